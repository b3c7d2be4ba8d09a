//! bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`) and its CPU
//! blockwise 8-bit quantization (`quantize_blockwise` / `dequantize_blockwise`, the kernels
//! of csrc/cpu_ops.cpp), which double quantization applies to the NF4 absmax values.

use std::sync::OnceLock;

/// Entries of an 8-bit code.
pub const CODE_LEN: usize = 256;
/// The CPU kernel's lookup table resolution: [-1, 1] in 65536 steps.
const LUT_LEN: usize = 65536;

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, sorted, as
/// bitsandbytes computes it on an x86-64 CPU: for exponent i in 0..7, the midpoints of
/// `torch.linspace(0.1, 1, 2^i + 1)` times ±10^(i-6), then 0 and 1. torch's linspace kernel
/// is built with FMA contraction: element k is `fma(step, k, start)` in the first half and
/// `fma(-step, steps - 1 - k, end)` in the second.
pub fn dynamic_map() -> &'static [f32; CODE_LEN] {
    static MAP: OnceLock<[f32; CODE_LEN]> = OnceLock::new();
    MAP.get_or_init(|| {
        const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
        let mut data = Vec::with_capacity(CODE_LEN);
        for (i, scale) in SCALES.iter().enumerate() {
            let scale = *scale as f32;
            let bounds = linspace(0.1, 1.0, (1 << i) + 1);
            for w in bounds.windows(2) {
                data.push(scale * ((w[0] + w[1]) / 2.0));
            }
            for w in bounds.windows(2) {
                data.push(-scale * ((w[0] + w[1]) / 2.0));
            }
        }
        data.push(0.0);
        data.push(1.0);
        data.sort_by(f32::total_cmp);
        data.try_into().expect("256 entries")
    })
}

/// torch's f32 `linspace` on the CPU (see [`dynamic_map`]).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|k| {
            if k < half {
                step.mul_add(k as f32, start)
            } else {
                (-step).mul_add((steps - 1 - k) as f32, end)
            }
        })
        .collect()
}

/// Codes and f32 absmax per block of an 8-bit blockwise quantization.
#[derive(Clone, Debug, PartialEq)]
pub struct Blockwise {
    pub codes: Vec<u8>,
    pub absmax: Vec<f32>,
}

/// bitsandbytes' CPU `quantize_blockwise(x, code, blocksize)` (`quantize_cpu_impl`): per
/// block the absmax (an all-zero block gets absmax 0 and code 0), each value times
/// `1 / absmax`, clamped to [-1, 1], mapped to one of 65536 evenly spaced bins
/// (`fma((v + 1) / 2, 65535, 0.5)` truncated: the kernel is compiled with FMA) and the bin
/// to the code whose midpoints bracket the bin's left edge (a precomputed table). That is
/// the nearest code except within 2^-16 of a midpoint, and it is what bitsandbytes stores.
pub fn quantize_blockwise(x: &[f32], code: &[f32; CODE_LEN], blocksize: usize) -> Blockwise {
    assert!(blocksize > 0, "blocksize 0");
    let lut = bin_table(code);
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let am = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / am;
        codes.extend(block.iter().map(|&v| lut[bin_of(v * inv)]));
    }
    Blockwise { codes, absmax }
}

/// `dequantize_blockwise`: `code[c] * absmax[block]` in f32.
pub fn dequantize_blockwise(
    codes: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
    out: &mut [f32],
) {
    assert_eq!(
        codes.len(),
        out.len(),
        "dequantize_blockwise: output length"
    );
    for ((o, c), scale) in out
        .chunks_mut(blocksize)
        .zip(codes.chunks(blocksize))
        .zip(absmax)
    {
        for (o, &c) in o.iter_mut().zip(c) {
            *o = code[c as usize] * scale;
        }
    }
}

/// `norm_to_lut_index`: the bin of a scaled value.
fn bin_of(v: f32) -> usize {
    let t = (v.clamp(-1.0, 1.0) + 1.0) * 0.5;
    t.mul_add((LUT_LEN - 1) as f32, 0.5) as usize
}

/// `build_quantize_lut`: for each bin, the number of code midpoints below its left edge.
fn bin_table(code: &[f32; CODE_LEN]) -> Vec<u8> {
    let mid: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut idx = 0usize;
    (0..LUT_LEN)
        .map(|i| {
            let val = -1.0f32 + (2.0 * i as f32) / (LUT_LEN - 1) as f32;
            while idx < CODE_LEN - 1 && mid[idx] < val {
                idx += 1;
            }
            idx as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_is_signed_sorted_and_spans_minus_one_to_one() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        assert_eq!(m[255], 1.0);
        assert_eq!(
            m[127], 0.0,
            "zero sits just below the middle: 127 negative values"
        );
        assert!((m[0] + 0.99297).abs() < 1e-4, "{}", m[0]);
    }

    #[test]
    fn exact_codes_map_to_themselves_and_zero_blocks_to_code_zero() {
        let m = dynamic_map();
        // a block whose absmax is 1 holding code values far wider apart than a bin (2^-15):
        // each comes back as its own index
        let wide: Vec<usize> = (0..256).filter(|&i| m[i].abs() >= 0.01).collect();
        let x: Vec<f32> = wide.iter().map(|&i| m[i]).collect();
        let q = quantize_blockwise(&x, m, 256);
        assert_eq!(q.absmax, [1.0]);
        assert_eq!(q.codes, wide.iter().map(|&i| i as u8).collect::<Vec<_>>());
        let z = quantize_blockwise(&[0.0; 10], m, 4);
        assert_eq!((z.codes, z.absmax), (vec![0; 10], vec![0.0; 3]));
    }
}
