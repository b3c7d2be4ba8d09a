//! The run folder of `lema train`: where a run may write, and that only one process
//! writes there at a time.
//!
//! * The folder is the one the caller names (`output_dir`); nothing read from a
//!   checkpoint chooses it.
//! * An exclusive lock on `.lema.lock` inside it (`flock`, released by the OS when the
//!   process ends, however it ends) keeps a second run out; the file holds the PID of
//!   the process that has it, for the message the second one prints.
//! * `.lema-run` records the id of the run that owns the folder; every checkpoint records
//!   the id too. A run resumed in its checkpoint's own folder must find that folder owned
//!   by the checkpoint's run; a fresh run, or a resume into another folder, must find no
//!   run's files there at all.
//! * Temporary files and folders left by a killed writer are removed once the lock is
//!   held (no other run can be writing them then).
//! * The effective configuration goes to `config.toml` unless a file there was not
//!   written by lema, or was edited since (its header line carries a hash of the rest):
//!   then to `config.lema.toml`, and the user's file is left as it is.

use super::{Observer, list_checkpoints, read_run_state};
use crate::error::{Error, Result};
use crate::fsutil::{atomic_write, clean_stale_temporaries, fnv1a};
use std::fs::{File, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The lock file inside a run folder.
pub const LOCK_FILE: &str = ".lema.lock";
/// The file naming the run that owns a run folder.
pub const RUN_ID_FILE: &str = ".lema-run";
/// Where the effective configuration goes, in order of preference.
pub const CONFIG_FILES: [&str; 2] = ["config.toml", "config.lema.toml"];
/// Start of the first line of a configuration lema wrote.
const CONFIG_HEADER: &str = "# effective configuration of this run, written by lema ";

/// Refuse an `output_dir` that cannot be a folder, naming it: empty, or a file (itself or
/// one of its parents).
pub fn check_output_path(out: &Path) -> Result<()> {
    if out.as_os_str().is_empty() {
        return Err(Error::config(
            "output_dir is empty; name the run folder (e.g. --output-dir runs/my-run)",
        ));
    }
    if let Some(existing) = out.ancestors().find(|a| a.exists())
        && !existing.is_dir()
    {
        let what = if existing == out {
            "is a file".to_string()
        } else {
            format!("is inside {}, which is a file", existing.display())
        };
        return Err(Error::config(format!(
            "output_dir {} {what}, not a folder; choose a folder for the run (e.g. --output-dir runs/my-run)",
            out.display()
        )));
    }
    Ok(())
}

/// A locked run folder; the lock lasts as long as this value (or the process).
pub struct RunDir {
    path: PathBuf,
    owner: Owner,
    config_file: PathBuf,
    /// Whether this process created the folder (it is removed again if left empty).
    created: bool,
    _lock: File,
}

/// The run id a checkpoint records (`None` for checkpoints older than run ids).
pub type CheckpointRunId<'a> = Option<&'a str>;

impl RunDir {
    /// Create (if need be) and lock `out`, remove what killed writers left there, and
    /// check that this run may write there: a fresh run (`resume` is `None`) or a run
    /// resumed from a checkpoint in another folder needs a folder without any run's
    /// files; a run resumed in its checkpoint's own folder needs that folder to belong to
    /// the checkpoint's run. `out` must be absolute.
    pub fn open(
        out: &Path,
        resume: Option<(&Path, CheckpointRunId)>,
        obs: &mut dyn Observer,
    ) -> Result<Self> {
        check_output_path(out)?;
        let created = !out.exists();
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let lock = lock(out)?;
        for line in clean_stale_temporaries(out)? {
            obs.on_notice(&line);
        }
        let in_place = match resume {
            Some((ckpt, _)) => same_folder(ckpt.parent(), out),
            None => false,
        };
        let owner = match resume {
            Some((ckpt, id)) if in_place => check_owned_by(out, ckpt, id)?,
            _ => {
                check_holds_no_run(out, resume.map(|r| r.0))?;
                Owner {
                    run_id: new_run_id(),
                    adopts_unnamed: false,
                }
            }
        };
        let config_file = config_file(out, obs)?;
        Ok(Self {
            path: out.to_path_buf(),
            owner,
            config_file,
            created,
            _lock: lock,
        })
    }

    /// The run's id, recorded in its checkpoints.
    pub fn run_id(&self) -> &str {
        &self.owner.run_id
    }

    /// Record the run as the folder's owner; call before writing the first output.
    pub fn claim(&self) -> Result<()> {
        let v = serde_json::json!({
            "run_id": self.owner.run_id,
            "adopts_checkpoints_without_id": self.owner.adopts_unnamed,
            "written_by": format!("lema {}", env!("CARGO_PKG_VERSION")),
        });
        let text = v.to_string() + "\n";
        atomic_write(&self.path.join(RUN_ID_FILE), |w| {
            w.write_all(text.as_bytes())
        })
    }

    /// Write the effective configuration `toml` (see the module notes for where); returns
    /// the file written.
    pub fn write_config(&self, toml: &str) -> Result<PathBuf> {
        let text = format!(
            "{CONFIG_HEADER}{}; fnv1a {:016x} of the lines below\n{toml}",
            env!("CARGO_PKG_VERSION"),
            fnv1a(toml.as_bytes())
        );
        atomic_write(&self.config_file, |w| w.write_all(text.as_bytes()))?;
        Ok(self.config_file.clone())
    }
}

impl Drop for RunDir {
    /// A folder this process created and left holding only the lock (the run failed
    /// before writing anything) is removed; the lock itself goes with the file handle.
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        let names: Vec<_> = std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        if names.len() == 1 && names[0] == LOCK_FILE {
            let _ = std::fs::remove_file(self.path.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// Take the folder's lock, or say which process holds it.
fn lock(out: &Path) -> Result<File> {
    let path = out.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("lema process {pid}"),
                Err(_) => "another lema process".to_string(),
            };
            return Err(Error::config(format!(
                "output_dir {} is in use: {holder} is running there (it holds {}); wait for it to finish or stop it, or choose another output_dir",
                out.display(),
                path.display()
            )));
        }
        Err(TryLockError::Error(e)) => {
            return Err(Error::io(
                &path,
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot lock the run folder ({e}); lema needs a file system with file locks to keep one run per folder"
                    ),
                ),
            ));
        }
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| (&file).write_all(pid.as_bytes()))
        .map_err(|e| Error::io(&path, e))?;
    Ok(file)
}

