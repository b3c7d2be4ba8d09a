//! File-system helpers: atomic writes (ARCHITECTURE.md §7: temporary name in the same
//! folder, fsync, rename) and the one safetensors writer built on them, so that a crash or
//! Ctrl-C never leaves a half-written checkpoint or prepared model under its final name.
//!
//! [`AtomicFile`] is the single atomic write path; [`atomic_write`] wraps it for a
//! closure. [`SafetensorsWriter`] streams a safetensors file tensor by tensor into an
//! `AtomicFile` (`lema prepare`, `merge`, `bench`); [`write_safetensors`] is the
//! in-memory convenience on top of it (adapters, checkpoints), laying the tensors out in
//! the safetensors crate's order so its files match that crate's byte for byte.

use crate::error::{Error, Result};
use crate::types::DType;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest safetensors header lema writes or reads, as the safetensors crate allows.
pub const MAX_HEADER_SIZE: usize = 100_000_000;

/// Buffer size of an [`AtomicFile`]; large tensors are passed through unbuffered anyway.
const WRITE_BUFFER: usize = 1 << 20;

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

/// A file written under a temporary name beside its destination and renamed into place
/// by [`AtomicFile::commit`]. Dropped without a commit (an error, a panic), it removes
/// its temporary file and leaves the destination untouched; a process killed meanwhile
/// (Ctrl-C, a crash) leaves at most a `.<file>.tmp-*` file, never a partial destination.
pub struct AtomicFile {
    path: PathBuf,
    dir: PathBuf,
    // Declared before `guard` so that the file is closed before it is removed.
    out: BufWriter<File>,
    guard: TempGuard,
}

impl AtomicFile {
    /// Create `.<file>.tmp-<pid>-<n>` in the folder of `path` (`n` counts the files this
    /// process has created, so concurrent writers never share a temporary file).
    pub fn create(path: &Path) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
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
        tmp_name.push(format!(
            ".tmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let tmp = dir.join(tmp_name);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            out: BufWriter::with_capacity(WRITE_BUFFER, file),
            guard: TempGuard {
                path: tmp,
                armed: true,
            },
        })
    }

    /// The destination path (what error messages name).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `bytes`; an error names the destination path.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Flush, fsync, rename over the destination, then sync the folder (Unix only). An
    /// error before the rename removes the temporary file and leaves the destination
    /// untouched; an error after it (syncing the folder) means the new file is in place
    /// but may not yet survive a power loss.
    pub fn commit(self) -> Result<()> {
        let Self {
            path,
            dir,
            out,
            mut guard,
        } = self;
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        drop(file);
        std::fs::rename(&guard.path, &path).map_err(|e| Error::io(&path, e))?;
        guard.armed = false;
        sync_dir(&dir).map_err(|e| Error::io(&dir, e))
    }
}

/// Write `path` atomically through an [`AtomicFile`]: `write` fills the temporary file,
/// which is then committed. On any error (or panic) in `write` the temporary file is
/// removed and `path` is untouched.
pub fn atomic_write(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    write(&mut file.out).map_err(|e| Error::io(path, e))?;
    file.commit()
}

/// `bytes` without a leading UTF-8 byte order mark (some Windows editors start every
/// text file with one; JSON, TOML and JSONL parsers refuse it).
pub fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes)
}

