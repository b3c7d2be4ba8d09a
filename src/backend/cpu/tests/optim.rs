//! AdamW and SGD: three steps against references written from the textbook formulas in
//! f64 (PyTorch's documented algorithms).

use super::util::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::{AdamWStep, Backend, SgdStep};

const N: usize = 13;

#[test]
fn adamw_three_steps_match_reference() {
    let mut rng = Rng::new(60);
    let p0 = rng.vec(N, 1.0);
    // Gradients of very different sizes, so that eps and the bias corrections matter.
    let grads: Vec<Vec<f64>> = (0..3)
        .map(|s| {
            rng.vec(N, 1.0)
                .iter()
                .enumerate()
                .map(|(i, g)| g * 10f64.powi(i as i32 % 5 - 3 - s))
                .collect()
        })
        .collect();
    let hyper = |step| AdamWStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step,
    };

    // Reference: p ← p − lr·wd·p; m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²;
    // p ← p − lr·m̂/(√v̂ + eps) with m̂ = m/(1−β1^t), v̂ = v/(1−β2^t).
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; N], vec![0.0; N]);
    for (t, g) in grads.iter().enumerate() {
        let h = hyper(t as u64 + 1);
        let (lr, b1, b2, eps, wd) = (
            h.lr as f64,
            h.beta1 as f64,
            h.beta2 as f64,
            h.eps as f64,
            h.weight_decay as f64,
        );
        let t = (t + 1) as i32;
        for i in 0..N {
            p[i] -= lr * wd * p[i];
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let (m_hat, v_hat) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
            p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }

    let be = be64();
    let (mut bp, mut bm, mut bv) = (buf(&p0), buf(&[0.0; N]), buf(&[0.0; N]));
    for (t, g) in grads.iter().enumerate() {
        be.adamw_step(&mut bp, &buf(g), &mut bm, &mut bv, hyper(t as u64 + 1))
            .unwrap();
    }
    assert_close("adamw p", &bp.0, &p, 1e-12, 1e-15);
    assert_close("adamw m", &bm.0, &m, 1e-12, 1e-18);
    assert_close("adamw v", &bv.0, &v, 1e-12, 1e-24);
    assert!(
        bp.0.iter().zip(&p0).all(|(a, b)| a != b),
        "every parameter must have moved"
    );

    let be32 = CpuBackend::<f32>::new();
    let mut p32 = be32.upload_f64(&p0).unwrap();
    let (mut m32, mut v32) = (be32.zeros(N).unwrap(), be32.zeros(N).unwrap());
    for (t, g) in grads.iter().enumerate() {
        let g32 = be32.upload_f64(g).unwrap();
        be32.adamw_step(&mut p32, &g32, &mut m32, &mut v32, hyper(t as u64 + 1))
            .unwrap();
    }
    assert_close(
        "adamw p (f32)",
        &be32.download_f64(&p32).unwrap(),
        &p,
        1e-5,
        1e-7,
    );
}

#[test]
fn sgd_three_steps_match_reference() {
    let mut rng = Rng::new(61);
    let p0 = rng.vec(N, 1.0);
    let grads: Vec<Vec<f64>> = (0..3).map(|_| rng.vec(N, 1.0)).collect();
    let be = be64();
    for momentum in [0.9f32, 0.0] {
        let hyper = |first| SgdStep {
            lr: 0.1,
            momentum,
            weight_decay: 0.01,
            first,
        };
        // Reference: d = g + wd·p; buf = first ? d : μ·buf + d; p ← p − lr·buf.
        let (mut p, mut b) = (p0.clone(), vec![0.0; N]);
        for (t, g) in grads.iter().enumerate() {
            let h = hyper(t == 0);
            for i in 0..N {
                let d = g[i] + h.weight_decay as f64 * p[i];
                b[i] = if t == 0 {
                    d
                } else {
                    momentum as f64 * b[i] + d
                };
                p[i] -= h.lr as f64 * b[i];
            }
        }
        // Without momentum the buffer is never read: NaN in it must not matter.
        let start = if momentum == 0.0 { f64::NAN } else { 0.0 };
        let (mut bp, mut bb) = (buf(&p0), buf(&[start; N]));
        for (t, g) in grads.iter().enumerate() {
            be.sgd_step(&mut bp, &buf(g), &mut bb, hyper(t == 0 && momentum != 0.0))
                .unwrap();
        }
        assert_close(
            &format!("sgd p (momentum {momentum})"),
            &bp.0,
            &p,
            1e-13,
            1e-15,
        );
    }
}
