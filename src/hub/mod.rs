//! Models from the Hugging Face Hub: `org/name[@revision]` downloaded into the cache that
//! Python's `huggingface_hub` uses too ([`cache`]), only the files lema reads
//! ([`select`]), resumably and verified ([`download`]), and prepared once into lema's own
//! cache for the commands that take a prepared model ([`prepared`]).
//!
//! The environment is huggingface_hub's: `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`,
//! `HF_TOKEN` (or the token file `$HF_HOME/token`), `HF_HUB_OFFLINE`,
//! `HF_HUB_DISABLE_PROGRESS_BARS`; `LEMA_CACHE` is where prepared models go.

pub mod cache;
pub mod checksum;
pub mod client;
pub mod download;
pub mod id;
pub mod prepared;
pub mod select;

pub use id::HubId;
pub use prepared::prepared;

use crate::error::{Error, HubErrorKind, Result};
use cache::RepoCache;
use client::Client;
use std::path::{Path, PathBuf};

/// The default Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to reach the Hub, and where its files and lema's prepared models go.
#[derive(Clone)]
pub struct HubOptions {
    /// `HF_ENDPOINT`, without a trailing `/`.
    pub endpoint: String,
    /// `HF_HUB_CACHE`: the folder holding `models--org--name/`.
    pub cache_dir: PathBuf,
    /// `LEMA_CACHE`: lema's own cache (prepared models under `prepared/`).
    pub lema_cache: PathBuf,
    /// `HF_TOKEN`, or the token file.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: use only the cache (revisions resolved through its refs).
    pub offline: bool,
    /// Progress bars on stderr.
    pub progress: bool,
    /// When set and raised, a download stops at its next chunk with
    /// [`Error::Interrupted`], keeping its part for the next run to resume (the Python
    /// bindings raise it on Ctrl-C).
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl HubOptions {
    /// The options the environment sets, as huggingface_hub reads it:
    /// `HF_HOME` (default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`),
    /// `HF_HUB_CACHE` (default `$HF_HOME/hub`), `HF_ENDPOINT`, `HF_TOKEN` (else the file
    /// `HF_TOKEN_PATH`, default `$HF_HOME/token`), `HF_HUB_OFFLINE`,
    /// `HF_HUB_DISABLE_PROGRESS_BARS`; and `LEMA_CACHE` (default `$HF_HOME/lema`).
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let text = |k: &str| var(k).and_then(|v| v.into_string().ok());
        let hf_home = match var("HF_HOME") {
            Some(h) => PathBuf::from(h),
            None => match (
                var("XDG_CACHE_HOME"),
                var("HOME").or_else(|| var("USERPROFILE")),
            ) {
                (Some(xdg), _) => PathBuf::from(xdg).join("huggingface"),
                (None, Some(home)) => PathBuf::from(home).join(".cache").join("huggingface"),
                (None, None) => {
                    return Err(Error::config(
                        "no home folder for the Hugging Face cache: set HF_HOME (or HF_HUB_CACHE)",
                    ));
                }
            },
        };
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map_or_else(|| hf_home.join("hub"), PathBuf::from);
        let token_file = var("HF_TOKEN_PATH").map_or_else(|| hf_home.join("token"), PathBuf::from);
        let token = text("HF_TOKEN")
            .or_else(|| text("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| std::fs::read_to_string(&token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let truthy = |k: &str| {
            text(k).is_some_and(|v| {
                ["1", "on", "yes", "true"].contains(&v.trim().to_ascii_lowercase().as_str())
            })
        };
        Ok(HubOptions {
            endpoint: text("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            cache_dir,
            lema_cache: var("LEMA_CACHE").map_or_else(|| hf_home.join("lema"), PathBuf::from),
            token,
            offline: truthy("HF_HUB_OFFLINE"),
            progress: !truthy("HF_HUB_DISABLE_PROGRESS_BARS"),
            cancel: None,
        })
    }

    /// The same options with progress bars on or off.
    pub fn with_progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }
}

/// The options, with the token itself left out.
impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("lema_cache", &self.lema_cache)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .finish()
    }
}

/// A repository's files in the cache at one commit.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// `models--org--name/snapshots/<commit>`: an HF model folder `lema prepare` reads.
    pub dir: PathBuf,
    pub commit: String,
}

/// `spec` as a Hub id when it is one: shaped like `org/name[@revision]` and not a path
/// that exists here (a local file or folder always wins).
pub fn hub_id(spec: &Path) -> Option<HubId> {
    if std::fs::symlink_metadata(spec).is_ok() {
        return None;
    }
    spec.to_str().and_then(HubId::parse)
}

/// The local folder or file that `spec` names: a path that exists, as it is; a Hub id,
/// downloaded (what is not yet cached) and its snapshot folder returned; anything else is
/// an error saying it is neither.
pub fn resolve(spec: &Path, opts: &HubOptions) -> Result<PathBuf> {
    if std::fs::symlink_metadata(spec).is_ok() {
        return Ok(spec.to_path_buf());
    }
    match hub_id(spec) {
        Some(id) => Ok(download(&id, opts).map_err(not_local_either)?.dir),
        None => Err(Error::format(
            spec,
            "no such file or folder, and not a Hugging Face Hub id (org/name or org/name@revision)",
        )),
    }
}

/// Download what lema needs of `id` (what the cache lacks), or with `opts.offline`
/// find it in the cache; the snapshot folder.
pub fn download(id: &HubId, opts: &HubOptions) -> Result<Snapshot> {
    Source::locate(id, opts)?.fetch(Files::All)
}

