//! The model file as a file: what a path given as a model is ([`classify`]), the weights
//! file it names ([`weights_file`]), a content fingerprint that is cheap on a 100 GB file
//! ([`content_fingerprint`]), how to tell that the file changed while it is mapped
//! ([`Stamp`]), and a SIGBUS backstop that names the file when a mapped one is truncated
//! under the process ([`install_fault_handler`]).
//!
//! Every command that takes a model goes through [`classify`], so a GGUF, a PyTorch
//! pickle, a folder to prepare or a FIFO gets the same message wherever it is given, and
//! nothing is opened before its kind is known (opening a FIFO for reading blocks).

use crate::error::{Error, Result};
use crate::fsutil::{Fnv1a, MAX_HEADER_SIZE};
use std::fs::File;
use std::path::{Path, PathBuf};

/// What a path given as a model is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Nothing is there.
    Missing,
    /// A folder; `prepared` when it holds a `model.safetensors` (what `lema prepare`
    /// writes), else a folder to prepare (e.g. a Hugging Face download).
    Folder { prepared: bool },
    /// A regular file that starts like safetensors (header size, then `{`).
    Safetensors,
    /// A llama.cpp GGUF file.
    Gguf,
    /// A PyTorch pickle checkpoint: `zip` is Some(true) for the zip archive of
    /// `torch.save`, Some(false) for the legacy pickle, None for a file of unknown
    /// contents named like a pickle (`.bin`, `.pt`, `.pth`, `.ckpt`).
    Pickle { zip: Option<bool> },
    /// Not a regular file: what it is (a FIFO, a socket, a device).
    NotRegular(&'static str),
    /// A regular file of another kind (or a damaged safetensors file: its parser says
    /// what is wrong).
    Other,
}

/// Bytes read from the start of a regular file to classify it.
const MAGIC_BYTES: usize = 9;

/// What `path` is, judged from its metadata (symlinks followed) and, for a regular file,
/// its first bytes. A non-regular file is never opened.
pub fn classify(path: &Path) -> Result<Kind> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Kind::Missing),
        Err(e) => return Err(Error::io(path, e)),
    };
    if meta.is_dir() {
        return Ok(Kind::Folder {
            prepared: path.join("model.safetensors").is_file(),
        });
    }
    if !meta.is_file() {
        return Ok(Kind::NotRegular(non_regular_kind(&meta)));
    }
    let mut head = [0u8; MAGIC_BYTES];
    let n = read_prefix(path, &mut head)?;
    Ok(match kind_of_prefix(&head[..n]) {
        Kind::Other
            if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| crate::import::hf::PICKLE_EXTENSIONS.contains(&e)) =>
        {
            Kind::Pickle { zip: None }
        }
        kind => kind,
    })
}

/// Classify a regular file from its first bytes.
fn kind_of_prefix(head: &[u8]) -> Kind {
    if head.starts_with(crate::import::gguf::GGUF_MAGIC) {
        return Kind::Gguf;
    }
    if let Some((size, rest)) = head.split_first_chunk::<8>() {
        let size = u64::from_le_bytes(*size);
        if rest.first() == Some(&b'{') && size <= MAX_HEADER_SIZE as u64 {
            return Kind::Safetensors;
        }
    }
    if head.starts_with(b"PK\x03\x04") {
        return Kind::Pickle { zip: Some(true) };
    }
    // pickle protocol 2..5 opens with PROTO (0x80) and its number
    if let [0x80, 2..=5, ..] = head {
        return Kind::Pickle { zip: Some(false) };
    }
    Kind::Other
}

fn read_prefix(path: &Path, buf: &mut [u8]) -> Result<usize> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(n)
}

#[cfg(unix)]
fn non_regular_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn non_regular_kind(_meta: &std::fs::Metadata) -> &'static str {
    "not a regular file"
}

/// What to give instead, for messages.
const WHAT_A_MODEL_IS: &str =
    "a .safetensors file made by `lema prepare`, or the folder that holds its model.safetensors";

