//! The gated MLPs (SwiGLU, GeGLU), gelu_new and dropout: forward against formulas,
//! backward against finite differences.

use super::util::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Activation, Backend, dropout_keep};

const N: usize = 37;

fn gated(act: Activation, gate: &[f64], up: &[f64]) -> Vec<f64> {
    let mut out = buf(&vec![0.0; gate.len()]);
    be64()
        .gated_forward(act, &mut out, &buf(gate), &buf(up))
        .unwrap();
    out.0
}

/// GELU, tanh approximation, from its formula.
fn gelu_formula(x: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (k * (x + 0.044715 * x.powi(3))).tanh())
}

fn gelu(x: &[f64]) -> Vec<f64> {
    let mut out = buf(&vec![0.0; x.len()]);
    be64().gelu_forward(&mut out, &buf(x)).unwrap();
    out.0
}

#[test]
fn gated_forward_matches_formula_and_backward_matches_finite_differences() {
    let mut rng = Rng::new(40);
    let (gate, up, dout) = (rng.vec(N, 4.0), rng.vec(N, 2.0), rng.vec(N, 1.0));
    for act in [Activation::Silu, Activation::GeluTanh] {
        let f = |g: f64| match act {
            Activation::Silu => g / (1.0 + (-g).exp()),
            Activation::GeluTanh => gelu_formula(g),
        };
        let want: Vec<f64> = gate.iter().zip(&up).map(|(&g, u)| f(g) * u).collect();
        assert_close(
            &format!("{act:?} out"),
            &gated(act, &gate, &up),
            &want,
            1e-15,
            1e-16,
        );

        let (mut dgate, mut dup) = (buf(&[9.0; N]), buf(&[9.0; N]));
        be64()
            .gated_backward(
                act,
                &mut dgate,
                &mut dup,
                &buf(&dout),
                &buf(&gate),
                &buf(&up),
            )
            .unwrap();
        check_grad(&format!("{act:?} dgate"), &dgate.0, &gate, |g| {
            weighted_sum(&dout, &gated(act, g, &up))
        });
        check_grad(&format!("{act:?} dup"), &dup.0, &up, |u| {
            weighted_sum(&dout, &gated(act, &gate, u))
        });
    }
}

#[test]
fn gelu_forward_matches_formula_and_backward_matches_finite_differences() {
    let mut rng = Rng::new(41);
    let (x, dout) = (rng.vec(N, 4.0), rng.vec(N, 1.0));
    let want: Vec<f64> = x.iter().map(|&x| gelu_formula(x)).collect();
    assert_close("gelu out", &gelu(&x), &want, 1e-15, 1e-16);

    let mut dx = buf(&[9.0; N]);
    be64()
        .gelu_backward(&mut dx, &buf(&dout), &buf(&x))
        .unwrap();
    check_grad("gelu dx", &dx.0, &x, |x| weighted_sum(&dout, &gelu(x)));
}

#[test]
fn dropout_follows_the_shared_mask_and_backward_matches_finite_differences() {
    let mut rng = Rng::new(42);
    let be = be64();
    let (p, seed) = (0.3f32, 0xDEAD_BEEF);
    let n = 4000;
    let (x, dout) = (rng.vec(n, 1.0), rng.vec(n, 1.0));
    let mut out = buf(&vec![0.0; n]);
    be.dropout_forward(&mut out, &buf(&x), p, seed, 0).unwrap();
    let want: Vec<f64> = (0..n)
        .map(|i| {
            if dropout_keep(seed, i as u64, p) {
                x[i] / (1.0 - p as f64)
            } else {
                0.0
            }
        })
        .collect();
    assert_close("dropout out", &out.0, &want, 1e-15, 0.0);
    let kept = (0..n).filter(|&i| dropout_keep(seed, i as u64, p)).count() as f64 / n as f64;
    assert!(
        (kept - 0.7).abs() < 0.03,
        "kept fraction {kept}, expected about 0.7"
    );

    // Finite differences on a short prefix (the op is elementwise, so this covers it).
    let m = 40;
    let mut dx = buf(&vec![9.0; m]);
    be.dropout_backward(&mut dx, &buf(&dout[..m]), p, seed, 0)
        .unwrap();
    check_grad("dropout dx", &dx.0, &x[..m], |xx| {
        let mut o = buf(&vec![0.0; m]);
        be.dropout_forward(&mut o, &buf(xx), p, seed, 0).unwrap();
        weighted_sum(&dout[..m], &o.0)
    });

    // p = 0 copies; the f32 backend draws the same mask.
    be.dropout_forward(&mut out, &buf(&x), 0.0, seed, 0)
        .unwrap();
    assert_eq!(out.0, x);
    let be32 = CpuBackend::<f32>::new();
    let mut o32 = be32.zeros(n).unwrap();
    be32.dropout_forward(&mut o32, &be32.upload_f64(&x).unwrap(), p, seed, 0)
        .unwrap();
    assert_close(
        "dropout f32",
        &be32.download_f64(&o32).unwrap(),
        &want,
        1e-6,
        0.0,
    );

    // a piece at `offset` draws the whole buffer's mask there (sequence tiles), in both
    // directions
    let (start, len) = (1234, 777);
    let mut piece = buf(&vec![0.0; len]);
    be.dropout_forward(
        &mut piece,
        &buf(&x[start..start + len]),
        p,
        seed,
        start as u64,
    )
    .unwrap();
    assert_eq!(piece.0, out_of(&be, &x, p, seed)[start..start + len]);
    be.dropout_backward(
        &mut piece,
        &buf(&x[start..start + len]),
        p,
        seed,
        start as u64,
    )
    .unwrap();
    assert_eq!(piece.0, out_of(&be, &x, p, seed)[start..start + len]);
}

/// Dropout of all of `x` from index 0.
fn out_of(be: &CpuBackend<f64>, x: &[f64], p: f32, seed: u64) -> Vec<f64> {
    let mut out = buf(&vec![0.0; x.len()]);
    be.dropout_forward(&mut out, &buf(x), p, seed, 0).unwrap();
    out.0
}
