//! Causal attention: forward against an explicit full-matrix softmax with a causal mask,
//! gradients of q, k and v against finite differences (GQA and plain multi-head).

use super::util::*;
use crate::backend::{AttnDims, Backend};

fn dims(batch: usize, seq: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttnDims {
    AttnDims {
        batch,
        seq,
        n_heads,
        n_kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
    }
}

/// Lengths of (q, kv, lse).
fn lens(d: &AttnDims) -> (usize, usize, usize) {
    let (b, t, h, kvh, hd) = (d.batch, d.seq, d.n_heads, d.n_kv_heads, d.head_dim);
    (b * t * h * hd, b * t * kvh * hd, b * h * t)
}

/// Explicit reference: S = scale·Q·Kᵀ over the whole [T, T] matrix, −∞ above the
/// diagonal, row softmax, out = P·V, lse = ln Σ exp S.
fn naive(q: &[f64], k: &[f64], v: &[f64], d: &AttnDims) -> (Vec<f64>, Vec<f64>) {
    let (b_n, t_n, h_n, kvh, hd) = (d.batch, d.seq, d.n_heads, d.n_kv_heads, d.head_dim);
    let (mut out, mut lse) = (vec![0.0; q.len()], vec![0.0; b_n * h_n * t_n]);
    for b in 0..b_n {
        for h in 0..h_n {
            let g = h / (h_n / kvh);
            let qi = |t: usize| ((b * t_n + t) * h_n + h) * hd;
            let ki = |s: usize| ((b * t_n + s) * kvh + g) * hd;
            let mut s_mat = vec![vec![f64::NEG_INFINITY; t_n]; t_n];
            for t in 0..t_n {
                for s in 0..=t {
                    s_mat[t][s] =
                        d.scale as f64 * (0..hd).map(|e| q[qi(t) + e] * k[ki(s) + e]).sum::<f64>();
                }
            }
            for t in 0..t_n {
                let max = s_mat[t].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s_mat[t].iter().map(|x| (x - max).exp()).sum();
                lse[(b * h_n + h) * t_n + t] = max + z.ln();
                for s in 0..t_n {
                    let p = (s_mat[t][s] - max).exp() / z;
                    for e in 0..hd {
                        out[qi(t) + e] += p * v[ki(s) + e];
                    }
                }
            }
        }
    }
    (out, lse)
}

fn forward(q: &[f64], k: &[f64], v: &[f64], d: &AttnDims) -> (Vec<f64>, Vec<f64>) {
    let (nq, _, nl) = lens(d);
    let (mut out, mut lse) = (buf(&vec![0.0; nq]), buf(&vec![0.0; nl]));
    be64()
        .attention_forward(&mut out, &mut lse, &buf(q), &buf(k), &buf(v), *d, None)
        .unwrap();
    (out.0, lse.0)
}

#[test]
fn attention_forward_matches_full_matrix_softmax() {
    let mut rng = Rng::new(30);
    for d in [
        dims(2, 5, 4, 2, 3),
        dims(1, 7, 2, 2, 4),
        dims(2, 1, 4, 2, 3),
        dims(1, 4, 3, 1, 8),
    ] {
        let (nq, nkv, _) = lens(&d);
        let (q, k, v) = (rng.vec(nq, 1.5), rng.vec(nkv, 1.5), rng.vec(nkv, 1.0));
        let (out, lse) = forward(&q, &k, &v, &d);
        let (want_out, want_lse) = naive(&q, &k, &v, &d);
        assert_close(
            &format!("attention out {d:?}"),
            &out,
            &want_out,
            1e-12,
            1e-14,
        );
        assert_close(
            &format!("attention lse {d:?}"),
            &lse,
            &want_lse,
            1e-12,
            1e-14,
        );
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut rng = Rng::new(31);
    let be = be64();
    for d in [
        dims(2, 5, 4, 2, 3),
        dims(1, 4, 2, 2, 4),
        dims(2, 1, 4, 2, 3),
    ] {
        let (nq, nkv, _) = lens(&d);
        let (q, k, v) = (rng.vec(nq, 1.5), rng.vec(nkv, 1.5), rng.vec(nkv, 1.0));
        let up = rng.vec(nq, 1.0);
        let (out, lse) = forward(&q, &k, &v, &d);
        // Nonzero starting values: the backward must overwrite them.
        let (mut dq, mut dk, mut dv) = (
            buf(&vec![7.0; nq]),
            buf(&vec![7.0; nkv]),
            buf(&vec![7.0; nkv]),
        );
        be.attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &buf(&up),
            &buf(&out),
            &buf(&lse),
            &buf(&q),
            &buf(&k),
            &buf(&v),
            d,
            None,
        )
        .unwrap();
        let loss = |q: &[f64], k: &[f64], v: &[f64]| weighted_sum(&up, &forward(q, k, v, &d).0);
        check_grad(&format!("attention dv {d:?}"), &dv.0, &v, |x| {
            loss(&q, &k, x)
        });
        if d.seq == 1 {
            // One key: p = 1 whatever q and k are, so their gradients vanish.
            for (what, g, x) in [("dq", &dq.0, &q), ("dk", &dk.0, &k)] {
                assert!(
                    g.iter().all(|&e| e == 0.0),
                    "{what} with T = 1 must be 0: {g:?}"
                );
                let numeric = if what == "dq" {
                    numeric_grad(x, |x| loss(x, &k, &v))
                } else {
                    numeric_grad(x, |x| loss(&q, x, &v))
                };
                assert!(
                    max_abs(what, &numeric) < 1e-9,
                    "{what}: numeric {numeric:?}"
                );
            }
        } else {
            check_grad(&format!("attention dq {d:?}"), &dq.0, &q, |x| {
                loss(x, &k, &v)
            });
            check_grad(&format!("attention dk {d:?}"), &dk.0, &k, |x| {
                loss(&q, x, &v)
            });
        }
    }
}

/// Packed rows: attention with `key_start` equals attention run on each segment as its
/// own sequence, forward and backward.
#[test]
fn key_start_confines_attention_to_segments() {
    let mut rng = Rng::new(32);
    let be = be64();
    // one row of T = 7 holding segments of lengths 3, 1, 3
    let seg = [3usize, 1, 3];
    let d = dims(1, 7, 4, 2, 3);
    let (nq, nkv, nl) = lens(&d);
    let (q, k, v) = (rng.vec(nq, 1.5), rng.vec(nkv, 1.5), rng.vec(nkv, 1.0));
    let up = rng.vec(nq, 1.0);
    let mut ks = Vec::new();
    for (i, &len) in seg.iter().enumerate() {
        let start: usize = seg[..i].iter().sum();
        ks.extend(std::iter::repeat_n(start as u32, len));
    }
    let (mut out, mut lse) = (buf(&vec![0.0; nq]), buf(&vec![0.0; nl]));
    be.attention_forward(
        &mut out,
        &mut lse,
        &buf(&q),
        &buf(&k),
        &buf(&v),
        d,
        Some(&ks),
    )
    .unwrap();
    let (mut dq, mut dk, mut dv) = (
        buf(&vec![0.0; nq]),
        buf(&vec![0.0; nkv]),
        buf(&vec![0.0; nkv]),
    );
    be.attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        &buf(&up),
        &out,
        &lse,
        &buf(&q),
        &buf(&k),
        &buf(&v),
        d,
        Some(&ks),
    )
    .unwrap();
    let (qrow, kvrow) = (d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim);
    let mut start = 0;
    for &len in &seg {
        let ds = dims(1, len, 4, 2, 3);
        let qs = &q[start * qrow..(start + len) * qrow];
        let kk = &k[start * kvrow..(start + len) * kvrow];
        let vs = &v[start * kvrow..(start + len) * kvrow];
        let (o, _) = forward(qs, kk, vs, &ds);
        assert_close(
            "segment out",
            &out.0[start * qrow..(start + len) * qrow],
            &o,
            1e-12,
            1e-14,
        );
        let ups = &up[start * qrow..(start + len) * qrow];
        let (mut gq, mut gk, mut gv) = (
            buf(&vec![0.0; len * qrow]),
            buf(&vec![0.0; len * kvrow]),
            buf(&vec![0.0; len * kvrow]),
        );
        let (o2, l2) = forward(qs, kk, vs, &ds);
        be.attention_backward(
            &mut gq,
            &mut gk,
            &mut gv,
            &buf(ups),
            &buf(&o2),
            &buf(&l2),
            &buf(qs),
            &buf(kk),
            &buf(vs),
            ds,
            None,
        )
        .unwrap();
        assert_close(
            "segment dq",
            &dq.0[start * qrow..(start + len) * qrow],
            &gq.0,
            1e-12,
            1e-14,
        );
        assert_close(
            "segment dk",
            &dk.0[start * kvrow..(start + len) * kvrow],
            &gk.0,
            1e-12,
            1e-14,
        );
        assert_close(
            "segment dv",
            &dv.0[start * kvrow..(start + len) * kvrow],
            &gv.0,
            1e-12,
            1e-14,
        );
        start += len;
    }
}

