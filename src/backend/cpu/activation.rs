//! Elementwise activations: the gated MLPs (SwiGLU, GeGLU), GELU-tanh (GPT-2's `gelu_new`),
//! and the dropout on the LoRA input.

use rayon::prelude::*;

use super::CpuFloat;
use super::elementwise::PAR_MIN;
use super::vector::{CHUNK, vectorized};
use crate::backend::{Activation, dropout_keep};

/// σ(x) = 1/(1 + e^(−x)); saturates to 0 or 1 without NaN.
#[inline(always)]
fn sigmoid<T: CpuFloat>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_v())
}

/// out `[n]` = act(gate) · up.
pub(crate) fn gated_forward<T: CpuFloat>(act: Activation, out: &mut [T], gate: &[T], up: &[T]) {
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(out, (gate, up))| gated_forward_chunk(act, out, gate, up));
}

vectorized! {
    /// [`gated_forward`] over one chunk.
    fn gated_forward_chunk<T: CpuFloat>(act: Activation, out: &mut [T], gate: &[T], up: &[T]) {
        let each = out.iter_mut().zip(gate.iter().zip(up));
        match act {
            Activation::Silu => {
                for (o, (&g, &u)) in each {
                    *o = g * sigmoid(g) * u;
                }
            }
            Activation::GeluTanh => {
                for (o, (&g, &u)) in each {
                    *o = gelu_and_slope(g).0 * u;
                }
            }
        }
    }
}

/// dgate, dup `[n]` (overwritten) of [`gated_forward`] given dout `[n]`.
pub(crate) fn gated_backward<T: CpuFloat>(
    act: Activation,
    dgate: &mut [T],
    dup: &mut [T],
    dout: &[T],
    gate: &[T],
    up: &[T],
) {
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(
            dout.par_chunks(CHUNK)
                .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))),
        )
        .for_each(|((dgate, dup), (dout, (gate, up)))| {
            gated_backward_chunk(act, dgate, dup, dout, gate, up)
        });
}

vectorized! {
    /// [`gated_backward`] over one chunk.
    fn gated_backward_chunk<T: CpuFloat>(
        act: Activation,
        dgate: &mut [T],
        dup: &mut [T],
        dout: &[T],
        gate: &[T],
        up: &[T],
    ) {
        // forward: out = act(g)·u  ⇒  ∂out/∂u = act(g), ∂out/∂g = u·act′(g); for SiLU
        //   act(g) = g·σ(g), act′(g) = σ(g)·(1 + g·(1 − σ(g)))
        let each = dgate
            .iter_mut()
            .zip(dup.iter_mut())
            .zip(dout.iter().zip(gate.iter().zip(up)));
        match act {
            Activation::Silu => {
                for ((dg, du), (&d, (&g, &u))) in each {
                    let s = sigmoid(g);
                    *du = d * g * s;
                    *dg = d * u * s * (T::one() + g * (T::one() - s));
                }
            }
            Activation::GeluTanh => {
                for ((dg, du), (&d, (&g, &u))) in each {
                    let (a, slope) = gelu_and_slope(g);
                    *du = d * a;
                    *dg = d * u * slope;
                }
            }
        }
    }
}

/// √(2/π) and the cubic coefficient of the tanh approximation.
fn gelu_consts<T: CpuFloat>() -> (T, T) {
    (
        T::from_f64((2.0 / std::f64::consts::PI).sqrt()),
        T::from_f64(0.044715),
    )
}

/// GELU (tanh approximation) at x and its derivative:
/// `½·x·(1 + tanh u)`, u = k·(x + a·x³), and `½·(1 + tanh u) + ½·x·(1 − tanh² u)·k·(1 + 3a·x²)`.
#[inline(always)]
fn gelu_and_slope<T: CpuFloat>(x: T) -> (T, T) {
    let (k, a) = gelu_consts::<T>();
    let (half, three) = (T::from_f64(0.5), T::from_f64(3.0));
    let th = (k * (x + a * x * x * x)).tanh();
    let du = k * (T::one() + three * a * x * x);
    (
        half * x * (T::one() + th),
        half * (T::one() + th) + half * x * (T::one() - th * th) * du,
    )
}

/// out `[n]` = GELU-tanh(x), GPT-2's `gelu_new`.
pub(crate) fn gelu_forward<T: CpuFloat>(out: &mut [T], x: &[T]) {
    out.par_iter_mut()
        .zip(x.par_iter())
        .with_min_len(PAR_MIN)
        .for_each(|(o, &x)| *o = gelu_and_slope(x).0);
}

/// dx `[n]` (overwritten) of [`gelu_forward`] given dout `[n]`.
pub(crate) fn gelu_backward<T: CpuFloat>(dx: &mut [T], dout: &[T], x: &[T]) {
    dx.par_iter_mut()
        .zip(dout.par_iter().zip(x.par_iter()))
        .with_min_len(PAR_MIN)
        .for_each(|(dx, (&d, &x))| *dx = d * gelu_and_slope(x).1);
}

/// out `[n]` = x · keep(offset + i)/(1 − p) with the mask of [`dropout_keep`]; a plain
/// copy when p = 0. Being linear in x, it is its own backward (dx from dout, same p, seed
/// and offset).
pub(crate) fn dropout<T: CpuFloat>(out: &mut [T], x: &[T], p: f32, seed: u64, offset: u64) {
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
            *o = if dropout_keep(seed, offset + i as u64, p) {
                x * scale
            } else {
                T::zero()
            }
        });
}
