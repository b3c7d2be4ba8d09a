//! Hugging Face folder → one monolithic `.safetensors` file (`lema prepare`).
//!
//! The source folder has `config.json` and either `model.safetensors` or shards listed
//! in `model.safetensors.index.json`. The result keeps HF tensor names, with:
//! * GPT-2 names given their `transformer.` prefix where a checkpoint saved them without;
//! * tied weights materialised: `lm_head.weight` written as a copy of the embedding when
//!   the model ties them (Llama `tie_word_embeddings`, GPT-2 always);
//! * non-parameter buffers dropped (`attn.bias`, `attn.masked_bias`, `rotary_emb.inv_freq`);
//! * optionally every tensor cast to one dtype.
//!
//! Tensors are copied one at a time out of memory-mapped shards, in pieces of at most
//! 1 MiB, so memory stays small whatever the model size. PyTorch pickle checkpoints are
//! refused: loading a pickle runs arbitrary code.

use super::{
    ModelSummary, OutputPaths, PrepareReport, Progress, SourceFormat, dtype_counts, encode_f32,
    file_size, layer_sort_key, parameter_count,
};
use crate::error::{Error, Result};
use crate::fsutil::{SafetensorsWriter, TensorSpec, write_file_atomic};
use crate::types::DType;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// File extensions of PyTorch pickle checkpoints, which lema refuses to load.
pub const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt"];

/// Tokenizer and generation files copied beside the output when present.
pub const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

/// Every file copied beside the output when present: [`SIDE_FILES`] and the chat
/// template files ([`crate::tokenizer::TEMPLATE_FILES`]).
pub fn side_file_names() -> impl Iterator<Item = &'static str> {
    SIDE_FILES
        .iter()
        .chain(crate::tokenizer::TEMPLATE_FILES)
        .copied()
}

/// Name suffixes of buffers that HF checkpoints may contain but that are not parameters.
const DROPPED_SUFFIXES: &[&str] = &[".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq"];

