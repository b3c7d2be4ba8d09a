//! Large aligned reads of the model file for the staging ring: `O_DIRECT` where the
//! filesystem allows it (no page cache: the bytes go from the disk into the buffer, and
//! nothing is charged to the cgroup), else buffered reads with sequential read-ahead that
//! drop the pages behind them (`POSIX_FADV_DONTNEED`), so the cache does not grow with
//! the model either.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Alignment of direct reads: file offsets, lengths and buffer addresses (4 KiB covers
/// every logical block size in use).
pub const ALIGN: usize = 4096;

/// Bytes per read call: large enough for the disk's full rate, small enough that several
/// are in flight for one layer.
pub const CHUNK: usize = 8 << 20;

/// `x` rounded down / up to [`ALIGN`].
pub fn align_down(x: usize) -> usize {
    x / ALIGN * ALIGN
}
pub fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// A reader of one open file (the one the model's map was made from).
pub struct DiskReader {
    path: PathBuf,
    /// Opened with `O_DIRECT`, while direct reads work.
    direct: Option<File>,
    direct_ok: AtomicBool,
    buffered: File,
    /// Why reads are buffered, when they are.
    why_buffered: std::sync::Mutex<Option<String>>,
}

impl DiskReader {
    /// A reader of `file` (open, named `path` in messages). The direct descriptor is a
    /// new open of the same file (through /proc/self/fd), so it reads the mapped file
    /// even if the path has been replaced since.
    pub fn new(file: &File, path: &Path) -> Result<DiskReader> {
        let buffered = file.try_clone().map_err(|e| Error::io(path, e))?;
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            // sequential read-ahead for the buffered reads
            // SAFETY: a valid descriptor; advice only.
            unsafe {
                libc::posix_fadvise(buffered.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
            }
        }
        let (direct, why) = open_direct(file);
        Ok(DiskReader {
            path: path.to_path_buf(),
            direct_ok: AtomicBool::new(direct.is_some()),
            direct,
            buffered,
            why_buffered: std::sync::Mutex::new(why),
        })
    }

    /// "O_DIRECT" or "buffered (why)".
    pub fn mode(&self) -> String {
        if self.direct_ok.load(Ordering::Relaxed) {
            "O_DIRECT reads".into()
        } else {
            let why = self.why_buffered.lock().ok().and_then(|w| w.clone());
            format!(
                "buffered reads, pages dropped behind ({})",
                why.unwrap_or_default()
            )
        }
    }

    /// Fill `dst` from file offset `offset` (both aligned to [`ALIGN`]); at least `need`
    /// bytes must be read (the end of `dst` may lie past the end of the file).
    pub fn read(&self, dst: &mut [u8], offset: u64, need: usize) -> Result<()> {
        if self.direct_ok.load(Ordering::Relaxed)
            && let Some(f) = &self.direct
        {
            match read_full(f, dst, offset) {
                Ok(got) => return self.enough(got, offset, need),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EFAULT)) => {
                    // the filesystem takes O_DIRECT at open but not for reads, or the
                    // buffer is memory the kernel cannot pin for a direct read
                    self.direct_ok.store(false, Ordering::Relaxed);
                    if let Ok(mut w) = self.why_buffered.lock() {
                        *w = Some(format!("direct reads failed: {e}"));
                    }
                }
                Err(e) => return Err(Error::io(&self.path, e)),
            }
        }
        let got = read_full(&self.buffered, dst, offset).map_err(|e| Error::io(&self.path, e))?;
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: a valid descriptor; advice only.
            unsafe {
                libc::posix_fadvise(
                    self.buffered.as_raw_fd(),
                    offset as libc::off_t,
                    got as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        self.enough(got, offset, need)
    }

    fn enough(&self, got: usize, offset: u64, need: usize) -> Result<()> {
        if got >= need {
            return Ok(());
        }
        Err(Error::format(
            &self.path,
            format!(
                "the file ended after {} bytes at offset {offset} where {need} were expected; was it truncated while lema was reading it?",
                got
            ),
        ))
    }
}

/// Read until `dst` is full or the file ends; the bytes read.
fn read_full(f: &File, dst: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < dst.len() {
        match f.read_at(&mut dst[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// `file` opened again with `O_DIRECT`, or why not.
fn open_direct(file: &File) -> (Option<File>, Option<String>) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        if std::env::var_os("LEMA_NO_DIRECT_IO").is_some() {
            return (None, Some("LEMA_NO_DIRECT_IO is set".into()));
        }
        let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&proc_path)
        {
            Ok(f) => (Some(f), None),
            Err(e) => (None, Some(format!("the filesystem refuses O_DIRECT: {e}"))),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        (None, Some("O_DIRECT is Linux only".into()))
    }
}
