//! Elementwise and row-broadcast ops (axpy, bias, column copies, sum of squares, embedding
//! lookup) and the small vector helpers the other kernels share.

use rayon::prelude::*;

use super::CpuFloat;
use crate::backend::Accumulate;

/// Elements per rayon task for the light elementwise loops.
pub(crate) const PAR_MIN: usize = 1 << 14;

/// Rows per rayon task so that a task touches at least [`PAR_MIN`] elements of `cols`.
pub(crate) fn min_rows(cols: usize) -> usize {
    (PAR_MIN / cols.max(1)).max(1)
}

/// `Σ a·b` with eight partial sums: vectorisable, and rounding grows more slowly than with
/// one running sum.
#[inline(always)]
pub(crate) fn dot<T: CpuFloat>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    for (xa, xb) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(xa).zip(xb) {
            *s = *s + x * y;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `Σ a` with eight partial sums (vectorisable, as [`dot`]).
#[inline(always)]
pub(crate) fn sum<T: CpuFloat>(a: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let ca = a.chunks_exact(8);
    let tail = ca.remainder().iter().fold(T::zero(), |s, &x| s + x);
    for xa in ca {
        for (s, &x) in acc.iter_mut().zip(xa) {
            *s = *s + x;
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// The largest element (−∞ for none; NaN elements are passed over, as `f32::max` does),
/// in eight lanes so that it vectorises.
#[inline(always)]
pub(crate) fn max<T: CpuFloat>(a: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 8];
    let ca = a.chunks_exact(8);
    let tail = ca
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |m, &x| if x > m { x } else { m });
    for xa in ca {
        for (m, &x) in acc.iter_mut().zip(xa) {
            *m = if x > *m { x } else { *m };
        }
    }
    acc.iter().fold(tail, |m, &x| if x > m { x } else { m })
}

/// `y += alpha · x` over two equal-length slices.
#[inline(always)]
pub(crate) fn add_scaled<T: CpuFloat>(y: &mut [T], alpha: T, x: &[T]) {
    debug_assert_eq!(y.len(), x.len());
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + alpha * x;
    }
}

/// `y (=|+=) alpha · x`; y, x `[n]`.
pub(crate) fn axpy<T: CpuFloat>(y: &mut [T], alpha: T, x: &[T], acc: Accumulate) {
    let pairs = y.par_iter_mut().zip(x.par_iter()).with_min_len(PAR_MIN);
    match acc {
        Accumulate::Overwrite => pairs.for_each(|(y, &x)| *y = alpha * x),
        Accumulate::Add => pairs.for_each(|(y, &x)| *y = *y + alpha * x),
    }
}

/// `x[r, :] += b`; x `[rows, C]`, b `[C]`.
pub(crate) fn add_bias<T: CpuFloat>(x: &mut [T], b: &[T]) {
    x.par_chunks_mut(b.len())
        .with_min_len(min_rows(b.len()))
        .for_each(|row| {
            for (x, &b) in row.iter_mut().zip(b) {
                *x = *x + b;
            }
        });
}

/// `dst[r, dst_off..+width] (=|+=) src[r, src_off..+width]`; dst `[rows, dst_cols]`,
/// src `[rows, src_cols]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_cols<T: CpuFloat>(
    dst: &mut [T],
    dst_cols: usize,
    dst_off: usize,
    src: &[T],
    src_cols: usize,
    src_off: usize,
    width: usize,
    acc: Accumulate,
) {
    dst.par_chunks_mut(dst_cols)
        .zip(src.par_chunks(src_cols))
        .with_min_len(min_rows(width))
        .for_each(|(d, s)| {
            let (d, s) = (
                &mut d[dst_off..dst_off + width],
                &s[src_off..src_off + width],
            );
            match acc {
                Accumulate::Overwrite => d.copy_from_slice(s),
                Accumulate::Add => add_scaled(d, T::one(), s),
            }
        });
}

/// `Σ x²` accumulated in f64. Partial sums over fixed chunks are added in order, so the
/// result does not depend on the thread count.
pub(crate) fn sum_squares<T: CpuFloat>(x: &[T]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(PAR_MIN)
        .map(|c| c.iter().map(|&v| v.as_f64() * v.as_f64()).sum::<f64>())
        .collect();
    partial.iter().sum()
}

/// `out[i, :] (=|+=) table[ids[i], :]`; out `[N, C]`, table `[V, C]`, every id < V.
pub(crate) fn embedding_forward<T: CpuFloat>(
    out: &mut [T],
    ids: &[u32],
    table: &[T],
    c: usize,
    acc: Accumulate,
) {
    out.par_chunks_mut(c)
        .zip(ids.par_iter())
        .with_min_len(min_rows(c))
        .for_each(|(row, &id)| {
            let src = &table[id as usize * c..][..c];
            match acc {
                Accumulate::Overwrite => row.copy_from_slice(src),
                Accumulate::Add => add_scaled(row, T::one(), src),
            }
        });
}
