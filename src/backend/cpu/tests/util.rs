//! Shared test helpers: a seeded RNG, comparisons that fail on NaN, and central finite
//! differences in f64.

use crate::backend::cpu::{CpuBackend, CpuBuf};

/// The f64 reference backend every gradient test runs on.
pub(super) fn be64() -> CpuBackend<f64> {
    CpuBackend::<f64>::new()
}

/// Wrap f64 values exactly (`upload` would round them through f32).
pub(super) fn buf(v: &[f64]) -> CpuBuf<f64> {
    CpuBuf(v.to_vec())
}

/// splitmix64: small, seeded, good enough for test data.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [−1, 1).
    pub(super) fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (2.0 / (1u64 << 53) as f64) - 1.0
    }
    /// `n` values uniform in [−scale, scale), rounded to f32 so that the f32 and f64
    /// backends see the same inputs.
    pub(super) fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n)
            .map(|_| (self.uniform() * scale) as f32 as f64)
            .collect()
    }
    /// Uniform integer in 0..n.
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Fails unless `got` and `want` have equal lengths and every element satisfies
/// `|got − want| ≤ rtol·max(|got|, |want|) + atol`. NaN never passes.
pub(super) fn assert_close(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    assert!(!want.is_empty(), "{what}: nothing to compare");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let diff = (g - w).abs();
        let bound = rtol * g.abs().max(w.abs()) + atol;
        if diff.is_nan() || bound.is_nan() || diff > bound {
            panic!("{what}[{i}]: got {g:e}, want {w:e} (|diff| {diff:e} > bound {bound:e})");
        }
    }
}

/// Largest |x|, failing on NaN.
pub(super) fn max_abs(what: &str, x: &[f64]) -> f64 {
    x.iter().fold(0.0, |m: f64, &v| {
        assert!(!v.is_nan(), "{what}: NaN");
        m.max(v.abs())
    })
}

/// Σ g·y: the scalar loss whose gradient the backward passes compute, for upstream g.
pub(super) fn weighted_sum(g: &[f64], y: &[f64]) -> f64 {
    assert_eq!(g.len(), y.len());
    g.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// Step of the central differences.
pub(super) const FD_STEP: f64 = 1e-6;

/// Central finite differences of `f` at `x`: `(f(x + h·e_i) − f(x − h·e_i)) / 2h`.
pub(super) fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + FD_STEP;
            let up = f(&xp);
            xp[i] = x[i] - FD_STEP;
            let down = f(&xp);
            xp[i] = x[i];
            (up - down) / (2.0 * FD_STEP)
        })
        .collect()
}

/// Compare an analytic gradient with central differences of `f` at `x`. Tolerance:
/// relative 1e-6 per element plus 1e-6 of the gradient's largest entry (FD rounding is
/// about 1e-16·|f|/h ≈ 1e-9 here). Fails when the gradient is all zeros (nothing tested).
pub(super) fn check_grad(what: &str, analytic: &[f64], x: &[f64], f: impl Fn(&[f64]) -> f64) {
    let numeric = numeric_grad(x, f);
    let scale = max_abs(what, &numeric);
    assert!(
        scale > 1e-3,
        "{what}: numeric gradient is ~0 (max {scale:e}); the test checks nothing"
    );
    assert_close(what, analytic, &numeric, 1e-6, 1e-6 * scale);
}
