//! One body of ops run through the [`Backend`] trait on several backends: f32 against
//! the f64 reference, and thread counts against each other (bitwise).

use super::util::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Accumulate, AttnDims, Backend, Gemm};

const N: usize = 2 * 6; // B·T tokens
const C: usize = 16;
const V: usize = 23;

/// Every forward and backward of a small Llama-like block, on inputs drawn from `seed`;
/// returns each result as f64 with its name.
fn run_all<Be: Backend>(be: &Be, seed: u64) -> Vec<(&'static str, Vec<f64>)> {
    let mut rng = Rng::new(seed);
    let up = |v: &[f64]| be.upload_f64(v).unwrap();
    let down = |b: &Be::Buf| be.download_f64(b).unwrap();
    let mut res = Vec::new();

    let (x, w, b, dy) = (
        rng.vec(N * C, 2.0),
        rng.vec(C, 1.0),
        rng.vec(C, 1.0),
        rng.vec(N * C, 1.0),
    );
    let (xb, wb, bb, dyb) = (up(&x), up(&w), up(&b), up(&dy));
    let (mut out, mut mean, mut rstd, mut dx) = (
        be.zeros(N * C).unwrap(),
        be.zeros(N).unwrap(),
        be.zeros(N).unwrap(),
        be.zeros(N * C).unwrap(),
    );
    be.rms_norm_forward(&mut out, &mut rstd, &xb, &wb, 0.0, 1e-5)
        .unwrap();
    res.push(("rms_norm out", down(&out)));
    be.rms_norm_backward(&mut dx, &dyb, &xb, &wb, 0.0, &rstd, Accumulate::Overwrite)
        .unwrap();
    res.push(("rms_norm dx", down(&dx)));
    be.layer_norm_forward(&mut out, &mut mean, &mut rstd, &xb, &wb, &bb, 1e-5)
        .unwrap();
    res.push(("layer_norm out", down(&out)));
    be.layer_norm_backward(&mut dx, &dyb, &xb, &wb, &mean, &rstd, Accumulate::Overwrite)
        .unwrap();
    res.push(("layer_norm dx", down(&dx)));

    // Attention over x as q [B=2, T=6, H=4, D=4] with k, v [2, 6, KVH=2, 4].
    let dims = AttnDims {
        batch: 2,
        seq: 6,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 4,
        scale: 0.5,
    };
    let mut q = up(&x);
    let positions: Vec<u32> = (0..N as u32).map(|i| (i % 6) * 7).collect();
    let inv_freq = [1.0f32, 0.1];
    be.rope_forward(&mut q, &positions, &inv_freq, 4).unwrap();
    res.push(("rope q", down(&q)));
    let (k, v) = (up(&rng.vec(N * C / 2, 1.5)), up(&rng.vec(N * C / 2, 1.0)));
    let mut lse = be.zeros(2 * 4 * 6).unwrap();
    be.attention_forward(&mut out, &mut lse, &q, &k, &v, dims, None)
        .unwrap();
    res.push(("attention out", down(&out)));
    res.push(("attention lse", down(&lse)));
    let (mut dq, mut dk, mut dv) = (
        be.zeros(N * C).unwrap(),
        be.zeros(N * C / 2).unwrap(),
        be.zeros(N * C / 2).unwrap(),
    );
    be.attention_backward(
        &mut dq, &mut dk, &mut dv, &dyb, &out, &lse, &q, &k, &v, dims, None,
    )
    .unwrap();
    be.rope_backward(&mut dq, &positions, &inv_freq, 4).unwrap();
    res.push(("attention+rope dq", down(&dq)));
    res.push(("attention dk", down(&dk)));
    res.push(("attention dv", down(&dv)));

    let (mut dg, mut du) = (be.zeros(N * C).unwrap(), be.zeros(N * C).unwrap());
    be.gated_forward(crate::backend::Activation::Silu, &mut out, &xb, &dyb)
        .unwrap();
    res.push(("swiglu out", down(&out)));
    be.gated_backward(
        crate::backend::Activation::Silu,
        &mut dg,
        &mut du,
        &dyb,
        &xb,
        &q,
    )
    .unwrap();
    res.push(("swiglu dgate", down(&dg)));
    res.push(("swiglu dup", down(&du)));
    be.gelu_forward(&mut out, &xb).unwrap();
    res.push(("gelu out", down(&out)));
    be.gelu_backward(&mut dx, &dyb, &xb).unwrap();
    res.push(("gelu dx", down(&dx)));

    // out [N, C] = x [N, C] · Wᵀ with W [C, C]
    let wmat = up(&rng.vec(C * C, 0.5));
    let g = Gemm {
        m: N,
        n: C,
        k: C,
        trans_a: false,
        trans_b: true,
        alpha: 1.0,
        accumulate: Accumulate::Overwrite,
    };
    be.matmul(&mut out, &xb, &wmat, g).unwrap();
    res.push(("matmul", down(&out)));

    let head = up(&rng.vec(V * C, 1.0));
    let labels: Vec<i32> = (0..N)
        .map(|i| {
            if i % 5 == 4 {
                -100
            } else {
                rng.below(V) as i32
            }
        })
        .collect();
    let mut logits = be.zeros(N * V).unwrap();
    let loss = be
        .lm_head_loss(
            &xb,
            &head,
            &labels,
            C,
            0.1,
            None,
            Some(&mut dx),
            Some(&mut logits),
        )
        .unwrap();
    res.push(("lm_head_loss sum", vec![loss.sum, loss.count as f64]));
    res.push(("lm_head_loss dh", down(&dx)));
    res.push(("lm_head_loss logits", down(&logits)));
    res
}

#[test]
fn f32_backend_agrees_with_f64_reference() {
    let want = run_all(&be64(), 80);
    let got = run_all(&CpuBackend::<f32>::new(), 80);
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        // f32 rounding (6e-8) grown by short sums and exp/log: 1e-5 of the tensor's scale.
        let scale = max_abs(name, w);
        assert_close(&format!("{name} f32 vs f64"), g, w, 1e-5, 1e-5 * scale);
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let one = run_all(&CpuBackend::<f32>::with_threads(1).unwrap(), 81);
    let three = run_all(&CpuBackend::<f32>::with_threads(3).unwrap(), 81);
    for ((name, a), (_, b)) in one.iter().zip(&three) {
        assert_eq!(a, b, "{name}: 1 thread vs 3 threads");
    }
}
