//! NF4 exactly as bitsandbytes computes it on the CPU (`quantize_4bit` / `dequantize_4bit`
//! with `quant_type="nf4"`, bitsandbytes 0.50): blocks of 64 over the flattened weight, one
//! absmax per block, each value to the nearest of 16 codes, two codes a byte (the first
//! element in the high nibble), and optionally double quantization of the absmax values.

use super::dynamic;
use super::torch_sum::torch_mean;
use crate::error::{Error, Result};
use crate::types::DType;

/// bitsandbytes' NF4 values (`get_4bit_type("nf4")`, the f32 constants it ships; also the
/// table of its CPU and CUDA dequantization kernels).
#[allow(clippy::excessive_precision)] // bitsandbytes' literals, as written there
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// Elements per NF4 block (bitsandbytes' and transformers' default `blocksize`).
pub const BLOCKSIZE: usize = 64;
/// Absmax values per block of the double quantization (bitsandbytes' fixed 256).
pub const NESTED_BLOCKSIZE: usize = 256;
/// The smallest absmax bitsandbytes divides by (`absmax.clamp(min=1e-38)`).
const MIN_ABSMAX: f32 = 1e-38;

/// An NF4-quantized tensor: what bitsandbytes' `quantize_4bit` returns (the packed bytes and
/// its `QuantState`).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    /// The original tensor's shape (row-major).
    pub shape: Vec<usize>,
    /// The type it was quantized from, which bitsandbytes dequantizes to.
    pub dtype: DType,
    /// Elements per block.
    pub blocksize: usize,
    /// `ceil(numel / 2)` bytes: element 2i in the high nibble of byte i, 2i + 1 in the low
    /// one (an odd count pads the last low nibble with the code of 0.0, 7).
    pub packed: Vec<u8>,
    /// One scale per block.
    pub absmax: Absmax,
}

/// The per-block scales, plain or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    F32(Vec<f32>),
    /// Double quantization (`compress_statistics=True`).
    Nested(Nested),
}

/// Double-quantized absmax: block b's scale is `code[codes[b]] * absmax[b / blocksize] +
/// offset`, in f32, rounded after the product and after the sum (bitsandbytes'
/// `dequantize_blockwise`, then `absmax += offset`).
#[derive(Clone, Debug, PartialEq)]
pub struct Nested {
    /// One 8-bit code per NF4 block.
    pub codes: Vec<u8>,
    /// One f32 per block of `blocksize` codes.
    pub absmax: Vec<f32>,
    /// The 8-bit code (bitsandbytes' signed dynamic map; stored with the tensor, and the one
    /// dequantization uses).
    pub code: Vec<f32>,
    /// Codes per nested block.
    pub blocksize: usize,
    /// The mean subtracted from the absmax values before quantizing them.
    pub offset: f32,
}

impl Nf4Tensor {
    /// Elements of the original tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of NF4 blocks.
    pub fn blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// The f32 scale of every block, as bitsandbytes' `dequantize_4bit` uses them.
    pub fn block_scales(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::F32(a) => a.clone(),
            Absmax::Nested(n) => {
                let mut out = vec![0.0; n.codes.len()];
                dynamic::dequantize_blockwise(&n.codes, &n.absmax, &n.code, n.blocksize, &mut out);
                for a in &mut out {
                    *a += n.offset;
                }
                out
            }
        }
    }
}

/// Midpoints between neighbouring NF4 codes, in f32 as bitsandbytes takes them
/// (`(code[:-1] + code[1:]) / 2`).
fn midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// bitsandbytes' `quantize_4bit(x, blocksize=64, quant_type="nf4",
/// compress_statistics=double_quant)` on the CPU, for `x` of `shape` holding values of
/// `dtype` (bitsandbytes widens bf16/f16 to f32 first, so widened values give the same
/// bytes). Per block of 64: absmax = max |x|; a full block scales by `x * (1 / max(absmax,
/// 1e-38))`, a short last block by `x / max(absmax, 1e-38)` (and stores the clamped
/// absmax, where a full all-zero block stores 0); the scaled value, clamped to [-1, 1], takes
/// the code of the first midpoint at or above it (`torch.bucketize`: a value exactly on a
/// midpoint goes to the lower code). Double quantization: offset = torch's f32 mean of the
/// absmax values, then [`dynamic::quantize_blockwise`] of absmax - offset in blocks of 256
/// with the signed dynamic map. Refuses an empty tensor, a shape that does not hold
/// `x.len()` values, and non-finite values.
pub fn quantize_nf4(
    x: &[f32],
    shape: &[usize],
    dtype: DType,
    double_quant: bool,
) -> Result<Nf4Tensor> {
    let numel: usize = shape.iter().product();
    if numel != x.len() || x.is_empty() {
        return Err(Error::internal(format!(
            "quantize_nf4: shape {shape:?} for {} values",
            x.len()
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "NF4 quantization: element {i} of a {shape:?} tensor is {}",
            x[i]
        )));
    }
    let mid = midpoints();
    let code_of = |s: f32| mid.partition_point(|&m| m < s.clamp(-1.0, 1.0)) as u8;
    let mut codes = Vec::with_capacity(x.len() + 1);
    let mut absmax = Vec::with_capacity(x.len().div_ceil(BLOCKSIZE));
    for block in x.chunks(BLOCKSIZE) {
        let am = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if block.len() == BLOCKSIZE {
            let inv = 1.0 / am.max(MIN_ABSMAX);
            codes.extend(block.iter().map(|&v| code_of(v * inv)));
            absmax.push(am);
        } else {
            let am = am.max(MIN_ABSMAX);
            codes.extend(block.iter().map(|&v| code_of(v / am)));
            absmax.push(am);
        }
    }
    if codes.len() % 2 == 1 {
        codes.push(code_of(0.0));
    }
    let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    let absmax = if double_quant {
        let offset = torch_mean(&absmax);
        let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let code = dynamic::dynamic_map();
        let q = dynamic::quantize_blockwise(&centered, code, NESTED_BLOCKSIZE);
        Absmax::Nested(Nested {
            codes: q.codes,
            absmax: q.absmax,
            code: code.to_vec(),
            blocksize: NESTED_BLOCKSIZE,
            offset,
        })
    } else {
        Absmax::F32(absmax)
    };
    Ok(Nf4Tensor {
        shape: shape.to_vec(),
        dtype,
        blocksize: BLOCKSIZE,
        packed,
        absmax,
    })
}