/// The UTF-8 byte order mark, which some editors write at the start of a text file.
pub const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Return the heap's free pages to the OS (glibc's `malloc_trim`, which also releases
/// free pages inside every thread's arena). Called between the batches of a long load,
/// whose short-lived buffers would otherwise stay resident. A no-op elsewhere.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A text file's contents, without a leading UTF-8 byte order mark; the error names the
/// file.
pub fn read_text(path: &Path) -> Result<String> {
    let mut text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Write `bytes` to `path` atomically (see [`atomic_write`]).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write(path, |w| w.write_all(bytes))
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

/// One tensor to be written by a [`SafetensorsWriter`]: name, element type, shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Header name (unique in the file; `__metadata__` is reserved).
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

/// The padded header JSON of a safetensors file whose data holds `specs` in this order,
/// and each tensor's size in bytes. `__metadata__` (omitted when empty) comes first, then
/// the tensors in data order; spaces pad the header to a multiple of 8 bytes so that the
/// data section starts 8-byte aligned.
fn safetensors_header(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<u64>)> {
    let json_str = |s: &str| serde_json::Value::from(s).to_string();

    let mut entries = Vec::with_capacity(specs.len() + 1);
    if !metadata.is_empty() {
        let items: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v)))
            .collect();
        entries.push(format!("\"__metadata__\":{{{}}}", items.join(",")));
    }
    let mut sizes = Vec::with_capacity(specs.len());
    let mut offset = 0u64;
    let mut seen = std::collections::HashSet::with_capacity(specs.len());
    for s in specs {
        if s.name == "__metadata__" {
            return Err(Error::tensor(
                path,
                &s.name,
                "this name is reserved by safetensors",
            ));
        }
        if !seen.insert(s.name.as_str()) {
            return Err(Error::tensor(path, &s.name, "appears more than once"));
        }
        let n = s.n_bytes().ok_or_else(|| {
            Error::tensor(path, &s.name, format!("shape {:?} is too large", s.shape))
        })?;
        let end = offset.checked_add(n).ok_or_else(|| {
            Error::tensor(
                path,
                &s.name,
                "the file would be too large (size overflows)",
            )
        })?;
        let shape: Vec<String> = s.shape.iter().map(usize::to_string).collect();
        entries.push(format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            json_str(&s.name),
            s.dtype.safetensors_name(),
            shape.join(",")
        ));
        sizes.push(n);
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
    Ok((header, sizes))
}

/// Writes a safetensors file tensor by tensor, atomically.
///
/// The caller declares every tensor (name, dtype, shape) up front, so the header can be
/// written first; the data then follows one tensor at a time, in declaration order, and
/// never has to be held in memory all at once. The file goes through an [`AtomicFile`]:
/// [`finish`](Self::finish) checks that every tensor was written in full and renames it
/// into place; a writer dropped before that removes its temporary file.
pub struct SafetensorsWriter {
    file: AtomicFile,
    specs: Vec<TensorSpec>,
    sizes: Vec<u64>,
    /// Index of the tensor being written and bytes of it written so far.
    current: usize,
    written_in_current: u64,
    total_bytes: u64,
}

impl SafetensorsWriter {
    /// Create the temporary file and write the header for `specs` (data follows in this
    /// order). `metadata` goes into the header's `__metadata__` entry (omitted when empty).
    pub fn create(
        path: &Path,
        specs: Vec<TensorSpec>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let (header, sizes) = safetensors_header(path, &specs, metadata)?;
        let total_bytes = sizes.iter().sum();
        let mut file = AtomicFile::create(path)?;
        file.write_all(&(header.len() as u64).to_le_bytes())?;
        file.write_all(&header)?;
        let mut writer = Self {
            file,
            specs,
            sizes,
            current: 0,
            written_in_current: 0,
            total_bytes,
        };
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
        let path = self.file.path();
        let (spec, size) = match (self.specs.get(self.current), self.sizes.get(self.current)) {
            (Some(s), Some(&n)) => (s, n),
            _ => {
                return Err(Error::tensor(
                    path,
                    name,
                    "all declared tensors are already written",
                ));
            }
        };
        if spec.name != name {
            return Err(Error::tensor(
                path,
                name,
                format!("written out of order; expected '{}' next", spec.name),
            ));
        }
        let after = self.written_in_current + bytes.len() as u64;
        if after > size {
            return Err(Error::tensor(
                path,
                name,
                format!("{after} bytes written, but the tensor has {size}"),
            ));
        }
        self.file.write_all(bytes)?;
        self.written_in_current = after;
        if after == size {
            self.current += 1;
            self.written_in_current = 0;
            self.skip_empty();
        }
        Ok(())
    }

