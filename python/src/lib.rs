//! `lema._lema`: the Python bindings of lema's engine. A thin layer: the numerics are
//! the library's; this crate turns Python values into the library's types and back,
//! shares LoRA memory through DLPack ([`dlpack`]), releases the GIL for engine work and
//! lets Ctrl-C stop it ([`interrupt`]), and maps errors to Python exceptions
//! ([`errors`]). The pure-Python package beside it (python/lema/) holds the seed's API.

mod dlpack;
mod engine;
mod errors;
mod interrupt;
mod tensors;
mod tokenizer;

use pyo3::prelude::*;
use std::path::PathBuf;

/// `lema prepare`: a Hugging Face model folder, or a GGUF file, into the monolithic
/// safetensors file training reads (config and tokenizer beside it). Returns the report.
#[pyfunction]
#[pyo3(signature = (src, out, dtype=None, progress=true))]
fn prepare(
    py: Python<'_>,
    src: PathBuf,
    out: PathBuf,
    dtype: Option<String>,
    progress: bool,
) -> PyResult<String> {
    interrupt::detached(py, move || {
        let dtype = dtype
            .as_deref()
            .map(str::parse::<lema::backend::DType>)
            .transpose()?;
        let dir = lema::import::OutputPaths::of(&out).dir;
        lema::fsutil::clean_stale_temporaries(&dir)?;
        Ok(lema::import::prepare(&src, &out, dtype, progress)?.to_string())
    })
}

/// A random-init model of `lema bench`'s shape `shape` (e.g. "tiny", "llama2-7b") with a
/// byte-level tokenizer, in folder `dir` (model.safetensors, config.json, tokenizer):
/// for tests and benchmarks. Returns the weights file.
#[pyfunction]
#[pyo3(signature = (dir, shape="tiny", vocab=None, layers=None, dtype="f32", seed=11))]
fn write_random_model(
    py: Python<'_>,
    dir: PathBuf,
    shape: &str,
    vocab: Option<usize>,
    layers: Option<usize>,
    dtype: &str,
    seed: u64,
) -> PyResult<PathBuf> {
    let (shape, dtype) = (shape.to_string(), dtype.to_string());
    interrupt::detached(py, move || {
        let mut s = lema::bench::preset(&shape)?;
        s.vocab = vocab.unwrap_or(s.vocab);
        s.layers = layers.unwrap_or(s.layers);
        let file = lema::bench::write_random_model(&dir, &s, dtype.parse()?, seed, 0.5)?;
        lema::tokenizer::write_byte_level_tokenizer(
            &dir,
            &["<|endoftext|>"],
            Some("<|endoftext|>"),
            None,
        )?;
        Ok(file)
    })
}

/// The local snapshot folder of Hub repository `repo_id` (`org/name`, optionally
/// `@revision`; `revision` overrides), downloading what the cache lacks: config.json and
/// the tokenizer files, and with `weights` the safetensors files too. The environment
/// (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE) applies.
#[pyfunction]
#[pyo3(signature = (repo_id, revision=None, weights=true, progress=true))]
fn hub_snapshot(
    py: Python<'_>,
    repo_id: String,
    revision: Option<String>,
    weights: bool,
    progress: bool,
) -> PyResult<PathBuf> {
    // Ctrl-C stops a download at its next chunk; the part is kept for the next call
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cancel.clone();
    interrupt::run(py, &cancel, move || {
        let id = lema::hub::id::HubId::parse(&repo_id)
            .ok_or_else(|| {
                let why = "no such file or folder, and not a Hugging Face Hub id (org/name or org/name@revision)";
                lema::Error::io(&repo_id, std::io::Error::new(std::io::ErrorKind::NotFound, why))
            })?
            .with_revision(revision.as_deref())?;
        let mut opts = lema::hub::HubOptions::from_env()?.with_progress(progress);
        opts.cancel = Some(flag);
        let snap = if weights {
            lema::hub::download(&id, &opts)?
        } else {
            lema::hub::download_without_weights(&id, &opts)?
        };
        Ok(snap.dir)
    })
}

/// Whether CUDA can be used, and why not when it cannot.
#[pyfunction]
fn cuda_status() -> (bool, Option<String>) {
    match lema::backend::cuda::probe(0) {
        Ok(()) => (true, None),
        Err(why) => (false, Some(why)),
    }
}

#[pymodule]
fn _lema(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<engine::Engine>()?;
    m.add_class::<dlpack::Buffer>()?;
    m.add_class::<tokenizer::Tokenizer>()?;
    m.add_function(wrap_pyfunction!(prepare, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_status, m)?)?;
    m.add_function(wrap_pyfunction!(write_random_model, m)?)?;
    m.add_function(wrap_pyfunction!(hub_snapshot, m)?)?;
    m.add_function(wrap_pyfunction!(tensors::save_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(tensors::load_safetensors, m)?)?;
    Ok(())
}
