//! FP8 E4M3 ("fn": no infinities, NaN = 0x7f / 0xff, largest 448) weights with one f32
//! scale per 128 × 128 block, as DeepSeek-V3 and Qwen3-FP8 checkpoints store them and
//! transformers' `FineGrainedFP8` quantizer writes them: `X.weight` (F8_E4M3, `[out, in]`)
//! and `X.weight_scale_inv` (F32, `[⌈out/128⌉, ⌈in/128⌉]`), weight[i, j] =
//! e4m3(q[i, j]) · scale_inv[i/128, j/128] (the "inverse" scale multiplies on
//! dequantization). Edge blocks may be short. The conversions are torch's, bit for bit
//! (tests/fp8.rs checks them against torch itself).

use crate::types::DType;

/// Rows and columns of one scale block.
pub const BLOCK: usize = 128;
/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// The suffix of a weight's scale tensor (`X.weight` → `X.weight_scale_inv`).
pub const SCALE_SUFFIX: &str = "_scale_inv";

/// The shape of the scale tensor of an `[out, in]` weight.
pub fn scale_shape(out: usize, inp: usize) -> [usize; 2] {
    [out.div_ceil(BLOCK), inp.div_ceil(BLOCK)]
}

/// `x` as E4M3 bits, as torch 2.15 casts float32 to float8_e4m3fn on the CPU: round to
/// nearest even, subnormals kept, saturating (|x| ≥ 448, infinities included, to ±448),
/// NaN to NaN (0x7f with x's sign). The rounding is c10's `fp8e4m3fn_from_fp32_value`.
pub fn f32_to_e4m3(x: f32) -> u8 {
    const DENORM_MASK: u32 = 141 << 23;
    let mut bits = x.to_bits();
    let sign = bits & 0x8000_0000;
    bits ^= sign;
    let r = if bits > 0x7f80_0000 {
        0x7f
    } else if bits >= E4M3_MAX.to_bits() {
        0x7e
    } else if bits < (121 << 23) {
        // below 2^-6: the subnormals, rounded by an f32 addition
        let b = (f32::from_bits(bits) + f32::from_bits(DENORM_MASK)).to_bits();
        b.wrapping_sub(DENORM_MASK) as u8
    } else {
        let mant_odd = (bits >> 20) & 1;
        let b = bits
            .wrapping_add(((7u32).wrapping_sub(127)) << 23)
            .wrapping_add(0x7ffff)
            .wrapping_add(mant_odd);
        (b >> 20) as u8
    };
    r | (sign >> 24) as u8
}

/// The value of E4M3 bits `b`, as torch widens float8_e4m3fn to float32 (c10's
/// `fp8e4m3fn_to_fp32_value`; every value is exact in f32, NaN as its bits give it).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let w = (b as u32) << 24;
    let sign = w & 0x8000_0000;
    let nonsign = w & 0x7fff_ffff;
    let shift = nonsign.leading_zeros();
    let shift = shift.saturating_sub(4);
    let inf_nan = ((nonsign.wrapping_add(0x0100_0000) as i32) >> 8) as u32 & 0x7f80_0000;
    let zero = ((nonsign.wrapping_sub(1) as i32) >> 31) as u32;
    let v = ((nonsign << shift >> 4).wrapping_add((0x78u32.wrapping_sub(shift)) << 23) | inf_nan)
        & !zero;
    f32::from_bits(sign | v)
}

/// An `[out, in]` weight in FP8 with its block scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Tensor {
    pub shape: [usize; 2],
    /// E4M3 bits, row-major.
    pub codes: Vec<u8>,
    /// One scale per block, row-major over `scale_shape(shape)`.
    pub scale_inv: Vec<f32>,
}

/// Quantize the row-major `[out, in]` weight `w` as transformers' `Fp8Quantize` does, per
/// 128 × 128 block (short at the edges): amax = max |w|, scale = 448 / amax (1 for an
/// all-zero block), scale_inv = 1 / scale, q = e4m3(clamp(w · scale, ±448)). torch divides
/// a Python number by a tensor as the tensor's reciprocal times the number, so scale is
/// (1 / amax) · 448, rounded twice.
pub fn quantize_fp8(w: &[f32], shape: [usize; 2]) -> Fp8Tensor {
    let [rows, cols] = shape;
    assert_eq!(w.len(), rows * cols, "quantize_fp8: shape {shape:?}");
    let [br, bc] = scale_shape(rows, cols);
    let mut amax = vec![0.0f32; br * bc];
    for (i, row) in w.chunks_exact(cols.max(1)).enumerate() {
        for (j, x) in row.iter().enumerate() {
            let a = &mut amax[(i / BLOCK) * bc + j / BLOCK];
            *a = a.max(x.abs());
        }
    }
    let scale: Vec<f32> = amax
        .iter()
        .map(|&a| if a > 0.0 { (1.0 / a) * E4M3_MAX } else { 1.0 })
        .collect();
    let scale_inv = scale.iter().map(|&s| 1.0 / s).collect();
    let mut codes = Vec::with_capacity(w.len());
    for (i, row) in w.chunks_exact(cols.max(1)).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            let s = scale[(i / BLOCK) * bc + j / BLOCK];
            codes.push(f32_to_e4m3((x * s).clamp(-E4M3_MAX, E4M3_MAX)));
        }
    }
    Fp8Tensor {
        shape,
        codes,
        scale_inv,
    }
}

/// `out` = e4m3(q) · scale_inv of its block, in f32, rounded to `dtype` (transformers'
/// `Fp8Dequantize`: `(q.float() * s).to(dtype)`).
pub fn dequantize_fp8(t: &Fp8Tensor, dtype: DType, out: &mut [f32]) {
    let [rows, cols] = t.shape;
    assert_eq!(out.len(), rows * cols, "dequantize_fp8: output length");
    let bc = scale_shape(rows, cols)[1];
    for (i, row) in out.chunks_exact_mut(cols.max(1)).enumerate() {
        for (j, o) in row.iter_mut().enumerate() {
            let s = t.scale_inv[(i / BLOCK) * bc + j / BLOCK];
            *o = dtype.round(e4m3_to_f32(t.codes[i * cols + j]) * s);
        }
    }
}

/// The `quantization_config` these checkpoints carry in config.json.
pub fn quantization_config() -> serde_json::Value {
    serde_json::json!({
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_the_edges_are_torchs() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if b & 0x7f == 0x7f {
                assert!(v.is_nan(), "{b:#x}");
            } else {
                assert_eq!(f32_to_e4m3(v), b, "{b:#x} = {v}");
            }
        }
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(f32_to_e4m3(464.5), 0x7e); // torch saturates
        assert_eq!(f32_to_e4m3(-f32::INFINITY), 0xfe);
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7f);
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00); // tie with 0 goes to 0
        assert_eq!(f32_to_e4m3(3.0 * 2f32.powi(-10)), 0x02); // tie 1.5 ulp → 2
    }
}
