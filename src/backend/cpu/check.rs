//! Argument checks of the CPU backend's ops: every length is compared with what the
//! dimensions imply before a kernel runs, and errors name the op and quote the numbers.

use crate::backend::AttnDims;
use crate::error::{Error, Result};

/// A backend error of op `op`.
pub(super) fn fail(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cpu",
        op,
        msg: msg.into(),
    }
}

/// `Ok` when buffer `what` holds `want` elements; otherwise an error quoting both lengths
/// and the expected shape.
pub(super) fn expect_len(
    op: &'static str,
    what: &str,
    got: usize,
    want: usize,
    shape: impl FnOnce() -> String,
) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(fail(
            op,
            format!("{what} has {got} elements, expected {want} = {}", shape()),
        ))
    }
}

/// The product of `dims`, or an error when it overflows.
pub(super) fn numel(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| fail(op, format!("shape {dims:?} overflows the address space")))
}

/// Rows of buffer `what` seen as `[rows, cols]`; an error when cols is 0 or does not divide
/// its length.
pub(super) fn rows_of(op: &'static str, what: &str, len: usize, cols: usize) -> Result<usize> {
    if cols == 0 || !len.is_multiple_of(cols) {
        return Err(fail(
            op,
            format!("{what} has {len} elements, not a whole number of rows of {cols}"),
        ));
    }
    Ok(len / cols)
}

/// `Ok` when two buffers that the op pairs element by element have equal lengths.
pub(super) fn same_len(op: &'static str, a: (&str, usize), b: (&str, usize)) -> Result<()> {
    if a.1 == b.1 {
        Ok(())
    } else {
        Err(fail(
            op,
            format!("{} has {} elements but {} has {}", a.0, a.1, b.0, b.1),
        ))
    }
}

/// Checks of the attention shapes shared by forward and backward; returns (q len, kv len,
/// lse len).
pub(super) fn attn_lens(op: &'static str, d: &AttnDims) -> Result<(usize, usize, usize)> {
    if d.head_dim == 0 {
        return Err(fail(op, "head_dim must be positive, got 0"));
    }
    if d.n_kv_heads == 0 || !d.n_heads.is_multiple_of(d.n_kv_heads) {
        return Err(fail(
            op,
            format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                d.n_heads, d.n_kv_heads
            ),
        ));
    }
    Ok((
        numel(op, &[d.batch, d.seq, d.n_heads, d.head_dim])?,
        numel(op, &[d.batch, d.seq, d.n_kv_heads, d.head_dim])?,
        numel(op, &[d.batch, d.n_heads, d.seq])?,
    ))
}

/// Checks of the RoPE arguments shared by forward and backward.
pub(super) fn rope_check(
    op: &'static str,
    len: usize,
    positions: &[u32],
    inv_freq: &[f32],
    heads: usize,
) -> Result<()> {
    if inv_freq.is_empty() {
        return Err(fail(
            op,
            "inv_freq is empty (head dim D = 2·inv_freq.len() must be > 0)",
        ));
    }
    let d = 2 * inv_freq.len();
    let want = numel(op, &[positions.len(), heads, d])?;
    expect_len(op, "x", len, want, || {
        format!("[N={} (positions), heads={heads}, D={d}]", positions.len())
    })
}

/// Checks of a dropout probability.
pub(super) fn dropout_check(op: &'static str, p: f32) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(fail(
            op,
            format!("dropout probability {p} is outside [0, 1)"),
        ))
    }
}

/// The buffers of an NF4 weight must fit its size (see [`crate::backend::nf4_problem`]).
pub(super) fn nf4_check(
    op: &'static str,
    numel: usize,
    blocksize: usize,
    lens: (usize, usize, usize),
    nested: Option<(usize, usize, usize)>,
) -> Result<()> {
    crate::backend::nf4_problem(numel, blocksize, lens, nested).map_or(Ok(()), |m| Err(fail(op, m)))
}

/// The parts of an FP8 weight must fit its shape.
pub(super) fn fp8_check(
    op: &'static str,
    rows: usize,
    cols: usize,
    codes: usize,
    scales: usize,
) -> Result<()> {
    crate::backend::fp8_problem(rows, cols, codes, scales).map_or(Ok(()), |m| Err(fail(op, m)))
}

/// A soft-cap must be a positive finite number.
pub(super) fn softcap_check(op: &'static str, cap: Option<f32>) -> Result<()> {
    crate::backend::softcap_problem(cap).map_or(Ok(()), |m| Err(fail(op, m)))
}

/// `key_start` must give, for every token t of a row, a first key ≤ t, never decreasing
/// along the row (packed segments are contiguous).
pub(super) fn check_key_start(
    op: &'static str,
    d: &AttnDims,
    key_start: Option<&[u32]>,
) -> Result<()> {
    let Some(ks) = key_start else { return Ok(()) };
    if ks.len() != d.batch * d.seq {
        return Err(fail(
            op,
            format!(
                "key_start has {} entries, expected B·T = {}",
                ks.len(),
                d.batch * d.seq
            ),
        ));
    }
    for (r, row) in ks.chunks(d.seq.max(1)).enumerate() {
        for (t, &s) in row.iter().enumerate() {
            if s as usize > t || (t > 0 && s < row[t - 1]) {
                return Err(fail(
                    op,
                    format!(
                        "key_start[{r}, {t}] = {s} must be ≤ {t} and not below the previous entry"
                    ),
                ));
            }
        }
    }
    Ok(())
}
