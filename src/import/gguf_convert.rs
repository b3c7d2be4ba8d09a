//! GGUF → HF folder, for every architecture with a GGUF description
//! ([`crate::model::gguf::GgufArch`], found by `general.architecture`): tensor names,
//! shapes, the Q/K row order, the norm offset and config.json, driven by the description.
//!
//! What differs between a llama.cpp file and the HF checkpoint it came from:
//! * names: `blk.N.attn_q.weight` is `model.layers.N.self_attn.q_proj.weight`, and so on
//!   (the description's table);
//! * dimension order: ggml lists dimensions fastest-varying first, so `dims [C, V]` is the
//!   HF shape `[V, C]` with the same bytes;
//! * in `llama` files only, the rows of `q_proj` and `k_proj`: llama.cpp's
//!   `convert_hf_to_gguf.py` reorders them per head from HF's "rotate halves" RoPE layout
//!   to ggml's interleaved pairs (`permute`); [`gguf_row_of_hf_row`] undoes it;
//! * in `gemma3` files, every `*norm.weight` is stored as 1 + w (subtracted in f32).
//!
//! Conversion streams row by row: each HF row is read from its GGUF row, dequantized,
//! cast and written, so memory stays at one row plus the output buffer.

use super::dequant;
use super::gguf::{GgmlType, GgufFile, GgufHeader, MetaArray, MetaValue, TensorInfo};
use super::{Progress, encode_f32, layer_sort_key};
use crate::error::{Error, Result};
use crate::fsutil::{SafetensorsWriter, TensorSpec};
use crate::model::gguf::{self as desc, Dim, GgufArch, GgufMeta, Need, Rows};
use crate::types::DType;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

pub use crate::model::gguf::json_f32;

/// The HF name of a GGUF tensor under `d`, with the block tensor's description (`None` for
/// the embedding, final norm and head), or `None` for a name `d` does not know.
pub fn hf_name(d: &GgufArch, gguf: &str) -> Option<(String, Option<&'static desc::GgufTensor>)> {
    if let Some((_, hf, _)) = desc::GLOBALS.iter().find(|(g, _, _)| *g == gguf) {
        return Some((hf.to_string(), None));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let t = d
        .tensors
        .iter()
        .find(|t| t.gguf == module && t.suffix == suffix)?;
    Some((format!("model.layers.{layer}.{}.{suffix}", t.hf), Some(t)))
}

/// Undo `convert_hf_to_gguf.py`'s `permute(w, n_head, n_head)` on rows: the GGUF row that
/// holds HF row `r` of a `[rows, …]` tensor split into `n_head` heads.
///
/// The Python reshapes the rows of each head as `[2, head_dim/2]` and swaps the two axes,
/// so HF row `h·hd + j·hd/2 + i` (half `j`, position `i`) lands in GGUF row
/// `h·hd + 2i + j`. Requires `rows` to be a multiple of `2·n_head` (checked by callers).
pub fn gguf_row_of_hf_row(r: usize, rows: usize, n_head: usize) -> usize {
    let hd = rows / n_head;
    let half = hd / 2;
    let (h, within) = (r / hd, r % hd);
    let (j, i) = (within / half, within % half);
    h * hd + 2 * i + j
}

/// The Hugging Face Hub id (`owner/name`) of the model a GGUF was converted from, when its
/// metadata records one: `general.source.huggingface.repository` (older llama.cpp
/// converters), or a `https://huggingface.co/owner/name` URL in `general.source.repo_url`
/// or `general.repo_url`. Not `general.base_model.*`, which names the parent model.
fn hub_source_id(h: &GgufHeader) -> Option<String> {
    let text = |key: &str| h.get(key).and_then(MetaValue::as_str).map(str::trim);
    let from_url = |key: &str| {
        let url = text(key)?;
        let rest = [
            "https://huggingface.co/",
            "http://huggingface.co/",
            "huggingface.co/",
        ]
        .iter()
        .find_map(|p| url.strip_prefix(p))?;
        let mut parts = rest.trim_end_matches('/').splitn(3, '/');
        Some(format!("{}/{}", parts.next()?, parts.next()?))
    };
    text("general.source.huggingface.repository")
        .map(str::to_string)
        .or_else(|| from_url("general.source.repo_url"))
        .or_else(|| from_url("general.repo_url"))
        .filter(|id| crate::checkpoint::is_hub_repo_id(id))
}

fn meta_usize(h: &GgufHeader, path: &Path, key: &str) -> Result<Option<usize>> {
    match h.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "metadata '{key}' must be a non-negative integer, got {}",
                        v.type_name()
                    ),
                )
            }),
    }
}

fn require_usize(h: &GgufHeader, path: &Path, key: &str) -> Result<usize> {
    match meta_usize(h, path, key)? {
        Some(0) => Err(Error::format(path, format!("metadata '{key}' is 0"))),
        Some(v) => Ok(v),
        None => Err(Error::format(path, format!("metadata '{key}' is missing"))),
    }
}

fn meta_f32(h: &GgufHeader, path: &Path, key: &str) -> Result<Option<f32>> {
    match h.get(key) {
        None => Ok(None),
        Some(v) => v.as_f64().map(|x| Some(x as f32)).ok_or_else(|| {
            Error::format(
                path,
                format!("metadata '{key}' must be a number, got {}", v.type_name()),
            )
        }),
    }
}

