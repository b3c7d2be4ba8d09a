//! Types every layer of lema shares, with no dependencies of their own: the element type
//! of a stored tensor, and the label value the loss does not count.

use crate::error::Result;

/// Element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Raw bytes: the packed codes and statistics of a quantized weight (bitsandbytes'
    /// NF4 layout), expanded by the backend before use, never computed with as numbers.
    U8,
    /// FP8 E4M3 ("fn") codes of a quantized weight (128 × 128 block-scaled, as FP8
    /// checkpoints store them): stored, expanded by the backend before use, never
    /// computed with. Decoded, each is its exact value.
    F8E4M3,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 | DType::F8E4M3 => 1,
        }
    }

    /// The safetensors spelling ("F32", "F16", "BF16").
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::U8 => "U8",
            DType::F8E4M3 => "F8_E4M3",
        }
    }

    /// transformers' name of this type (`torch_dtype` in config.json).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::U8 => "uint8",
            DType::F8E4M3 => "float8_e4m3fn",
        }
    }

    /// Append `values` to `out` in this type's little-endian encoding (round to nearest
    /// even; U8: the byte each value holds, saturating; F8E4M3: torch's cast).
    pub fn encode_into(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            DType::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
            DType::BF16 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
            DType::U8 => out.extend(values.iter().map(|&v| v as u8)),
            DType::F8E4M3 => out.extend(values.iter().map(|&v| crate::quant::fp8::f32_to_e4m3(v))),
        }
    }

    /// `x` rounded to this type (to nearest, ties to even) and widened back.
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 | DType::U8 => x,
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::BF16 => half::bf16::from_f32(x).to_f32(),
            DType::F8E4M3 => crate::quant::fp8::e4m3_to_f32(crate::quant::fp8::f32_to_e4m3(x)),
        }
    }

    /// Decode little-endian bytes of this type into f32 values (`out.len()` elements).
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::U8 => {
                for (o, &b) in out.iter_mut().zip(bytes) {
                    *o = f32::from(b);
                }
            }
            DType::F8E4M3 => {
                for (o, &b) in out.iter_mut().zip(bytes) {
                    *o = crate::quant::fp8::e4m3_to_f32(b);
                }
            }
        }
    }
}

impl From<DType> for safetensors::Dtype {
    fn from(d: DType) -> Self {
        match d {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::U8 => safetensors::Dtype::U8,
            DType::F8E4M3 => safetensors::Dtype::F8_E4M3,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U8 => "u8",
            DType::F8E4M3 => "f8e4m3",
        })
    }
}

impl std::str::FromStr for DType {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "fp16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            _ => Err(crate::error::Error::config(format!(
                "unknown dtype '{s}'; supported: f32, f16, bf16"
            ))),
        }
    }
}

/// Label value that is not counted in the loss (HF convention).
pub const IGNORE_INDEX: i32 = -100;
