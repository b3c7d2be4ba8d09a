//! Importing models (`lema prepare`): a Hugging Face folder or a GGUF file becomes one
//! monolithic `.safetensors` file with HF tensor names and tied weights materialised,
//! with config.json and the tokenizer files beside it (ARCHITECTURE.md §7).
//!
//! Everything streams: tensors are read from memory-mapped inputs and written one at a
//! time (GGUF: one row at a time), so memory stays near the largest tensor, not the model.
//!
//! * [`prepare`] picks the importer from the source: a folder → [`hf`], a `.gguf` file →
//!   [`prepare_gguf`].
//! * [`inspect`] summarises a source without converting it (for `lema info`).

pub mod dequant;
pub mod gguf;
pub mod gguf_convert;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod hf;
pub mod quantize;

pub use hf::prepare_monolithic_safetensors;

use crate::error::{Error, Result};
use crate::modelfile::Kind;
use crate::types::DType;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The kind of model source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceFormat {
    /// A Hugging Face folder with safetensors weights.
    HfFolder,
    /// A single safetensors file.
    Safetensors,
    /// A llama.cpp GGUF file.
    Gguf,
}

impl fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceFormat::HfFolder => "Hugging Face folder",
            SourceFormat::Safetensors => "safetensors file",
            SourceFormat::Gguf => "GGUF file",
        })
    }
}

/// What [`prepare`] did.
#[derive(Clone, Debug)]
pub struct PrepareReport {
    /// The source that was read.
    pub source: PathBuf,
    /// Its format.
    pub format: SourceFormat,
    /// The monolithic `.safetensors` file written.
    pub output: PathBuf,
    /// The other files written beside it (config.json, tokenizer files, …).
    pub side_files: Vec<PathBuf>,
    /// `model_type` of the result (`llama`, `gpt2`).
    pub model_type: String,
    /// Number of tensors written.
    pub tensors: usize,
    /// Number of values in them.
    pub parameters: u64,
    /// Size of the output file in bytes.
    pub bytes: u64,
    /// Tensor counts by output dtype.
    pub output_dtypes: BTreeMap<String, usize>,
    /// Tensor counts by source type (ggml types for GGUF, safetensors dtypes otherwise).
    pub source_types: BTreeMap<String, usize>,
    /// Tensors written as copies of another (tied weights), as `copy <- original`.
    pub materialized: Vec<String>,
    /// Source tensors left out (non-parameter buffers).
    pub dropped: Vec<String>,
    /// Source tensors whose name changed (GPT-2 prefixing, GGUF → HF names).
    pub renamed: usize,
    /// Anything else worth telling the user.
    pub notes: Vec<String>,
}

impl fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = |m: &BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "source: {} ({})", self.source.display(), self.format)?;
        writeln!(f, "wrote: {} ({} bytes)", self.output.display(), self.bytes)?;
        writeln!(
            f,
            "model: {}, {} tensors, {} parameters",
            self.model_type, self.tensors, self.parameters
        )?;
        writeln!(f, "source types: {}", counts(&self.source_types))?;
        writeln!(f, "output dtypes: {}", counts(&self.output_dtypes))?;
        if !self.materialized.is_empty() {
            writeln!(
                f,
                "materialised tied weights: {}",
                self.materialized.join(", ")
            )?;
        }
        if !self.dropped.is_empty() {
            writeln!(f, "dropped buffers: {}", self.dropped.len())?;
        }
        for s in &self.side_files {
            writeln!(f, "wrote: {}", s.display())?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// Where the output goes: a folder and the model file inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputPaths {
    /// The folder for the model file and the side files.
    pub dir: PathBuf,
    /// The `.safetensors` file.
    pub model: PathBuf,
}

impl OutputPaths {
    /// `out` ending in `.safetensors` names the model file itself; anything else is a
    /// folder that receives `model.safetensors`.
    pub fn of(out: &Path) -> Self {
        let is_file = out.extension().is_some_and(|e| e == "safetensors");
        let (dir, model) = if is_file {
            let dir = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (dir, out.to_path_buf())
        } else {
            (out.to_path_buf(), out.join("model.safetensors"))
        };
        Self { dir, model }
    }

    /// [`OutputPaths::of`], creating the folder when missing.
    pub fn resolve(out: &Path) -> Result<Self> {
        let paths = Self::of(out);
        std::fs::create_dir_all(&paths.dir).map_err(|e| Error::io(&paths.dir, e))?;
        Ok(paths)
    }
}

/// A byte-counting progress bar on stderr, or nothing.
pub struct Progress(indicatif::ProgressBar);

impl Progress {
    /// A bar over `total` bytes, shown only when `enabled`.
    pub fn new(enabled: bool, total: u64, what: &str) -> Self {
        if !enabled {
            return Self(indicatif::ProgressBar::hidden());
        }
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_string());
        Self(bar)
    }

    /// Count `n` more bytes done.
    pub fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    /// Remove the bar.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// Memory-map a model file read-only. The import code's only way to map a file.