/// bitsandbytes' `dequantize_4bit` into f32: element i is `NF4_CODE[code_i] *
/// scale[i / blocksize]` (one f32 product; scales from [`Nf4Tensor::block_scales`]).
/// Panics if `out.len()` is not the tensor's element count.
pub fn dequantize_nf4(t: &Nf4Tensor, out: &mut [f32]) {
    dequantize_with(t, out, |v| v);
}

/// `dequantize_4bit` of a bf16 tensor: the f32 product rounded to nearest, ties to even
/// (bitsandbytes' CPU kernels; with AVX512-BF16 its conversion also flushes subnormal
/// products to zero, which needs block absmax values below about 1e-38).
pub fn dequantize_nf4_into_bf16(t: &Nf4Tensor, out: &mut [half::bf16]) {
    dequantize_with(t, out, half::bf16::from_f32);
}

/// `dequantize_4bit` of an f16 tensor: the f32 product rounded to nearest, ties to even.
pub fn dequantize_nf4_into_f16(t: &Nf4Tensor, out: &mut [half::f16]) {
    dequantize_with(t, out, half::f16::from_f32);
}

fn dequantize_with<T>(t: &Nf4Tensor, out: &mut [T], cast: impl Fn(f32) -> T) {
    assert_eq!(out.len(), t.numel(), "dequantize_nf4: output length");
    let scales = t.block_scales();
    for (b, (o, scale)) in out.chunks_mut(t.blocksize).zip(&scales).enumerate() {
        let first = b * t.blocksize;
        for (j, o) in o.iter_mut().enumerate() {
            let i = first + j;
            let byte = t.packed[i / 2];
            let code = if i.is_multiple_of(2) {
                byte >> 4
            } else {
                byte & 0x0f
            };
            *o = cast(NF4_CODE[code as usize] * scale);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_midpoints_are_sorted_around_zero() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(NF4_CODE[7], 0.0);
        let mid = midpoints();
        assert_eq!(mid.partition_point(|&m| m < 0.0), 7, "0.0 is code 7");
    }

    #[test]
    fn high_nibble_first_ties_down_and_odd_counts_pad_with_code_seven() {
        // absmax 1: scaling is exact. [1, -1, midpoint(8, 9), just above it, 0]
        let mid = midpoints();
        let above = f32::from_bits(mid[8].to_bits() + 1);
        let x = [1.0, -1.0, mid[8], above, 0.0];
        let t = quantize_nf4(&x, &[5], DType::F32, false).unwrap();
        assert_eq!(t.packed, [0xf0, 0x89, 0x77]);
        assert_eq!(t.absmax, Absmax::F32(vec![1.0]));
        let mut out = [0.0; 5];
        dequantize_nf4(&t, &mut out);
        assert_eq!(out, [1.0, -1.0, NF4_CODE[8], NF4_CODE[9], 0.0]);
    }

    #[test]
    fn zero_blocks_store_zero_or_the_clamp_when_short() {
        let x = vec![0.0f32; 64 + 3];
        let t = quantize_nf4(&x, &[67], DType::BF16, false).unwrap();
        assert_eq!(t.absmax, Absmax::F32(vec![0.0, MIN_ABSMAX]));
        assert!(t.packed.iter().all(|&b| b == 0x77));
    }

    #[test]
    fn refuses_non_finite_values_and_a_wrong_shape() {
        let e = quantize_nf4(&[1.0, f32::NAN], &[2], DType::F32, true).unwrap_err();
        assert!(e.to_string().contains("element 1"), "{e}");
        assert!(quantize_nf4(&[1.0; 6], &[2, 2], DType::F32, true).is_err());
        assert!(quantize_nf4(&[], &[0], DType::F32, true).is_err());
    }

    #[test]
    fn double_quant_scales_come_back_near_the_plain_ones() {
        let x: Vec<f32> = (0..64 * 300)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4 * (1 + i / 640) as f32)
            .collect();
        let plain = quantize_nf4(&x, &[x.len()], DType::F32, false).unwrap();
        let nested = quantize_nf4(&x, &[x.len()], DType::F32, true).unwrap();
        assert_eq!(plain.packed, nested.packed);
        let Absmax::Nested(n) = &nested.absmax else {
            panic!("not nested")
        };
        // the dynamic map's codes near 1 are 0.0140625 apart: half that, times the nested
        // block's absmax, bounds the error
        let (a, b) = (plain.block_scales(), nested.block_scales());
        for (i, (p, q)) in a.iter().zip(&b).enumerate() {
            let bound = 0.0071 * n.absmax[i / 256];
            assert!(
                (p - q).abs() <= bound,
                "block {i}: {p} vs {q} (bound {bound})"
            );
        }
    }
}
