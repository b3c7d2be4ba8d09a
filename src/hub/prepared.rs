//! A Hub model prepared once for the commands that take a prepared model (`train`,
//! `eval`, `generate`, `info`, `merge`): `$LEMA_CACHE/prepared/models--org--name/<commit>/`
//! holds what `lema prepare` writes (model.safetensors, config.json, the tokenizer), made
//! in a temporary folder renamed into place, so it is either complete or absent; a commit
//! prepared before is reused without downloading or converting anything.

use super::{HubId, HubOptions, Source, cache, not_local_either};
use crate::error::Result;
use std::path::PathBuf;

/// The folder holding `id` prepared (model.safetensors and its side files): reused when
/// its commit was prepared before, else downloaded (what the Hub cache lacks) and
/// prepared with the weights' own dtype.
pub fn prepared(id: &HubId, opts: &HubOptions) -> Result<PathBuf> {
    let found = || -> Result<PathBuf> {
        let source = Source::locate(id, opts)?;
        let parent = opts.lema_cache.join("prepared").join(id.folder_name());
        let dir = parent.join(&source.commit);
        if is_prepared(&dir) {
            return Ok(dir);
        }
        let snapshot = source.fetch(super::Files::All)?;
        let _lock = cache::lock_file(
            &parent.join(format!("{}.lock", source.commit)),
            opts.progress,
        )?;
        if is_prepared(&dir) {
            return Ok(dir);
        }
        for line in crate::fsutil::clean_stale_temporaries(&parent)? {
            if opts.progress {
                eprintln!("note: {line}");
            }
        }
        crate::checkpoint::write_dir_atomically(&dir, |tmp| {
            crate::import::prepare(&snapshot.dir, tmp, None, opts.progress).map(drop)
        })?;
        Ok(dir)
    };
    found().map_err(not_local_either)
}

fn is_prepared(dir: &std::path::Path) -> bool {
    dir.join("model.safetensors").is_file()
}
