//! A streaming, atomic writer of `.safetensors` files.
//!
//! The caller declares every tensor (name, dtype, shape) up front, so the header can be
//! written first; the data then follows one tensor at a time, in declaration order, and
//! never has to be held in memory all at once. The file is written under a temporary
//! name in the destination folder, fsynced and renamed into place by [`finish`]; a writer
//! dropped before that removes its temporary file, so a reader never sees half a model.
//!
//! (A stand-in until the shared `fsutil` module lands; the format is the safetensors
//! spec: u64 header length, JSON header padded with spaces to a multiple of 8, data.)
//!
//! [`finish`]: SafetensorsWriter::finish

use crate::backend::DType;
use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One tensor to be written: name, element type, shape (row-major).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name in the header.
    pub name: String,
    /// Element type of the data.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Size of the tensor's data in bytes, or `None` on overflow.
    pub fn n_bytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size() as u64, |acc, &d| {
                acc.checked_mul(d as u64)
            })
    }
}

/// Writes a safetensors file tensor by tensor; see the module documentation.
pub struct SafetensorsWriter {
    path: PathBuf,
    tmp: Option<PathBuf>,
    out: BufWriter<File>,
    specs: Vec<TensorSpec>,
    sizes: Vec<u64>,
    /// Index of the tensor being written and bytes of it written so far.
    current: usize,
    written_in_current: u64,
    total_bytes: u64,
}

/// A temporary path beside `path` (same folder, so the final rename is atomic).
pub(crate) fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let unique = format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    path.with_file_name(unique)
}

/// Fsync the folder holding `path`, so that a rename into it is durable.
fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = File::open(parent).map_err(|e| Error::io(parent, e))?;
    dir.sync_all().map_err(|e| Error::io(parent, e))
}