/// Whether `a` (a checkpoint's parent) and `b` are the same folder.
fn same_folder(a: Option<&Path>, b: &Path) -> bool {
    let a = match a {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// An id for a new run: the time, the process and the std hasher's random keys.
fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// The run that owns a folder, as `.lema-run` records it.
struct Owner {
    run_id: String,
    /// Checkpoints without a run id (older lema) count as this run's: the run was resumed
    /// from one of them in this folder.
    adopts_unnamed: bool,
}

/// The folder's `.lema-run`, if it has one.
fn folder_owner(out: &Path) -> Result<Option<Owner>> {
    let path = out.join(RUN_ID_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            Some(Owner {
                run_id: v.get("run_id")?.as_str()?.to_string(),
                adopts_unnamed: v
                    .get("adopts_checkpoints_without_id")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false),
            })
        })
        .map(Some)
        .ok_or_else(|| {
            Error::format(
                &path,
                "not the run marker lema writes (no run_id); it names the run that owns this folder: remove it only if the folder holds no other run",
            )
        })
}

/// A run resumed in place: the folder, and every other checkpoint in it, belong to the
/// checkpoint's run. Returns the folder's owner from now on.
fn check_owned_by(out: &Path, ckpt: &Path, id: CheckpointRunId) -> Result<Owner> {
    let refuse = |whose: String| {
        Error::config(format!(
            "cannot resume from {} in its folder: {whose}, not to this checkpoint's run, and resuming would overwrite it; continue this checkpoint elsewhere with --output-dir NEW_FOLDER",
            ckpt.display()
        ))
    };
    if let Some(owner) = folder_owner(out)? {
        let ours = match id {
            Some(id) => id == owner.run_id,
            None => owner.adopts_unnamed,
        };
        if !ours {
            return Err(refuse(format!(
                "{} belongs to run {} ({})",
                out.display(),
                owner.run_id,
                out.join(RUN_ID_FILE).display()
            )));
        }
        return Ok(owner);
    }
    // a folder without a marker (a checkpoint copied in, or an older lema)
    let me = ckpt.canonicalize().ok();
    let foreign: Vec<String> = list_checkpoints(out)
        .into_iter()
        .filter(|(_, p)| p.canonicalize().ok() != me)
        .filter(|(_, p)| read_run_state(p).map_or(true, |(_, rs)| rs.run_id.as_deref() != id))
        .map(|(_, p)| p.display().to_string())
        .collect();
    if !foreign.is_empty() {
        return Err(refuse(format!(
            "{} holds checkpoints of another run ({})",
            out.display(),
            foreign.join(", ")
        )));
    }
    Ok(Owner {
        run_id: id.map_or_else(new_run_id, str::to_string),
        adopts_unnamed: id.is_none(),
    })
}

/// A fresh run, or a resume into another folder: `out` holds no run's results.
fn check_holds_no_run(out: &Path, resume: Option<&Path>) -> Result<()> {
    let what = match resume {
        Some(c) => format!(
            "resuming from {} there would overwrite it; choose another output_dir",
            c.display()
        ),
        None => "choose another output_dir".to_string(),
    };
    if let Some((_, last)) = list_checkpoints(out).last() {
        return Err(Error::config(format!(
            "output_dir {} already holds a run (last checkpoint {}); {what}, or continue that run with --resume {}",
            out.display(),
            last.display(),
            last.display()
        )));
    }
    for name in ["metrics.jsonl", "adapter"] {
        if out.join(name).exists() {
            return Err(Error::config(format!(
                "output_dir {} already holds a run's {name}; {what}, or remove it",
                out.display()
            )));
        }
    }
    Ok(())
}

/// Whether `path` is a configuration lema wrote and nobody edited since.
fn written_by_lema(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Some((first, rest)) = text.split_once('\n') else {
        return false;
    };
    first.starts_with(CONFIG_HEADER)
        && first.ends_with(&format!(
            "; fnv1a {:016x} of the lines below",
            fnv1a(rest.as_bytes())
        ))
}

/// The first of [`CONFIG_FILES`] that is free or lema's own.
fn config_file(out: &Path, obs: &mut dyn Observer) -> Result<PathBuf> {
    let usable = |p: &Path| !p.exists() || (p.is_file() && written_by_lema(p));
    let [main, fallback] = CONFIG_FILES.map(|n| out.join(n));
    if usable(&main) {
        return Ok(main);
    }
    if usable(&fallback) {
        obs.on_notice(&format!(
            "{} was not written by lema (or was edited since): it is left as it is, and this run's effective configuration goes to {}",
            main.display(),
            fallback.display()
        ));
        return Ok(fallback);
    }
    Err(Error::config(format!(
        "output_dir {} holds your own {} and {}; lema writes the run's effective configuration to one of them and overwrites neither: move one away or choose another output_dir",
        out.display(),
        CONFIG_FILES[0],
        CONFIG_FILES[1]
    )))
}
