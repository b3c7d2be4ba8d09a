//! The cache layout shared with Python's `huggingface_hub`, so that each reuses what the
//! other downloaded:
//!
//! ```text
//! $HF_HUB_CACHE/models--org--name/
//!     refs/<revision>                  the commit the revision resolved to
//!     blobs/<etag>                     a file's content, named by its etag
//!     blobs/<etag>.incomplete          a download in progress (resumed from its length)
//!     snapshots/<commit>/<file>        a relative symlink to ../../blobs/<etag>
//! $HF_HUB_CACHE/.locks/models--org--name/<etag>.lock
//! ```
//!
//! A snapshot link is made only after its blob is complete and verified, and a ref only
//! after every file of the snapshot is linked, so a failure at any point leaves no link
//! to a partial or wrong blob, and no ref to a partial snapshot.

use super::id::HubId;
use crate::error::{Error, Result};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

/// One repository's folder in the cache.
pub struct RepoCache {
    root: PathBuf,
    locks: PathBuf,
}

impl RepoCache {
    /// The folder of `id` under the cache folder `cache_dir` (`$HF_HUB_CACHE`).
    pub fn new(cache_dir: &Path, id: &HubId) -> Self {
        RepoCache {
            root: cache_dir.join(id.folder_name()),
            locks: cache_dir.join(".locks").join(id.folder_name()),
        }
    }

    /// The repository's folder, `models--org--name`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the content with this etag is kept once complete.
    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    /// Where a download of the content with this etag grows (huggingface_hub's name, so
    /// either tool resumes the other's download).
    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.incomplete"))
    }

    /// The snapshot folder of a commit.
    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    /// The commit `revision` names in the cache: itself when it is a commit id, else
    /// what `refs/<revision>` holds (`None` when there is no such ref).
    pub fn commit_of(&self, revision: &str) -> Result<Option<String>> {
        if super::id::is_commit(revision) {
            return Ok(Some(revision.to_string()));
        }
        let path = self.root.join("refs").join(revision);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim().to_string()).filter(|c| !c.is_empty())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Record that `revision` resolved to `commit` (atomically; nothing for a commit id).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.root.join("refs").join(revision);
        create_parent(&path)?;
        crate::fsutil::write_file_atomic(&path, commit.as_bytes())
    }

    /// The file `file` of the snapshot of `commit`, when it is there and its blob too.
    pub fn cached_file(&self, commit: &str, file: &str) -> Option<PathBuf> {
        let p = self.snapshot(commit).join(file);
        p.is_file().then_some(p)
    }

    /// Make `snapshots/<commit>/<file>` name the blob of `etag` (a relative symlink, put
    /// in place by a rename, so the link is never half made); returns its path.
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let rel = Path::new(file);
        let depth = rel.components().count();
        if depth == 0 || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(Error::format(
                &self.root,
                format!(
                    "the Hub listed a file name {file:?} that is not a path inside the repository"
                ),
            ));
        }
        let link = self.snapshot(commit).join(rel);
        create_parent(&link)?;
        let mut target = PathBuf::new();
        for _ in 0..depth + 1 {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        let name = link.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = link.with_file_name(format!(
            ".{}.tmp-{}",
            name.unwrap_or_default(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        make_link(&target, &self.blob(etag), &tmp)?;
        std::fs::rename(&tmp, &link).map_err(|e| Error::io(&link, e))?;
        Ok(link)
    }

    /// Hold the lock of the blob of `etag` (the lock file huggingface_hub takes too), so
    /// that two processes never write the same blob; released when dropped.
    pub fn lock(&self, etag: &str, progress: bool) -> Result<File> {
        lock_file(&self.locks.join(format!("{etag}.lock")), progress)
    }
}

/// Take an exclusive lock on `path` (created if need be), waiting for another process
/// that holds it, and saying so on stderr when `progress` is on.
pub fn lock_file(path: &Path, progress: bool) -> Result<File> {
    create_parent(path)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    match file.try_lock() {
        Ok(()) => return Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            if progress {
                eprintln!("waiting for another process that holds {}", path.display());
            }
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(path, e)),
    }
    file.lock().map_err(|e| Error::io(path, e))?;
    Ok(file)
}

fn create_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) => std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e)),
        None => Ok(()),
    }
}

#[cfg(unix)]
fn make_link(target: &Path, _blob: &Path, at: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, at).map_err(|e| Error::io(at, e))
}

/// Where symbolic links may need privileges, the snapshot holds a copy of the blob (as
/// huggingface_hub does there).
#[cfg(not(unix))]
fn make_link(_target: &Path, blob: &Path, at: &Path) -> Result<()> {
    std::fs::copy(blob, at)
        .map(drop)
        .map_err(|e| Error::io(at, e))
}
