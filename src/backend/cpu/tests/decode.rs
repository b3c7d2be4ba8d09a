//! Attention of new queries against a KV cache: against a naive reference written here,
//! against the training attention when the cache holds exactly the sequence, and the
//! host fallback that other backends inherit against the CPU kernel.

use super::util::*;
use crate::backend::cpu::{CpuBackend, CpuBuf};
use crate::backend::{AttnDims, Backend, DecodeDims, attention_decode_on_host};

fn dims(b: usize, q_len: usize, cap: usize, kv_len: usize, h: usize, kvh: usize) -> DecodeDims {
    DecodeDims {
        batch: b,
        q_len,
        cap,
        kv_len,
        n_heads: h,
        n_kv_heads: kvh,
        head_dim: 8,
        scale: 1.0 / 8f32.sqrt(),
    }
}

/// out[b, i, h] = Σ_s softmax_s(scale·q·k_s)·v_s over s in min(ks[b], t)..=t, t = kv_len −
/// Tq + i, written out loop by loop.
#[allow(clippy::needless_range_loop)]
fn naive(q: &[f64], k: &[f64], v: &[f64], d: &DecodeDims, ks: &[u32]) -> Vec<f64> {
    let (hd, h_n, kvh) = (d.head_dim, d.n_heads, d.n_kv_heads);
    let mut out = vec![0.0; q.len()];
    for b in 0..d.batch {
        for i in 0..d.q_len {
            let t = d.kv_len - d.q_len + i;
            for h in 0..h_n {
                let g = h / (h_n / kvh);
                let qi = ((b * d.q_len + i) * h_n + h) * hd;
                let ki = |s: usize| ((b * d.cap + s) * kvh + g) * hd;
                let keys: Vec<usize> = ((ks[b] as usize).min(t)..=t).collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&s| {
                        d.scale as f64 * (0..hd).map(|e| q[qi + e] * k[ki(s) + e]).sum::<f64>()
                    })
                    .collect();
                let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - max).exp()).sum();
                for (&s, &x) in keys.iter().zip(&sc) {
                    for e in 0..hd {
                        out[qi + e] += (x - max).exp() / z * v[ki(s) + e];
                    }
                }
            }
        }
    }
    out
}

fn lens(d: &DecodeDims) -> (usize, usize) {
    (
        d.batch * d.q_len * d.n_heads * d.head_dim,
        d.batch * d.cap * d.n_kv_heads * d.head_dim,
    )
}

#[test]
fn decode_matches_the_naive_reference() {
    let mut r = Rng::new(11);
    // (B, Tq, cap, kv_len, H, KVH): one new token, several, a full cache, GQA and MHA
    for (b, tq, cap, kvl, h, kvh) in [
        (2, 1, 9, 5, 4, 2),
        (3, 4, 10, 7, 4, 1),
        (1, 6, 6, 6, 2, 2),
        (2, 1, 4, 1, 6, 3),
    ] {
        let d = dims(b, tq, cap, kvl, h, kvh);
        let (nq, nkv) = lens(&d);
        let (q, k, v) = (r.vec(nq, 1.0), r.vec(nkv, 1.0), r.vec(nkv, 1.0));
        // left padding of up to kv_len − Tq positions, plus a row padded past the queries
        let mut ks: Vec<u32> = (0..b).map(|_| r.below(kvl - tq + 1) as u32).collect();
        if b > 1 {
            ks[1] = (kvl - 1) as u32;
        }
        let mut out = buf(&vec![f64::NAN; nq]);
        be64()
            .attention_decode(&mut out, &buf(&q), &buf(&k), &buf(&v), d, Some(&ks))
            .unwrap();
        let want = naive(&q, &k, &v, &d, &ks);
        assert_close(&format!("{d:?}"), &out.0, &want, 1e-12, 1e-13);
        // without key_start: every row from 0
        let mut out = buf(&vec![0.0; nq]);
        be64()
            .attention_decode(&mut out, &buf(&q), &buf(&k), &buf(&v), d, None)
            .unwrap();
        assert_close(
            "no key_start",
            &out.0,
            &naive(&q, &k, &v, &d, &vec![0; b]),
            1e-12,
            1e-13,
        );
    }
}

