//! Quantized frozen weights, backend-free: bitsandbytes' NF4 codec, reproduced bit for bit
//! (tests/nf4.rs checks it against bitsandbytes 0.50.2 itself), and the safetensors layout
//! transformers writes for a bitsandbytes 4-bit model.
//!
//! * [`nf4`]: the NF4 table, [`quantize_nf4`] (blocks of 64, absmax, double quantization),
//!   [`dequantize_nf4`] and its bf16/f16 forms.
//! * [`dynamic`]: the signed 8-bit dynamic map and the blockwise 8-bit quantization that
//!   double quantization applies to the absmax values.
//! * [`fp8`]: FP8 E4M3 with 128 × 128 block scales (DeepSeek-V3 / Qwen3-FP8 checkpoints).
//! * [`format`]: the formats lema writes ([`Format`]) and their stored parts.
//! * [`torch_sum`]: torch's f32 summation order, for the double-quantization offset.
//! * [`bnb_layout`]: `X.weight`, `X.weight.absmax`, … and `quantization_config`.

pub mod bnb_layout;
pub mod dynamic;
pub mod format;
pub mod fp8;
pub mod nf4;
pub mod torch_sum;

pub use bnb_layout::{
    Bnb4Config, StoredTensor, TensorRef, bnb4_weights, companion_of, decode_bnb4, encode_bnb4,
    quantization_config, read_quantization_config,
};
pub use format::{Format, encode_fp8, stored_dtype};
pub use nf4::{
    Absmax, Nested, Nf4Tensor, dequantize_nf4, dequantize_nf4_into_bf16, dequantize_nf4_into_f16,
    quantize_nf4,
};