pub(crate) fn map_readonly(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: a read-only private map of a model file that lema never writes while it is
    // mapped. If another process truncated or rewrote the file meanwhile, reads could see
    // changed bytes or fault: the documented contract of mmap, shared by every mmap-based
    // model loader, and outside what lema can prevent.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Tell the kernel that the pages of `part` (a slice of `map`) are no longer needed, so
/// that a conversion's resident memory does not grow with the input file: the pages are
/// clean copies of the file and are simply read again if touched later. Best effort;
/// does nothing when `part` is not inside `map`.
pub(crate) fn release_pages(map: &memmap2::Mmap, part: &[u8]) {
    let base = map.as_ptr() as usize;
    let start = part.as_ptr() as usize;
    let Some(offset) = start.checked_sub(base) else {
        return;
    };
    if part.is_empty()
        || offset
            .checked_add(part.len())
            .is_none_or(|end| end > map.len())
    {
        return;
    }
    // SAFETY: `map` is a read-only mapping of a file that is never written through it, so
    // every page is a clean page of the file; MADV_DONTNEED only drops those pages, and a
    // later read of the range (through `part` or any other slice) faults the same bytes
    // back in from the file. The range was checked to lie inside the mapping.
    #[cfg(unix)]
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, part.len())
    };
}

/// Append `values` to `out` in `dtype`'s little-endian encoding (round to nearest even).
pub fn encode_f32(values: &[f32], dtype: DType, out: &mut Vec<u8>) {
    dtype.encode_into(values, out)
}

/// Order of tensors in the output file: embeddings, then layers by number, then the
/// final norm, then the head, so that a layer's bytes are contiguous and in stream order.
pub(crate) fn layer_sort_key(name: &str) -> (u8, usize, String) {
    let layer = name
        .split('.')
        .collect::<Vec<_>>()
        .windows(2)
        .find_map(|w| match w {
            [group, n] if *group == "layers" || *group == "h" => n.parse::<usize>().ok(),
            _ => None,
        });
    if let Some(l) = layer {
        return (1, l, name.to_string());
    }
    let group = if name.starts_with("lm_head") {
        3
    } else if name.contains("embed") || name.contains(".wte.") || name.contains(".wpe.") {
        0
    } else {
        2
    };
    (group, 0, name.to_string())
}

fn dtype_counts(specs: &[crate::fsutil::TensorSpec]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in specs {
        *m.entry(s.dtype.to_string()).or_insert(0) += 1;
    }
    m
}

fn parameter_count(specs: &[crate::fsutil::TensorSpec]) -> u64 {
    specs
        .iter()
        .map(|s| s.shape.iter().map(|&d| d as u64).product::<u64>())
        .sum()
}

/// Write JSON beside the model, atomically; returns the path.
fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<PathBuf> {
    let path = dir.join(name);
    let text = gguf_tokenizer::to_json_text(value, &path)?;
    crate::fsutil::write_file_atomic(&path, text.as_bytes())?;
    Ok(path)
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len())
}

/// Convert a GGUF file of an architecture with a GGUF description
/// ([`crate::model::gguf::for_architecture`]): `model.safetensors` (dequantized to `dtype`, default bf16
/// for quantized input), config.json, tokenizer.json, tokenizer_config.json,
/// special_tokens_map.json and generation_config.json. See [`OutputPaths::resolve`] for
/// `out`.
pub fn prepare_gguf(
    src: &Path,
    out: &Path,
    dtype: Option<DType>,
    progress: bool,
) -> Result<PrepareReport> {
    let file = gguf::GgufFile::open(src)?;
    let h = &file.header;
    let plan = gguf_convert::GgufPlan::new(h, src, dtype)?;
    let tok = gguf_tokenizer::from_gguf(h, src, Some(plan.meta.max_position_embeddings))?;
    let tok_text = gguf_tokenizer::to_json_text(&tok.tokenizer_json, src)?;
    gguf_tokenizer::check_loads(&tok_text, src)?;

    let paths = OutputPaths::resolve(out)?;
    let specs = plan.specs();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("lema.converted_from".to_string(), "gguf".to_string());
    if let Some(name) = src.file_name() {
        meta.insert(
            "lema.source".to_string(),
            name.to_string_lossy().into_owned(),
        );
    }
    let mut writer = crate::fsutil::SafetensorsWriter::create(&paths.model, specs.clone(), &meta)?;
    let bar = Progress::new(progress, writer.data_bytes(), "gguf → safetensors");
    plan.write_tensors(&file, &mut writer, &bar)?;
    let model = writer.finish()?;
    bar.finish();

    let mut side_files = vec![write_json(&paths.dir, "config.json", &plan.config)?];
    let tok_path = paths.dir.join("tokenizer.json");
    crate::fsutil::write_file_atomic(&tok_path, tok_text.as_bytes())?;
    side_files.push(tok_path);
    side_files.push(write_json(
        &paths.dir,
        "tokenizer_config.json",
        &tok.tokenizer_config,
    )?);
    side_files.push(write_json(
        &paths.dir,
        "special_tokens_map.json",
        &tok.special_tokens_map,
    )?);
    let mut gen_config = serde_json::json!({"_from_model_config": true});
    if let (Some(obj), Some(cfg)) = (gen_config.as_object_mut(), plan.config.as_object()) {
        for k in ["bos_token_id", "eos_token_id", "pad_token_id"] {
            if let Some(v) = cfg.get(k) {
                obj.insert(k.into(), v.clone());
            }
        }
    }
    side_files.push(write_json(
        &paths.dir,
        "generation_config.json",
        &gen_config,
    )?);

    let materialized = if plan.tied {
        vec!["lm_head.weight <- model.embed_tokens.weight".to_string()]
    } else {
        Vec::new()
    };
    Ok(PrepareReport {
        source: src.to_path_buf(),
        format: SourceFormat::Gguf,
        bytes: file_size(&model)?,
        output: model,
        side_files,
        model_type: plan.model_type.clone(),
        tensors: specs.len(),
        parameters: parameter_count(&specs),
        output_dtypes: dtype_counts(&specs),
        source_types: plan.source_types(),
        materialized,
        dropped: Vec::new(),
        renamed: h.tensors.len(),
        notes: tok.notes,
    })
}

