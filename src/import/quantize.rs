//! `lema prepare --quantize nf4`: a prepared (dense) model file rewritten with every block
//! linear in bitsandbytes' NF4 layout (double quantization, as transformers saves a
//! `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
//! bnb_4bit_use_double_quant=True)` model); embeddings, norms and the head stay as they are,
//! as bitsandbytes keeps them. Tensor by tensor: memory stays at one tensor (in f32) and its
//! parts. A quant state's JSON holds the tensor's offset, so its length is known only once
//! the tensor is quantized: a first pass quantizes each tensor for the header's sizes, the
//! second writes them.

use crate::error::{Error, Result};
use crate::fsutil::{SafetensorsWriter, TensorSpec};
use crate::gbi::Gbi;
use crate::quant::{Bnb4Config, StoredTensor, encode_bnb4, quantize_nf4};
use crate::types::DType;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// Rewrite the dense model `dense` (with its config.json `config_json`) as `out`, its
/// block linears in NF4; returns the names quantized. Refuses a file that already holds
/// quantized weights.
pub fn quantize_nf4_file(dense: &Path, config_json: &Path, out: &Path) -> Result<Vec<String>> {
    let cfg = crate::config::ModelConfig::from_file(config_json)?;
    let model = crate::model::Model::new(cfg);
    let gbi = Gbi::open(dense)?;
    let already = crate::quant::bnb4_weights(gbi.path(), gbi.tensors().map(|t| t.name.as_str()))?;
    if let Some(w) = already.first() {
        return Err(Error::tensor(
            gbi.path(),
            w,
            "is already quantized (NF4); use the file as it is, or quantize the unquantized model",
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
        let q = quantize_nf4(&x, &t.shape, t.dtype, true)?;
        Ok(encode_bnb4(&t.name, &q))
    };
    // pass 1: the parts' names, types and shapes
    let mut specs = Vec::new();
    for t in gbi.tensors() {
        if targets.contains(&t.name) {
            for p in quantized(t)? {
                specs.push(TensorSpec {
                    name: p.name,
                    dtype: stored(p.dtype),
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
    meta.insert("lema.quantized".into(), "nf4".into());
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

/// Quantize the model `prepare` just wrote (its report), in place: the NF4 file replaces
/// the dense one (written beside it first, so the disk holds both for a moment) and
/// config.json gets its `quantization_config`. Returns the names quantized.
pub fn quantize_prepared(report: &super::PrepareReport) -> Result<Vec<String>> {
    let dense = &report.output;
    let dir = dense.parent().unwrap_or(Path::new("."));
    let config_json = dir.join("config.json");
    let tmp = dir.join("model.nf4-in-progress.safetensors");
    let names = quantize_nf4_file(dense, &config_json, &tmp)?;
    let dtype = first_dtype(&tmp)?;
    std::fs::rename(&tmp, dense).map_err(|e| Error::io(dense, e))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&crate::fsutil::read_text(&config_json)?)
            .map_err(|e| Error::format(&config_json, format!("not valid JSON: {e}")))?;
    with_quantization_config(&mut config, dtype);
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

/// config.json `config` with the `quantization_config` transformers writes for this layout
/// (compute dtype: the weights' own).
pub fn with_quantization_config(config: &mut serde_json::Value, compute_dtype: DType) {
    if let Some(obj) = config.as_object_mut() {
        obj.insert(
            "quantization_config".into(),
            crate::quant::quantization_config(Bnb4Config {
                double_quant: true,
                compute_dtype,
            }),
        );
    }
}

/// lema's type of a stored tensor of bitsandbytes' layout.
pub(crate) fn stored(d: safetensors::Dtype) -> DType {
    match d {
        safetensors::Dtype::U8 => DType::U8,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        _ => DType::F32,
    }
}
