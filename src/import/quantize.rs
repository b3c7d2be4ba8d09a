//! `lema prepare --quantize nf4|fp8`: a prepared (dense) model file rewritten with every
//! block linear quantized; embeddings, norms and the head stay as they are, as bitsandbytes
//! and transformers' FP8 quantizer keep them.
//!
//! * nf4: bitsandbytes' NF4 layout (double quantization, as transformers saves a
//!   `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
//!   bnb_4bit_use_double_quant=True)` model).
//! * fp8: E4M3 with 128 × 128 block scales, as transformers' `FineGrainedFP8Config()`
//!   quantizes (DeepSeek-V3 / Qwen3-FP8 layout; edge blocks may be short).
//!
//! Tensor by tensor: memory stays at one tensor (in f32) and its parts. A quant state's
//! JSON holds the tensor's offset, so its length is known only once the tensor is
//! quantized: a first pass quantizes each tensor for the header's sizes, the second
//! writes them.

use crate::error::{Error, Result};
use crate::fsutil::{SafetensorsWriter, TensorSpec};
use crate::gbi::Gbi;
pub use crate::quant::Format;
use crate::quant::{StoredTensor, stored_dtype};
use crate::types::DType;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// Rewrite the dense model `dense` (with its config.json `config_json`) as `out`, its
/// block linears in `format`; returns the names quantized. Refuses a file that already
/// holds quantized weights (NF4 or FP8).
pub fn quantize_file(
    dense: &Path,
    config_json: &Path,
    out: &Path,
    format: Format,
) -> Result<Vec<String>> {
    let cfg = crate::config::ModelConfig::from_file(config_json)?;
    let model = crate::model::Model::new(cfg);
    let gbi = Gbi::open(dense)?;
    let nf4 = crate::quant::bnb4_weights(gbi.path(), gbi.tensors().map(|t| t.name.as_str()))?;
    let fp8 = gbi
        .tensors()
        .filter(|t| t.dtype == DType::F8E4M3)
        .map(|t| t.name.clone());
    if let Some((w, kind)) = nf4
        .into_iter()
        .map(|w| (w, "NF4"))
        .chain(fp8.map(|w| (w, "FP8")))
        .next()
    {
        return Err(Error::tensor(
            gbi.path(),
            &w,
            format!(
                "is already quantized ({kind}); use the file as it is, or quantize the unquantized model"
            ),
        ));
    }
    let targets: HashSet<String> = model
        .linear_weights()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| gbi.get(n).is_some())
        .collect();
    let quantized = |t: &crate::gbi::TensorInfo| -> Result<Vec<StoredTensor>> {
        let mut x = vec![0.0f32; t.shape.iter().product()];
        t.dtype.decode_into(gbi.bytes(t), &mut x);
        format.quantize(&t.name, &x, &t.shape, t.dtype)
    };
    // pass 1: the parts' names, types and shapes
    let mut specs = Vec::new();
    for t in gbi.tensors() {
        if targets.contains(&t.name) {
            for p in quantized(t)? {
                specs.push(TensorSpec {
                    name: p.name,
                    dtype: stored_dtype(p.dtype),
                    shape: p.shape,
                });
            }
        } else {
            specs.push(TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            });
        }
    }
    let mut meta: BTreeMap<String, String> = gbi.metadata().clone();
    meta.insert("lema.quantized".into(), format.name().into());
    let mut writer = SafetensorsWriter::create(out, specs, &meta)?;
    // pass 2: the data, in the writer's order of tensors as created
    let mut names = Vec::new();
    for t in gbi.tensors() {
        if targets.contains(&t.name) {
            for p in quantized(t)? {
                writer.write(&p.name, &p.data)?;
            }
            names.push(t.name.clone());
        } else {
            writer.write(&t.name, gbi.bytes(t))?;
        }
    }
    writer.finish()?;
    names.sort();
    Ok(names)
}

/// Quantize the model `prepare` just wrote (its report), in place: the quantized file
/// replaces the dense one (written beside it first, so the disk holds both for a moment)
/// and config.json gets its `quantization_config`. Returns the names quantized.
pub fn quantize_prepared(report: &super::PrepareReport, format: Format) -> Result<Vec<String>> {
    let dense = &report.output;
    let dir = dense.parent().unwrap_or(Path::new("."));
    let config_json = dir.join("config.json");
    let tmp = dir.join(format!("model.{}-in-progress.safetensors", format.name()));
    let names = quantize_file(dense, &config_json, &tmp, format)?;
    let dtype = first_dtype(&tmp)?;
    std::fs::rename(&tmp, dense).map_err(|e| Error::io(dense, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&crate::fsutil::read_text(&config_json)?)
            .map_err(|e| Error::format(&config_json, format!("not valid JSON: {e}")))?;
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "quantization_config".into(),
            format.quantization_config(dtype),
        );
    }
    crate::checkpoint::write_json(&config_json, &config)?;
    Ok(names)
}

/// The dtype the quantized weights of `path` expand to (their quant state's), bf16 when
/// none says.
fn first_dtype(path: &Path) -> Result<DType> {
    let gbi = Gbi::open(path)?;
    let table = crate::quant::bnb4_weights(gbi.path(), gbi.tensors().map(|t| t.name.as_str()))?;
    let Some(w) = table.first() else {
        return Ok(DType::BF16);
    };
    let get = |n: &str| {
        gbi.get(n).map(|t| crate::quant::TensorRef {
            dtype: t.dtype.into(),
            shape: t.shape.clone(),
            data: gbi.bytes(t),
        })
    };
    Ok(crate::quant::bnb_layout::bnb4_layout(gbi.path(), w, get)?.dtype)
}