    /// Check that every tensor was written in full, then commit the file (fsync, rename
    /// into place). Returns the final path.
    pub fn finish(self) -> Result<PathBuf> {
        if let Some(spec) = self.specs.get(self.current) {
            return Err(Error::tensor(
                self.file.path(),
                &spec.name,
                "not written (the file would be incomplete)",
            ));
        }
        let path = self.file.path().to_path_buf();
        self.file.commit()?;
        Ok(path)
    }
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
        DType::U8 | DType::F8E4M3 => 3,
    }
}

/// Write `tensors` and `metadata` (the `__metadata__` map, omitted when empty) as one
/// safetensors file, atomically, through a [`SafetensorsWriter`]. Each tensor's data
/// length must match its shape and dtype. The tensors are laid out as the safetensors
/// crate does (descending dtype alignment, then name), so that every tensor stays aligned
/// to its element size and the file matches that crate's output byte for byte.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorOut],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut order: Vec<&TensorOut> = tensors.iter().collect();
    order.sort_by(|a, b| (align_rank(a.dtype), &a.name).cmp(&(align_rank(b.dtype), &b.name)));
    let mut specs = Vec::with_capacity(order.len());
    for t in &order {
        let spec = TensorSpec {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        };
        // An overflowing shape is reported by the header builder.
        if let Some(want) = spec.n_bytes()
            && t.data.len() as u64 != want
        {
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
        specs.push(spec);
    }
    let mut w = SafetensorsWriter::create(path, specs, metadata)?;
    // Empty tensors have no bytes to write; the writer skips them by itself.
    for t in order.iter().filter(|t| !t.data.is_empty()) {
        w.write(&t.name, &t.data)?;
    }
    w.finish().map(drop)
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

/// FNV-1a, 64 bits, fed in pieces: a cheap hash, stable across platforms and versions,
/// to tell whether bytes changed (not for security). What the data and model
/// fingerprints and the kernel cache names use.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv1a {
    /// The FNV offset basis.
    pub fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
    /// Hash `bytes` in after what came before.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// FNV-1a, 64 bits, of `bytes` at once.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = Fnv1a::new();
    h.update(bytes);
    h.finish()
}

/// What a temporary name left in a folder was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemporaryKind {
    /// `.<name>.tmp-<pid>[-<n>]`: a file ([`AtomicFile`]) or folder
    /// ([`write_dir_atomically`](crate::checkpoint::write_dir_atomically)) being written.
    Partial,
    /// `.<name>.old-<pid>`: the previous version of a folder being replaced.
    Previous,
}

/// Parse a temporary name made by [`AtomicFile`] or `write_dir_atomically`: the final
/// name, the kind and the writing process's id. Other names give `None`.
pub fn parse_temporary(file_name: &str) -> Option<(&str, TemporaryKind, u32)> {
    let rest = file_name.strip_prefix('.')?;
    let (name, kind, suffix) = [
        (".tmp-", TemporaryKind::Partial),
        (".old-", TemporaryKind::Previous),
    ]
    .into_iter()
    .find_map(|(mark, kind)| {
        let (name, suffix) = rest.rsplit_once(mark)?;
        Some((name, kind, suffix))
    })?;
    let mut parts = suffix.split('-');
    let pid = parts.next()?.parse().ok()?;
    let counter_ok = match (kind, parts.next(), parts.next()) {
        (_, None, None) => true,
        (TemporaryKind::Partial, Some(n), None) => {
            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        }
        _ => false,
    };
    (!name.is_empty() && counter_ok).then_some((name, kind, pid))
}

/// Whether a process with this id exists (on Unix; elsewhere every process is assumed
/// alive, so that nothing of a running writer is ever removed).
pub fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // signal 0 checks that the process exists without signalling it
        // SAFETY: kill with signal 0 has no effect beyond the check.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Remove the temporary files and folders that writers killed mid-write (`kill -9`, a
