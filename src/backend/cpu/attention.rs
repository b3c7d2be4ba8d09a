//! Causal softmax attention (optionally confined to packed segments), flash-style in
//! blocks of [`BQ`] queries: a block's scores against its visible keys are one GEMM into
//! a `[BQ, keys]` scratch, softmaxed there, so no `[T, T]` matrix exists; each row's
//! log-sum-exp is saved and the backward recomputes the probabilities from it. The block
//! products run on the `gemm` crate's kernels on one thread each (`gemm_serial`); the
//! parallelism is over blocks.
//!
//! Shapes: q, out, dout `[B, T, H, D]`; k, v `[B, T, KVH, D]`; lse `[B, H, T]`. Query head
//! h reads key/value head `h / (H / KVH)`.
//!
//! Parallelism without shared writes: the forward runs one task per query block, which
//! owns its rows of `out`; the backward one task per chunk of query blocks, which owns its
//! rows of `dq` and a partial sum of `dk`, `dv`, added in a fixed order at the end. No
//! result depends on the thread count or on scheduling.
//!
//! The single-token path for generation ([`attention_decode`]) keeps the per-query loop:
//! one query row has no block to multiply.

use rayon::prelude::*;

use super::CpuFloat;
use super::elementwise::{add_scaled, dot, max, min_rows, sum};
use super::matmul::{View, gemm_serial};
use super::vector::vectorized;
use crate::backend::{Accumulate, AttnDims, DecodeDims};

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

/// Query rows per block: the M of the block GEMMs (scores `[BQ, keys]`).
const BQ: usize = 64;

/// The query blocks of one row of the batch: `[t0, t1)` for t0 = 0, BQ, 2·BQ, …
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t.div_ceil(BQ)).map(move |i| (i * BQ, ((i + 1) * BQ).min(t)))
}

/// The scores of query block `[t0, t1)` of row b against its keys, softmaxed in place:
/// `s [rows, len]` holds, for query t and key `s_lo + j`, `exp(scale·q_t·k − m_t)` where
/// the key is visible (first(t) ≤ key ≤ t) and 0 elsewhere. With `lse` given, m_t is that
/// (the backward's recompute) and nothing is returned; else m_t is the row's max and the
/// row sums are returned through `sums` (the forward).
#[allow(clippy::too_many_arguments)]
fn block_probs<T: CpuFloat>(
    s: &mut [T],
    q: &[T],
    k: &[T],
    l: &Layout,
    (b, h): (usize, usize),
    (t0, t1, s_lo): (usize, usize, usize),
    first: &dyn Fn(usize) -> usize,
    scale: T,
    lse: Option<&dyn Fn(usize) -> T>,
    sums: &mut Vec<(T, T)>,
) {
    let (rows, len) = (t1 - t0, t1 - s_lo);
    let g = h / l.group;
    // s [rows, len] = scale · q[b, t0..t1, h, :] · k[b, s_lo..t1, g, :]ᵀ
    gemm_serial(
        s,
        len,
        View {
            data: &q[l.q(b, t0, h)..],
            rs: l.h * l.d,
            cs: 1,
        },
        View {
            data: &k[l.kv(b, s_lo, g)..],
            rs: 1,
            cs: l.kvh * l.d,
        },
        (rows, len, l.d),
        scale,
        Accumulate::Overwrite,
    );
    let rows_at = RowsAt {
        t0,
        s_lo,
        row0: b * l.t,
    };
    softmax_rows(s, len, rows_at, first, lse, sums);
}

/// Where a block's score rows sit: query `t0 + i` of the row of the batch whose first
/// token is `row0`, keys from `s_lo` on.
#[derive(Clone, Copy)]
struct RowsAt {
    t0: usize,
    s_lo: usize,
    row0: usize,
}

