//! Fused LM head and cross-entropy over row chunks: only a `[rows, V]` block of logits (at most 64 MiB)
//! exists at a time. Per chunk: logits = h·wᵀ (one GEMM), a stable log-softmax per row
//! (rows in parallel), the loss, dlogits in place of the logits, then dh = dlogits·w.

use rayon::prelude::*;

use super::CpuFloat;
use super::matmul::gemm_rowmajor;
use super::vector::vectorized;
use crate::backend::{Accumulate, IGNORE_INDEX, LossSum};

/// Rows of logits materialised at once: as many as fit [`BLOCK_BYTES`], between 16 and
/// 256. The head's GEMMs are `[rows, C]·[C, V]` and `[rows, V]·[V, C]`; at 64 rows they
/// ran at 143 and 120 GFLOP/s on two cores, at 256 rows at 188 and 141 (SmolLM2's
/// V = 49152, C = 576).
fn chunk_rows(v: usize, elem: usize) -> usize {
    (BLOCK_BYTES / (v * elem).max(1)).clamp(16, 256)
}

/// The most bytes one block of logits takes.
const BLOCK_BYTES: usize = 64 << 20;

/// Loss of h `[N, C]` against labels `[N]` (each in 0..V or [`IGNORE_INDEX`]) through the
/// head w `[V, C]`. dh `[N, C]`, when given, is overwritten with
/// `loss_scale · (softmax − onehot) · w` (zero rows for ignored labels); logits `[N, V]`,
/// when given, receives the logits. With `softcap` c the logits are `c · tanh(h·wᵀ / c)`
/// and the gradient goes through the cap.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lm_head_loss<T: CpuFloat>(
    h: &[T],
    w: &[T],
    labels: &[i32],
    c: usize,
    loss_scale: T,
    softcap: Option<T>,
    mut dh: Option<&mut [T]>,
    mut logits: Option<&mut [T]>,
) -> LossSum {
    let n = labels.len();
    let v = w.len() / c;
    let mut total = LossSum::default();
    if n == 0 {
        return total;
    }
    let chunk = chunk_rows(v, std::mem::size_of::<T>());
    let mut block = vec![T::zero(); chunk.min(n) * v]; // [rows ≤ chunk, V]
    for (ci, labels) in labels.chunks(chunk).enumerate() {
        let (r0, rows) = (ci * chunk, labels.len());
        let block = &mut block[..rows * v];
        // block [rows, V] = h[r0..r0+rows] [rows, C] · wᵀ (w stored [V, C])
        gemm_rowmajor(
            block,
            &h[r0 * c..(r0 + rows) * c],
            w,
            (rows, v, c),
            (false, true),
            T::one(),
            Accumulate::Overwrite,
        );
        if let Some(cap) = softcap {
            softcap_in_place(block, cap);
        }
        if let Some(out) = logits.as_deref_mut() {
            out[r0 * v..(r0 + rows) * v].copy_from_slice(block);
        }
        let want_grad = dh.is_some();
        let losses: Vec<Option<f64>> = block
            .par_chunks_mut(v)
            .zip(labels.par_iter())
            .map(|(row, &label)| row_loss(row, label, loss_scale, softcap, want_grad))
            .collect();
        // Added in row order: the sum does not depend on the thread count.
        for loss in losses.into_iter().flatten() {
            total.sum += loss;
            total.count += 1;
        }
        if let Some(dh) = dh.as_deref_mut() {
            // dh[r0..r0+rows] [rows, C] = dlogits [rows, V] · w [V, C]
            gemm_rowmajor(
                &mut dh[r0 * c..(r0 + rows) * c],
                block,
                w,
                (rows, c, v),
                (false, false),
                T::one(),
                Accumulate::Overwrite,
            );
        }
    }
    total
}

vectorized! {
    /// Cross-entropy of one row of logits `[V]` against `label`: `lse − logit[label]`, or
    /// `None` for [`IGNORE_INDEX`]. With `want_grad` the row is overwritten with
    /// `loss_scale · (softmax − onehot)` (zeros for an ignored row), times the soft-cap's
    /// slope `1 − (x/cap)²` when the row holds capped logits x.
    fn row_loss<T: CpuFloat>(
        row: &mut [T],
        label: i32,
        loss_scale: T,
        softcap: Option<T>,
        want_grad: bool,
    ) -> Option<f64> {
        if label == IGNORE_INDEX {
            if want_grad {
                row.fill(T::zero());
            }
            return None;
        }
        let label = label as usize;
        // lse = max + ln Σ exp(x − max), the sum in f64: summed in order in f32, the small
        // terms of a large vocabulary are rounded away (SmolLM2, V = 49152: the loss came out
        // 1.0e-4 nats low against transformers over the same logits)
        let max = super::elementwise::max(row);
        let x_label = row[label];
        // the capped logits, for the slope of the cap in the gradient
        let capped: Option<(T, Vec<T>)> = softcap.filter(|_| want_grad).map(|cap| (cap, row.to_vec()));
        // the row becomes e_j = exp(x_j − max); softmax_j = e_j / Σ e
        for x in row.iter_mut() {
            *x = (*x - max).exp_v();
        }
        let mut part = [0f64; 4];
        let chunks = row.chunks_exact(4);
        let tail: f64 = chunks.remainder().iter().map(|&e| e.as_f64()).sum();
        for c in chunks {
            for (p, &e) in part.iter_mut().zip(c) {
                *p += e.as_f64();
            }
        }
        let sum = (part[0] + part[1]) + (part[2] + part[3]) + tail;
        let lse64 = max.as_f64() + sum.ln();
        let loss = lse64 - x_label.as_f64();
        if want_grad {
            // ∂loss/∂x_j = softmax_j − [j = label]
            let inv = T::from_f64(1.0 / sum);
            match capped {
                None => {
                    let s = loss_scale * inv;
                    for e in row.iter_mut() {
                        *e = s * *e;
                    }
                    row[label] = row[label] - loss_scale;
                }
                Some((cap, x)) => {
                    // x = cap·tanh(z/cap)  ⇒  ∂x/∂z = 1 − (x/cap)²
                    for (j, (e, &x)) in row.iter_mut().zip(&x).enumerate() {
                        let onehot = if j == label { T::one() } else { T::zero() };
                        let y = x / cap;
                        *e = loss_scale * (*e * inv - onehot) * (T::one() - y * y);
                    }
                }
            }
        }
        Some(loss)
    }
}

/// `x = cap · tanh(x / cap)` over a block of logits, as transformers computes it.
pub(crate) fn softcap_in_place<T: CpuFloat>(x: &mut [T], cap: T) {
    x.par_iter_mut()
        .with_min_len(super::elementwise::PAR_MIN)
        .for_each(|x| *x = (*x / cap).tanh() * cap);
}