/// power loss) left in `dir`: those of processes that no longer run. A `.<name>.old-<pid>`
/// folder whose `<name>` is missing (a kill between the two renames of a folder
/// replacement) is renamed back, so the previous complete version is kept. Temporaries
/// of this process and of running ones are left alone. Returns one line per entry, for
/// the user.
pub fn clean_stale_temporaries(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let me = std::process::id();
    let mut report = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let file_name = entry.file_name();
        let Some((name, kind, pid)) = file_name.to_str().and_then(parse_temporary) else {
            continue;
        };
        let path = entry.path();
        if pid == me {
            continue;
        }
        if process_alive(pid) {
            report.push(format!(
                "left {} alone: process {pid}, which wrote it, is still running",
                path.display()
            ));
            continue;
        }
        let target = dir.join(name);
        if kind == TemporaryKind::Previous && !target.exists() {
            std::fs::rename(&path, &target).map_err(|e| Error::io(&path, e))?;
            report.push(format!(
                "restored {} from {} (process {pid} was killed while replacing it)",
                target.display(),
                path.display()
            ));
            continue;
        }
        let is_dir = entry.file_type().map_err(|e| Error::io(&path, e))?.is_dir();
        if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .map_err(|e| Error::io(&path, e))?;
        report.push(format!(
            "removed {}, left by process {pid} (no longer running) while writing {name}",
            path.display()
        ));
    }
    report.sort();
    Ok(report)
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
        d.into()
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

    /// The specs of `tensors` in the order `write_safetensors` lays them out.
    fn crate_order<'a>(tensors: &'a [TensorOut<'a>]) -> Vec<&'a TensorOut<'a>> {
        let mut order: Vec<&TensorOut> = tensors.iter().collect();
        order.sort_by(|a, b| (align_rank(a.dtype), &a.name).cmp(&(align_rank(b.dtype), &b.name)));
        order
    }

    #[test]
    fn streaming_and_in_memory_writers_are_byte_identical() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = sample_tensors();
        for meta in [
            BTreeMap::new(),
            BTreeMap::from([
                ("format".to_string(), "pt".to_string()),
                ("note".to_string(), "\"quoted\" ü\n".to_string()),
            ]),
        ] {
            let a = dir.path().join("in_memory.safetensors");
            write_safetensors(&a, &tensors, &meta).unwrap();

            let b = dir.path().join("streamed.safetensors");
            let order = crate_order(&tensors);
            let specs = order
                .iter()
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                })
                .collect();
            let mut w = SafetensorsWriter::create(&b, specs, &meta).unwrap();
            assert_eq!(
                w.data_bytes(),
                tensors.iter().map(|t| t.data.len() as u64).sum::<u64>()
            );
            for t in &order {
                // In uneven pieces, as the importers write.
                for piece in t.data.chunks(3) {
                    w.write(&t.name, piece).unwrap();
                }
            }
            assert!(w.next_tensor().is_none());
            assert_eq!(w.finish().unwrap(), b);

            let (a, b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
            assert_eq!(a, b, "metadata {meta:?}");
        }
        assert_eq!(
            listing(dir.path()),
            vec!["in_memory.safetensors", "streamed.safetensors"]
        );
    }

    #[test]
    fn streamed_file_loads_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        // Declaration order is data order, whatever the names and dtypes.
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
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut w = SafetensorsWriter::create(&path, specs, &meta).unwrap();
        let b = f32_bytes(&[0.0, 1.5, 3.0, 4.5, 6.0, 7.5]);
        w.write("b", &b[..10]).unwrap();
        let msg = w.write("a", &[0; 2]).unwrap_err().to_string();
        assert!(msg.contains("out of order") && msg.contains("'b'"), "{msg}");
        w.write("b", &b[10..]).unwrap();
        let a: Vec<u8> = [1.0f32, -2.0, 0.5]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let msg = w.write("a", &[0; 8]).unwrap_err().to_string();
        assert!(
            msg.contains("8 bytes written") && msg.contains("has 6"),
            "{msg}"
        );
        w.write("a", &a).unwrap();
        let msg = w.write("b", &a).unwrap_err().to_string();
        assert!(msg.contains("already written"), "{msg}");
        w.finish().unwrap();

        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(md.metadata().as_ref().unwrap().get("format").unwrap(), "pt");
        let tb = st.tensor("b").unwrap();
        assert_eq!(tb.shape(), &[2, 3]);
        assert_eq!(tb.data(), &b[..]);
        let ta = st.tensor("a").unwrap();
        assert_eq!(ta.dtype(), Dtype::BF16);
        assert_eq!(ta.data(), &a[..]);
        assert_eq!(st.tensor("empty").unwrap().shape(), &[0, 4]);
        assert_eq!(listing(dir.path()), vec!["m.safetensors"]);
    }

    #[test]
    fn unfinished_or_dropped_writer_leaves_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, b"original").unwrap();
        let specs = vec![TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![4],
        }];
        let mut w = SafetensorsWriter::create(&path, specs.clone(), &BTreeMap::new()).unwrap();
        w.write("x", &[0u8; 8]).unwrap();
        let msg = w.finish().unwrap_err().to_string();
        assert!(
            msg.contains("m.safetensors") && msg.contains("incomplete"),
            "{msg}"
        );
        assert_eq!(listing(dir.path()), vec!["m.safetensors"]);

        let mut w = SafetensorsWriter::create(&path, specs, &BTreeMap::new()).unwrap();
        w.write("x", &[0u8; 16]).unwrap();
        drop(w); // never finished: as if an error had unwound past it
        assert_eq!(std::fs::read(&path).unwrap(), b"original");
        assert_eq!(listing(dir.path()), vec!["m.safetensors"]);
    }

    #[test]
    fn temporary_names_are_recognised() {
        use TemporaryKind::*;
        assert_eq!(
            parse_temporary(".checkpoint-4.tmp-123"),
            Some(("checkpoint-4", Partial, 123))
        );
        assert_eq!(
            parse_temporary(".model.safetensors.tmp-77-3"),
            Some(("model.safetensors", Partial, 77))
        );
        assert_eq!(
            parse_temporary(".adapter.old-9"),
            Some(("adapter", Previous, 9))
        );
        for not_ours in [
            "checkpoint-4.tmp-1",
            ".tmp-1",
            ".x.tmp-",
            ".x.tmp-12a",
            ".x.tmp-1-",
            ".x.old-1-2",
            ".x.tmp-1-2-3",
            ".lema.lock",
        ] {
            assert_eq!(parse_temporary(not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn stale_temporaries_are_removed_or_restored_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        let me = std::process::id();
        std::fs::create_dir(d.path().join(format!(".checkpoint-2.tmp-{dead}"))).unwrap();
        std::fs::write(d.path().join(format!(".config.toml.tmp-{dead}-0")), b"x").unwrap();
        std::fs::create_dir(d.path().join(format!(".adapter.old-{dead}"))).unwrap();
        std::fs::write(d.path().join(format!(".adapter.old-{dead}/a")), b"old").unwrap();
        std::fs::write(d.path().join(format!(".metrics.jsonl.tmp-{me}-5")), b"mine").unwrap();
        std::fs::write(d.path().join("user.txt"), b"keep").unwrap();
        let report = clean_stale_temporaries(d.path()).unwrap();
        assert_eq!(report.len(), 3, "{report:?}");
        assert!(
            report
                .iter()
                .any(|l| l.starts_with("restored") && l.contains("adapter"))
        );
        assert_eq!(
            listing(d.path()),
            vec![
                format!(".metrics.jsonl.tmp-{me}-5"),
                "adapter".into(),
                "user.txt".into()
            ]
        );
        assert_eq!(std::fs::read(d.path().join("adapter/a")).unwrap(), b"old");
    }

    /// The id of a process that has exited.
    fn dead_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(!process_alive(pid));
        pid
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
