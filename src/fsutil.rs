//! File-system helpers: atomic writes (DESIGN.md §3: temporary name in the same folder,
//! fsync, rename) and a safetensors writer built on them, so that a crash never leaves a
//! half-written checkpoint or prepared model under its final name.

use crate::backend::DType;
use crate::error::{Error, Result};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Largest safetensors header lema writes or reads, as the safetensors crate allows.
pub const MAX_HEADER_SIZE: usize = 100_000_000;

/// Removes the temporary file on drop unless disarmed (errors and panics alike).
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Write `path` atomically: `write` fills `.<file>.tmp-<pid>` in the same folder, which is
/// flushed, synced and renamed over `path`; then the folder is synced (Unix only). On any
/// error before the rename, the temporary file is removed and `path` is untouched; an
/// error after it (syncing the folder) means the new file is in place but may not yet
/// survive a power loss. Two concurrent writers of one path in one process would share
/// the temporary name; callers serialise such writes.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let Some(file_name) = path.file_name() else {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        ));
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);

    let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut guard = TempGuard {
        path: tmp,
        armed: true,
    };
    let mut w = BufWriter::new(file);
    write(&mut w).map_err(|e| Error::io(path, e))?;
    let file = w
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))?;
    drop(file);
    std::fs::rename(&guard.path, path).map_err(|e| Error::io(path, e))?;
    guard.armed = false;
    sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// Make a rename in `dir` durable. Filesystems that cannot sync a folder say so with
/// `InvalidInput`/`Unsupported`; that is not an error worth failing a write for.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match File::open(dir).and_then(|d| d.sync_all()) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Folders cannot be synced portably outside Unix; the rename itself is atomic.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    Ok(())
}

/// One tensor to write: its name, element type, shape and little-endian bytes.
#[derive(Clone, Debug)]
pub struct TensorOut<'a> {
    /// Header name (unique in the file; `__metadata__` is reserved).
    pub name: String,
    /// Element type of `data`.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes, `product(shape) × dtype size` of them; borrowed or owned.
    pub data: Cow<'a, [u8]>,
}

/// Rank of a dtype in the safetensors crate's write order: larger alignment first.
fn align_rank(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::BF16 => 1,
        DType::F16 => 2,
    }
}

/// The padded header JSON and the order in which the tensors' data follow it. Laid out as
/// the safetensors crate does (descending dtype alignment, then name; spaces pad the
/// header to a multiple of 8), so that every tensor stays aligned to its element size.
fn safetensors_header(
    path: &Path,
    tensors: &[TensorOut],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&tensors[a], &tensors[b]);
        (align_rank(a.dtype), &a.name).cmp(&(align_rank(b.dtype), &b.name))
    });
    let json_str = |s: &str| serde_json::Value::from(s).to_string();

    let mut entries = Vec::with_capacity(tensors.len() + 1);
    if !metadata.is_empty() {
        let items: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v)))
            .collect();
        entries.push(format!("\"__metadata__\":{{{}}}", items.join(",")));
    }
    let mut offset = 0usize;
    let mut seen = std::collections::HashSet::with_capacity(tensors.len());
    for &i in &order {
        let t = &tensors[i];
        if t.name == "__metadata__" {
            return Err(Error::tensor(
                path,
                &t.name,
                "this name is reserved by safetensors",
            ));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(Error::tensor(path, &t.name, "appears more than once"));
        }
        let want = t
            .shape
            .iter()
            .try_fold(t.dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::tensor(path, &t.name, format!("shape {:?} is too large", t.shape))
            })?;
        if t.data.len() != want {
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "has {} bytes of data, but shape {:?} of {} needs {want}",
                    t.data.len(),
                    t.shape,
                    t.dtype
                ),
            ));
        }
        let end = offset + want;
        let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        entries.push(format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            json_str(&t.name),
            t.dtype.safetensors_name(),
            shape.join(",")
        ));
        offset = end;
    }
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() > MAX_HEADER_SIZE {
        return Err(Error::format(
            path,
            format!(
                "safetensors header would be {} bytes, more than the {MAX_HEADER_SIZE} allowed",
                header.len()
            ),
        ));
    }
    Ok((header, order))
}