/// The description of the file's `general.architecture`, or an error naming the key, the
/// value and the supported ones.
pub fn description(h: &GgufHeader, path: &Path) -> Result<&'static GgufArch> {
    let supported = desc::supported_architectures();
    let arch = h.architecture().ok_or_else(|| {
        Error::format(
            path,
            format!("metadata 'general.architecture' is missing; supported: {supported}"),
        )
    })?;
    desc::for_architecture(arch).ok_or_else(|| {
        Error::format(
            path,
            format!(
                "general.architecture is '{arch}' (read from 'general.architecture'); GGUF files lema converts: {supported}"
            ),
        )
    })
}

/// Read and check the `{arch}.*` metadata a description needs.
pub fn read_meta(h: &GgufHeader, path: &Path, d: &GgufArch) -> Result<GgufMeta> {
    let a = d.arch;
    let k = |s: &str| format!("{a}.{s}");
    let hidden_size = require_usize(h, path, &k("embedding_length"))?;
    let num_attention_heads = require_usize(h, path, &k("attention.head_count"))?;
    let num_key_value_heads =
        meta_usize(h, path, &k("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(Error::format(
            path,
            format!(
                "{a}.attention.head_count {num_attention_heads} is not a multiple of head_count_kv {num_key_value_heads}"
            ),
        ));
    }
    let head_dim = match meta_usize(h, path, &k("attention.key_length"))? {
        Some(d) => d,
        None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => {
            return Err(Error::format(
                path,
                format!(
                    "{a}.embedding_length {hidden_size} is not a multiple of head_count {num_attention_heads}"
                ),
            ));
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::format(
            path,
            format!("head dimension {head_dim} must be even and non-zero"),
        ));
    }
    if let Some(v) = meta_usize(h, path, &k("attention.value_length"))?
        && v != head_dim
    {
        return Err(Error::format(
            path,
            format!(
                "{a}.attention.value_length {v} differs from key_length {head_dim}; not supported"
            ),
        ));
    }
    if let Some(r) = meta_usize(h, path, &k("rope.dimension_count"))?
        && r != head_dim
    {
        return Err(Error::format(
            path,
            format!(
                "{a}.rope.dimension_count {r} differs from the head dimension {head_dim}; partial rotary embeddings are not supported"
            ),
        ));
    }
    let tokens = h
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .map(|a| a.len());
    // The token list decides; {arch}.vocab_size is the fallback. The embedding's shape is
    // checked against the result.
    let vocab_size = match (tokens, meta_usize(h, path, &k("vocab_size"))?) {
        (Some(n), _) => n,
        (None, Some(v)) => v,
        (None, None) => {
            return Err(Error::format(
                path,
                format!("neither {a}.vocab_size nor tokenizer.ggml.tokens is present"),
            ));
        }
    };
    let rope_linear_factor = match h.get(&k("rope.scaling.type")).and_then(MetaValue::as_str) {
        None | Some("none") => None,
        Some("linear") => Some(
            meta_f32(h, path, &k("rope.scaling.factor"))?.ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "{a}.rope.scaling.type is 'linear' but {a}.rope.scaling.factor is missing"
                    ),
                )
            })?,
        ),
        Some(other) => {
            return Err(Error::format(
                path,
                format!("{a}.rope.scaling.type '{other}' is not supported (none, linear)"),
            ));
        }
    };
    let num_hidden_layers = require_usize(h, path, &k("block_count"))?;
    let sliding_layers = match h.get(&k("attention.sliding_window_pattern")) {
        None => None,
        Some(MetaValue::Array(MetaArray::Bool(v))) => Some(v.clone()),
        Some(v) => match v.as_u64() {
            Some(0) | None => {
                return Err(Error::format(
                    path,
                    format!(
                        "metadata '{a}.attention.sliding_window_pattern' must be a positive period or one bool per layer, got {}",
                        v.type_name()
                    ),
                ));
            }
            Some(n) => {
                let n = n as usize;
                Some((0..num_hidden_layers).map(|i| i % n < n - 1).collect())
            }
        },
    };
    Ok(GgufMeta {
        name: h
            .get("general.name")
            .and_then(MetaValue::as_str)
            .map(str::to_string),
        vocab_size,
        hidden_size,
        intermediate_size: require_usize(h, path, &k("feed_forward_length"))?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings: require_usize(h, path, &k("context_length"))?,
        rms_norm_eps: meta_f32(h, path, &k("attention.layer_norm_rms_epsilon"))?.ok_or_else(
            || {
                Error::format(
                    path,
                    format!("metadata '{a}.attention.layer_norm_rms_epsilon' is missing"),
                )
            },
        )?,
        rope_theta: meta_f32(h, path, &k("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_linear_factor,
        rope_original_context: meta_usize(h, path, &k("rope.scaling.original_context_length"))?,
        sliding_window: meta_usize(h, path, &k("attention.sliding_window"))?.filter(|&w| w > 0),
        sliding_layers,
        final_logit_softcapping: meta_f32(h, path, &k("final_logit_softcapping"))?,
        attn_logit_softcapping: meta_f32(h, path, &k("attn_logit_softcapping"))?,
        attention_scale: meta_f32(h, path, &k("attention.scale"))?,
        attention_bias: h.tensors.iter().any(|t| t.name == "blk.0.attn_q.bias"),
    })
}

fn dim_size(m: &GgufMeta, d: Dim) -> usize {
    let q = m.num_attention_heads * m.head_dim;
    let kv = m.num_key_value_heads * m.head_dim;
    match d {
        Dim::Hidden => m.hidden_size,
        Dim::Vocab => m.vocab_size,
        Dim::Ffn => m.intermediate_size,
        Dim::Ffn2 => 2 * m.intermediate_size,
        Dim::Q => q,
        Dim::Kv => kv,
        Dim::Qkv => q + 2 * kv,
        Dim::HeadDim => m.head_dim,
    }
}

fn dims_text(dims: &[Dim]) -> String {
    let names: Vec<&str> = dims
        .iter()
        .map(|d| match d {
            Dim::Hidden => "embedding_length",
            Dim::Vocab => "vocabulary",
            Dim::Ffn => "feed_forward_length",
            Dim::Ffn2 => "2·feed_forward_length",
            Dim::Q => "head_count·head_dim",
            Dim::Kv => "head_count_kv·head_dim",
            Dim::Qkv => "(head_count + 2·head_count_kv)·head_dim",
            Dim::HeadDim => "head_dim",
        })
        .collect();
    format!("[{}]", names.join(", "))
}

/// One output tensor: where it comes from and how its rows are reordered.
#[derive(Clone, Debug)]
struct Planned {
    hf: String,
    source: TensorInfo,
    shape: Vec<usize>,
    /// Heads whose Q/K row permutation is undone (`None`: rows copied in order).
    unpermute_heads: Option<usize>,
    /// Subtracted from every value (the description's norm offset, on norms).
    offset: f32,
}

/// What the conversion will do, before any data is touched.
#[derive(Clone, Debug)]
pub struct GgufPlan {
    /// The architecture's description.
    pub arch: &'static GgufArch,
    /// Sizes and options from the metadata.
    pub meta: GgufMeta,
    /// config.json for the converted model.
    pub config: serde_json::Value,
    /// `model_type` of the result.
    pub model_type: String,
    /// Whether `lm_head.weight` is a copy of the embedding (no `output.weight`).
    pub tied: bool,
    /// Output element type.
    pub dtype: DType,
    tensors: Vec<Planned>,
}

impl GgufPlan {
    /// Map every tensor, check every shape and build config.json. `dtype` overrides the
    /// default output type (bf16 when any input is quantized or bf16, else f16 when any is
    /// f16, else f32).
    pub fn new(h: &GgufHeader, path: &Path, dtype: Option<DType>) -> Result<Self> {
        let d = description(h, path)?;
        let meta = read_meta(h, path, d)?;
        let mut tensors = Vec::with_capacity(h.tensors.len() + 1);
        let mut unknown = Vec::new();
        for t in &h.tensors {
            if let Some((_, why)) = d.refused.iter().find(|(n, _)| *n == t.name) {
                return Err(Error::tensor(path, &t.name, *why));
            }
            let Some((hf, td)) = hf_name(d, &t.name) else {
                unknown.push(t.name.clone());
                continue;
            };
            let shape: Vec<usize> = t
                .hf_shape()
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| Error::tensor(path, &t.name, "dimension does not fit in memory"))?;
            let (dims, layer) = match td {
                Some(td) => {
                    let layer: usize = hf
                        .strip_prefix("model.layers.")
                        .and_then(|r| r.split('.').next())
                        .and_then(|l| l.parse().ok())
                        .unwrap_or(usize::MAX);
                    (td.shape, Some(layer))
                }
                None => desc::GLOBALS
                    .iter()
                    .find(|(g, _, _)| *g == t.name)
                    .map(|(_, _, s)| (*s, None))
                    .ok_or_else(|| Error::internal("GLOBALS lost a name"))?,
            };
            if let Some(l) = layer
                && l >= meta.num_hidden_layers
            {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!(
                        "block {l} is outside the {} blocks {}.block_count declares",
                        meta.num_hidden_layers, d.arch
                    ),
                ));
            }
            let expected: Vec<usize> = dims.iter().map(|&x| dim_size(&meta, x)).collect();
            if shape != expected {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!(
                        "HF shape {shape:?} (ggml dims {:?}) but the {}.* metadata implies {expected:?} = {} for '{hf}'",
                        t.dims,
                        d.arch,
                        dims_text(dims)
                    ),
                ));
            }
            if !dequant::is_supported(t.ty) {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    dequant::DequantError::Unsupported(t.ty).to_string(),
                ));
            }
            let unpermute_heads = match td.map(|t| t.rows) {
                Some(Rows::QueryHeads) if d.permute_qk => Some(meta.num_attention_heads),
                Some(Rows::KeyHeads) if d.permute_qk => Some(meta.num_key_value_heads),
                _ => None,
            };
            if let (Some(heads), Some(&rows)) = (unpermute_heads, shape.first())
                && rows % (2 * heads) != 0
            {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!("{rows} rows cannot be split into {heads} heads of even size"),
                ));
            }
            let offset = if hf.ends_with("norm.weight") {
                d.norm_offset
            } else {
                0.0
            };
            tensors.push(Planned {
                hf,
                source: t.clone(),
                shape,
                unpermute_heads,
                offset,
            });
        }
        if !unknown.is_empty() {
            return Err(Error::format(
                path,
                format!(
                    "tensors with no HF equivalent in a '{}' file: {}",
                    d.arch,
                    unknown.join(", ")
                ),
            ));
        }
        // Every required tensor exactly once; an optional one in every block or in none.
        let have: HashSet<&str> = tensors.iter().map(|p| p.hf.as_str()).collect();
        let mut required = vec![
            "model.embed_tokens.weight".to_string(),
            "model.norm.weight".to_string(),
        ];
        for t in d.tensors {
            let name = |l: usize| format!("model.layers.{l}.{}.{}", t.hf, t.suffix);
            let present = (0..meta.num_hidden_layers).any(|l| have.contains(name(l).as_str()));
            if t.need == Need::Required || present {
                required.extend((0..meta.num_hidden_layers).map(name));
            }
        }
        let missing: Vec<&str> = required
            .iter()
            .map(String::as_str)
            .filter(|n| !have.contains(n))
            .collect();
        if !missing.is_empty() {
            return Err(Error::format(
                path,
                format!("missing tensors (HF names): {}", missing.join(", ")),
            ));
        }
        let tied = !have.contains("lm_head.weight");
        if tied {
            let embed = tensors
                .iter()
                .find(|p| p.hf == "model.embed_tokens.weight")
                .cloned()
                .ok_or_else(|| Error::format(path, "token_embd.weight is missing"))?;
            tensors.push(Planned {
                hf: "lm_head.weight".into(),
                ..embed
            });
        }
        tensors.sort_by_key(|p| layer_sort_key(&p.hf));

        let dtype = dtype.unwrap_or_else(|| {
            let types: Vec<GgmlType> = h.tensors.iter().map(|t| t.ty).collect();
            if types
                .iter()
                .any(|t| t.is_quantized() || *t == GgmlType::BF16)
            {
                DType::BF16
            } else if types.contains(&GgmlType::F16) {
                DType::F16
            } else {
                DType::F32
            }
        });
        let config = build_config(h, path, d, &meta, tied, dtype)?;
        let model_type = config["model_type"].as_str().unwrap_or(d.arch).to_string();
        Ok(Self {
            arch: d,
            meta,
            config,
            model_type,
            tied,
            dtype,
            tensors,
        })
    }

    /// The output tensors in write order.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.tensors
            .iter()
            .map(|p| TensorSpec {
                name: p.hf.clone(),
                dtype: self.dtype,
                shape: p.shape.clone(),
            })
            .collect()
    }

    /// Counts of the source tensors' ggml types (each GGUF tensor once).
    pub fn source_types(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        let mut seen = HashSet::new();
        for p in &self.tensors {
            if seen.insert(p.source.name.as_str()) {
                *m.entry(p.source.ty.name().to_string()).or_insert(0) += 1;
            }
        }
        m
    }

    /// Stream every tensor into `writer` (created from [`GgufPlan::specs`]).
    pub fn write_tensors(
        &self,
        gguf: &GgufFile,
        writer: &mut SafetensorsWriter,
        progress: &Progress,
    ) -> Result<()> {
        let path = gguf.path();
        let mut row_f32 = Vec::new();
        let mut chunk: Vec<u8> = Vec::with_capacity(1 << 20);
        for p in &self.tensors {
            let data = gguf.tensor_data(&p.source)?;
            let row_len = usize::try_from(p.source.dims.first().copied().unwrap_or(1))
                .map_err(|_| Error::tensor(path, &p.source.name, "row too long"))?;
            let rows: usize = p.shape.iter().product::<usize>() / row_len.max(1);
            let row_bytes = data.len() / rows.max(1);
            if rows.checked_mul(row_bytes) != Some(data.len()) {
                return Err(Error::tensor(
                    path,
                    &p.source.name,
                    "data is not a whole number of rows",
                ));
            }
            row_f32.resize(row_len, 0.0f32);
            chunk.clear();
            for r in 0..rows {
                let src_row = match p.unpermute_heads {
                    Some(heads) => gguf_row_of_hf_row(r, rows, heads),
                    None => r,
                };
                let start = src_row * row_bytes;
                let src = data.get(start..start + row_bytes).ok_or_else(|| {
                    Error::tensor(
                        path,
                        &p.source.name,
                        format!("row {src_row} outside the data"),
                    )
                })?;
                dequant::dequantize(p.source.ty, src, &mut row_f32)
                    .map_err(|e| Error::tensor(path, &p.source.name, e.to_string()))?;
                if let Some(bad) = row_f32.iter().position(|x| !x.is_finite()) {
                    return Err(Error::tensor(
                        path,
                        &p.source.name,
                        format!(
                            "non-finite value {} at row {src_row}, column {bad}",
                            row_f32[bad]
                        ),
                    ));
                }
                if p.offset != 0.0 {
                    row_f32.iter_mut().for_each(|x| *x -= p.offset);
                }
                encode_f32(&row_f32, self.dtype, &mut chunk);
                if chunk.len() >= 1 << 20 {
                    writer.write(&p.hf, &chunk)?;
                    progress.inc(chunk.len() as u64);
                    chunk.clear();
                }
            }
            if !chunk.is_empty() {
                writer.write(&p.hf, &chunk)?;
                progress.inc(chunk.len() as u64);
                chunk.clear();
            }
            gguf.release(&p.source);
        }
        Ok(())
    }
}