/// Explicit reference with a first key per token (`ks`, or 0): scores, softmax, output,
/// lse and, given the output's cotangent `up`, dq, dk, dv by the chain rule written out
/// over the whole `[T, T]` matrix.
#[allow(clippy::type_complexity)]
fn naive_with_grads(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    up: &[f64],
    d: &AttnDims,
    ks: Option<&[u32]>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b_n, t_n, h_n, kvh, hd) = (d.batch, d.seq, d.n_heads, d.n_kv_heads, d.head_dim);
    let sc = d.scale as f64;
    let mut out = vec![0.0; q.len()];
    let mut lse = vec![0.0; b_n * h_n * t_n];
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for b in 0..b_n {
        for h in 0..h_n {
            let g = h / (h_n / kvh);
            let qi = |t: usize| ((b * t_n + t) * h_n + h) * hd;
            let ki = |s: usize| ((b * t_n + s) * kvh + g) * hd;
            for t in 0..t_n {
                let s0 = ks.map_or(0, |ks| ks[b * t_n + t] as usize);
                let sc_row: Vec<f64> = (s0..=t)
                    .map(|s| sc * (0..hd).map(|e| q[qi(t) + e] * k[ki(s) + e]).sum::<f64>())
                    .collect();
                let max = sc_row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc_row.iter().map(|x| (x - max).exp()).sum();
                lse[(b * h_n + h) * t_n + t] = max + z.ln();
                let p: Vec<f64> = sc_row.iter().map(|x| (x - max).exp() / z).collect();
                for (j, s) in (s0..=t).enumerate() {
                    for e in 0..hd {
                        out[qi(t) + e] += p[j] * v[ki(s) + e];
                    }
                }
                // dP_s = up·v_s; dS_s = p_s (dP_s − Σ_r p_r dP_r)
                let dp: Vec<f64> = (s0..=t)
                    .map(|s| (0..hd).map(|e| up[qi(t) + e] * v[ki(s) + e]).sum::<f64>())
                    .collect();
                let mean: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for (j, s) in (s0..=t).enumerate() {
                    let ds = p[j] * (dp[j] - mean);
                    for e in 0..hd {
                        dq[qi(t) + e] += sc * ds * k[ki(s) + e];
                        dk[ki(s) + e] += sc * ds * q[qi(t) + e];
                        dv[ki(s) + e] += p[j] * up[qi(t) + e];
                    }
                }
            }
        }
    }
    (out, lse, dq, dk, dv)
}