/// The error for a path of kind `kind` where a prepared model is wanted, or None when the
/// kind is one (a safetensors file, a prepared folder) or may be one (`Other`: the
/// safetensors parser says what is wrong with it).
pub fn refusal(path: &Path, kind: Kind) -> Option<Error> {
    let p = path.display();
    let msg = match kind {
        Kind::Safetensors | Kind::Other | Kind::Folder { prepared: true } => return None,
        Kind::Missing => format!("no such model ({WHAT_A_MODEL_IS})"),
        Kind::Folder { prepared: false } => format!(
            "no such model: the folder has no model.safetensors; if it is a Hugging Face model \
             folder, convert it once with `lema prepare {p} --out DIR` and give DIR \
             ({WHAT_A_MODEL_IS})"
        ),
        Kind::Gguf => format!(
            "this is a GGUF file; lema trains and runs on the safetensors file that `lema \
             prepare` makes from it (with config.json and the tokenizer beside it): run `lema \
             prepare {p} --out DIR` once and give DIR as the model"
        ),
        Kind::Pickle { zip } => return Some(crate::import::hf::pickle_refusal(path, zip)),
        Kind::NotRegular(what) => {
            format!("is {what}, not a model file; give {WHAT_A_MODEL_IS}")
        }
    };
    Some(Error::format(path, msg))
}

/// The prepared weights file that `model` names: the path itself, or `model.safetensors`
/// in the folder it names; anything else (missing, a GGUF, a pickle, a folder still to
/// prepare, a FIFO) is refused with what to do instead.
pub fn weights_file(model: &Path) -> Result<PathBuf> {
    let file = match classify(model)? {
        Kind::Folder { prepared: true } => model.join("model.safetensors"),
        kind => {
            if let Some(e) = refusal(model, kind) {
                return Err(e);
            }
            return Ok(model.to_path_buf());
        }
    };
    match refusal(&file, classify(&file)?) {
        Some(e) => Err(e),
        None => Ok(file),
    }
}

/// Pages sampled by [`content_fingerprint`], spread evenly over the data section.
pub const FINGERPRINT_PAGES: u64 = 256;
/// Size of one sampled page.
pub const FINGERPRINT_PAGE: u64 = 4096;
/// The scheme's name, the first word of every fingerprint.
const FINGERPRINT_SCHEME: &str = "sampled-fnv1a-v1";

