//! Causal softmax attention (optionally confined to packed segments), flash-style: each query row computes its scores, their max
//! and normaliser in one row of scratch, so no `[T, T]` matrix exists; the row's
//! log-sum-exp is saved and the backward recomputes the probabilities from it.
//!
//! Shapes: q, out, dout `[B, T, H, D]`; k, v `[B, T, KVH, D]`; lse `[B, H, T]`. Query head
//! h reads key/value head `h / (H / KVH)`.
//!
//! Parallelism without shared writes: the forward and the dq pass run one task per query
//! token (b, t), which owns `out[b, t]` / `dq[b, t]`; the dk/dv pass runs one task per key
//! token (b, s), which owns `dk[b, s]` and `dv[b, s]` and sums over every query head of
//! each group and every t ≥ s. Splitting the backward so recomputes the probabilities
//! once more than a single pass would, in exchange for full parallelism and no locks.

use rayon::prelude::*;

use super::CpuFloat;
use super::elementwise::{add_scaled, dot};
use crate::backend::{AttnDims, DecodeDims};

/// Index helper for the row-major layouts above.
#[derive(Clone, Copy)]
struct Layout {
    t: usize,
    h: usize,
    kvh: usize,
    d: usize,
    /// Query heads per key/value head.
    group: usize,
}

impl Layout {
    fn new(dims: &AttnDims) -> Self {
        Layout {
            t: dims.seq,
            h: dims.n_heads,
            kvh: dims.n_kv_heads,
            d: dims.head_dim,
            group: dims.n_heads / dims.n_kv_heads,
        }
    }
    /// Offset of q/out/dout[b, t, h, :].
    fn q(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.t + t) * self.h + h) * self.d
    }
    /// Offset of k/v[b, s, g, :].
    fn kv(&self, b: usize, s: usize, g: usize) -> usize {
        ((b * self.t + s) * self.kvh + g) * self.d
    }
    /// Index of lse[b, h, t].
    fn lse(&self, b: usize, h: usize, t: usize) -> usize {
        (b * self.h + h) * self.t + t
    }
}

/// out `[B, T, H, D]` = softmax(scale · q·kᵀ, causal) · v; lse `[B, H, T]` saved.
pub(crate) fn attention_forward<T: CpuFloat>(
    out: &mut [T],
    lse: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    dims: &AttnDims,
    key_start: Option<&[u32]>,
) {
    let l = Layout::new(dims);
    let row = l.h * l.d;
    let first = |bt: usize| key_start.map_or(0, |ks| ks[bt] as usize);
    if out.is_empty() {
        return;
    }
    let scale = T::from_f32(dims.scale);
    // lse in token-major order [B, T, H], so that each task writes one contiguous piece;
    // transposed into lse [B, H, T] at the end.
    let mut lse_bth = vec![T::zero(); lse.len()];
    out.par_chunks_mut(row)
        .zip(lse_bth.par_chunks_mut(l.h))
        .enumerate()
        .for_each_init(Vec::new, |p: &mut Vec<T>, (bt, (out_bt, lse_bt))| {
            let (b, t) = (bt / l.t, bt % l.t);
            let s0 = first(bt);
            for h in 0..l.h {
                let g = h / l.group;
                let qv = &q[l.q(b, t, h)..][..l.d];
                // scores over keys s0 ≤ s ≤ t, then p = exp(score − max)
                p.clear();
                p.extend((s0..=t).map(|s| scale * dot(qv, &k[l.kv(b, s, g)..][..l.d])));
                let max = p.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
                let mut sum = T::zero();
                for x in p.iter_mut() {
                    *x = (*x - max).exp();
                    sum = sum + *x;
                }
                // out = Σ_s p_s · v_s / Σ_s p_s
                let o = &mut out_bt[h * l.d..][..l.d];
                o.fill(T::zero());
                for (s, &ps) in (s0..).zip(p.iter()) {
                    add_scaled(o, ps, &v[l.kv(b, s, g)..][..l.d]);
                }
                for x in o.iter_mut() {
                    *x = *x / sum;
                }
                lse_bt[h] = max + sum.ln();
            }
        });
    lse.par_chunks_mut(l.t)
        .enumerate()
        .for_each(|(bh, lse_row)| {
            let (b, h) = (bh / l.h, bh % l.h);
            for (t, x) in lse_row.iter_mut().enumerate() {
                *x = lse_bth[(b * l.t + t) * l.h + h];
            }
        });
}