/// Write `tensors` and `metadata` (the `__metadata__` map, omitted when empty) as one
/// safetensors file, atomically. Each tensor's data length must match its shape and dtype.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorOut],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let (header, order) = safetensors_header(path, tensors, metadata)?;
    atomic_write(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for &i in &order {
            w.write_all(&tensors[i].data)?;
        }
        Ok(())
    })
}

/// Little-endian bytes of f32 values, for [`TensorOut::data`].
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// f32 values from little-endian bytes; a trailing partial value (fewer than 4 bytes) is
/// ignored.
pub fn bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{Dtype, SafeTensors, tensor::TensorView};
    use std::collections::HashMap;

    /// Names of the entries of a folder, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Tensors of every supported dtype, with names that sort differently from the
    /// dtype order and odd element counts (so 2-byte data would misalign a later f32).
    fn sample_tensors() -> Vec<TensorOut<'static>> {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut bytes = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect()
        };
        vec![
            TensorOut {
                name: "a.half".into(),
                dtype: DType::F16,
                shape: vec![3],
                data: Cow::Owned(bytes(6)),
            },
            TensorOut {
                name: "b.bf".into(),
                dtype: DType::BF16,
                shape: vec![1, 5],
                data: Cow::Owned(bytes(10)),
            },
            TensorOut {
                name: "z.float".into(),
                dtype: DType::F32,
                shape: vec![2, 3],
                data: Cow::Owned(f32_bytes(&[1.0, -2.5, 3.25, 0.0, f32::MAX, 1e-30])),
            },
            TensorOut {
                name: "c.scalar".into(),
                dtype: DType::F32,
                shape: vec![],
                data: Cow::Owned(f32_bytes(&[7.0])),
            },
            TensorOut {
                name: "d.empty".into(),
                dtype: DType::F32,
                shape: vec![0, 4],
                data: Cow::Owned(vec![]),
            },
            TensorOut {
                name: "needs \"escaping\" ü".into(),
                dtype: DType::F16,
                shape: vec![2, 1],
                data: Cow::Owned(bytes(4)),
            },
        ]
    }

    fn st_dtype(d: DType) -> Dtype {
        match d {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
        }
    }

    #[test]
    fn atomic_write_creates_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.txt");
        atomic_write(&p, |w| w.write_all(b"first")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"first");
        atomic_write(&p, |w| w.write_all(b"second, longer")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
        assert_eq!(listing(dir.path()), vec!["out.txt"]);
    }

    #[test]
    fn atomic_write_error_leaves_original() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keep.bin");
        std::fs::write(&p, b"original").unwrap();
        let err = atomic_write(&p, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("keep.bin") && msg.contains("disk on fire"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"original");
        assert_eq!(listing(dir.path()), vec!["keep.bin"]);
    }

    #[test]
    fn atomic_write_panic_leaves_original() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keep.bin");
        std::fs::write(&p, b"original").unwrap();
        let r = std::panic::catch_unwind(|| {
            let _ = atomic_write(&p, |w| {
                w.write_all(b"partial")?;
                panic!("writer panicked");
            });
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"original");
        assert_eq!(listing(dir.path()), vec!["keep.bin"]);
    }

    #[test]
    fn atomic_write_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no such folder").join("f");
        let msg = atomic_write(&missing, |w| w.write_all(b"x"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("no such folder"), "{msg}");
        // The target is a folder: the rename fails and the temporary file is cleaned up.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("inside"), b"x").unwrap();
        let msg = atomic_write(&sub, |w| w.write_all(b"x"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("sub"), "{msg}");
        assert_eq!(listing(dir.path()), vec!["sub"]);
        assert!(atomic_write(Path::new("/"), |w| w.write_all(b"x")).is_err());
    }

    #[test]
    fn safetensors_matches_the_crate_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let tensors = sample_tensors();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors(&p, &tensors, &meta).unwrap();
        let ours = std::fs::read(&p).unwrap();

        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|t| {
                let v = TensorView::new(st_dtype(t.dtype), t.shape.clone(), &t.data).unwrap();
                (t.name.clone(), v)
            })
            .collect();
        let meta_hm: HashMap<String, String> = meta.clone().into_iter().collect();
        let theirs = safetensors::serialize(views, Some(meta_hm)).unwrap();
        assert_eq!(ours, theirs);

        // And the crate reads every tensor back as written.
        let st = SafeTensors::deserialize(&ours).unwrap();
        let (n, m) = SafeTensors::read_metadata(&ours).unwrap();
        assert_eq!(st.len(), tensors.len());
        for t in &tensors {
            let v = st.tensor(&t.name).unwrap();
            assert_eq!(v.dtype(), st_dtype(t.dtype), "{}", t.name);
            assert_eq!(v.shape(), t.shape.as_slice(), "{}", t.name);
            assert_eq!(v.data(), t.data.as_ref(), "{}", t.name);
            // Every tensor starts aligned to its element size within the data section.
            let start = m.info(&t.name).unwrap().data_offsets.0;
            assert_eq!(start % t.dtype.size(), 0, "{} misaligned", t.name);
        }
        assert_eq!(n % 8, 0);
        assert_eq!(m.metadata().as_ref().unwrap().get("format").unwrap(), "pt");
    }

    #[test]
    fn safetensors_without_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        write_safetensors(&p, &sample_tensors()[2..3], &BTreeMap::new()).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("__metadata__"));
        let (_, m) = SafeTensors::read_metadata(&bytes).unwrap();
        assert!(m.metadata().is_none());
        // No tensors at all is a valid (empty) file too.
        write_safetensors(&p, &[], &BTreeMap::new()).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(SafeTensors::deserialize(&bytes).unwrap().len(), 0);
    }

    #[test]
    fn safetensors_rejects_bad_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, b"untouched").unwrap();
        let none = BTreeMap::new();

        let mut t = sample_tensors();
        t[2].data = Cow::Owned(vec![0; 20]);
        let msg = write_safetensors(&p, &t, &none).unwrap_err().to_string();
        for part in [
            "bad.safetensors",
            "z.float",
            "20 bytes",
            "[2, 3]",
            "needs 24",
        ] {
            assert!(msg.contains(part), "{msg} lacks {part}");
        }

        let mut t = sample_tensors();
        t[1].name = "a.half".into(); // same name, different dtype
        let msg = write_safetensors(&p, &t, &none).unwrap_err().to_string();
        assert!(
            msg.contains("'a.half'") && msg.contains("more than once"),
            "{msg}"
        );

        let mut t = sample_tensors();
        t[0].name = "__metadata__".into();
        let msg = write_safetensors(&p, &t, &none).unwrap_err().to_string();
        assert!(msg.contains("reserved"), "{msg}");

        let mut t = sample_tensors();
        t[0].shape = vec![usize::MAX, 3];
        let msg = write_safetensors(&p, &t, &none).unwrap_err().to_string();
        assert!(msg.contains("too large"), "{msg}");

        assert_eq!(std::fs::read(&p).unwrap(), b"untouched");
        assert_eq!(listing(dir.path()), vec!["bad.safetensors"]);
    }

    #[test]
    fn f32_bytes_round_trip() {
        let v = [
            0.0f32,
            -0.0,
            1.5,
            -3.25e-20,
            f32::INFINITY,
            f32::MIN_POSITIVE,
        ];
        let b = f32_bytes(&v);
        assert_eq!(b.len(), 24);
        assert_eq!(&b[8..12], &1.5f32.to_le_bytes());
        let back = bytes_to_f32(&b);
        assert_eq!(back.len(), v.len());
        for (x, y) in v.iter().zip(&back) {
            assert_eq!(x.to_bits(), y.to_bits());
        }
        assert_eq!(bytes_to_f32(&b[..7]), vec![0.0]);
    }
}
