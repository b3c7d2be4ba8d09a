//! Expansion of quantized frozen weights into plain weights: NF4 (bitsandbytes' layout) and
//! FP8 E4M3 with 128 × 128 block scales. The CPU backend holds every weight as `T`: NF4's
//! stored bytes arrive as one value per byte, FP8 codes as their (exact) values.

use rayon::prelude::*;

use super::CpuFloat;
use super::elementwise::PAR_MIN;
use crate::backend::DType;

/// The second level of double quantization: per-block f32 scales of the first-level
/// codes, the 256-value code map, the block size and the offset added back.
pub(crate) struct Nested<'a, T> {
    pub absmax: &'a [T],
    pub code: &'a [T],
    pub blocksize: usize,
    pub offset: f32,
}

/// out `[numel]` = code[nibble i] · scale(i / blocksize), in f32, rounded to `dtype`;
/// nibble i of byte i/2 is its high half for even i. The scale is `absmax[b]`, or with
/// double quantization `nested.code[absmax[b]] · nested.absmax[b / nested.blocksize] +
/// nested.offset`.
pub(crate) fn dequantize_nf4<T: CpuFloat>(
    out: &mut [T],
    packed: &[T],
    absmax: &[T],
    code: &[T],
    nested: Option<&Nested<'_, T>>,
    blocksize: usize,
    dtype: DType,
) {
    let byte = |v: T| v.as_f32() as u8;
    let scale = |b: usize| -> f32 {
        match nested {
            None => absmax[b].as_f32(),
            Some(n) => {
                n.code[byte(absmax[b]) as usize].as_f32() * n.absmax[b / n.blocksize].as_f32()
                    + n.offset
            }
        }
    };
    out.par_chunks_mut(blocksize)
        .enumerate()
        .with_min_len((PAR_MIN / blocksize).max(1))
        .for_each(|(b, block)| {
            let s = scale(b);
            for (j, o) in block.iter_mut().enumerate() {
                let i = b * blocksize + j;
                let p = byte(packed[i / 2]);
                let nibble = if i.is_multiple_of(2) {
                    p >> 4
                } else {
                    p & 0x0f
                };
                *o = T::from_f32(dtype.round(code[nibble as usize].as_f32() * s));
            }
        });
}

/// out `[rows, cols]` = codes[i, j] · scale_inv[i / 128, j / 128], in f32, rounded to
/// `dtype`; `codes` hold the E4M3 values themselves.
pub(crate) fn dequantize_fp8<T: CpuFloat>(
    out: &mut [T],
    codes: &[T],
    scale_inv: &[T],
    cols: usize,
    dtype: DType,
) {
    use crate::quant::fp8::BLOCK;
    if cols == 0 {
        return;
    }
    let bc = cols.div_ceil(BLOCK);
    out.par_chunks_mut(cols)
        .zip(codes.par_chunks(cols))
        .enumerate()
        .with_min_len((PAR_MIN / cols).max(1))
        .for_each(|(i, (row, q))| {
            let scales = &scale_inv[(i / BLOCK) * bc..(i / BLOCK + 1) * bc];
            for (j, (o, &c)) in row.iter_mut().zip(q).enumerate() {
                *o = T::from_f32(dtype.round(c.as_f32() * scales[j / BLOCK].as_f32()));
            }
        });
}
