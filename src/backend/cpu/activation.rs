//! Elementwise activations: SwiGLU (Llama MLP), GPT-2's `gelu_new`, and the dropout on
//! the LoRA input.

use rayon::prelude::*;

use super::CpuFloat;
use super::elementwise::PAR_MIN;
use crate::backend::dropout_keep;

/// σ(x) = 1/(1 + e^(−x)); saturates to 0 or 1 without NaN.
#[inline]
fn sigmoid<T: CpuFloat>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// out `[n]` = silu(gate) · up, silu(g) = g · σ(g).
pub(crate) fn swiglu_forward<T: CpuFloat>(out: &mut [T], gate: &[T], up: &[T]) {
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .with_min_len(PAR_MIN)
        .for_each(|(o, (&g, &u))| *o = g * sigmoid(g) * u);
}

/// dgate, dup `[n]` (overwritten) of [`swiglu_forward`] given dout `[n]`.
pub(crate) fn swiglu_backward<T: CpuFloat>(
    dgate: &mut [T],
    dup: &mut [T],
    dout: &[T],
    gate: &[T],
    up: &[T],
) {
    // forward: out = g·σ(g)·u
    //   ∂out/∂u = g·σ(g);  ∂out/∂g = u·σ(g)·(1 + g·(1 − σ(g)))
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .zip(dout.par_iter().zip(gate.par_iter().zip(up.par_iter())))
        .with_min_len(PAR_MIN)
        .for_each(|((dg, du), (&d, (&g, &u)))| {
            let s = sigmoid(g);
            *du = d * g * s;
            *dg = d * u * s * (T::one() + g * (T::one() - s));
        });
}

/// √(2/π) and the cubic coefficient of `gelu_new`.
fn gelu_consts<T: CpuFloat>() -> (T, T) {
    (
        T::from_f64((2.0 / std::f64::consts::PI).sqrt()),
        T::from_f64(0.044715),
    )
}

/// out `[n]` = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), GPT-2's `gelu_new`.
pub(crate) fn gelu_forward<T: CpuFloat>(out: &mut [T], x: &[T]) {
    let (k, a) = gelu_consts::<T>();
    let half = T::from_f64(0.5);
    out.par_iter_mut()
        .zip(x.par_iter())
        .with_min_len(PAR_MIN)
        .for_each(|(o, &x)| *o = half * x * (T::one() + (k * (x + a * x * x * x)).tanh()));
}

/// dx `[n]` (overwritten) of [`gelu_forward`] given dout `[n]`.
pub(crate) fn gelu_backward<T: CpuFloat>(dx: &mut [T], dout: &[T], x: &[T]) {
    // forward: out = ½·x·(1 + tanh u), u = k·(x + a·x³)
    //   ∂out/∂x = ½·(1 + tanh u) + ½·x·(1 − tanh² u)·k·(1 + 3a·x²)
    let (k, a) = gelu_consts::<T>();
    let (half, three) = (T::from_f64(0.5), T::from_f64(3.0));
    dx.par_iter_mut()
        .zip(dout.par_iter().zip(x.par_iter()))
        .with_min_len(PAR_MIN)
        .for_each(|(dx, (&d, &x))| {
            let th = (k * (x + a * x * x * x)).tanh();
            let du = k * (T::one() + three * a * x * x);
            *dx = d * (half * (T::one() + th) + half * x * (T::one() - th * th) * du);
        });
}

/// out `[n]` = x · keep(i)/(1 − p) with the mask of [`dropout_keep`]; a plain copy when
/// p = 0. Being linear in x, it is its own backward (dx from dout, same p and seed).
pub(crate) fn dropout<T: CpuFloat>(out: &mut [T], x: &[T], p: f32, seed: u64) {
    if p == 0.0 {
        out.copy_from_slice(x);
        return;
    }
    // torch: input · (mask / (1 − p))
    let scale = T::from_f64(1.0 / (1.0 - p as f64));
    out.par_iter_mut()
        .zip(x.par_iter())
        .enumerate()
        .with_min_len(PAR_MIN)
        .for_each(|(i, (o, &x))| {
            *o = if dropout_keep(seed, i as u64, p) {
                x * scale
            } else {
                T::zero()
            }
        });
}
