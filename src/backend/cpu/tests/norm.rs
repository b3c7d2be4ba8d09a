//! RMSNorm and LayerNorm: forward against the textbook formula, input gradients against
//! finite differences (both accumulation modes).

use super::util::*;
use crate::backend::cpu::CpuBuf;
use crate::backend::{Accumulate, Backend};

const N: usize = 4;
const C: usize = 7;
const EPS: f32 = 1e-5;

/// The usual RMSNorm and Gemma's `(1 + w)`.
const OFFSETS: [f32; 2] = [0.0, 1.0];

fn rms_forward(x: &[f64], w: &[f64], off: f32) -> (Vec<f64>, Vec<f64>) {
    let be = be64();
    let (mut out, mut rstd) = (buf(&[0.0; N * C]), buf(&[0.0; N]));
    be.rms_norm_forward(&mut out, &mut rstd, &buf(x), &buf(w), off, EPS)
        .unwrap();
    (out.0, rstd.0)
}

fn ln_forward(x: &[f64], w: &[f64], b: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let be = be64();
    let (mut out, mut mean, mut rstd) = (buf(&[0.0; N * C]), buf(&[0.0; N]), buf(&[0.0; N]));
    be.layer_norm_forward(
        &mut out,
        &mut mean,
        &mut rstd,
        &buf(x),
        &buf(w),
        &buf(b),
        EPS,
    )
    .unwrap();
    (out.0, mean.0, rstd.0)
}

#[test]
fn rms_norm_forward_matches_formula() {
    let mut rng = Rng::new(10);
    let (x, w) = (rng.vec(N * C, 2.0), rng.vec(C, 1.5));
    for off in OFFSETS {
        let (out, rstd) = rms_forward(&x, &w, off);
        let mut want = vec![0.0; N * C];
        for i in 0..N {
            let row = &x[i * C..][..C];
            let ms = row.iter().map(|v| v * v).sum::<f64>() / C as f64;
            let r = 1.0 / (ms + EPS as f64).sqrt();
            assert_close("rms rstd", &rstd[i..=i], &[r], 1e-14, 0.0);
            for j in 0..C {
                want[i * C + j] = row[j] * r * (off as f64 + w[j]);
            }
        }
        assert_close(
            &format!("rms out (offset {off})"),
            &out,
            &want,
            1e-14,
            1e-15,
        );
    }
}

#[test]
fn rms_norm_backward_matches_finite_differences() {
    let mut rng = Rng::new(11);
    let be = be64();
    let (x, w, up, dx0) = (
        rng.vec(N * C, 2.0),
        rng.vec(C, 1.5),
        rng.vec(N * C, 1.0),
        rng.vec(N * C, 1.0),
    );
    for off in OFFSETS {
        let (_, rstd) = rms_forward(&x, &w, off);
        let numeric_of = |xx: &[f64]| weighted_sum(&up, &rms_forward(xx, &w, off).0);
        for acc in [Accumulate::Overwrite, Accumulate::Add] {
            let mut dx = buf(&dx0);
            be.rms_norm_backward(
                &mut dx,
                &buf(&up),
                &buf(&x),
                &buf(&w),
                off,
                &buf(&rstd),
                acc,
            )
            .unwrap();
            let grad: Vec<f64> = match acc {
                Accumulate::Overwrite => dx.0,
                Accumulate::Add => dx.0.iter().zip(&dx0).map(|(d, d0)| d - d0).collect(),
            };
            check_grad(
                &format!("rms_norm dx {acc:?} offset {off}"),
                &grad,
                &x,
                numeric_of,
            );
        }
    }
}

#[test]
fn layer_norm_forward_matches_formula() {
    let mut rng = Rng::new(12);
    // An offset mean checks that the variance is centred.
    let x: Vec<f64> = rng.vec(N * C, 2.0).iter().map(|v| v + 3.0).collect();
    let (w, b) = (rng.vec(C, 1.5), rng.vec(C, 1.0));
    let (out, mean, rstd) = ln_forward(&x, &w, &b);
    let mut want = vec![0.0; N * C];
    for i in 0..N {
        let row = &x[i * C..][..C];
        let mu = row.iter().sum::<f64>() / C as f64;
        let var = row.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / C as f64;
        let r = 1.0 / (var + EPS as f64).sqrt();
        assert_close("ln mean", &mean[i..=i], &[mu], 1e-14, 0.0);
        assert_close("ln rstd", &rstd[i..=i], &[r], 1e-13, 0.0);
        for j in 0..C {
            want[i * C + j] = (row[j] - mu) * r * w[j] + b[j];
        }
    }
    assert_close("ln out", &out, &want, 1e-13, 1e-14);
}

#[test]
fn layer_norm_backward_matches_finite_differences() {
    let mut rng = Rng::new(13);
    let be = be64();
    let (x, w, b) = (rng.vec(N * C, 2.0), rng.vec(C, 1.5), rng.vec(C, 1.0));
    let (up, dx0) = (rng.vec(N * C, 1.0), rng.vec(N * C, 1.0));
    let (_, mean, rstd) = ln_forward(&x, &w, &b);
    let numeric_of = |xx: &[f64]| weighted_sum(&up, &ln_forward(xx, &w, &b).0);
    for acc in [Accumulate::Overwrite, Accumulate::Add] {
        let mut dx = CpuBuf(dx0.clone());
        be.layer_norm_backward(
            &mut dx,
            &buf(&up),
            &buf(&x),
            &buf(&w),
            &buf(&mean),
            &buf(&rstd),
            acc,
        )
        .unwrap();
        let grad: Vec<f64> = match acc {
            Accumulate::Overwrite => dx.0,
            Accumulate::Add => dx.0.iter().zip(&dx0).map(|(d, d0)| d - d0).collect(),
        };
        check_grad(&format!("layer_norm dx {acc:?}"), &grad, &x, numeric_of);
    }
}
