//! RoPE: forward against the complex-number form, backward against finite differences
//! and as the inverse of the forward.

use super::util::*;
use crate::backend::Backend;

const HEADS: usize = 3;
const D: usize = 8;

/// HF's default inverse frequencies, in f32: 1 / base^(2j/D).
fn inv_freq() -> Vec<f32> {
    (0..D / 2)
        .map(|j| 1.0 / 10000f32.powf((2 * j) as f32 / D as f32))
        .collect()
}

fn positions(rng: &mut Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(300) as u32).collect()
}

#[test]
fn rope_forward_matches_complex_rotation() {
    let mut rng = Rng::new(20);
    let n = 6;
    let (pos, freq) = (positions(&mut rng, n), inv_freq());
    let x = rng.vec(n * HEADS * D, 1.0);
    let mut got = buf(&x);
    be64().rope_forward(&mut got, &pos, &freq, HEADS).unwrap();
    let mut want = vec![0.0; x.len()];
    for (i, &p) in pos.iter().enumerate() {
        for h in 0..HEADS {
            let base = (i * HEADS + h) * D;
            for j in 0..D / 2 {
                // (x_j + i·x_{j+D/2}) · e^{iθ}, θ rounded to f32 as HF computes it.
                let theta = (p as f32 * freq[j]) as f64;
                let (re, im) = (x[base + j], x[base + j + D / 2]);
                want[base + j] = re * theta.cos() - im * theta.sin();
                want[base + j + D / 2] = re * theta.sin() + im * theta.cos();
            }
        }
    }
    // cos and sin are rounded to f32 (as HF does): |error| ≲ 2·6e-8 per term.
    assert_close("rope forward", &got.0, &want, 1e-6, 1e-6);
}

#[test]
fn rope_backward_matches_finite_differences_and_inverts_forward() {
    let mut rng = Rng::new(21);
    let be = be64();
    let n = 5;
    let (pos, freq) = (positions(&mut rng, n), inv_freq());
    let (x, up) = (rng.vec(n * HEADS * D, 1.0), rng.vec(n * HEADS * D, 1.0));
    let mut dx = buf(&up);
    be.rope_backward(&mut dx, &pos, &freq, HEADS).unwrap();
    check_grad("rope dx", &dx.0, &x, |xx| {
        let mut y = buf(xx);
        be.rope_forward(&mut y, &pos, &freq, HEADS).unwrap();
        weighted_sum(&up, &y.0)
    });

    let mut y = buf(&x);
    be.rope_forward(&mut y, &pos, &freq, HEADS).unwrap();
    be.rope_backward(&mut y, &pos, &freq, HEADS).unwrap();
    // Exact up to cos² + sin² = 1 in f32-rounded values.
    assert_close("rope backward ∘ forward", &y.0, &x, 1e-6, 1e-6);
}

#[test]
fn rope_uses_f32_angles_and_cosines_like_hf() {
    // HF computes θ = pos·inv_freq, cos θ and sin θ in f32 whatever the model's dtype; the
    // f64 backend must rotate by exactly those rounded values, not by f64 cos θ.
    let (freq, pos) = (inv_freq(), [123u32, 4097]);
    let x: Vec<f64> = (0..2 * D).map(|i| 1.0 + i as f64 / 8.0).collect();
    let mut got = buf(&x);
    be64().rope_forward(&mut got, &pos, &freq, 1).unwrap();
    let mut differs_from_f64_cos = false;
    for (t, &p) in pos.iter().enumerate() {
        for j in 0..D / 2 {
            let theta = p as f32 * freq[j];
            let (c, s) = (theta.cos() as f64, theta.sin() as f64);
            let (lo, hi) = (x[t * D + j], x[t * D + j + D / 2]);
            let want = [lo * c - hi * s, hi * c + lo * s];
            let have = [got.0[t * D + j], got.0[t * D + j + D / 2]];
            assert_close("rope f32 cos/sin", &have, &want, 1e-15, 0.0);
            differs_from_f64_cos |= (c - (theta as f64).cos()).abs() > 1e-12;
        }
    }
    assert!(
        differs_from_f64_cos,
        "the inputs do not tell f32 from f64 cosines"
    );
}
