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
use crate::quant::{Bnb4Config, StoredTensor, encode_bnb4, quantize_nf4};
use crate::types::DType;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// A quantized format `lema prepare --quantize` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// bitsandbytes' NF4 with double quantization.
    Nf4,
    /// FP8 E4M3 with 128 × 128 block scales.
    Fp8,
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(Format::Nf4),
            "fp8" => Ok(Format::Fp8),
            _ => Err(Error::config(format!(
                "--quantize {s}: supported: nf4, fp8"
            ))),
        }
    }
}

impl Format {
    /// The stored parts of the dense weight `name` (values `x` of `shape`, stored as
    /// `dtype`) in this format.
    fn quantize(
        self,
        name: &str,
        x: &[f32],
        shape: &[usize],
        dtype: DType,
    ) -> Result<Vec<StoredTensor>> {
        match self {
            Format::Nf4 => Ok(encode_bnb4(name, &quantize_nf4(x, shape, dtype, true)?)),
            Format::Fp8 => {
                use crate::quant::fp8::{SCALE_SUFFIX, quantize_fp8, scale_shape};
                let &[rows, cols] = shape else {
                    return Err(Error::config(format!(
                        "{name}: FP8 quantizes [out, in] weights, this one is {shape:?}"
                    )));
                };
                let q = quantize_fp8(x, [rows, cols]);
                Ok(vec![
                    StoredTensor {
                        name: name.to_string(),
                        dtype: safetensors::Dtype::F8_E4M3,
                        shape: shape.to_vec(),
                        data: q.codes,
                    },
                    StoredTensor {
                        name: format!("{name}{SCALE_SUFFIX}"),
                        dtype: safetensors::Dtype::F32,
                        shape: scale_shape(rows, cols).to_vec(),
                        data: q.scale_inv.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    },
                ])
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::Nf4 => "nf4",
            Format::Fp8 => "fp8",
        }
    }
}

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
    match format {
        Format::Nf4 => with_quantization_config(&mut config, dtype),
        Format::Fp8 => {
            if let Some(obj) = config.as_object_mut() {
                obj.insert(
                    "quantization_config".into(),
                    crate::quant::fp8::quantization_config(),
                );
            }
        }
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
        safetensors::Dtype::F8_E4M3 => DType::F8E4M3,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        _ => DType::F32,
    }
}