/// Write `bytes` to `path` atomically: temporary file in the same folder, fsync, rename.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path_for(path);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_parent(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl SafetensorsWriter {
    /// Create the temporary file and write the header for `specs` (data follows in this
    /// order). `metadata` goes into the header's `__metadata__` entry.
    pub fn create(
        path: &Path,
        specs: Vec<TensorSpec>,
        metadata: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata)
                    .map_err(|e| Error::format(path, format!("metadata: {e}")))?,
            );
        }
        let mut sizes = Vec::with_capacity(specs.len());
        let mut offset = 0u64;
        for s in &specs {
            if s.name == "__metadata__" {
                return Err(Error::tensor(path, &s.name, "reserved tensor name"));
            }
            let n = s.n_bytes().ok_or_else(|| {
                Error::tensor(path, &s.name, format!("shape {:?} overflows", s.shape))
            })?;
            let end = offset
                .checked_add(n)
                .ok_or_else(|| Error::tensor(path, &s.name, "file size overflows"))?;
            let entry = serde_json::json!({
                "dtype": s.dtype.safetensors_name(),
                "shape": s.shape,
                "data_offsets": [offset, end],
            });
            if header.insert(s.name.clone(), entry).is_some() {
                return Err(Error::tensor(path, &s.name, "tensor declared twice"));
            }
            sizes.push(n);
            offset = end;
        }
        let mut json =
            serde_json::to_vec(&header).map_err(|e| Error::format(path, format!("header: {e}")))?;
        // Pad with spaces so that the data starts 8-byte aligned.
        while (json.len() + 8) % 8 != 0 {
            json.push(b' ');
        }

        let tmp = temp_path_for(path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        // From here on, Drop removes the temporary file if anything fails.
        let mut writer = Self {
            path: path.to_path_buf(),
            tmp: Some(tmp.clone()),
            out: BufWriter::with_capacity(1 << 20, file),
            specs,
            sizes,
            current: 0,
            written_in_current: 0,
            total_bytes: offset,
        };
        writer
            .out
            .write_all(&(json.len() as u64).to_le_bytes())
            .and_then(|()| writer.out.write_all(&json))
            .map_err(|e| Error::io(&tmp, e))?;
        writer.skip_empty();
        Ok(writer)
    }

    /// The declared tensors, in write order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// Total size of the data section in bytes.
    pub fn data_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The tensor whose bytes are expected next, if any.
    pub fn next_tensor(&self) -> Option<&TensorSpec> {
        self.specs.get(self.current)
    }

    fn skip_empty(&mut self) {
        while self.sizes.get(self.current) == Some(&0) {
            self.current += 1;
        }
    }

    /// Append bytes of the current tensor. A tensor may be written in any number of
    /// pieces; a piece may not run past the end of the current tensor.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.tmp.clone().unwrap_or_else(|| self.path.clone());
        let (spec, size) = match (self.specs.get(self.current), self.sizes.get(self.current)) {
            (Some(s), Some(&n)) => (s, n),
            _ => {
                return Err(Error::tensor(
                    &self.path,
                    name,
                    "all declared tensors are already written",
                ));
            }
        };
        if spec.name != name {
            return Err(Error::tensor(
                &self.path,
                name,
                format!("written out of order; expected '{}' next", spec.name),
            ));
        }
        let after = self.written_in_current + bytes.len() as u64;
        if after > size {
            return Err(Error::tensor(
                &self.path,
                name,
                format!("{after} bytes written, but the tensor has {size}"),
            ));
        }
        self.out.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        self.written_in_current = after;
        if after == size {
            self.current += 1;
            self.written_in_current = 0;
            self.skip_empty();
        }
        Ok(())
    }

    /// Check that every tensor was written in full, fsync, and rename into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        if let Some(spec) = self.specs.get(self.current) {
            return Err(Error::tensor(
                &self.path,
                &spec.name,
                "not written (the file would be incomplete)",
            ));
        }
        let tmp = self.tmp.clone().unwrap_or_else(|| self.path.clone());
        self.out.flush().map_err(|e| Error::io(&tmp, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        self.tmp = None;
        sync_parent(&self.path)?;
        Ok(self.path.clone())
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_file_loads_with_the_safetensors_crate() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("m.safetensors");
        let specs = vec![
            TensorSpec {
                name: "b".into(),
                dtype: DType::F32,
                shape: vec![2, 3],
            },
            TensorSpec {
                name: "a".into(),
                dtype: DType::BF16,
                shape: vec![3],
            },
            TensorSpec {
                name: "empty".into(),
                dtype: DType::F16,
                shape: vec![0, 4],
            },
        ];
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let mut w = SafetensorsWriter::create(&path, specs, &meta)?;
        let b: Vec<u8> = (0..6)
            .flat_map(|i| (i as f32 * 1.5).to_le_bytes())
            .collect();
        w.write("b", &b[..10])?;
        w.write("b", &b[10..])?;
        let a: Vec<u8> = [1.0f32, -2.0, 0.5]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        assert!(
            w.write("b", &a).is_err(),
            "writing past the declared tensors must fail"
        );
        w.write("a", &a)?;
        w.finish()?;

        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(&path, e.to_string()))?;
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::format(&path, e.to_string()))?;
        assert_eq!(
            md.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
        let tb = st
            .tensor("b")
            .map_err(|e| Error::format(&path, e.to_string()))?;
        assert_eq!(tb.shape(), &[2, 3]);
        assert_eq!(tb.data(), &b[..]);
        let ta = st
            .tensor("a")
            .map_err(|e| Error::format(&path, e.to_string()))?;
        assert_eq!(ta.dtype(), safetensors::Dtype::BF16);
        assert_eq!(ta.data(), &a[..]);
        let te = st
            .tensor("empty")
            .map_err(|e| Error::format(&path, e.to_string()))?;
        assert_eq!(te.shape(), &[0, 4]);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .map_err(|e| Error::io(dir.path(), e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        Ok(())
    }

    #[test]
    fn unfinished_writer_leaves_nothing() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("m.safetensors");
        let specs = vec![TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![4],
        }];
        let mut w = SafetensorsWriter::create(&path, specs, &Default::default())?;
        w.write("x", &[0u8; 8])?;
        let err = w.finish();
        assert!(err.is_err());
        assert_eq!(
            std::fs::read_dir(dir.path())
                .map_err(|e| Error::io(dir.path(), e))?
                .count(),
            0
        );
        Ok(())
    }
}
