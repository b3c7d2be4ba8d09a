//! Rotary position embedding in Hugging Face's rotate-half layout: element j of a head is
//! paired with element j + D/2 and the pair is rotated by `positions[i] · inv_freq[j]`.
//! The angle, its cosine and sine are computed in f32 exactly as HF does, then converted
//! to the compute type.

use rayon::prelude::*;

use super::CpuFloat;
use super::elementwise::min_rows;

/// Rotate x `[N, heads, D]` in place, token i by `positions[i]` (`[N]`); inv_freq `[D/2]`.
pub(crate) fn rope_forward<T: CpuFloat>(
    x: &mut [T],
    positions: &[u32],
    inv_freq: &[f32],
    heads: usize,
) {
    rotate(x, positions, inv_freq, heads, false);
}

/// Gradient of [`rope_forward`] in place on dx `[N, heads, D]`.
pub(crate) fn rope_backward<T: CpuFloat>(
    dx: &mut [T],
    positions: &[u32],
    inv_freq: &[f32],
    heads: usize,
) {
    // forward: [lo', hi'] = [[cos, −sin], [sin, cos]] · [lo, hi], a linear map whose
    // gradient is its transpose: the same rotation with sin negated.
    rotate(dx, positions, inv_freq, heads, true);
}

/// The rotation of both directions; `inverse` negates the angle.
fn rotate<T: CpuFloat>(
    x: &mut [T],
    positions: &[u32],
    inv_freq: &[f32],
    heads: usize,
    inverse: bool,
) {
    let half = inv_freq.len();
    let row = heads * 2 * half;
    if x.is_empty() || row == 0 {
        return;
    }
    x.par_chunks_mut(row)
        .zip(positions.par_iter())
        .with_min_len(min_rows(row))
        .for_each_init(Vec::new, |cos_sin: &mut Vec<(T, T)>, (token, &pos)| {
            // HF: freqs = position_ids.float() · inv_freq (f32), then cos() and sin() in f32.
            cos_sin.clear();
            cos_sin.extend(inv_freq.iter().map(|&f| {
                let angle = pos as f32 * f;
                let (sin, cos) = angle.sin_cos();
                let sin = if inverse { -sin } else { sin };
                (T::from_f32(cos), T::from_f32(sin))
            }));
            for head in token.chunks_exact_mut(2 * half) {
                let (lo, hi) = head.split_at_mut(half);
                for ((l, h), &(cos, sin)) in lo.iter_mut().zip(hi.iter_mut()).zip(cos_sin.iter()) {
                    // HF: out = x·cos + rotate_half(x)·sin, rotate_half([lo, hi]) = [−hi, lo]
                    let (a, b) = (*l, *h);
                    *l = a * cos - b * sin;
                    *h = b * cos + a * sin;
                }
            }
        });
}