/// Sequences longer than a query block, split into several backward chunks (one row of
/// 150 tokens) or one (a batch of 40), with and without packed segments that cross block
/// boundaries: forward and backward against the written-out reference.
#[test]
fn blocked_attention_matches_reference_on_long_rows() {
    let mut rng = Rng::new(33);
    let be = be64();
    for (d, packed) in [
        (dims(1, 150, 4, 2, 8), false),
        (dims(2, 150, 3, 1, 8), true),
        (dims(40, 70, 2, 1, 4), false),
        (dims(3, 129, 2, 2, 4), true),
    ] {
        let (nq, nkv, nl) = lens(&d);
        let (q, k, v) = (rng.vec(nq, 1.5), rng.vec(nkv, 1.5), rng.vec(nkv, 1.0));
        let up = rng.vec(nq, 1.0);
        // segments of 50, 70 and the rest in each row
        let ks: Vec<u32> = (0..d.batch * d.seq)
            .map(|bt| {
                let t = bt % d.seq;
                if t < 50 {
                    0
                } else if t < 120 {
                    50
                } else {
                    120
                }
            })
            .collect();
        let ks = packed.then_some(&ks[..]);
        let (mut out, mut lse) = (buf(&vec![0.0; nq]), buf(&vec![0.0; nl]));
        be.attention_forward(&mut out, &mut lse, &buf(&q), &buf(&k), &buf(&v), d, ks)
            .unwrap();
        let (want_out, want_lse, want_dq, want_dk, want_dv) =
            naive_with_grads(&q, &k, &v, &up, &d, ks);
        let what = |x: &str| format!("{x} {d:?} packed={packed}");
        assert_close(&what("out"), &out.0, &want_out, 1e-11, 1e-13);
        assert_close(&what("lse"), &lse.0, &want_lse, 1e-11, 1e-13);
        let (mut dq, mut dk, mut dv) = (
            buf(&vec![7.0; nq]),
            buf(&vec![7.0; nkv]),
            buf(&vec![7.0; nkv]),
        );
        be.attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &buf(&up),
            &out,
            &lse,
            &buf(&q),
            &buf(&k),
            &buf(&v),
            d,
            ks,
        )
        .unwrap();
        assert_close(&what("dq"), &dq.0, &want_dq, 1e-10, 1e-12);
        assert_close(&what("dk"), &dk.0, &want_dk, 1e-10, 1e-12);
        assert_close(&what("dv"), &dv.0, &want_dv, 1e-10, 1e-12);
    }
}