/// The error for a pickle checkpoint (a folder of them, or one file): why it is refused
/// and how to convert it. `zip` says which form its first bytes showed, when they were
/// read: the zip archive of `torch.save` or the legacy pickle.
pub fn pickle_refusal(src: &Path, zip: Option<bool>) -> Error {
    let form = match zip {
        Some(true) => " (a zip archive written by torch.save)",
        Some(false) => " (a legacy torch.save pickle)",
        None => "",
    };
    // transformers loads a folder: the file's own, when given a file
    let folder = if src.is_dir() {
        src.to_path_buf()
    } else {
        match src.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    };
    let converted = match folder.file_name() {
        Some(_) => format!("{}-safetensors", folder.display()),
        None => "model-safetensors".to_string(),
    };
    Error::format(
        src,
        format!(
            "this is a PyTorch pickle checkpoint{form}; lema does not load pickles, because \
             unpickling runs arbitrary code from the file. Convert its model folder to \
             safetensors once with transformers, e.g.\n  python -c \"from transformers import \
             AutoModelForCausalLM as M; M.from_pretrained('{0}').save_pretrained('{converted}', \
             safe_serialization=True)\"\nand prepare the new folder with `lema prepare \
             {converted} --out DIR`",
            folder.display()
        ),
    )
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = crate::fsutil::read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// The safetensors files of an HF folder (shard file names, relative to the folder).
/// Tensor name → shard file name, from `model.safetensors.index.json`.
type WeightMap = HashMap<String, String>;

pub(crate) fn shard_files(src: &Path) -> Result<(Vec<String>, Option<WeightMap>)> {
    let index = src.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| Error::format(&index, "no 'weight_map' object"))?;
        let mut weight_map = HashMap::with_capacity(map.len());
        let mut files: Vec<String> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::format(&index, format!("weight_map['{name}'] is not a file name"))
            })?;
            // A shard must be a plain file name inside the folder.
            if file.is_empty()
                || file.contains('/')
                || file.contains('\\')
                || file == "."
                || file == ".."
            {
                return Err(Error::format(
                    &index,
                    format!("weight_map['{name}'] = {file:?} is not a file in the folder"),
                ));
            }
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            weight_map.insert(name.clone(), file.to_string());
        }
        files.sort();
        return Ok((files, Some(weight_map)));
    }
    if src.join("model.safetensors").is_file() {
        return Ok((vec!["model.safetensors".into()], None));
    }
    let entries: Vec<String> = std::fs::read_dir(src)
        .map_err(|e| Error::io(src, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let pickles: Vec<&String> = entries
        .iter()
        .filter(|n| {
            Path::new(n.as_str())
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| PICKLE_EXTENSIONS.contains(&e))
        })
        .collect();
    if !pickles.is_empty() {
        return Err(pickle_refusal(src, None));
    }
    let others: Vec<&String> = entries
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    Err(Error::format(
        src,
        if others.is_empty() {
            "no model.safetensors or model.safetensors.index.json in the folder".to_string()
        } else {
            format!(
                "no model.safetensors or model.safetensors.index.json; found {} (name the shards in an index)",
                others
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    ))
}

fn dtype_of(st: safetensors::Dtype) -> Option<DType> {
    match st {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// One output tensor and where its bytes come from.
struct Source {
    out_name: String,
    shard: usize,
    in_name: String,
    dtype: DType,
    shape: Vec<usize>,
}

/// Prepare an HF folder: see the module documentation. `out` is a folder (receiving
/// `model.safetensors`) or a path ending in `.safetensors`; `dtype` casts every tensor
/// (default: keep each tensor's dtype).
pub fn prepare_monolithic_safetensors(
    src: &Path,
    out: &Path,
    dtype: Option<DType>,
    progress: bool,
) -> Result<PrepareReport> {
    let config_path = src.join("config.json");
    if !config_path.is_file() {
        // A folder of pickles without config.json is still a pickle checkpoint.
        shard_files(src)?;
        return Err(Error::format(
            &config_path,
            "missing: an HF model folder needs config.json",
        ));
    }
    let mut config = read_json(&config_path)?;
    let model_type = config
        .get("model_type")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
        .to_string();
    let Some(arch) = crate::model::family::for_model_type(&model_type) else {
        return Err(Error::format(
            &config_path,
            format!(
                "model_type '{model_type}' (read from 'model_type') is not supported ({})",
                crate::model::family::supported_model_types()
            ),
        ));
    };
    let family = crate::model::family::family(arch);
    let tie = match config.get("tie_word_embeddings") {
        None => family.ties_by_default, // GPT2Config ties by default, LlamaConfig does not

        Some(serde_json::Value::Bool(b)) => *b,
        Some(v) => {
            return Err(Error::format(
                &config_path,
                format!("tie_word_embeddings must be true or false, got {v}"),
            ));
        }
    };
    let (files, weight_map) = shard_files(src)?;
    let paths: Vec<PathBuf> = files.iter().map(|f| src.join(f)).collect();
    let out_paths = OutputPaths::resolve(out)?;
    if let Ok(out_canon) = out_paths.model.canonicalize() {
        for p in &paths {
            if p.canonicalize().ok().as_ref() == Some(&out_canon) {
                return Err(Error::format(
                    &out_paths.model,
                    "the output would overwrite an input shard; choose another output path",
                ));
            }
        }
    }
    let maps: Vec<memmap2::Mmap> = paths
        .iter()
        .map(|p| super::map_readonly(p))
        .collect::<Result<_>>()?;
    let shards: Vec<safetensors::SafeTensors> = maps
        .iter()
        .zip(&paths)
        .map(|(m, p)| {
            safetensors::SafeTensors::deserialize(m)
                .map_err(|e| Error::format(p, format!("invalid safetensors file: {e}")))
        })
        .collect::<Result<_>>()?;

    let mut sources: Vec<Source> = Vec::new();
    let mut dropped = Vec::new();
    let mut renamed = 0usize;
    let mut source_types: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (si, (st, path)) in shards.iter().zip(&paths).enumerate() {
        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        for name in names {
            if let Some(wm) = &weight_map
                && wm.get(name).map(String::as_str) != files.get(si).map(String::as_str)
            {
                continue; // The index assigns this tensor to another shard.
            }
            if DROPPED_SUFFIXES.iter().any(|s| name.ends_with(s)) {
                dropped.push(name.to_string());
                continue;
            }
            let view = st
                .tensor(name)
                .map_err(|e| Error::tensor(path, name, e.to_string()))?;
            *source_types
                .entry(format!("{:?}", view.dtype()))
                .or_insert(0) += 1;
            let in_dtype = dtype_of(view.dtype()).ok_or_else(|| {
                Error::tensor(
                    path,
                    name,
                    format!("dtype {:?} is not supported (F32, F16, BF16)", view.dtype()),
                )
            })?;
            let out_name = match family.root_prefix {
                Some(root) if !name.starts_with(root) && !name.starts_with("lm_head.") => {
                    renamed += 1;
                    format!("{root}{name}")
                }
                _ => name.to_string(),
            };
            if let Some(prev) = seen.insert(out_name.clone(), si) {
                return Err(Error::tensor(
                    path,
                    name,
                    format!(
                        "also present (as '{out_name}') in {}",
                        paths
                            .get(prev)
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    ),
                ));
            }
            sources.push(Source {
                out_name,
                shard: si,
                in_name: name.to_string(),
                dtype: in_dtype,
                shape: view.shape().to_vec(),
            });
        }
    }
    if let Some(wm) = &weight_map {
        for (name, file) in wm {
            let found = files
                .iter()
                .position(|f| f == file)
                .and_then(|i| shards.get(i))
                .is_some_and(|st| st.tensor(name).is_ok());
            if !found {
                return Err(Error::tensor(
                    src.join(file),
                    name,
                    "listed in model.safetensors.index.json but not in the shard",
                ));
            }
        }
    }

    let embed_name = family.embed_name;
    let mut materialized = Vec::new();
    let mut notes = Vec::new();
    let has_head = sources.iter().any(|s| s.out_name == "lm_head.weight");
    if tie {
        if has_head {
            notes.push("tied model already stores lm_head.weight; kept as stored".to_string());
        } else {
            let e = sources
                .iter()
                .find(|s| s.out_name == embed_name)
                .ok_or_else(|| {
                    Error::tensor(
                        src,
                        embed_name,
                        "missing (needed for the tied lm_head.weight)",
                    )
                })?;
            let copy = Source {
                out_name: "lm_head.weight".into(),
                shard: e.shard,
                in_name: e.in_name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
            };
            materialized.push(format!("lm_head.weight <- {embed_name}"));
            sources.push(copy);
        }
    } else if !has_head {
        return Err(Error::tensor(
            src,
            "lm_head.weight",
            "missing and config.json says tie_word_embeddings is false",
        ));
    }
    sources.sort_by_key(|s| layer_sort_key(&s.out_name));

    let specs: Vec<TensorSpec> = sources
        .iter()
        .map(|s| TensorSpec {
            name: s.out_name.clone(),
            dtype: dtype.unwrap_or(s.dtype),
            shape: s.shape.clone(),
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("lema.converted_from".to_string(), "hf".to_string());
    let mut writer = SafetensorsWriter::create(&out_paths.model, specs.clone(), &meta)?;
    let bar = Progress::new(progress, writer.data_bytes(), "safetensors → monolithic");
    const PIECE: usize = 1 << 20;
    let mut f32_buf: Vec<f32> = Vec::new();
    let mut bytes_buf: Vec<u8> = Vec::new();
    for (s, spec) in sources.iter().zip(&specs) {
        let (st, path, map) = match (shards.get(s.shard), paths.get(s.shard), maps.get(s.shard)) {
            (Some(st), Some(p), Some(m)) => (st, p, m),
            _ => return Err(Error::tensor(src, &s.in_name, "shard index out of range")),
        };
        let data = st
            .tensor(&s.in_name)
            .map_err(|e| Error::tensor(path, &s.in_name, e.to_string()))?
            .data();
        if spec.dtype == s.dtype {
            for piece in data.chunks(PIECE) {
                writer.write(&spec.name, piece)?;
                bar.inc(piece.len() as u64);
            }
        } else {
            let step = PIECE / s.dtype.size();
            for piece in data.chunks(step * s.dtype.size()) {
                f32_buf.resize(piece.len() / s.dtype.size(), 0.0);
                s.dtype.decode_into(piece, &mut f32_buf);
                bytes_buf.clear();
                encode_f32(&f32_buf, spec.dtype, &mut bytes_buf);
                writer.write(&spec.name, &bytes_buf)?;
                bar.inc(bytes_buf.len() as u64);
            }
        }
        super::release_pages(map, data);
    }
    let model = writer.finish()?;
    bar.finish();

    // config.json: the source's, with the tying made explicit and the dtype updated.
    if let Some(obj) = config.as_object_mut() {
        obj.insert("tie_word_embeddings".into(), serde_json::Value::Bool(tie));
        if let Some(d) = dtype {
            obj.insert("torch_dtype".into(), d.torch_name().into());
        }
    }
    let mut side_files = vec![super::write_json(&out_paths.dir, "config.json", &config)?];
    for name in side_file_names() {
        let from = src.join(name);
        if !from.is_file() {
            continue;
        }
        let to = out_paths.dir.join(name);
        let same = matches!((from.canonicalize(), to.canonicalize()), (Ok(a), Ok(b)) if a == b);
        if !same {
            let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
            write_file_atomic(&to, &bytes)?;
        }
        side_files.push(to);
    }
    Ok(PrepareReport {
        source: src.to_path_buf(),
        format: SourceFormat::HfFolder,
        bytes: file_size(&model)?,
        output: model,
        side_files,
        model_type,
        tensors: specs.len(),
        parameters: parameter_count(&specs),
        output_dtypes: dtype_counts(&specs),
        source_types,
        materialized,
        dropped,
        renamed,
        notes,
    })
}

/// Summarise an HF folder or a safetensors file from the headers alone.
pub fn inspect(path: &Path) -> Result<ModelSummary> {
    let (files, format, config) = if path.is_dir() {
        let (files, _) = shard_files(path)?;
        let cfg = path.join("config.json");
        let config = if cfg.is_file() {
            Some(read_json(&cfg)?)
        } else {
            None
        };
        (
            files.iter().map(|f| path.join(f)).collect::<Vec<_>>(),
            SourceFormat::HfFolder,
            config,
        )
    } else if path.extension().is_some_and(|e| e == "safetensors") {
        let cfg = path.with_file_name("config.json");
        let config = if cfg.is_file() {
            Some(read_json(&cfg)?)
        } else {
            None
        };
        (vec![path.to_path_buf()], SourceFormat::Safetensors, config)
    } else {
        if let Some(ext) = path.extension().and_then(|e| e.to_str())
            && PICKLE_EXTENSIONS.contains(&ext)
        {
            return Err(pickle_refusal(path, None));
        }
        return Err(Error::format(
            path,
            "not a GGUF file, safetensors file or HF folder",
        ));
    };
    let mut types = BTreeMap::new();
    let mut tensors = 0usize;
    let mut parameters = 0u64;
    for f in &files {
        let map = super::map_readonly(f)?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&map)
            .map_err(|e| Error::format(f, format!("invalid safetensors file: {e}")))?;
        for info in meta.tensors().values() {
            tensors += 1;
            parameters += info.shape.iter().map(|&d| d as u64).product::<u64>();
            *types.entry(format!("{:?}", info.dtype)).or_insert(0) += 1;
        }
    }
    let mut metadata = BTreeMap::new();
    let mut architecture = None;
    if let Some(obj) = config.as_ref().and_then(serde_json::Value::as_object) {
        for (k, v) in obj {
            if !v.is_object() && !v.is_array() {
                metadata.insert(k.clone(), v.to_string());
            }
        }
        architecture = obj
            .get("model_type")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
    }
    Ok(ModelSummary {
        path: path.to_path_buf(),
        format,
        architecture,
        tensors,
        parameters,
        types,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use serde_json::json;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn ramp(n: usize, start: f32) -> Vec<f32> {
        (0..n).map(|i| start + i as f32 * 0.25).collect()
    }

    /// Write a safetensors file of F32 tensors (name, shape, values).
    fn write_st(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Result<()> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, s, v)| (n.to_string(), f32_bytes(v), s.clone()))
            .collect();
        let views = bytes
            .iter()
            .map(|(n, b, s)| {
                TensorView::new(safetensors::Dtype::F32, s.clone(), b).map(|v| (n.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::format(path, e.to_string()))?;
        let out =
            safetensors::serialize(views, None).map_err(|e| Error::format(path, e.to_string()))?;
        std::fs::write(path, out).map_err(|e| Error::io(path, e))
    }

    fn write_text(path: &Path, text: &str) -> Result<()> {
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    type Read = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

    fn read_st(path: &Path) -> Result<Read> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect())
    }

    fn tmp() -> Result<tempfile::TempDir> {
        tempfile::tempdir().map_err(|e| Error::io("tempdir", e))
    }

    #[test]
    fn gpt2_names_are_prefixed_buffers_dropped_and_head_materialised() -> Result<()> {
        let dir = tmp()?;
        let src = dir.path().join("gpt2");
        std::fs::create_dir(&src).map_err(|e| Error::io(&src, e))?;
        let wte = ramp(5 * 4, -1.0);
        write_st(
            &src.join("model.safetensors"),
            &[
                ("wte.weight", vec![5, 4], wte.clone()),
                ("wpe.weight", vec![3, 4], ramp(12, 2.0)),
                ("h.0.attn.c_attn.weight", vec![4, 12], ramp(48, 0.5)),
                ("h.0.attn.c_attn.bias", vec![12], ramp(12, 0.0)),
                ("h.0.attn.bias", vec![1, 1, 3, 3], ramp(9, 0.0)),
                ("h.0.attn.masked_bias", vec![1], vec![-1e4]),
                ("ln_f.weight", vec![4], ramp(4, 1.0)),
            ],
        )?;
        write_text(
            &src.join("config.json"),
            r#"{"model_type": "gpt2", "n_embd": 4}"#,
        )?;
        write_text(&src.join("tokenizer.json"), r#"{"fake": true}"#)?;
        let out = dir.path().join("out");
        let report = super::super::prepare(&src, &out, None, false)?;
        let t = read_st(&out.join("model.safetensors"))?;
        let names: Vec<&str> = t.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            vec![
                "lm_head.weight",
                "transformer.h.0.attn.c_attn.bias",
                "transformer.h.0.attn.c_attn.weight",
                "transformer.ln_f.weight",
                "transformer.wpe.weight",
                "transformer.wte.weight",
            ]
        );
        assert_eq!(t["lm_head.weight"], t["transformer.wte.weight"]);
        assert_eq!(t["lm_head.weight"].2, f32_bytes(&wte));
        assert_eq!(t["transformer.h.0.attn.c_attn.weight"].1, vec![4, 12]);
        assert_eq!(
            report.dropped,
            vec![
                "h.0.attn.bias".to_string(),
                "h.0.attn.masked_bias".to_string()
            ]
        );
        assert_eq!(report.renamed, 5);
        assert_eq!(
            report.materialized,
            vec!["lm_head.weight <- transformer.wte.weight".to_string()]
        );
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("config.json")).map_err(|e| Error::io(&out, e))?,
        )
        .map_err(|e| Error::format(&out, e.to_string()))?;
        assert_eq!(cfg["tie_word_embeddings"], json!(true));
        assert_eq!(cfg["n_embd"], json!(4));
        assert_eq!(
            std::fs::read_to_string(out.join("tokenizer.json"))
                .ok()
                .as_deref(),
            Some(r#"{"fake": true}"#)
        );
        Ok(())
    }

    #[test]
    fn sharded_llama_with_tied_embeddings_and_dtype_conversion() -> Result<()> {
        let dir = tmp()?;
        let src = dir.path().join("llama");
        std::fs::create_dir(&src).map_err(|e| Error::io(&src, e))?;
        let embed = ramp(6 * 4, -3.0);
        let q = ramp(16, 0.1);
        write_st(
            &src.join("model-00001-of-00002.safetensors"),
            &[
                ("model.embed_tokens.weight", vec![6, 4], embed.clone()),
                (
                    "model.layers.0.self_attn.rotary_emb.inv_freq",
                    vec![2],
                    vec![1.0, 0.01],
                ),
            ],
        )?;
        write_st(
            &src.join("model-00002-of-00002.safetensors"),
            &[
                (
                    "model.layers.0.self_attn.q_proj.weight",
                    vec![4, 4],
                    q.clone(),
                ),
                ("model.norm.weight", vec![4], ramp(4, 1.0)),
            ],
        )?;
        let index = json!({"metadata": {}, "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.layers.0.self_attn.rotary_emb.inv_freq": "model-00001-of-00002.safetensors",
            "model.layers.0.self_attn.q_proj.weight": "model-00002-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
        }});
        write_text(
            &src.join("model.safetensors.index.json"),
            &index.to_string(),
        )?;
        write_text(
            &src.join("config.json"),
            r#"{"model_type": "llama", "tie_word_embeddings": true}"#,
        )?;
        let out = dir.path().join("prepared/llama.safetensors");
        let report = prepare_monolithic_safetensors(&src, &out, Some(DType::BF16), false)?;
        assert_eq!(report.output, out);
        let t = read_st(&out)?;
        assert_eq!(t.len(), 4, "{:?}", t.keys().collect::<Vec<_>>());
        let bf = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect()
        };
        assert_eq!(
            t["model.embed_tokens.weight"],
            (safetensors::Dtype::BF16, vec![6, 4], bf(&embed))
        );
        assert_eq!(t["lm_head.weight"], t["model.embed_tokens.weight"]);
        assert_eq!(t["model.layers.0.self_attn.q_proj.weight"].2, bf(&q));
        assert_eq!(
            report.dropped,
            vec!["model.layers.0.self_attn.rotary_emb.inv_freq".to_string()]
        );
        let cfg = read_json(&dir.path().join("prepared/config.json"))?;
        assert_eq!(cfg["torch_dtype"], json!("bfloat16"));

        // An index naming a tensor that its shard lacks is an error naming both.
        let mut bad = index.clone();
        bad["weight_map"]["model.layers.0.mlp.up_proj.weight"] =
            json!("model-00002-of-00002.safetensors");
        write_text(&src.join("model.safetensors.index.json"), &bad.to_string())?;
        let msg = prepare(&src, &dir.path().join("o2"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("model.layers.0.mlp.up_proj.weight") && msg.contains("00002"),
            "{msg}"
        );
        // A shard path that leaves the folder is refused.
        bad["weight_map"]["x"] = json!("../evil.safetensors");
        write_text(&src.join("model.safetensors.index.json"), &bad.to_string())?;
        let msg = prepare(&src, &dir.path().join("o3"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("evil") && msg.contains("not a file in the folder"),
            "{msg}"
        );
        Ok(())
    }

    fn prepare(src: &Path, out: &Path, dtype: Option<DType>) -> Result<PrepareReport> {
        prepare_monolithic_safetensors(src, out, dtype, false)
    }

    #[test]
    fn refusals_name_the_problem() -> Result<()> {
        let dir = tmp()?;
        let src = dir.path().join("m");
        std::fs::create_dir(&src).map_err(|e| Error::io(&src, e))?;
        // Pickles only.
        write_text(&src.join("pytorch_model.bin"), "not really a pickle")?;
        write_text(&src.join("config.json"), r#"{"model_type": "llama"}"#)?;
        let msg = prepare(&src, &dir.path().join("o"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("arbitrary code") && msg.contains("safe_serialization=True"),
            "{msg}"
        );
        let msg = super::super::prepare(
            &src.join("pytorch_model.bin"),
            &dir.path().join("o"),
            None,
            false,
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(msg.contains("pickle"), "{msg}");
        // Untied Llama without lm_head.
        write_st(
            &src.join("model.safetensors"),
            &[("model.embed_tokens.weight", vec![2, 2], ramp(4, 0.0))],
        )?;
        let msg = prepare(&src, &dir.path().join("o"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("lm_head.weight") && msg.contains("tie_word_embeddings is false"),
            "{msg}"
        );
        // Unsupported architecture.
        write_text(&src.join("config.json"), r#"{"model_type": "falcon"}"#)?;
        let msg = prepare(&src, &dir.path().join("o"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("'falcon'") && msg.contains("mistral, qwen2"),
            "{msg}"
        );
        // Output on top of the input.
        write_text(
            &src.join("config.json"),
            r#"{"model_type": "llama", "tie_word_embeddings": true}"#,
        )?;
        let msg = prepare(&src, &src.join("model.safetensors"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("overwrite an input"), "{msg}");
        // In place into the same folder under another name is fine.
        let r = prepare(&src, &src.join("monolithic.safetensors"), None)?;
        assert_eq!(r.tensors, 2);
        let info = super::inspect(&src.join("monolithic.safetensors"))?;
        assert_eq!((info.tensors, info.parameters), (2, 8));
        assert_eq!(info.architecture.as_deref(), Some("llama"));
        Ok(())
    }
}
