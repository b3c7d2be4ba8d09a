//! Loops compiled for the processor's vector unit. The binary is built for x86-64's
//! baseline (SSE2), so a plain loop runs 4 f32 (2 f64) lanes at a time, and the f64
//! arithmetic of [`super::fastexp`] 2 at a time. A function written with [`vectorized!`]
//! is compiled three times, for the baseline, for AVX2 and for AVX-512, and runs the
//! widest version the processor has (detected once). The arithmetic is the same whatever
//! the width: Rust never fuses `a·b + c` into one rounding, and lanes are independent, so
//! every element gets the bits the baseline loop gives it (`tests/model_golden.rs` checks
//! them, and `same_bits_at_every_width` below).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// The vector extension that [`vectorized!`] functions run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Baseline,
    Avx2,
    Avx512,
}

/// The widest [`Level`] this processor has, or the cap [`cap_level`] set, if narrower.
pub(crate) fn level() -> Level {
    static DETECTED: OnceLock<Level> = OnceLock::new();
    let detected = *DETECTED.get_or_init(detect);
    match CAP.load(Ordering::Relaxed) {
        0 => Level::Baseline,
        1 => detected.min(Level::Avx2),
        _ => detected,
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl");
        if avx2 && avx512 {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// The widest level [`level`] may return, as `Level as u8` (tests run the narrower
/// versions with it; every version gives the same bits, so other threads running at
/// the same time are not affected in their results).
static CAP: AtomicU8 = AtomicU8::new(Level::Avx512 as u8);

/// Let [`level`] return at most `cap` from now on (tests).
#[cfg(test)]
pub(crate) fn cap_level(cap: Level) {
    CAP.store(cap as u8, Ordering::Relaxed);
}

/// A function whose body is compiled for the baseline, AVX2 and AVX-512, run at
/// [`level`]. Arguments are plain identifiers; generic parameters take one bound each.
/// The body is inlined into each version, so what it calls should be `#[inline]` (or
/// small and generic) to be compiled at the version's width too.
macro_rules! vectorized {
    ($(#[$attr:meta])* $vis:vis fn $name:ident $(<$($g:ident: $bound:path),+>)?
        ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn avx512 $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $crate::backend::cpu::vector::level() {
                    // SAFETY: `level` found these extensions on this processor.
                    $crate::backend::cpu::vector::Level::Avx512 => {
                        return unsafe { avx512($($arg),*) };
                    }
                    // SAFETY: as above.
                    $crate::backend::cpu::vector::Level::Avx2 => {
                        return unsafe { avx2($($arg),*) };
                    }
                    $crate::backend::cpu::vector::Level::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use vectorized;

/// Elements per task of the elementwise loops written with [`vectorized!`].
pub(crate) const CHUNK: usize = 1 << 14;
