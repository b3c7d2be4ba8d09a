//! The kernels written with `vectorized!` give the same bits at every vector width: run
//! at the baseline (SSE2), at AVX2 and at AVX-512, as far as this processor has them, on
//! inputs whose exponentials span the whole range the kernels see.

use super::util::Rng;
use crate::backend::cpu::vector::{Level, cap_level, level};
use crate::backend::cpu::{CpuBackend, CpuBuf};
use crate::backend::{Accumulate, Activation, AttnDims, Backend};

fn f32s(rng: &mut Rng, n: usize, scale: f64) -> CpuBuf<f32> {
    CpuBuf(rng.vec(n, scale).into_iter().map(|x| x as f32).collect())
}

fn zeros(n: usize) -> CpuBuf<f32> {
    CpuBuf(vec![0.0; n])
}

/// Every output of the vectorised kernels on one set of inputs, as bits.
fn outputs() -> Vec<(&'static str, Vec<u32>)> {
    let be = CpuBackend::<f32>::new();
    let mut rng = Rng::new(7);
    let mut out = Vec::new();
    let mut keep = |name: &'static str, b: &CpuBuf<f32>| {
        out.push((name, b.0.iter().map(|x| x.to_bits()).collect()))
    };
    // the gated MLPs over more than one chunk, with gates out to ±40 (σ saturates)
    let n = (1 << 14) * 2 + 333;
    let (gate, up, dout) = (
        f32s(&mut rng, n, 40.0),
        f32s(&mut rng, n, 2.0),
        f32s(&mut rng, n, 1.0),
    );
    for act in [Activation::Silu, Activation::GeluTanh] {
        let mut y = zeros(n);
        be.gated_forward(act, &mut y, &gate, &up).unwrap();
        keep("gated_forward", &y);
        let (mut dg, mut du) = (zeros(n), zeros(n));
        be.gated_backward(act, &mut dg, &mut du, &dout, &gate, &up)
            .unwrap();
        keep("gated_backward dgate", &dg);
        keep("gated_backward dup", &du);
    }
    // RMSNorm over rows of an odd width
    let (rows, c) = (21, 203);
    let (x, w, dy) = (
        f32s(&mut rng, rows * c, 3.0),
        f32s(&mut rng, c, 1.0),
        f32s(&mut rng, rows * c, 1.0),
    );
    let (mut y, mut rstd) = (zeros(rows * c), zeros(rows));
    be.rms_norm_forward(&mut y, &mut rstd, &x, &w, 1.0, 1e-6)
        .unwrap();
    keep("rms_norm_forward", &y);
    keep("rms_norm rstd", &rstd);
    let mut dx = f32s(&mut rng, rows * c, 1.0);
    be.rms_norm_backward(&mut dx, &dy, &x, &w, 1.0, &rstd, Accumulate::Add)
        .unwrap();
    keep("rms_norm_backward", &dx);
    // the LM head's loss, plain and soft-capped, with an ignored row
    let (rows, c, v) = (9, 24, 517);
    let (h, w) = (f32s(&mut rng, rows * c, 4.0), f32s(&mut rng, v * c, 1.0));
    let labels: Vec<i32> = (0..rows as i32)
        .map(|i| if i == 4 { -100 } else { i * 37 % v as i32 })
        .collect();
    for cap in [None, Some(30.0)] {
        let (mut dh, mut logits) = (zeros(rows * c), zeros(rows * v));
        let loss = be
            .lm_head_loss(
                &h,
                &w,
                &labels,
                c,
                0.25,
                cap,
                Some(&mut dh),
                Some(&mut logits),
            )
            .unwrap();
        keep("lm_head_loss dh", &dh);
        keep("lm_head_loss logits", &logits);
        let sum = CpuBuf(vec![loss.sum as f32, loss.count as f32]);
        keep("lm_head_loss sum", &sum);
    }
    // attention with two packed segments in the first row (scores up to ±60)
    let dims = AttnDims {
        batch: 2,
        seq: 150,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
        scale: 0.25,
    };
    let (nq, nkv) = (2 * 150 * 4 * 16, 2 * 150 * 2 * 16);
    let (q, k, vv) = (
        f32s(&mut rng, nq, 4.0),
        f32s(&mut rng, nkv, 4.0),
        f32s(&mut rng, nkv, 1.0),
    );
    let key_start: Vec<u32> = (0..300u32)
        .map(|t| if (70..150).contains(&t) { 70 } else { 0 })
        .collect();
    let (mut o, mut lse) = (zeros(nq), zeros(2 * 4 * 150));
    be.attention_forward(&mut o, &mut lse, &q, &k, &vv, dims, Some(&key_start))
        .unwrap();
    keep("attention out", &o);
    keep("attention lse", &lse);
    let dout = f32s(&mut rng, nq, 1.0);
    let (mut dq, mut dk, mut dv) = (zeros(nq), zeros(nkv), zeros(nkv));
    be.attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        &dout,
        &o,
        &lse,
        &q,
        &k,
        &vv,
        dims,
        Some(&key_start),
    )
    .unwrap();
    keep("attention dq", &dq);
    keep("attention dk", &dk);
    keep("attention dv", &dv);
    out
}

#[test]
fn same_bits_at_every_width() {
    let widest = level();
    cap_level(Level::Baseline);
    let base = outputs();
    for l in [Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|&l| l <= widest)
    {
        cap_level(l);
        assert_eq!(level(), l);
        for ((name, want), (_, got)) in base.iter().zip(outputs()) {
            let first = want.iter().zip(&got).position(|(a, b)| a != b);
            assert!(
                first.is_none(),
                "{name} at {l:?}: element {first:?} differs from the baseline's"
            );
        }
    }
    cap_level(Level::Avx512);
    assert_eq!(level(), widest);
    eprintln!("compared the baseline with the widths up to {widest:?}");
}
