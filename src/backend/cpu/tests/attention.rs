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
