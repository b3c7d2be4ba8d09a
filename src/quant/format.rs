//! The quantized formats lema writes (`lema prepare --quantize`, `lema bench --quant`):
//! each one's name, how a dense weight becomes its stored parts, and the
//! `quantization_config` its config.json carries.

use super::bnb_layout::{Bnb4Config, StoredTensor, encode_bnb4, quantization_config};
use super::fp8::{Fp8Tensor, SCALE_SUFFIX, quantize_fp8, scale_shape};
use super::nf4::quantize_nf4;
use crate::error::{Error, Result};
use crate::types::DType;

/// A quantized format for the block linears.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
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
                "unknown quantized format {s:?}: supported: nf4, fp8"
            ))),
        }
    }
}

impl Format {
    /// The stored parts of the dense weight `name` (values `x` of `shape`, stored as
    /// `dtype`) in this format.
    pub fn quantize(
        self,
        name: &str,
        x: &[f32],
        shape: &[usize],
        dtype: DType,
    ) -> Result<Vec<StoredTensor>> {
        match self {
            Format::Nf4 => Ok(encode_bnb4(name, &quantize_nf4(x, shape, dtype, true)?)),
            Format::Fp8 => {
                let &[rows, cols] = shape else {
                    return Err(Error::config(format!(
                        "{name}: FP8 quantizes [out, in] weights, this one is {shape:?}"
                    )));
                };
                Ok(encode_fp8(name, quantize_fp8(x, [rows, cols])))
            }
        }
    }

    /// The format's name on the command line and in a file's `lema.quantized` metadata.
    pub fn name(self) -> &'static str {
        match self {
            Format::Nf4 => "nf4",
            Format::Fp8 => "fp8",
        }
    }

    /// What the format is, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Format::Nf4 => "NF4 (double quantization)",
            Format::Fp8 => "FP8 E4M3 (128 × 128 block scales)",
        }
    }

    /// The `quantization_config` of a model whose block linears are in this format and
    /// expand to `compute_dtype` (NF4's quant states name it; FP8 expands to the
    /// model's dtype).
    pub fn quantization_config(self, compute_dtype: DType) -> serde_json::Value {
        match self {
            Format::Nf4 => quantization_config(Bnb4Config {
                double_quant: true,
                compute_dtype,
            }),
            Format::Fp8 => super::fp8::quantization_config(),
        }
    }
}

/// The two stored tensors of an FP8 weight: `name` (the E4M3 codes) and
/// `name_scale_inv` (f32, one per 128 × 128 block).
pub fn encode_fp8(name: &str, q: Fp8Tensor) -> Vec<StoredTensor> {
    let [rows, cols] = q.shape;
    vec![
        StoredTensor {
            name: name.to_string(),
            dtype: safetensors::Dtype::F8_E4M3,
            shape: vec![rows, cols],
            data: q.codes,
        },
        StoredTensor {
            name: format!("{name}{SCALE_SUFFIX}"),
            dtype: safetensors::Dtype::F32,
            shape: scale_shape(rows, cols).to_vec(),
            data: q.scale_inv.iter().flat_map(|v| v.to_le_bytes()).collect(),
        },
    ]
}

/// lema's type of a stored part (U8 codes, E4M3 codes, scales).
pub fn stored_dtype(d: safetensors::Dtype) -> DType {
    match d {
        safetensors::Dtype::U8 => DType::U8,
        safetensors::Dtype::F8_E4M3 => DType::F8E4M3,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        _ => DType::F32,
    }
}