/// The f32 kernels give the same bits on one thread and on several (the partial sums are
/// added in a fixed order).
#[test]
fn attention_does_not_depend_on_the_thread_count() {
    use crate::backend::cpu::CpuBackend;
    let mut rng = Rng::new(34);
    let d = dims(1, 200, 4, 2, 16);
    let (nq, nkv, nl) = lens(&d);
    let f = |x: Vec<f64>| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (q, k, v, up) = (
        f(rng.vec(nq, 1.5)),
        f(rng.vec(nkv, 1.5)),
        f(rng.vec(nkv, 1.0)),
        f(rng.vec(nq, 1.0)),
    );
    let run = |threads: usize| {
        let be = CpuBackend::<f32>::with_threads(threads).unwrap();
        let (q, k, v, up) = (
            be.upload(&q).unwrap(),
            be.upload(&k).unwrap(),
            be.upload(&v).unwrap(),
            be.upload(&up).unwrap(),
        );
        let (mut out, mut lse) = (be.zeros(nq).unwrap(), be.zeros(nl).unwrap());
        be.attention_forward(&mut out, &mut lse, &q, &k, &v, d, None)
            .unwrap();
        let (mut dq, mut dk, mut dv) = (
            be.zeros(nq).unwrap(),
            be.zeros(nkv).unwrap(),
            be.zeros(nkv).unwrap(),
        );
        be.attention_backward(
            &mut dq, &mut dk, &mut dv, &up, &out, &lse, &q, &k, &v, d, None,
        )
        .unwrap();
        (out.0, lse.0, dq.0, dk.0, dv.0)
    };
    assert_eq!(run(1), run(3));
}
