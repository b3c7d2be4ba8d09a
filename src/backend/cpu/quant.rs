//! Expansion of NF4-stored frozen weights (bitsandbytes' layout) into plain weights. The
//! stored bytes arrive as one value per byte (the CPU backend holds every weight as `T`).

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
