//! One file of a snapshot into the cache: its blob downloaded (resumed from the
//! `.incomplete` part an earlier run left), verified against its etag, renamed into place
//! under the blob's lock, then linked from the snapshot.

use super::cache::RepoCache;
use super::checksum::Checksum;
use super::client::{Client, FileMeta};
use super::id::HubId;
use crate::error::{Error, HubErrorKind, Result};
use crate::import::Progress;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes read and written at a time.
const CHUNK: usize = 1 << 20;

/// `file` of `id` at `commit`, in the snapshot folder: its path there. A file already
/// linked is not asked for again (a commit's files never change).
pub fn fetch_file(
    client: &Client,
    cache: &RepoCache,
    id: &HubId,
    commit: &str,
    file: &str,
    progress: bool,
    cancel: Option<&AtomicBool>,
) -> Result<PathBuf> {
    if let Some(p) = cache.cached_file(commit, file) {
        return Ok(p);
    }
    let meta = client.file_meta(id, commit, file)?;
    let blob = cache.blob(&meta.etag);
    if !blob.is_file() {
        let _lock = cache.lock(&meta.etag, progress)?;
        // another process may have finished it while this one waited
        if !blob.is_file() {
            download_blob(client, &meta, cache, id, file, progress, cancel)?;
        }
    }
    cache.link(commit, file, &meta.etag)
}

/// Download the blob of `meta` into its `.incomplete` part from where an earlier attempt
/// stopped, check its size and checksum, and rename it to the blob. A broken-off download
/// keeps the part (a rerun resumes it); a wrong checksum removes it.
fn download_blob(
    client: &Client,
    meta: &FileMeta,
    cache: &RepoCache,
    id: &HubId,
    file: &str,
    progress: bool,
    cancel: Option<&AtomicBool>,
) -> Result<()> {
    let (part, blob) = (&cache.incomplete(&meta.etag), &cache.blob(&meta.etag));
    let subject = format!("{} {file}", id.display());
    if let Some(dir) = part.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut have = std::fs::metadata(part).map_or(0, |m| m.len());
    if have > meta.size {
        remove(part)?;
        have = 0;
    }
    let mut sum = Checksum::for_etag(&meta.etag, meta.size);
    if have < meta.size {
        let mut resp = client.open(&meta.url, have, id, file)?;
        match resp.status().as_u16() {
            206 if range_start(&resp) == Some(have) => {}
            // a range that does not continue the part: start afresh on the next run
            206 => {
                remove(part)?;
                return Err(Error::hub(
                    HubErrorKind::Protocol,
                    &subject,
                    format!(
                        "asked for the bytes from {have} on, the server sent another range \
                         ({:?}); the partial download was removed: run again",
                        resp.headers().get("content-range")
                    ),
                ));
            }
            // the server ignored the Range header: start over
            200 => have = 0,
            // nothing past `have`, yet the part is short: what it holds is not this file
            _ => {
                remove(part)?;
                return Err(Error::hub(
                    HubErrorKind::Incomplete,
                    &subject,
                    format!(
                        "the server has no bytes past {have} of the {} it announced; the \
                         partial download was removed: run again",
                        meta.size
                    ),
                ));
            }
        }
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(have > 0)
            .write(true)
            .truncate(have == 0)
            .open(part)
            .map_err(|e| Error::io(part, e))?;
        hash_prefix(part, have, &mut sum)?;
        let bar = Progress::new(progress, meta.size, file);
        bar.inc(have);
        let copied = copy(
            &mut resp.body_mut().as_reader(),
            &mut out,
            meta.size - have,
            &mut sum,
            &bar,
            part,
            cancel,
        );
        bar.finish();
        out.sync_all().map_err(|e| Error::io(part, e))?;
        // asked to stop (Ctrl-C in Python): the part is kept, and the next run resumes it
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Interrupted);
        }
        let (copied, cause) = match copied {
            Ok(n) => (n, None),
            Err((n, e)) => (n, Some(e)),
        };
        let got = have + copied;
        if got < meta.size {
            let cause = cause.unwrap_or_else(|| "the connection closed early".to_string());
            return Err(Error::hub(
                HubErrorKind::Incomplete,
                &subject,
                format!(
                    "the download stopped at {got} of {} bytes ({cause}); the part is kept in \
                     {}: run the command again to resume from there",
                    meta.size,
                    part.display()
                ),
            ));
        }
        // what reached the disk, not only what was written: the checksum covers the
        // bytes as they came, so the file must be exactly them
        let on_disk = out.metadata().map_err(|e| Error::io(part, e))?.len();
        if on_disk != meta.size {
            drop(out);
            remove(part)?;
            return Err(Error::hub(
                HubErrorKind::Incomplete,
                &subject,
                format!(
                    "the partial file {} held {on_disk} bytes after the download, not {}; it \
                     was removed: run the command again",
                    part.display(),
                    meta.size
                ),
            ));
        }
    } else {
        hash_prefix(part, have, &mut sum)?;
    }
    if let Err((got, want)) = sum.verify() {
        remove(part)?;
        return Err(Error::hub(
            HubErrorKind::Checksum,
            &subject,
            format!(
                "the downloaded content does not match the Hub's checksum ({got}, expected \
                 {want}); it was removed and nothing was linked: run the command again (if \
                 it fails again, the server at HF_ENDPOINT serves wrong content)"
            ),
        ));
    }
    std::fs::rename(part, blob).map_err(|e| Error::io(blob, e))
}

/// The first byte of a 206 response's `Content-Range: bytes <start>-<end>/<size>`.
fn range_start(resp: &ureq::http::Response<ureq::Body>) -> Option<u64> {
    let v = resp.headers().get("content-range")?.to_str().ok()?;
    let range = v.trim().strip_prefix("bytes")?.trim_start();
    range.split('-').next()?.trim().parse().ok()
}

/// Copy at most `limit` bytes; the count copied, or that count and the error that
/// stopped the copy.
fn copy(
    from: &mut impl Read,
    to: &mut File,
    limit: u64,
    sum: &mut Checksum,
    bar: &Progress,
    part: &Path,
    cancel: Option<&AtomicBool>,
) -> std::result::Result<u64, (u64, String)> {
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < limit {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err((done, "interrupted".into()));
        }
        let want = CHUNK.min((limit - done) as usize);
        let n = match from.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((done, e.to_string())),
        };
        if let Err(e) = to.write_all(&buf[..n]) {
            return Err((done, format!("writing {}: {e}", part.display())));
        }
        sum.update(&buf[..n]);
        bar.inc(n as u64);
        done += n as u64;
    }
    Ok(done)
}

/// Feed the first `len` bytes of `part` (what an earlier run downloaded) to `sum`.
fn hash_prefix(part: &Path, len: u64, sum: &mut Checksum) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mut f = File::open(part).map_err(|e| Error::io(part, e))?.take(len);
    let mut buf = vec![0u8; CHUNK];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => sum.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io(part, e)),
        }
    }
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}