/// Like [`download`], but only the files beside the weights (config.json, tokenizer,
/// generation and chat template files): what building a model needs when its weights
/// were prepared already. The revision's ref is not written (the snapshot is partial).
pub fn download_without_weights(id: &HubId, opts: &HubOptions) -> Result<Snapshot> {
    Source::locate(id, opts)?.fetch(Files::WithoutWeights)
}

/// What [`Source::fetch`] brings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Files {
    All,
    WithoutWeights,
}

/// A revision of a repository resolved to its commit, online or from the cache.
pub(crate) struct Source<'a> {
    id: &'a HubId,
    opts: &'a HubOptions,
    cache: RepoCache,
    pub commit: String,
    /// Online: the client and the files the repository lists at the commit.
    remote: Option<(Client, Vec<String>)>,
}

impl<'a> Source<'a> {
    /// Resolve the revision: with the Hub's listing, or offline through the cache's refs.
    pub fn locate(id: &'a HubId, opts: &'a HubOptions) -> Result<Self> {
        let cache = RepoCache::new(&opts.cache_dir, id);
        let (commit, remote) = if opts.offline {
            let commit = cache.commit_of(id.revision())?.ok_or_else(|| {
                Error::hub(
                    HubErrorKind::NotCached,
                    id.display(),
                    format!(
                        "HF_HUB_OFFLINE is set and the cache {} holds no revision '{}' of it: \
                         run once without HF_HUB_OFFLINE to download it, or point HF_HUB_CACHE \
                         (or HF_HOME) at the cache that has it",
                        opts.cache_dir.display(),
                        id.revision()
                    ),
                )
            })?;
            (commit, None)
        } else {
            let client = Client::new(&opts.endpoint, opts.token.clone());
            match client.repo_info(id) {
                Ok(info) => (info.commit, Some((client, info.files))),
                // as huggingface_hub does: an unreachable Hub falls back to what the cache
                // holds of the revision, said once
                Err(
                    e @ Error::Hub {
                        kind: HubErrorKind::Network,
                        ..
                    },
                ) => match cache.commit_of(id.revision())? {
                    Some(commit) => {
                        eprintln!(
                            "note: {e}; using the cached commit {commit} of {} (set HF_HUB_OFFLINE=1 to skip the Hub)",
                            id.display()
                        );
                        (commit, None)
                    }
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        };
        Ok(Source {
            id,
            opts,
            cache,
            commit,
            remote,
        })
    }

    /// The snapshot with every file lema needs: downloaded (online), or checked to be
    /// all in the cache (offline).
    pub(crate) fn fetch(&self, which: Files) -> Result<Snapshot> {
        let dir = self.cache.snapshot(&self.commit);
        match &self.remote {
            Some((client, files)) => {
                let get = |f: &str| {
                    download::fetch_file(
                        client,
                        &self.cache,
                        self.id,
                        &self.commit,
                        f,
                        self.opts.progress,
                        self.opts.cancel.as_deref(),
                    )
                };
                let mut first = select::first_files(self.id, files)?;
                if which == Files::WithoutWeights {
                    first.retain(|f| f != select::INDEX && f != select::WEIGHTS);
                }
                for f in &first {
                    get(f)?;
                }
                if which == Files::WithoutWeights {
                    return Ok(Snapshot {
                        dir,
                        commit: self.commit.clone(),
                    });
                }
                if first.iter().any(|f| f == select::INDEX) {
                    let (shards, _) = crate::import::hf::shard_files(&dir)?;
                    for s in select::shards_named(self.id, shards, files)? {
                        get(&s)?;
                    }
                }
                // only now that every file is linked: offline use never finds a ref to a
                // partial snapshot
                self.cache.write_ref(self.id.revision(), &self.commit)?;
            }
            None => self.check_cached(&dir, which)?,
        }
        Ok(Snapshot {
            dir,
            commit: self.commit.clone(),
        })
    }

    /// Offline: config.json and the weights (every shard of an index) must be cached.
    fn check_cached(&self, dir: &Path, which: Files) -> Result<()> {
        let cached = |f: &str| self.cache.cached_file(&self.commit, f).is_some();
        let mut missing: Vec<String> = Vec::new();
        if !cached("config.json") {
            missing.push("config.json".into());
        }
        if which == Files::All {
            if cached(select::INDEX) {
                let (shards, _) = crate::import::hf::shard_files(dir)?;
                missing.extend(shards.into_iter().filter(|s| !cached(s)));
            } else if !cached(select::WEIGHTS) {
                missing.push(select::WEIGHTS.into());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(Error::hub(
            HubErrorKind::NotCached,
            self.id.display(),
            format!(
                "HF_HUB_OFFLINE is set and the cache lacks {} of commit {} (in {}): run once \
                 without HF_HUB_OFFLINE to download them",
                missing.join(", "),
                self.commit,
                dir.display()
            ),
        ))
    }
}

/// A Hub error for an id that could also have been meant as a local path: say that no
/// such path exists either.
fn not_local_either(e: Error) -> Error {
    match e {
        Error::Hub {
            kind:
                kind @ (HubErrorKind::NotFound | HubErrorKind::Unauthorized | HubErrorKind::Network),
            subject,
            msg,
        } => Error::hub(
            kind,
            subject,
            format!("{msg} (nor is there a local file or folder of that name)"),
        ),
        e => e,
    }
}
