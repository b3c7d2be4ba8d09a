//! RMSNorm and LayerNorm over the rows of x `[N, C]`, statistics in the compute type (f32
//! on the f32 backend, as Hugging Face computes norms). Weights are frozen, so the
//! backward passes give only the input gradient.

use rayon::prelude::*;

use super::CpuFloat;
use super::elementwise::{dot, min_rows};
use super::vector::vectorized;
use crate::backend::Accumulate;

/// `T` from a count.
fn count<T: CpuFloat>(c: usize) -> T {
    T::from_f64(c as f64)
}

/// Store `v` into `dst` or add it, by `acc`.
#[inline(always)]
fn put<T: CpuFloat>(dst: &mut T, v: T, acc: Accumulate) {
    *dst = match acc {
        Accumulate::Overwrite => v,
        Accumulate::Add => *dst + v,
    };
}

/// out `[N, C]` = x · rstd · (w_offset + w), rstd `[N]` = 1/√(mean(x²) + eps); x `[N, C]`,
/// w `[C]`.
pub(crate) fn rms_norm_forward<T: CpuFloat>(
    out: &mut [T],
    rstd: &mut [T],
    x: &[T],
    w: &[T],
    w_offset: T,
    c: usize,
    eps: T,
) {
    out.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .with_min_len(min_rows(c))
        .for_each(|((out, rstd), x)| *rstd = rms_norm_row(out, x, w, w_offset, eps));
}

vectorized! {
    /// One row of [`rms_norm_forward`]; returns its rstd.
    fn rms_norm_row<T: CpuFloat>(out: &mut [T], x: &[T], w: &[T], w_offset: T, eps: T) -> T {
        let r = T::one() / (dot(x, x) / count(x.len()) + eps).sqrt();
        for ((o, &x), &w) in out.iter_mut().zip(x).zip(w) {
            *o = x * r * (w_offset + w);
        }
        r
    }
}

/// dx `[N, C]` (=|+=) ∂L/∂x of [`rms_norm_forward`], given dout `[N, C]` and its saved rstd.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_norm_backward<T: CpuFloat>(
    dx: &mut [T],
    dout: &[T],
    x: &[T],
    w: &[T],
    w_offset: T,
    rstd: &[T],
    c: usize,
    acc: Accumulate,
) {
    // forward: out_j = x_j · r · w_j (w_j standing for w_offset + w_j) with r = (Σ_j x_j²/C + eps)^(-1/2), so ∂r/∂x_i = −r³·x_i/C:
    //   dx_i = r · w_i · dout_i − x_i · (r³/C) · Σ_j dout_j · w_j · x_j
    dx.par_chunks_mut(c)
        .zip(dout.par_chunks(c))
        .zip(x.par_chunks(c))
        .zip(rstd.par_iter())
        .with_min_len(min_rows(c))
        .for_each(|(((dx, dout), x), &r)| rms_norm_backward_row(dx, dout, x, w, w_offset, r, acc));
}

vectorized! {
    /// One row of [`rms_norm_backward`].
    fn rms_norm_backward_row<T: CpuFloat>(
        dx: &mut [T],
        dout: &[T],
        x: &[T],
        w: &[T],
        w_offset: T,
        r: T,
        acc: Accumulate,
    ) {
        let s = dout
            .iter()
            .zip(w)
            .zip(x)
            .fold(T::zero(), |s, ((&g, &w), &x)| s + g * (w_offset + w) * x);
        let coef = s * r * r * r / count(x.len());
        for (((dx, &g), &w), &x) in dx.iter_mut().zip(dout).zip(w).zip(x) {
            put(dx, r * (w_offset + w) * g - x * coef, acc);
        }
    }
}

/// out `[N, C]` = (x − mean) · rstd · w + b with mean, rstd `[N]` (saved),
/// rstd = 1/√(var + eps), var the biased variance; x `[N, C]`, w, b `[C]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_forward<T: CpuFloat>(
    out: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    x: &[T],
    w: &[T],
    b: &[T],
    c: usize,
    eps: T,
) {
    out.par_chunks_mut(c)
        .zip(mean.par_iter_mut())
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .with_min_len(min_rows(c))
        .for_each(|(((out, mean), rstd), x)| {
            // Two passes: the centred sum of squares does not cancel as Σx² − C·mean² can.
            let mu = x.iter().fold(T::zero(), |s, &x| s + x) / count(c);
            let var = x.iter().fold(T::zero(), |s, &x| s + (x - mu) * (x - mu)) / count(c);
            let r = T::one() / (var + eps).sqrt();
            (*mean, *rstd) = (mu, r);
            for (((o, &x), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                *o = (x - mu) * r * w + b;
            }
        });
}

/// dx `[N, C]` (=|+=) ∂L/∂x of [`layer_norm_forward`], given dout `[N, C]` and the saved
/// mean and rstd `[N]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_backward<T: CpuFloat>(
    dx: &mut [T],
    dout: &[T],
    x: &[T],
    w: &[T],
    mean: &[T],
    rstd: &[T],
    c: usize,
    acc: Accumulate,
) {
    // forward: out = x̂ · w + b with x̂ = (x − mean) · rstd. With g = dout · w:
    //   dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))
    dx.par_chunks_mut(c)
        .zip(dout.par_chunks(c))
        .zip(x.par_chunks(c))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .with_min_len(min_rows(c))
        .for_each(|(((dx, dout), x), (&mu, &r))| {
            let (mut g_sum, mut gx_sum) = (T::zero(), T::zero());
            for ((&d, &w), &x) in dout.iter().zip(w).zip(x) {
                let g = d * w;
                g_sum = g_sum + g;
                gx_sum = gx_sum + g * (x - mu) * r;
            }
            let (g_mean, gx_mean) = (g_sum / count(c), gx_sum / count(c));
            for (((dx, &d), &w), &x) in dx.iter_mut().zip(dout).zip(w).zip(x) {
                let xhat = (x - mu) * r;
                put(dx, r * (d * w - g_mean - xhat * gx_mean), acc);
            }
        });
}