/// A fingerprint of the contents of the safetensors file open as `file` (at `path`, for
/// messages): FNV-1a over its length, its whole header (the 8-byte size and the JSON:
/// every tensor's name, dtype, shape and offsets, and the metadata) and
/// [`FINGERPRINT_PAGES`] pages of [`FINGERPRINT_PAGE`] bytes at evenly spaced offsets of
/// the data section. It reads about 1 MiB plus the header whatever the file's size, with
/// positioned reads (never through a mapping, so a file truncated meanwhile is an error,
/// not a fault). Another fine-tune of the same shape changes almost every page, so one
/// sample suffices; a change confined to a few small tensors can escape it.
pub fn content_fingerprint(file: &File, path: &Path) -> Result<String> {
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut size = [0u8; 8];
    read_at(file, path, &mut size, 0)?;
    let header = u64::from_le_bytes(size);
    let data_start = 8 + header;
    if header > MAX_HEADER_SIZE as u64 || data_start > len {
        return Err(Error::format(
            path,
            format!(
                "header size {header} does not fit the {len}-byte file; not a safetensors file"
            ),
        ));
    }
    let mut h = Fnv1a::new();
    h.update(&len.to_le_bytes());
    // the header, in pieces of at most 1 MiB
    let mut buf = vec![0u8; (1 << 20).min(data_start as usize)];
    let mut at = 0;
    while at < data_start {
        let n = buf.len().min((data_start - at) as usize);
        read_at(file, path, &mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    let data = len - data_start;
    if data > 0 {
        let span = data.saturating_sub(FINGERPRINT_PAGE);
        let mut page = vec![0u8; FINGERPRINT_PAGE.min(data) as usize];
        for k in 0..FINGERPRINT_PAGES {
            let off = data_start + span * k / (FINGERPRINT_PAGES - 1);
            read_at(file, path, &mut page, off)?;
            h.update(&off.to_le_bytes());
            h.update(&page);
        }
    }
    Ok(format!("{FINGERPRINT_SCHEME} {:016x}", h.finish()))
}

/// [`content_fingerprint`] of the file at `path`.
pub fn content_fingerprint_of(path: &Path) -> Result<String> {
    if let Some(e) = refusal(path, classify(path)?) {
        return Err(e);
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    content_fingerprint(&file, path)
}

#[cfg(unix)]
fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
        .map_err(|e| changed_or_io(path, e))
}

#[cfg(windows)]
fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    use std::os::windows::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match file.seek_read(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(changed_or_io(
                    path,
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Ok(n) => done += n,
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(())
}

fn changed_or_io(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::format(
            path,
            "the file became shorter while it was being read (truncated or rewritten meanwhile)",
        )
    } else {
        Error::io(path, e)
    }
}

/// What identifies an open file and its contents: size and modification time of the open
/// file, and its device and inode (to tell whether the path still names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    id: Option<(u64, u64)>,
}

/// How the file behind a [`Stamp`] stands now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileState {
    /// The path names the same, unmodified file.
    Unchanged,
    /// The open file is unmodified, but the path names another file now, or nothing (it
    /// was replaced by a rename, or deleted): the mapping stays valid and keeps the old
    /// bytes.
    Replaced,
    /// The open file itself was modified (truncated, extended or written in place): what
    /// changed.
    Modified(String),
}

impl Stamp {
    /// The stamp of an open file.
    pub fn of(file: &File, path: &Path) -> Result<Stamp> {
        let m = file.metadata().map_err(|e| Error::io(path, e))?;
        Ok(Stamp {
            len: m.len(),
            modified: m.modified().ok(),
            id: file_id(&m),
        })
    }

    /// The file's size when stamped.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file was empty when stamped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Compare `file` (opened as `path`) and `path` with this stamp: two `stat` calls.
    pub fn check(&self, file: &File, path: &Path) -> Result<FileState> {
        let now = Stamp::of(file, path)?;
        if now.len != self.len {
            return Ok(FileState::Modified(format!(
                "it was {} bytes when opened and is {} bytes now",
                self.len, now.len
            )));
        }
        if now.modified != self.modified {
            return Ok(FileState::Modified(
                "its modification time changed: it was written in place".into(),
            ));
        }
        let named = std::fs::metadata(path).ok().and_then(|m| file_id(&m));
        Ok(if self.id.is_some() && named != self.id {
            FileState::Replaced
        } else {
            FileState::Unchanged
        })
    }
}

#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_m: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// The error for a model file modified while it is in use.
pub fn modified_error(path: &Path, what: &str) -> Error {
    Error::format(
        path,
        format!(
            "the model file was modified while lema was reading it ({what}); its weights are \
             read layer by layer during the whole run, so they must not change meanwhile. \
             Restore the file and resume from the last checkpoint; to update a model that is \
             in use, write the new file elsewhere and rename it over the old one"
        ),
    )
}

/// The warning for a model file replaced (renamed over, or deleted) while it is in use.
pub fn replaced_warning(path: &Path) -> String {
    format!(
        "{}: the model file was replaced or removed while this run uses it; the run goes on \
         with the weights it opened (its checkpoints record their fingerprint), but resuming \
         later with the file now at this path will be refused if its weights differ",
        path.display()
    )
}

pub use fault::{install_fault_handler, register_mapping, unregister_mapping};

/// The SIGBUS backstop: a table of the live mappings of model files, written by
/// [`register_mapping`] and read (async-signal-safely) by the handler that
/// [`install_fault_handler`] installs. A fault inside a registered mapping — a mapped file
/// truncated under the process between the check before a layer read and the read
/// itself — prints a message naming the file and exits with status 1; any other SIGBUS
/// goes to the handler that was there before.
#[cfg(unix)]
mod fault {
    use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

    const SLOTS: usize = 16;
    const PATH_MAX: usize = 1024;
    const FREE: usize = 0;
    const BUSY: usize = 1;
    const READY: usize = 2;

    struct Slot {
        state: AtomicUsize,
        start: AtomicUsize,
        len: AtomicUsize,
        path_len: AtomicUsize,
        path: [AtomicU8; PATH_MAX],
    }

    static TABLE: [Slot; SLOTS] = [const {
        Slot {
            state: AtomicUsize::new(FREE),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            path_len: AtomicUsize::new(0),
            path: [const { AtomicU8::new(0) }; PATH_MAX],
        }
    }; SLOTS];

    /// Record that `[start, start + len)` maps the file `path`; returns the slot to free
    /// with [`unregister_mapping`] (None when the table is full: the mapping is then not
    /// named by the handler).
    pub fn register_mapping(start: usize, len: usize, path: &std::path::Path) -> Option<usize> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_os_str().as_bytes();
        let (i, slot) = TABLE.iter().enumerate().find(|(_, s)| {
            s.state
                .compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })?;
        let n = bytes.len().min(PATH_MAX);
        for (dst, &b) in slot.path.iter().zip(&bytes[..n]) {
            dst.store(b, Ordering::Relaxed);
        }
        slot.path_len.store(n, Ordering::Relaxed);
        slot.start.store(start, Ordering::Relaxed);
        slot.len.store(len, Ordering::Relaxed);
        slot.state.store(READY, Ordering::Release);
        Some(i)
    }

    /// Forget a mapping recorded by [`register_mapping`].
    pub fn unregister_mapping(slot: usize) {
        if let Some(s) = TABLE.get(slot) {
            s.state.store(FREE, Ordering::Release);
        }
    }

    static INSTALLED: AtomicBool = AtomicBool::new(false);
    static mut PREVIOUS: Option<libc::sigaction> = None;

    /// Install the SIGBUS handler (once; later calls do nothing).
    pub fn install_fault_handler() {
        if INSTALLED.swap(true, Ordering::SeqCst) {
            return;
        }
        // SAFETY: a zeroed sigaction is a valid value to fill in; the handler only reads
        // atomics and calls write(2), sigaction(2) and _exit(2), which are async-signal-
        // safe. PREVIOUS is written here once, before the handler can run, and only read
        // by the handler afterwards.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &sa, &mut old) == 0 {
                *std::ptr::addr_of_mut!(PREVIOUS) = Some(old);
            }
        }
    }

    fn write_stderr(bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            // SAFETY: write(2) on fd 2 from a valid buffer.
            let n = unsafe {
                libc::write(
                    2,
                    bytes[done..].as_ptr() as *const libc::c_void,
                    bytes.len() - done,
                )
            };
            if n <= 0 {
                return;
            }
            done += n as usize;
        }
    }

    extern "C" fn on_sigbus(
        _sig: libc::c_int,
        info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as usize;
        for slot in &TABLE {
            if slot.state.load(Ordering::Acquire) != READY {
                continue;
            }
            let start = slot.start.load(Ordering::Relaxed);
            let len = slot.len.load(Ordering::Relaxed);
            if addr < start || addr - start >= len {
                continue;
            }
            write_stderr(b"\nerror: ");
            let mut path = [0u8; PATH_MAX];
            let n = slot.path_len.load(Ordering::Relaxed).min(PATH_MAX);
            for (d, s) in path.iter_mut().zip(&slot.path[..n]) {
                *d = s.load(Ordering::Relaxed);
            }
            write_stderr(&path[..n]);
            write_stderr(
                b": the model file became shorter while lema was reading it (truncated or \
                  rewritten in place by another program; bus error reading its memory map), so \
                  lema cannot go on. Restore the file and resume from the last checkpoint; to \
                  update a model that is in use, write the new file elsewhere and rename it \
                  over the old one.\n",
            );
            // SAFETY: _exit is async-signal-safe and ends the process at once.
            unsafe { libc::_exit(1) };
        }
        // not a model file: give the fault to the previous handler (or the default
        // action) by restoring it; returning re-runs the faulting access
        // SAFETY: PREVIOUS was written before this handler was installed.
        unsafe {
            match *std::ptr::addr_of!(PREVIOUS) {
                Some(old) => libc::sigaction(libc::SIGBUS, &old, std::ptr::null_mut()),
                None => {
                    libc::signal(libc::SIGBUS, libc::SIG_DFL);
                    0
                }
            };
        }
    }
}