/// Attention of new queries against a key/value cache (see [`DecodeDims`]): out
/// `[B, Tq, H, D]` from q `[B, Tq, H, D]` and the caches `[B, cap, KVH, D]`. Query i of row
/// b, at position `kv_len − Tq + i`, attends to keys `key_start[b] ..= kv_len − Tq + i`.
/// One task per query token; the same arithmetic as [`attention_forward`].
pub(crate) fn attention_decode<T: CpuFloat>(
    out: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    dims: &DecodeDims,
    key_start: Option<&[u32]>,
) {
    let (h_, kvh, d) = (dims.n_heads, dims.n_kv_heads, dims.head_dim);
    let (tq, cap) = (dims.q_len, dims.cap);
    let group = h_ / kvh.max(1);
    let past = dims.kv_len - tq;
    if out.is_empty() {
        return;
    }
    let scale = T::from_f32(dims.scale);
    let kv = |b: usize, s: usize, g: usize| ((b * cap + s) * kvh + g) * d;
    out.par_chunks_mut(h_ * d).enumerate().for_each_init(
        Vec::new,
        |p: &mut Vec<T>, (bt, out_bt)| {
            let (b, i) = (bt / tq, bt % tq);
            let t = past + i;
            let s0 = key_start.map_or(0, |ks| (ks[b] as usize).min(t));
            for h in 0..h_ {
                let g = h / group;
                let qv = &q[(bt * h_ + h) * d..][..d];
                p.clear();
                p.extend((s0..=t).map(|s| scale * dot(qv, &k[kv(b, s, g)..][..d])));
                let max = p.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
                let mut sum = T::zero();
                for x in p.iter_mut() {
                    *x = (*x - max).exp();
                    sum = sum + *x;
                }
                let o = &mut out_bt[h * d..][..d];
                o.fill(T::zero());
                for (s, &ps) in (s0..).zip(p.iter()) {
                    add_scaled(o, ps, &v[kv(b, s, g)..][..d]);
                }
                for x in o.iter_mut() {
                    *x = *x / sum;
                }
            }
        },
    );
}

/// Gradients of [`attention_forward`]; dq `[B, T, H, D]`, dk, dv `[B, T, KVH, D]` are
/// overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward<T: CpuFloat>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    out: &[T],
    lse: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    dims: &AttnDims,
    key_start: Option<&[u32]>,
) {
    let l = Layout::new(dims);
    let first = |bt: usize| key_start.map_or(0, |ks| ks[bt] as usize);
    dq.fill(T::zero());
    dk.fill(T::zero());
    dv.fill(T::zero());
    if dq.is_empty() {
        return;
    }
    let scale = T::from_f32(dims.scale);
    // delta [B, T, H] = Σ_d dout · out: since out = Σ_s p_s·v_s, Σ_s p_s·dP_s = dout·out.
    let delta: Vec<T> = dout
        .par_chunks(l.d)
        .zip(out.par_chunks(l.d))
        .map(|(g, o)| dot(g, o))
        .collect();
    // For a query (b, t, h) and a key s ≤ t, with g = h / group:
    //   forward: p = exp(scale·q·k_s − lse), out = Σ_s p·v_s
    //   dP = dout·v_s,  dS = p·(dP − delta),  dscore = dS
    //   dq += scale·dS·k_s,  dk_s += scale·dS·q,  dv_s += p·dout
    let grad = |b: usize, t: usize, h: usize, s: usize| -> (T, T) {
        let g = h / l.group;
        let (qi, ki) = (l.q(b, t, h), l.kv(b, s, g));
        let p = (scale * dot(&q[qi..][..l.d], &k[ki..][..l.d]) - lse[l.lse(b, h, t)]).exp();
        let dp = dot(&dout[qi..][..l.d], &v[ki..][..l.d]);
        (p, p * (dp - delta[qi / l.d]))
    };

    // dq: one task per query token (b, t).
    dq.par_chunks_mut(l.h * l.d)
        .enumerate()
        .for_each(|(bt, dq_bt)| {
            let (b, t) = (bt / l.t, bt % l.t);
            for h in 0..l.h {
                let dq_row = &mut dq_bt[h * l.d..][..l.d];
                for s in first(bt)..=t {
                    let (_, ds) = grad(b, t, h, s);
                    add_scaled(dq_row, scale * ds, &k[l.kv(b, s, h / l.group)..][..l.d]);
                }
            }
        });

    // dk, dv: one task per key token (b, s), summing over queries t ≥ s of every head.
    dk.par_chunks_mut(l.kvh * l.d)
        .zip(dv.par_chunks_mut(l.kvh * l.d))
        .enumerate()
        .for_each(|(bs, (dk_bs, dv_bs))| {
            let (b, s) = (bs / l.t, bs % l.t);
            for h in 0..l.h {
                let g = h / l.group;
                let dk_row = &mut dk_bs[g * l.d..][..l.d];
                let dv_row = &mut dv_bs[g * l.d..][..l.d];
                // queries t ≥ s that see key s: key_start never decreases along a
                // row, so they end at the first t whose segment starts after s
                for t in (s..l.t).take_while(|&t| first(b * l.t + t) <= s) {
                    let (p, ds) = grad(b, t, h, s);
                    let qi = l.q(b, t, h);
                    add_scaled(dk_row, scale * ds, &q[qi..][..l.d]);
                    add_scaled(dv_row, p, &dout[qi..][..l.d]);
                }
            }
        });
}