/// Prepare any supported source: an HF folder ([`prepare_monolithic_safetensors`]) or a
/// GGUF file ([`prepare_gguf`]). `dtype` converts the weights (default: keep them, or
/// bf16 for quantized GGUF); `progress` shows a bar on stderr.
pub fn prepare(
    src: &Path,
    out: &Path,
    dtype: Option<DType>,
    progress: bool,
) -> Result<PrepareReport> {
    match classify_source(src)? {
        Kind::Folder { .. } => prepare_monolithic_safetensors(src, out, dtype, progress),
        Kind::Gguf => prepare_gguf(src, out, dtype, progress),
        _ => Err(Error::format(
            src,
            "not a model source lema can prepare: give a Hugging Face folder (config.json + safetensors) or a .gguf file",
        )),
    }
}

/// The kind of a source given to `prepare` or `info`, with the ones neither reads (missing,
/// a pickle, a FIFO) refused by name; a FIFO is never opened.
fn classify_source(src: &Path) -> Result<Kind> {
    let kind = crate::modelfile::classify(src)?;
    match kind {
        Kind::Missing => Err(Error::format(src, "no such file or folder")),
        Kind::Pickle { zip } => Err(hf::pickle_refusal(src, zip)),
        Kind::NotRegular(what) => Err(Error::format(
            src,
            format!(
                "is {what}, not a model: give a Hugging Face folder, a .gguf file or a .safetensors file"
            ),
        )),
        _ => Ok(kind),
    }
}

/// A short description of a model source, for `lema info`.
#[derive(Clone, Debug)]
pub struct ModelSummary {
    /// The file or folder summarised.
    pub path: PathBuf,
    /// What kind of source it is.
    pub format: SourceFormat,
    /// `general.architecture` (GGUF) or `model_type` (config.json), when known.
    pub architecture: Option<String>,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of values in them.
    pub parameters: u64,
    /// Tensor counts by element type.
    pub types: BTreeMap<String, usize>,
    /// Selected scalar metadata (GGUF keys or config.json fields), as text.
    pub metadata: BTreeMap<String, String>,
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} ({})", self.path.display(), self.format)?;
        if let Some(a) = &self.architecture {
            writeln!(f, "architecture: {a}")?;
        }
        writeln!(
            f,
            "tensors: {}, parameters: {}",
            self.tensors, self.parameters
        )?;
        let types: Vec<String> = self.types.iter().map(|(k, v)| format!("{v} {k}")).collect();
        writeln!(f, "types: {}", types.join(", "))?;
        for (k, v) in &self.metadata {
            writeln!(f, "{k}: {v}")?;
        }
        Ok(())
    }
}

/// Summarise a GGUF file, an HF folder or a safetensors file without converting it.
pub fn inspect(path: &Path) -> Result<ModelSummary> {
    if classify_source(path)? != Kind::Gguf {
        return hf::inspect(path);
    }
    let file = gguf::GgufFile::open(path)?;
    let h = &file.header;
    let mut types = BTreeMap::new();
    for t in &h.tensors {
        *types.entry(t.ty.name().to_string()).or_insert(0) += 1;
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("gguf.version".to_string(), h.version.to_string());
    for (k, v) in &h.metadata {
        let text = match v {
            gguf::MetaValue::Array(a) => format!("[{} × {}]", a.len(), a.type_name()),
            gguf::MetaValue::String(s) if s.len() > 80 => format!("<{} bytes of text>", s.len()),
            gguf::MetaValue::String(s) => s.clone(),
            other => format!("{other:?}"),
        };
        metadata.insert(k.clone(), text);
    }
    Ok(ModelSummary {
        path: path.to_path_buf(),
        format: SourceFormat::Gguf,
        architecture: h.architecture().map(str::to_string),
        tensors: h.tensors.len(),
        parameters: h.tensors.iter().map(gguf::TensorInfo::n_elements).sum(),
        types,
        metadata,
    })
}