/// config.json: the sizes, tokens, tie and dtype every family has, then the description's
/// own keys (which win).
fn build_config(
    h: &GgufHeader,
    path: &Path,
    d: &GgufArch,
    m: &GgufMeta,
    tied: bool,
    dtype: DType,
) -> Result<serde_json::Value> {
    let token_id = |key: &str| -> Result<Option<usize>> { meta_usize(h, path, key) };
    let torch_dtype = dtype.torch_name();
    let mut config = json!({
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_hidden_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_key_value_heads,
        "head_dim": m.head_dim,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": json_f32(m.rms_norm_eps),
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": tied,
        "initializer_range": 0.02,
        "torch_dtype": torch_dtype,
        "use_cache": true,
    });
    let own = (d.config)(m).map_err(|e| Error::format(path, e))?;
    if let Some(obj) = config.as_object_mut() {
        for (k, v) in [
            ("bos_token_id", token_id("tokenizer.ggml.bos_token_id")?),
            ("eos_token_id", token_id("tokenizer.ggml.eos_token_id")?),
            ("pad_token_id", token_id("tokenizer.ggml.padding_token_id")?),
        ] {
            if let Some(id) = v {
                obj.insert(k.into(), json!(id));
            }
        }
        // transformers' `_name_or_path`: the Hub id the GGUF says it was converted
        // from, when it records one (adapters trained on this folder name it as their
        // base, checkpoint::base_model_id); `general.name` is a display name, not an id
        if let Some(id) = hub_source_id(h) {
            obj.insert("_name_or_path".into(), json!(id));
        }
        obj.extend(own);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// convert_hf_to_gguf.py's permute, written as the literal index shuffle of
    /// `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)`.
    fn permute_like_python(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let half = rows / n_head / 2;
        let mut out = vec![f32::NAN; w.len()];
        // Output index (h, i, j, c) of shape (n_head, half, 2, cols) reads input (h, j, i, c).
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    for c in 0..cols {
                        let dst = ((h * half + i) * 2 + j) * cols + c;
                        let src = ((h * 2 + j) * half + i) * cols + c;
                        out[dst] = w[src];
                    }
                }
            }
        }
        out
    }

    fn unpermute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(w.len());
        for r in 0..rows {
            let s = gguf_row_of_hf_row(r, rows, n_head);
            out.extend_from_slice(&w[s * cols..(s + 1) * cols]);
        }
        out
    }

    #[test]
    fn unpermute_matches_a_hand_written_example() {
        // Two heads of four rows, one column: HF rows 0..8.
        // Per head the Python permute orders rows [first half, second half] interleaved:
        // head 0: [0, 2, 1, 3], head 1: [4, 6, 5, 7].
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let gguf = permute_like_python(&hf, 8, 1, 2);
        assert_eq!(gguf, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(unpermute(&gguf, 8, 1, 2), hf);
        // One head of six rows: halves [0,1,2] and [3,4,5] interleave to [0,3,1,4,2,5].
        let hf6: Vec<f32> = (0..6).map(|x| x as f32).collect();
        assert_eq!(
            permute_like_python(&hf6, 6, 1, 1),
            vec![0., 3., 1., 4., 2., 5.]
        );
        assert_eq!(unpermute(&[0., 3., 1., 4., 2., 5.], 6, 1, 1), hf6);
    }

    #[test]
    fn permute_then_unpermute_is_identity() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for &(n_head, head_dim, cols) in &[(1, 2, 1), (3, 4, 5), (9, 64, 3), (4, 6, 2)] {
            let rows = n_head * head_dim;
            let w: Vec<f32> = (0..rows * cols)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 40) as f32
                })
                .collect();
            let p = permute_like_python(&w, rows, cols, n_head);
            if head_dim > 2 {
                assert_ne!(
                    p, w,
                    "the permutation should move rows for head_dim {head_dim}"
                );
            }
            assert_eq!(
                unpermute(&p, rows, cols, n_head),
                w,
                "n_head {n_head}, head_dim {head_dim}"
            );
        }
    }

    #[test]
    fn names_map_to_hf() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.12.attn_k.weight",
                "model.layers.12.self_attn.k_proj.weight",
            ),
            ("blk.3.attn_v.bias", "model.layers.3.self_attn.v_proj.bias"),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.1.ffn_gate.weight",
                "model.layers.1.mlp.gate_proj.weight",
            ),
            ("blk.1.ffn_up.weight", "model.layers.1.mlp.up_proj.weight"),
            (
                "blk.1.ffn_down.weight",
                "model.layers.1.mlp.down_proj.weight",
            ),
            (
                "blk.2.attn_norm.weight",
                "model.layers.2.input_layernorm.weight",
            ),
            (
                "blk.2.ffn_norm.weight",
                "model.layers.2.post_attention_layernorm.weight",
            ),
        ];
        for (g, h) in cases {
            assert_eq!(
                hf_name(&crate::model::llama::GGUF, g)
                    .map(|x| x.0)
                    .as_deref(),
                Some(h),
                "{g}"
            );
        }
        for bad in [
            "blk.x.attn_q.weight",
            "blk.0.attn_qkv.weight",
            "rope_freqs.weight",
            "blk.0.attn_q.scale",
        ] {
            assert!(hf_name(&crate::model::llama::GGUF, bad).is_none(), "{bad}");
        }
    }

    // ---- End to end on a tiny model built in the test ----

    use crate::import::gguf::MetaValue;
    use crate::import::gguf_tokenizer::tests::with_tiny_bpe;
    use crate::import::gguf_write::GgufBuilder;
    use half::f16;

    /// HF name → (shape, values).
    type HfTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;
    /// Name → (dtype, shape, bytes) of a written safetensors file.
    type StTensors = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

    const C: usize = 32; // hidden
    const H: usize = 4; // heads
    const KVH: usize = 2; // key/value heads
    const D: usize = 8; // head dim
    const F: usize = 64; // MLP width
    const V: usize = 16; // vocabulary (the tiny tokenizer's)
    const L: usize = 2; // layers

    struct Rng(u64);
    impl Rng {
        fn f32(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// HF tensors (name → (shape, values)) and the GGUF file holding them as llama.cpp
    /// would: dims reversed, Q/K rows permuted, q_proj quantized to Q8_0 (with d = 1 and
    /// integer values, so the round trip is exact), one norm stored as F16.
    fn tiny_llama(tied: bool, rng: &mut Rng) -> (HfTensors, Vec<u8>) {
        let mut hf = BTreeMap::new();
        // Tensors added outside `add` (which borrows `hf`), merged at the end.
        let mut direct = BTreeMap::new();
        let mut b = with_tiny_bpe(GgufBuilder::new(), "smollm", false)
            .kv("general.architecture", MetaValue::String("llama".into()))
            .kv("general.name", MetaValue::String("tiny".into()))
            .kv("llama.context_length", MetaValue::U32(128))
            .kv("llama.embedding_length", MetaValue::U32(C as u32))
            .kv("llama.block_count", MetaValue::U32(L as u32))
            .kv("llama.feed_forward_length", MetaValue::U32(F as u32))
            .kv("llama.attention.head_count", MetaValue::U32(H as u32))
            .kv("llama.attention.head_count_kv", MetaValue::U32(KVH as u32))
            .kv(
                "llama.attention.layer_norm_rms_epsilon",
                MetaValue::F32(1e-5),
            )
            .kv("llama.rope.freq_base", MetaValue::F32(100_000.0))
            .kv("llama.rope.dimension_count", MetaValue::U32(D as u32));
        let mut add = |b: GgufBuilder,
                       gguf: &str,
                       hf_name: &str,
                       rows: usize,
                       cols: usize,
                       permute: Option<usize>,
                       rng: &mut Rng| {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
            let stored = match permute {
                Some(n) => permute_like_python(&w, rows, cols, n),
                None => w.clone(),
            };
            let shape = if rows == 1 {
                vec![cols]
            } else {
                vec![rows, cols]
            };
            let dims: Vec<u64> = if rows == 1 {
                vec![cols as u64]
            } else {
                vec![cols as u64, rows as u64]
            };
            hf.insert(hf_name.to_string(), (shape, w));
            b.tensor_f32(gguf, &dims, &stored)
        };
        b = add(
            b,
            "token_embd.weight",
            "model.embed_tokens.weight",
            V,
            C,
            None,
            rng,
        );
        for l in 0..L {
            let p = |m: &str| format!("model.layers.{l}.{m}");
            let g = |m: &str| format!("blk.{l}.{m}");
            // q_proj as Q8_0: integer values, one block (d = 1.0) per row of 32.
            let q: Vec<f32> = (0..H * D * C)
                .map(|_| (rng.f32() * 127.0).round() + 0.0)
                .collect();
            let stored = permute_like_python(&q, H * D, C, H);
            let mut bytes = Vec::new();
            for row in stored.chunks(32) {
                bytes.extend(f16::from_f32(1.0).to_le_bytes());
                bytes.extend(row.iter().map(|&x| x as i8 as u8));
            }
            b = b.tensor(
                &g("attn_q.weight"),
                &[C as u64, (H * D) as u64],
                GgmlType::Q8_0,
                bytes,
            );
            direct.insert(p("self_attn.q_proj.weight"), (vec![H * D, C], q));
            b = add(
                b,
                &g("attn_k.weight"),
                &p("self_attn.k_proj.weight"),
                KVH * D,
                C,
                Some(KVH),
                rng,
            );
            b = add(
                b,
                &g("attn_v.weight"),
                &p("self_attn.v_proj.weight"),
                KVH * D,
                C,
                None,
                rng,
            );
            b = add(
                b,
                &g("attn_output.weight"),
                &p("self_attn.o_proj.weight"),
                C,
                H * D,
                None,
                rng,
            );
            b = add(
                b,
                &g("ffn_gate.weight"),
                &p("mlp.gate_proj.weight"),
                F,
                C,
                None,
                rng,
            );
            b = add(
                b,
                &g("ffn_up.weight"),
                &p("mlp.up_proj.weight"),
                F,
                C,
                None,
                rng,
            );
            b = add(
                b,
                &g("ffn_down.weight"),
                &p("mlp.down_proj.weight"),
                C,
                F,
                None,
                rng,
            );
            b = add(
                b,
                &g("attn_norm.weight"),
                &p("input_layernorm.weight"),
                1,
                C,
                None,
                rng,
            );
            // ffn_norm as F16: values chosen exactly representable.
            let n: Vec<f32> = (0..C).map(|_| f16::from_f32(rng.f32()).to_f32()).collect();
            b = b.tensor(
                &g("ffn_norm.weight"),
                &[C as u64],
                GgmlType::F16,
                n.iter()
                    .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                    .collect(),
            );
            direct.insert(p("post_attention_layernorm.weight"), (vec![C], n));
        }
        b = add(
            b,
            "output_norm.weight",
            "model.norm.weight",
            1,
            C,
            None,
            rng,
        );
        if !tied {
            b = add(b, "output.weight", "lm_head.weight", V, C, None, rng);
        }
        hf.extend(direct);
        (hf, b.build())
    }

    fn read_safetensors(path: &Path) -> Result<StTensors> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect())
    }

    fn prepare_tiny(
        tied: bool,
        dtype: Option<DType>,
    ) -> Result<(HfTensors, tempfile::TempDir, crate::import::PrepareReport)> {
        let mut rng = Rng(0x1234_5678_9ABC_DEF1 ^ u64::from(tied));
        let (hf, bytes) = tiny_llama(tied, &mut rng);
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let src = dir.path().join("tiny.gguf");
        std::fs::write(&src, bytes).map_err(|e| Error::io(&src, e))?;
        let report = crate::import::prepare(&src, &dir.path().join("out"), dtype, false)?;
        Ok((hf, dir, report))
    }

    #[test]
    fn tiny_llama_converts_exactly_to_f32() -> Result<()> {
        let (mut hf, dir, report) = prepare_tiny(true, Some(DType::F32))?;
        let out = read_safetensors(&report.output)?;
        // Tied: lm_head is the embedding.
        let embed = hf
            .get("model.embed_tokens.weight")
            .cloned()
            .ok_or_else(|| Error::config("no embed"))?;
        hf.insert("lm_head.weight".into(), embed);
        assert_eq!(
            out.len(),
            hf.len(),
            "tensor names: {:?}",
            out.keys().collect::<Vec<_>>()
        );
        for (name, (shape, values)) in &hf {
            let (dt, oshape, data) = out
                .get(name)
                .ok_or_else(|| Error::config(format!("missing {name}")))?;
            assert_eq!(*dt, safetensors::Dtype::F32, "{name}");
            assert_eq!(oshape, shape, "{name}");
            let got: Vec<f32> = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(&got, values, "{name}");
        }
        assert_eq!(
            report.materialized,
            vec!["lm_head.weight <- model.embed_tokens.weight".to_string()]
        );
        assert_eq!(report.source_types.get("Q8_0"), Some(&L));
        assert_eq!(report.source_types.get("F16"), Some(&L));

        let cfg_path = dir.path().join("out/config.json");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?)
                .map_err(|e| Error::format(&cfg_path, e.to_string()))?;
        for (k, v) in [
            ("model_type", json!("llama")),
            ("architectures", json!(["LlamaForCausalLM"])),
            ("hidden_size", json!(C)),
            ("intermediate_size", json!(F)),
            ("num_hidden_layers", json!(L)),
            ("num_attention_heads", json!(H)),
            ("num_key_value_heads", json!(KVH)),
            ("head_dim", json!(D)),
            ("vocab_size", json!(V)),
            ("max_position_embeddings", json!(128)),
            ("rms_norm_eps", json!(1e-5)),
            ("rope_theta", json!(100000.0)),
            ("tie_word_embeddings", json!(true)),
            ("bos_token_id", json!(1)),
            ("eos_token_id", json!(2)),
            ("torch_dtype", json!("float32")),
        ] {
            assert_eq!(cfg[k], v, "config.json {k}");
        }
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ] {
            assert!(dir.path().join("out").join(f).is_file(), "{f}");
        }
        let tok = tokenizers::Tokenizer::from_file(dir.path().join("out/tokenizer.json"))
            .map_err(|e| Error::config(e.to_string()))?;
        assert_eq!(
            tok.encode("<|im_start|>ab", false)
                .map(|e| e.get_ids().to_vec())
                .ok(),
            Some(vec![1, 10])
        );
        Ok(())
    }

    #[test]
    fn untied_model_defaults_to_bf16_for_quantized_input() -> Result<()> {
        let (hf, _dir, report) = prepare_tiny(false, None)?;
        let out = read_safetensors(&report.output)?;
        assert_eq!(out.len(), hf.len());
        assert!(report.materialized.is_empty());
        for (name, (shape, values)) in &hf {
            let (dt, oshape, data) = out
                .get(name)
                .ok_or_else(|| Error::config(format!("missing {name}")))?;
            assert_eq!((*dt, oshape), (safetensors::Dtype::BF16, shape), "{name}");
            let got: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let want: Vec<u16> = values
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            // (+ 0.0 above turns -0.0 into 0.0, which an integer quant stores.)
            let bad = got.iter().zip(&want).position(|(g, w)| g != w);
            assert_eq!(bad, None, "{name}: first mismatch at {bad:?}");
        }
        // Layer order in the file: embedding, layer 0, layer 1, norm, head.
        let bytes = std::fs::read(&report.output).map_err(|e| Error::io(&report.output, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::format(&report.output, e.to_string()))?;
        let order = meta.offset_keys();
        assert_eq!(
            order.first().map(String::as_str),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(order.last().map(String::as_str), Some("lm_head.weight"));
        let pos = |n: &str| order.iter().position(|k| k == n);
        assert!(
            pos("model.layers.0.mlp.up_proj.weight") < pos("model.layers.1.input_layernorm.weight")
        );
        Ok(())
    }

    fn header_of(b: GgufBuilder) -> Result<GgufHeader> {
        GgufHeader::parse(&b.build(), Path::new("t.gguf"))
    }

    #[test]
    fn unsupported_types_missing_and_unknown_tensors_are_named() -> Result<()> {
        let mut rng = Rng(7);
        let (_, bytes) = tiny_llama(true, &mut rng);
        let h = GgufHeader::parse(&bytes, Path::new("t.gguf"))?;
        let rebuild = |skip: &str,
                       extra: Option<(&str, GgmlType, Vec<u8>, Vec<u64>)>|
         -> Result<GgufHeader> {
            let mut b = GgufBuilder::new();
            for (k, v) in &h.metadata {
                b = b.kv(k, v.clone());
            }
            for t in &h.tensors {
                if t.name != skip {
                    let start = (h.data_offset + t.offset) as usize;
                    b = b.tensor(
                        &t.name,
                        &t.dims,
                        t.ty,
                        bytes[start..start + t.n_bytes as usize].to_vec(),
                    );
                }
            }
            if let Some((name, ty, data, dims)) = extra {
                b = b.tensor(name, &dims, ty, data);
            }
            header_of(b)
        };
        let msg = |h: GgufHeader| {
            GgufPlan::new(&h, Path::new("t.gguf"), None)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };

        let m = msg(rebuild("blk.1.ffn_up.weight", None)?);
        assert!(
            m.contains("missing tensors") && m.contains("model.layers.1.mlp.up_proj.weight"),
            "{m}"
        );
        let m = msg(rebuild(
            "",
            Some(("blk.0.attn_qkv.weight", GgmlType::F32, vec![0; 4], vec![1])),
        )?);
        assert!(
            m.contains("no HF equivalent in a 'llama' file") && m.contains("blk.0.attn_qkv.weight"),
            "{m}"
        );
        let m = msg(rebuild(
            "",
            Some(("rope_freqs.weight", GgmlType::F32, vec![0; 16], vec![4])),
        )?);
        assert!(
            m.contains("rope_freqs.weight") && m.contains("not supported"),
            "{m}"
        );
        Ok(())
    }

    #[test]
    fn unsupported_quant_type_error_names_tensor_and_type() -> Result<()> {
        // A shape-correct attn_v in Q2_K (256 values per 84-byte block).
        let mut rng = Rng(9);
        let (_, bytes) = tiny_llama(true, &mut rng);
        let h = GgufHeader::parse(&bytes, Path::new("t.gguf"))?;
        let mut b = GgufBuilder::new();
        for (k, v) in &h.metadata {
            if k != "llama.embedding_length"
                && k != "llama.attention.head_count"
                && k != "llama.attention.head_count_kv"
            {
                b = b.kv(k, v.clone());
            }
        }
        // Re-describe the model with hidden 256 so a Q2_K row fits: only attn_v matters,
        // the plan fails at the first unsupported tensor before checking the others.
        b = b
            .kv("llama.embedding_length", MetaValue::U32(256))
            .kv("llama.attention.head_count", MetaValue::U32(32))
            .kv("llama.attention.head_count_kv", MetaValue::U32(2))
            .tensor(
                "blk.0.attn_v.weight",
                &[256, 16],
                GgmlType::Q2_K,
                vec![0; 84 * 16],
            );
        let h = header_of(b)?;
        let m = GgufPlan::new(&h, Path::new("t.gguf"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            m.contains("blk.0.attn_v.weight")
                && m.contains("Q2_K")
                && m.contains("cannot be dequantized"),
            "{m}"
        );
        Ok(())
    }

    #[test]
    fn the_hub_id_comes_from_the_source_repository_only() -> Result<()> {
        let id_of = |pairs: &[(&str, &str)]| -> Result<Option<String>> {
            let mut b = GgufBuilder::new().kv("general.name", MetaValue::String("Tiny 1B".into()));
            for (k, v) in pairs {
                b = b.kv(k, MetaValue::String(v.to_string()));
            }
            Ok(hub_source_id(&header_of(b)?))
        };
        assert_eq!(
            id_of(&[])?,
            None,
            "general.name is a display name, not an id"
        );
        assert_eq!(
            id_of(&[("general.source.huggingface.repository", "org/Model-1B")])?,
            Some("org/Model-1B".into())
        );
        assert_eq!(
            id_of(&[(
                "general.source.repo_url",
                "https://huggingface.co/org/m.v2/tree/main"
            )])?,
            Some("org/m.v2".into())
        );
        assert_eq!(
            id_of(&[("general.repo_url", "https://huggingface.co/org/m/")])?,
            Some("org/m".into())
        );
        assert_eq!(
            id_of(&[("general.repo_url", "https://github.com/org/m")])?,
            None
        );
        assert_eq!(
            id_of(&[(
                "general.base_model.0.repo_url",
                "https://huggingface.co/org/parent"
            )])?,
            None,
            "the parent model is not this model"
        );
        assert_eq!(
            id_of(&[("general.source.huggingface.repository", "../x")])?,
            None
        );
        Ok(())
    }

    #[test]
    fn other_architectures_are_refused() -> Result<()> {
        let h = header_of(
            GgufBuilder::new().kv("general.architecture", MetaValue::String("bloom".into())),
        )?;
        let m = GgufPlan::new(&h, Path::new("t.gguf"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            m.contains("'bloom'")
                && m.contains("read from 'general.architecture'")
                && m.contains("llama, qwen2, qwen3, phi3, gemma3"),
            "{m}"
        );
        let m = GgufPlan::new(&header_of(GgufBuilder::new())?, Path::new("t.gguf"), None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            m.contains("'general.architecture' is missing") && m.contains("gemma3"),
            "{m}"
        );
        Ok(())
    }
}