#[test]
fn a_full_cache_is_causal_attention() {
    let mut r = Rng::new(5);
    let (b, t, h, kvh) = (2, 7, 4, 2);
    let d = dims(b, t, t, t, h, kvh);
    let (nq, nkv) = lens(&d);
    let (q, k, v) = (r.vec(nq, 1.0), r.vec(nkv, 1.0), r.vec(nkv, 1.0));
    let mut dec = buf(&vec![0.0; nq]);
    be64()
        .attention_decode(&mut dec, &buf(&q), &buf(&k), &buf(&v), d, None)
        .unwrap();
    let ad = AttnDims {
        batch: b,
        seq: t,
        n_heads: h,
        n_kv_heads: kvh,
        head_dim: 8,
        scale: d.scale,
    };
    let (mut out, mut lse) = (buf(&vec![0.0; nq]), buf(&vec![0.0; b * h * t]));
    be64()
        .attention_forward(&mut out, &mut lse, &buf(&q), &buf(&k), &buf(&v), ad, None)
        .unwrap();
    assert_close("decode vs forward", &dec.0, &out.0, 1e-12, 1e-13);
}

#[test]
fn the_host_fallback_matches_the_cpu_kernel() {
    let be = CpuBackend::<f32>::new();
    let mut r = Rng::new(8);
    let d = dims(3, 2, 12, 9, 6, 2);
    let (nq, nkv) = lens(&d);
    let f = |x: Vec<f64>| {
        be.upload(&x.iter().map(|&y| y as f32).collect::<Vec<_>>())
            .unwrap()
    };
    let (q, k, v) = (f(r.vec(nq, 1.0)), f(r.vec(nkv, 1.0)), f(r.vec(nkv, 1.0)));
    let ks = [0u32, 3, 7];
    let mut own: CpuBuf<f32> = be.zeros(nq).unwrap();
    be.attention_decode(&mut own, &q, &k, &v, d, Some(&ks))
        .unwrap();
    let mut host: CpuBuf<f32> = be.zeros(nq).unwrap();
    attention_decode_on_host(&be, &mut host, &q, &k, &v, d, Some(&ks)).unwrap();
    let own: Vec<f64> = own.0.iter().map(|&x| x as f64).collect();
    let host: Vec<f64> = host.0.iter().map(|&x| x as f64).collect();
    assert!(max_abs("own", &own) > 0.01);
    assert_close("host vs cpu", &host, &own, 0.0, 0.0);
}

#[test]
fn bad_decode_arguments_are_errors() {
    let be = be64();
    let d = dims(2, 2, 6, 4, 4, 2);
    let (nq, nkv) = lens(&d);
    let (q, kv) = (buf(&vec![0.0; nq]), buf(&vec![0.0; nkv]));
    let mut out = buf(&vec![0.0; nq]);
    let err = |d: DecodeDims, out: &mut CpuBuf<f64>, q: &CpuBuf<f64>, ks: Option<&[u32]>| {
        be.attention_decode(out, q, &kv, &kv, d, ks)
            .unwrap_err()
            .to_string()
    };
    let e = err(dims(2, 5, 6, 4, 4, 2), &mut out, &q, None);
    assert!(e.contains("q_len ≤ kv_len"), "{e}");
    let e = err(dims(2, 2, 6, 7, 4, 2), &mut out, &q, None);
    assert!(e.contains("kv_len ≤ cap"), "{e}");
    let e = err(dims(2, 2, 6, 4, 4, 3), &mut out, &q, None);
    assert!(e.contains("multiple of n_kv_heads"), "{e}");
    let e = err(d, &mut out, &buf(&vec![0.0; nq - 1]), None);
    assert!(e.contains("q has") && e.contains("attention_decode"), "{e}");
    let e = err(d, &mut out, &q, Some(&[0]));
    assert!(e.contains("key_start has 1 entries"), "{e}");
}