vectorized! {
    /// [`block_probs`]'s softmax over the score rows `s [rows, len]`, in place.
    fn softmax_rows<T: CpuFloat>(
        s: &mut [T],
        len: usize,
        at: RowsAt,
        first: &dyn Fn(usize) -> usize,
        lse: Option<&dyn Fn(usize) -> T>,
        sums: &mut Vec<(T, T)>,
    ) {
        sums.clear();
        for (i, row) in s.chunks_exact_mut(len).enumerate() {
            let t = at.t0 + i;
            let (lo, hi) = (first(at.row0 + t) - at.s_lo, t - at.s_lo);
            row[..lo].fill(T::zero());
            row[hi + 1..].fill(T::zero());
            let vis = &mut row[lo..=hi];
            let m = match lse {
                Some(lse) => lse(t),
                None => max(vis),
            };
            for x in vis.iter_mut() {
                *x = (*x - m).exp_v();
            }
            if lse.is_none() {
                sums.push((m, sum(vis)));
            }
        }
    }
}

/// out `[B, T, H, D]` = softmax(scale · q·kᵀ, causal) · v; lse `[B, H, T]` saved.
///
/// One task per query block of BQ tokens of a row (it owns their rows of `out`), every
/// head in turn: the block's scores against its visible keys are one GEMM into a
/// `[BQ, keys]` scratch, the softmax is taken row by row there, and the output is a
/// second GEMM, `P · V`, straight into `out`. No `[T, T]` matrix exists; the result does
/// not depend on the thread count (each product runs on one thread, in a fixed order).
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
    out.par_chunks_mut(l.t * row)
        .zip(lse_bth.par_chunks_mut(l.t * l.h))
        .enumerate()
        .flat_map(|(b, (out_b, lse_b))| {
            out_b
                .par_chunks_mut(BQ * row)
                .zip(lse_b.par_chunks_mut(BQ * l.h))
                .zip(blocks(l.t).collect::<Vec<_>>())
                .map(move |((o, ls), blk)| (b, blk, o, ls))
        })
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(s, sums): &mut (Vec<T>, Vec<(T, T)>), (b, (t0, t1), o, ls)| {
                // key_start never decreases along a row: the block's first query has the
                // earliest first key
                let s_lo = first(b * l.t + t0);
                let (rows, len) = (t1 - t0, t1 - s_lo);
                s.resize(rows * len, T::zero());
                for h in 0..l.h {
                    let g = h / l.group;
                    block_probs(
                        s,
                        q,
                        k,
                        &l,
                        (b, h),
                        (t0, t1, s_lo),
                        &first,
                        scale,
                        None,
                        sums,
                    );
                    // out[b, t0..t1, h, :] = P [rows, len] · v[b, s_lo..t1, g, :]
                    gemm_serial(
                        &mut o[h * l.d..],
                        row,
                        View::rowmajor(s, len, false),
                        View {
                            data: &v[l.kv(b, s_lo, g)..],
                            rs: l.kvh * l.d,
                            cs: 1,
                        },
                        (rows, l.d, len),
                        T::one(),
                        Accumulate::Overwrite,
                    );
                    for (i, &(max, sum)) in sums.iter().enumerate() {
                        for x in &mut o[i * row + h * l.d..][..l.d] {
                            *x = *x / sum;
                        }
                        ls[i * l.h + h] = max + sum.ln();
                    }
                }
            },
        );
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

/// Bytes the backward's per-chunk partial dk/dv sums may take (beyond dk and dv).
const PARTIAL_BYTES: usize = 256 << 20;

/// How many query chunks the backward splits each row of the batch into: enough tasks
/// to keep cores busy, as partial dk/dv sums of at most [`PARTIAL_BYTES`]. A function of
/// the shape only, so the summation order — and the result — does not depend on the
/// thread count.
fn chunks_per_row(l: &Layout, batch: usize, elem: usize) -> usize {
    let nblocks = l.t.div_ceil(BQ);
    let per_chunk = (l.t * l.kvh * l.d * 2 * elem).max(1);
    let by_mem = (PARTIAL_BYTES / per_chunk).max(1);
    32usize.div_ceil(batch).min(nblocks).min(by_mem).max(1)
}

