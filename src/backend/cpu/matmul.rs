//! Row-major GEMM on the `gemm` crate. Transposes are expressed through the row/column
//! strides gemm takes, so no operand is ever copied.
//!
//! Careful: gemm computes `dst = alpha·dst + beta·lhs·rhs` — its `alpha` scales the old
//! destination and its `beta` the product, the reverse of BLAS naming.

use super::CpuFloat;
use crate::backend::{Accumulate, Gemm};

/// Below this many multiply-adds (m·n·k) a GEMM runs on the calling thread.
const PARALLEL_MIN_FLOPS: usize = 64 * 64 * 64;

/// [`Gemm`] on slices: `c[m×n] (=|+=) alpha · op(a)[m×k] · op(b)[k×n]`.
pub(crate) fn matmul<T: CpuFloat>(c: &mut [T], a: &[T], b: &[T], g: &Gemm) {
    gemm_rowmajor(
        c,
        a,
        b,
        (g.m, g.n, g.k),
        (g.trans_a, g.trans_b),
        T::from_f32(g.alpha),
        g.accumulate,
    );
}

/// `c (=|+=) alpha · op(a) · op(b)` with all three stored row-major:
/// c `[m, n]`; a `[m, k]`, or `[k, m]` when `trans_a`; b `[k, n]`, or `[n, k]` when `trans_b`.
pub(crate) fn gemm_rowmajor<T: CpuFloat>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    (m, n, k): (usize, usize, usize),
    (trans_a, trans_b): (bool, bool),
    alpha: T,
    acc: Accumulate,
) {
    // The raw-pointer call below relies on these; the backend checks them for the user.
    assert_eq!(c.len(), m * n, "gemm: c");
    assert_eq!(a.len(), m * k, "gemm: a");
    assert_eq!(b.len(), k * n, "gemm: b");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum: C = 0, or C unchanged when accumulating.
        if acc == Accumulate::Overwrite {
            c.fill(T::zero());
        }
        return;
    }
    // (row stride, column stride) of op(X) in elements. op(a)[i, p] is a[i·k + p], or
    // a[p·m + i] when a is stored transposed; likewise for b.
    let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
    let parallelism = if m * n * k >= PARALLEL_MIN_FLOPS && rayon::current_num_threads() > 1 {
        // 0: as many threads as the current rayon pool has.
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above make every index that the strides reach lie inside its
    // slice: op(a) spans (m-1)·a_rs + (k-1)·a_cs < m·k, op(b) likewise < k·n, c < m·n.
    // `c` is borrowed mutably, so it aliases neither input. T is f32 or f64 (CpuFloat is
    // sealed), both of which gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),         // dst
            1,                      // dst_cs: column stride of c
            n as isize,             // dst_rs: row stride of c
            acc == Accumulate::Add, // read_dst: keep the old c (`+=`)
            a.as_ptr(),             // lhs = op(a)
            a_cs as isize,          // lhs_cs
            a_rs as isize,          // lhs_rs
            b.as_ptr(),             // rhs = op(b)
            b_cs as isize,          // rhs_cs
            b_rs as isize,          // rhs_rs
            T::one(),               // gemm's "alpha": factor on the old c (when read)
            alpha,                  // gemm's "beta": factor on op(a)·op(b)
            false,                  // conj_dst
            false,                  // conj_lhs
            false,                  // conj_rhs
            parallelism,
        );
    }
}

/// A strided view of a row-major matrix operand: element `[i, j]` of the `rows × cols`
/// matrix is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> View<'a, T> {
    /// A contiguous row-major `[rows, cols]` matrix (`rs = cols`), or its transpose when
    /// `trans` (the stored `[cols, rows]` read by columns).
    pub fn rowmajor(data: &'a [T], cols: usize, trans: bool) -> Self {
        if trans {
            View {
                data,
                rs: 1,
                cs: cols,
            }
        } else {
            View {
                data,
                rs: cols,
                cs: 1,
            }
        }
    }
}

/// Largest index `[rows−1, cols−1]` reaches with these strides, plus one.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    (rows - 1) * rs + (cols - 1) * cs + 1
}

/// `c[m×n] (=|+=) alpha · a[m×k] · b[k×n]` on strided views, on the calling thread: the
/// small products inside an already-parallel kernel (attention's blocks). `c` is row-major
/// with row stride `c_rs` (unit column stride).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_serial<T: CpuFloat>(
    c: &mut [T],
    c_rs: usize,
    a: View<'_, T>,
    b: View<'_, T>,
    (m, n, k): (usize, usize, usize),
    alpha: T,
    acc: Accumulate,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The raw-pointer call below relies on these: every index the strides reach lies
    // inside its slice.
    assert!(c.len() >= extent(m, n, c_rs, 1), "gemm_serial: c");
    if k == 0 {
        if acc == Accumulate::Overwrite {
            for i in 0..m {
                c[i * c_rs..][..n].fill(T::zero());
            }
        }
        return;
    }
    assert!(a.data.len() >= extent(m, k, a.rs, a.cs), "gemm_serial: a");
    assert!(b.data.len() >= extent(k, n, b.rs, b.cs), "gemm_serial: b");
    // SAFETY: the asserts above bound every index; `c` is borrowed mutably, so it aliases
    // neither input; T is f32 or f64.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            acc == Accumulate::Add,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