#[cfg(not(unix))]
mod fault {
    /// Without Unix signals there is nothing to register.
    pub fn register_mapping(_start: usize, _len: usize, _path: &std::path::Path) -> Option<usize> {
        None
    }
    /// Without Unix signals there is nothing to unregister.
    pub fn unregister_mapping(_slot: usize) {}
    /// Without Unix signals there is no handler to install.
    pub fn install_fault_handler() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_classified() {
        let st = {
            let mut v = 2u64.to_le_bytes().to_vec();
            v.extend_from_slice(b"{}");
            v
        };
        assert_eq!(kind_of_prefix(&st), Kind::Safetensors);
        assert_eq!(kind_of_prefix(b"GGUF\x03\0\0\0\0"), Kind::Gguf);
        assert_eq!(
            kind_of_prefix(b"PK\x03\x04\0\0\0\0\0"),
            Kind::Pickle { zip: Some(true) }
        );
        assert_eq!(
            kind_of_prefix(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9"),
            Kind::Pickle { zip: Some(false) }
        );
        // a safetensors header size whose first byte is 0x80 is still safetensors
        let mut st80 = 0x0280u64.to_le_bytes().to_vec();
        st80.push(b'{');
        assert_eq!(kind_of_prefix(&st80), Kind::Safetensors);
        assert_eq!(kind_of_prefix(b"hello"), Kind::Other);
        assert_eq!(kind_of_prefix(b""), Kind::Other);
    }

    #[test]
    fn fingerprint_sees_a_changed_page_and_the_header() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let header = br#"{"a":{"dtype":"F32","shape":[262144],"data_offsets":[0,1048576]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        let data_start = bytes.len();
        bytes.extend((0..1 << 20).map(|i: u32| (i % 251) as u8));
        std::fs::write(&p, &bytes).unwrap();
        let fp = content_fingerprint_of(&p).unwrap();
        assert!(fp.starts_with(FINGERPRINT_SCHEME), "{fp}");
        assert_eq!(fp, content_fingerprint_of(&p).unwrap());
        // one byte of the last sampled page (the file's last byte)
        let mut other = bytes.clone();
        *other.last_mut().unwrap() ^= 1;
        std::fs::write(&p, &other).unwrap();
        assert_ne!(fp, content_fingerprint_of(&p).unwrap());
        // one byte of the header
        let mut other = bytes.clone();
        other[data_start - 3] = b'0';
        std::fs::write(&p, &other).unwrap();
        assert_ne!(fp, content_fingerprint_of(&p).unwrap());
        // the same bytes again give the first fingerprint
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(fp, content_fingerprint_of(&p).unwrap());
    }

    #[test]
    fn stamp_tells_modified_from_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.bin");
        std::fs::write(&p, b"0123456789").unwrap();
        let f = File::open(&p).unwrap();
        let s = Stamp::of(&f, &p).unwrap();
        assert_eq!(s.check(&f, &p).unwrap(), FileState::Unchanged);
        // a new file renamed over the path: the open one is untouched
        let q = d.path().join("new.bin");
        std::fs::write(&q, b"abcdefghij").unwrap();
        std::fs::rename(&q, &p).unwrap();
        assert_eq!(s.check(&f, &p).unwrap(), FileState::Replaced);
        // the open file truncated
        let g = File::open(&p).unwrap();
        let s = Stamp::of(&g, &p).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4)
            .unwrap();
        match s.check(&g, &p).unwrap() {
            FileState::Modified(m) => {
                assert!(m.contains("10 bytes") && m.contains("4 bytes"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
}