/// Query blocks `[first, end)` of each of `chunks` chunks of a row, of about equal causal
/// work (block i costs about i + 1).
fn chunk_bounds(nblocks: usize, chunks: usize) -> Vec<(usize, usize)> {
    let total = nblocks * (nblocks + 1) / 2;
    let mut out = Vec::with_capacity(chunks);
    let (mut start, mut done) = (0, 0);
    for c in 0..chunks {
        let target = total * (c + 1) / chunks;
        let mut end = start;
        while end < nblocks && (done < target || end == start) {
            done += end + 1;
            end += 1;
        }
        if c + 1 == chunks {
            end = nblocks;
        }
        out.push((start, end));
        start = end;
    }
    out.retain(|&(a, b)| b > a);
    out
}

/// One backward task: row b of the batch, its query blocks `[c0, c1)`, their rows of dq,
/// and the dk, dv sums they add into.
type ChunkTask<'a, T> = (usize, (usize, usize), &'a mut [T], &'a mut [T], &'a mut [T]);

/// Gradients of [`attention_forward`]; dq `[B, T, H, D]`, dk, dv `[B, T, KVH, D]` are
/// overwritten.
///
/// Each row of the batch is cut into chunks of query blocks ([`chunks_per_row`]); a task
/// owns a chunk's rows of dq and a partial sum of dk and dv over its queries (dk and dv
/// themselves when a row is one chunk). Per block and head it recomputes the
/// probabilities from the saved lse (one GEMM), then dP = dO·Vᵀ, dS = P∘(dP − δ) with
/// δ = Σ dO∘O, dq = scale·dS·K, dk += scale·dSᵀ·Q and dv += Pᵀ·dO — five GEMMs, each
/// product computed once. The partial sums are added in chunk order at the end.
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
    if dq.is_empty() {
        return;
    }
    let batch = dims.batch;
    let scale = T::from_f32(dims.scale);
    let (qrow, kvrow) = (l.h * l.d, l.kvh * l.d);
    // delta [B, T, H] = Σ_d dout · out: since out = Σ_s p_s·v_s, Σ_s p_s·dP_s = dout·out.
    let delta: Vec<T> = dout
        .par_chunks(l.d)
        .zip(out.par_chunks(l.d))
        .map(|(g, o)| dot(g, o))
        .collect();
    let nblocks = l.t.div_ceil(BQ);
    let bounds = chunk_bounds(nblocks, chunks_per_row(&l, batch, std::mem::size_of::<T>()));
    let single = bounds.len() == 1;
    // Each chunk's slice of dq and its partial dk, dv: rows [0, its last query) of the
    // row's keys (later keys are never seen from it). One chunk: dk, dv themselves.
    let mut partial: Vec<(Vec<T>, Vec<T>)> = if single {
        Vec::new()
    } else {
        (0..batch)
            .flat_map(|_| bounds.iter())
            .map(|&(_, e)| {
                let keys = (e * BQ).min(l.t);
                (vec![T::zero(); keys * kvrow], vec![T::zero(); keys * kvrow])
            })
            .collect()
    };
    if single {
        dk.fill(T::zero());
        dv.fill(T::zero());
    }
    let mut tasks: Vec<ChunkTask<'_, T>> = Vec::new();
    {
        let mut dq_rest = &mut dq[..];
        let mut dk_rows = dk.chunks_mut(l.t * kvrow);
        let mut dv_rows = dv.chunks_mut(l.t * kvrow);
        let mut parts = partial.iter_mut();
        for b in 0..batch {
            let (dk_b, dv_b) = (dk_rows.next(), dv_rows.next());
            let mut whole = dk_b.zip(dv_b);
            for &(c0, c1) in &bounds {
                let rows = (c1 * BQ).min(l.t) - c0 * BQ;
                let (mine, rest) = std::mem::take(&mut dq_rest).split_at_mut(rows * qrow);
                dq_rest = rest;
                let (pk, pv): (&mut [T], &mut [T]) = match whole.take() {
                    Some((k_, v_)) if single => (k_, v_),
                    _ => {
                        let p = parts.next().expect("one partial per chunk");
                        (&mut p.0[..], &mut p.1[..])
                    }
                };
                tasks.push((b, (c0, c1), mine, pk, pv));
            }
        }
    }
    tasks.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new(), Vec::new()),
        |(p, ds, sums): &mut (Vec<T>, Vec<T>, Vec<(T, T)>), (b, (c0, c1), dq_c, pk, pv)| {
            let row0 = c0 * BQ;
            for blk in c0..c1 {
                let (t0, t1) = (blk * BQ, ((blk + 1) * BQ).min(l.t));
                let s_lo = first(b * l.t + t0);
                let (rows, len) = (t1 - t0, t1 - s_lo);
                p.resize(rows * len, T::zero());
                ds.resize(rows * len, T::zero());
                for h in 0..l.h {
                    let g = h / l.group;
                    let lse_at = |t: usize| lse[l.lse(b, h, t)];
                    block_probs(
                        p,
                        q,
                        k,
                        &l,
                        (b, h),
                        (t0, t1, s_lo),
                        &first,
                        scale,
                        Some(&lse_at),
                        sums,
                    );
                    let q_blk = View {
                        data: &q[l.q(b, t0, h)..],
                        rs: qrow,
                        cs: 1,
                    };
                    let do_blk = View {
                        data: &dout[l.q(b, t0, h)..],
                        rs: qrow,
                        cs: 1,
                    };
                    // dP [rows, len] = dout[b, t0..t1, h, :] · v[b, s_lo..t1, g, :]ᵀ
                    gemm_serial(
                        ds,
                        len,
                        do_blk,
                        View {
                            data: &v[l.kv(b, s_lo, g)..],
                            rs: 1,
                            cs: kvrow,
                        },
                        (rows, len, l.d),
                        T::one(),
                        Accumulate::Overwrite,
                    );
                    // dS = P ∘ (dP − δ); zero where P is (invisible keys)
                    for (i, (dsr, pr)) in ds
                        .chunks_exact_mut(len)
                        .zip(p.chunks_exact(len))
                        .enumerate()
                    {
                        let dl = delta[(b * l.t + t0 + i) * l.h + h];
                        for (x, &pp) in dsr.iter_mut().zip(pr) {
                            *x = pp * (*x - dl);
                        }
                    }
                    // dq[b, t0..t1, h, :] = scale · dS · k[b, s_lo..t1, g, :]
                    gemm_serial(
                        &mut dq_c[(t0 - row0) * qrow + h * l.d..],
                        qrow,
                        View::rowmajor(ds, len, false),
                        View {
                            data: &k[l.kv(b, s_lo, g)..],
                            rs: kvrow,
                            cs: 1,
                        },
                        (rows, l.d, len),
                        scale,
                        Accumulate::Overwrite,
                    );
                    // dk[s_lo..t1, g, :] += scale · dSᵀ · q_blk
                    gemm_serial(
                        &mut pk[s_lo * kvrow + g * l.d..],
                        kvrow,
                        View::rowmajor(ds, len, true),
                        q_blk,
                        (len, l.d, rows),
                        scale,
                        Accumulate::Add,
                    );
                    // dv[s_lo..t1, g, :] += Pᵀ · dout_blk
                    gemm_serial(
                        &mut pv[s_lo * kvrow + g * l.d..],
                        kvrow,
                        View::rowmajor(p, len, true),
                        do_blk,
                        (len, l.d, rows),
                        T::one(),
                        Accumulate::Add,
                    );
                }
            }
        },
    );
    if single {
        return;
    }
    // dk, dv [b, s] = Σ over the row's chunks, in chunk order, of the partial sums that
    // reach key s.
    let per_row = bounds.len();
    let partial = &partial;
    dk.par_chunks_mut(kvrow)
        .zip(dv.par_chunks_mut(kvrow))
        .enumerate()
        .with_min_len(min_rows(kvrow))
        .for_each(|(bs, (dk_s, dv_s))| {
            let (b, s) = (bs / l.t, bs % l.t);
            dk_s.fill(T::zero());
            dv_s.fill(T::zero());
            for (pk, pv) in &partial[b * per_row..(b + 1) * per_row] {
                if (s + 1) * kvrow <= pk.len() {
                    add_scaled(dk_s, T::one(), &pk[s * kvrow..][..kvrow]);
                    add_scaled(dv_s, T::one(), &pv[s * kvrow..][..kvrow]);
                }
            }
        });
}
