//! The real test model, SmolLM2-135M-Instruct: the GGUF that scripts/fetch-smollm2.sh
//! puts in `.cache/models/`, and that GGUF prepared by this build.
//!
//! The tests never reuse a prepared folder from the cache (it may have been converted by
//! an older `prepare`): each test binary prepares the GGUF once, with the `prepare` it was
//! built with, into its own folder under cargo's target tmp dir (`target/tmp/`), replacing
//! what an earlier run left there. Preparing takes about 2 s (measured: 1.99 s wall,
//! 95 MB peak RSS, on the 2-core CI machine).

use super::skip::skip;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The cached GGUF, or `None` after [`skip`] (which fails under CI).
pub fn gguf_or_skip() -> Option<PathBuf> {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        Some(p)
    } else {
        skip(&format!(
            "{} is absent (run scripts/fetch-smollm2.sh)",
            p.display()
        ));
        None
    }
}

/// The folder this test binary prepared from the GGUF (model.safetensors, config.json,
/// tokenizer files), preparing it on the first call; `None` after [`skip`] when the
/// GGUF is absent (each caller skips with its own name).
pub fn prepared_or_skip() -> Option<PathBuf> {
    let gguf = gguf_or_skip()?;
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        // one folder per test binary: binaries may run in parallel
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(concat!("smollm2-135m-", env!("CARGO_CRATE_NAME")));
        if out.exists() {
            std::fs::remove_dir_all(&out)
                .unwrap_or_else(|e| panic!("removing {}: {e}", out.display()));
        }
        lema::import::prepare(&gguf, &out, None, false)
            .unwrap_or_else(|e| panic!("preparing {}: {e}", gguf.display()));
        out
    });
    Some(dir.clone())
}
