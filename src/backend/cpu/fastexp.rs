//! e^x without a libm call, so that the loops over a softmax row, the loss's logits and
//! the SiLU's sigmoid compile to vector code (libm's `expf` is a scalar call per element:
//! 4–5% of a SmolLM2 step's cycles, issue 12).
//!
//! f32: computed in f64 and rounded once — x = n·ln 2 + r with |r| ≤ ½ ln 2, e^r by its
//! Taylor series to degree 9 (truncation below 2⁻³⁷ relative), 2^n from the exponent bits
//! — so the result is the correctly rounded e^x but for ties within 2⁻³⁰ of a rounding
//! boundary (checked against f64's `exp` below: never more than 1 ulp off). A first
//! version in f32 arithmetic (Cephes' `expf`, up to 2 ulp) moved a fixture's LoRA weights
//! after 5 AdamW steps to 8e-6 from PEFT's (tolerance 5e-6): AdamW's first steps are
//! sign-like, so gradient elements near zero amplify any rounding noise. Written with
//! plain `+` and `·` (no fused multiply-add), so it gives the same bits on every x86
//! machine whatever vector width the compiler picks. Below the smallest normal result
//! it returns 0, above the largest finite one +∞; NaN stays NaN. f64 (the reference
//! backend) uses the standard library's `exp`.

/// The largest x whose e^x is finite in f32 (Cephes' MAXLOGF).
const MAX_X: f32 = 88.376_26;
/// Below this x, e^x is returned as 0 (about ln 2⁻¹²⁶; results here are just below the
/// smallest normal f32).
const MIN_X: f32 = -87.336_55;

/// e^x in f32 (see the module comment). Branch-free, so loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2: f64 = std::f64::consts::LN_2;
    // round to the nearest integer with the 1.5·2⁵² trick (no SSE4.1 round)
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    let xc = x.clamp(MIN_X, MAX_X) as f64; // NaN stays NaN
    let t = xc * LOG2E + MAGIC; // n sits in the low bits of t's mantissa
    let n = t - MAGIC;
    let r = xc - n * LN2; // |r| ≤ 0.347; n·LN2's rounding is far below f32's
    // e^r = Σ r^k / k!, k ≤ 9, by Horner
    let mut p = 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n, n in −126 ..= 127 after the clamp: (n + 1023) << 52, n read from t's bits
    // (integer adds and shifts, which vectorise where a float → integer conversion does
    // not; NaN: p is NaN whatever the scale)
    let scale = f64::from_bits(
        t.to_bits()
            .wrapping_sub(MAGIC.to_bits())
            .wrapping_add(1023)
            .wrapping_shl(52),
    );
    let e = (p * scale) as f32;
    if x > MAX_X {
        f32::INFINITY
    } else if x < MIN_X {
        0.0
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units in the last place between `got` and the f64 value `want` rounded to f32.
    fn ulps(got: f32, want: f64) -> u32 {
        let w = want as f32;
        (got.to_bits() as i64 - w.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn within_one_ulp_of_the_true_exponential() {
        let mut worst = (0u32, 0f32);
        // every 97th f32 bit pattern between the ends of the range, both signs
        for bits in (0u32..0x42b0_0000).step_by(97) {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                if !(MIN_X..=MAX_X).contains(&x) {
                    continue;
                }
                let u = ulps(exp_f32(x), (x as f64).exp());
                if u > worst.0 {
                    worst = (u, x);
                }
            }
        }
        assert!(worst.0 <= 1, "{} ulp at x = {:e}", worst.0, worst.1);
    }

    #[test]
    fn ends_and_non_finite_inputs() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(MAX_X).is_finite());
        assert!(exp_f32(MIN_X) > 0.0);
    }
}
