//! GEMM: every transpose combination and both accumulation modes against a naive triple
//! loop, and the input gradients (the transposed GEMMs model code uses) against finite
//! differences.

use super::util::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Accumulate, Backend, Gemm};

const ACCS: [Accumulate; 2] = [Accumulate::Overwrite, Accumulate::Add];
const TRANS: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

/// alpha · op(a) · op(b) by the definition, from the stored layouts of [`Gemm`].
fn naive(a: &[f64], b: &[f64], g: &Gemm) -> Vec<f64> {
    let (m, n, k) = (g.m, g.n, g.k);
    let op_a = |i: usize, p: usize| {
        if g.trans_a {
            a[p * m + i]
        } else {
            a[i * k + p]
        }
    };
    let op_b = |p: usize, j: usize| {
        if g.trans_b {
            b[j * k + p]
        } else {
            b[p * n + j]
        }
    };
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = g.alpha as f64 * (0..k).map(|p| op_a(i, p) * op_b(p, j)).sum::<f64>();
        }
    }
    c
}

fn gemm(
    m: usize,
    n: usize,
    k: usize,
    (trans_a, trans_b): (bool, bool),
    alpha: f32,
    accumulate: Accumulate,
) -> Gemm {
    Gemm {
        m,
        n,
        k,
        trans_a,
        trans_b,
        alpha,
        accumulate,
    }
}

#[test]
fn matmul_matches_naive_for_every_layout() {
    let mut rng = Rng::new(1);
    let (be, be32) = (be64(), CpuBackend::<f32>::new());
    // The last size is above the threshold where gemm runs multi-threaded.
    for (m, n, k) in [(3, 4, 5), (1, 7, 2), (9, 1, 1), (70, 65, 66)] {
        for t in TRANS {
            for acc in ACCS {
                let g = gemm(m, n, k, t, 0.75, acc);
                let (a, b, c0) = (
                    rng.vec(m * k, 1.0),
                    rng.vec(k * n, 1.0),
                    rng.vec(m * n, 1.0),
                );
                let prod = naive(&a, &b, &g);
                let want: Vec<f64> = match acc {
                    Accumulate::Overwrite => prod,
                    Accumulate::Add => c0.iter().zip(&prod).map(|(c, p)| c + p).collect(),
                };
                let what = format!("matmul m={m} n={n} k={k} trans={t:?} {acc:?}");
                let mut c = buf(&c0);
                be.matmul(&mut c, &buf(&a), &buf(&b), g).unwrap();
                assert_close(&what, &c.0, &want, 1e-12, 1e-12);

                let mut c32 = be32.upload_f64(&c0).unwrap();
                let (a32, b32) = (be32.upload_f64(&a).unwrap(), be32.upload_f64(&b).unwrap());
                be32.matmul(&mut c32, &a32, &b32, g).unwrap();
                let got = be32.download_f64(&c32).unwrap();
                assert_close(&format!("{what} (f32)"), &got, &want, 1e-5, 1e-5 * k as f64);
            }
        }
    }
}

#[test]
fn matmul_with_k_zero_is_an_empty_sum() {
    let be = be64();
    let mut c = buf(&[1.0, 2.0]);
    be.matmul(
        &mut c,
        &buf(&[]),
        &buf(&[]),
        gemm(2, 1, 0, (false, false), 1.0, Accumulate::Add),
    )
    .unwrap();
    assert_eq!(c.0, [1.0, 2.0]);
    be.matmul(
        &mut c,
        &buf(&[]),
        &buf(&[]),
        gemm(2, 1, 0, (false, false), 1.0, Accumulate::Overwrite),
    )
    .unwrap();
    assert_eq!(c.0, [0.0, 0.0]);
}

#[test]
fn matmul_input_gradients_match_finite_differences() {
    let mut rng = Rng::new(2);
    let be = be64();
    let (m, n, k, alpha) = (3, 4, 5, -0.7f32);
    for (ta, tb) in TRANS {
        for acc in ACCS {
            let g = gemm(m, n, k, (ta, tb), alpha, acc);
            let (a, b, c0, up) = (
                rng.vec(m * k, 1.0),
                rng.vec(k * n, 1.0),
                rng.vec(m * n, 1.0),
                rng.vec(m * n, 1.0),
            );
            let loss = |a: &[f64], b: &[f64]| {
                let mut c = buf(&c0);
                be.matmul(&mut c, &buf(a), &buf(b), g).unwrap();
                weighted_sum(&up, &c.0)
            };
            let run = |x: &[f64], y: &[f64], rows, cols, inner, tx, ty| {
                let mut out = buf(&vec![0.0; rows * cols]);
                let gg = gemm(rows, cols, inner, (tx, ty), alpha, Accumulate::Overwrite);
                be.matmul(&mut out, &buf(x), &buf(y), gg).unwrap();
                out.0
            };
            // C = α·op(A)·op(B), G = ∂L/∂C:
            //   ∂L/∂op(A) = α·G·op(B)ᵀ, ∂L/∂op(B) = α·op(A)ᵀ·G; a stored-transposed operand
            //   gets the transpose of that.
            let da = if ta {
                run(&b, &up, k, m, n, tb, true) // α·op(B)·Gᵀ  [k, m]
            } else {
                run(&up, &b, m, k, n, false, !tb) // α·G·op(B)ᵀ  [m, k]
            };
            let db = if tb {
                run(&up, &a, n, k, m, true, ta) // α·Gᵀ·op(A)  [n, k]
            } else {
                run(&a, &up, k, n, m, !ta, false) // α·op(A)ᵀ·G  [k, n]
            };
            let what = format!("trans=({ta}, {tb}) {acc:?}");
            check_grad(&format!("matmul dA {what}"), &da, &a, |x| loss(x, &b));
            check_grad(&format!("matmul dB {what}"), &db, &b, |x| loss(&a, x));
        }
    }
}
