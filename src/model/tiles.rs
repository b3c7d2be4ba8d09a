//! Sequence tiles: the rows of a block call that its per-token parts (norms, projections,
//! RoPE, the MLP, the residual adds) run over at once, so that their working set is one
//! tile's rather than the whole sequence's. Attention reads the whole call's q, k and v.
//!
//! A tile is a range of the call's `N = B·T` token rows (it may cross sequence
//! boundaries: nothing per-token cares). A tile that covers the whole call is the buffer
//! itself — no copy — so an untiled call runs exactly the ops it ran before tiles existed.

use crate::backend::Backend;
use crate::error::{Error, Result};

/// Token rows `start..start + rows` of a block call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub start: usize,
    pub rows: usize,
}

impl Tile {
    /// True when the tile is all `n` rows of the call.
    pub fn is_all(&self, n: usize) -> bool {
        self.start == 0 && self.rows == n
    }

    /// The tile's entries of a per-token array of the call (positions).
    pub fn of<'a, T>(&self, per_token: &'a [T]) -> &'a [T] {
        &per_token[self.start..self.start + self.rows]
    }
}

/// The tiles of `n` rows, `rows` at most each (None or 0: one tile), in order.
pub fn tiles(n: usize, rows: Option<usize>) -> impl Iterator<Item = Tile> {
    let step = rows.filter(|&r| r > 0 && r < n).unwrap_or(n).max(1);
    (0..n).step_by(step).map(move |start| Tile {
        start,
        rows: step.min(n - start),
    })
}

/// Rows of a `[N, width]` buffer for one tile: the buffer itself when the tile is all of
/// it, else a copy of the rows.
pub enum TileRows<'a, B: Backend> {
    All(&'a B::Buf),
    Copy(B::Buf),
}

impl<B: Backend> std::ops::Deref for TileRows<'_, B> {
    type Target = B::Buf;
    fn deref(&self) -> &B::Buf {
        match self {
            TileRows::All(b) => b,
            TileRows::Copy(b) => b,
        }
    }
}

/// Rows `t` of `x` `[n, width]`.
pub fn rows_of<'a, B: Backend>(
    be: &B,
    x: &'a B::Buf,
    t: Tile,
    n: usize,
    width: usize,
) -> Result<TileRows<'a, B>> {
    if t.is_all(n) {
        return Ok(TileRows::All(x));
    }
    let len = t.rows * width;
    // every element copied
    let mut part = be.uninit_like(len, x)?;
    be.copy_range(&mut part, 0, x, t.start * width, len)?;
    Ok(TileRows::Copy(part))
}

/// Rows `t` of a block's input `x` `[n, width]` in f32: as [`rows_of`] for an f32 `x`;
/// widened (exactly) from a block input kept in half precision
/// ([`Backend::is_half`]: one parked in bf16 and brought back as it was,
/// `LemaConfig::offload_activations_half`), so that only a tile of it exists in f32.
pub fn input_rows<'a, B: Backend>(
    be: &B,
    x: &'a B::Buf,
    t: Tile,
    n: usize,
    width: usize,
) -> Result<TileRows<'a, B>> {
    if !be.is_half(x) {
        return rows_of(be, x, t, n, width);
    }
    let f32_rows = match rows_of(be, x, t, n, width)? {
        TileRows::All(x) => be.widen(x)?,
        TileRows::Copy(part) => be.widen(&part)?,
    };
    Ok(TileRows::Copy(f32_rows))
}

/// Rows `t` of `x` `[n, width]` as a buffer of their own: `x` itself (taken) when the
/// tile is all of it, else a copy (`x` stays).
pub fn take_rows<B: Backend>(
    be: &B,
    x: &mut Option<B::Buf>,
    t: Tile,
    n: usize,
    width: usize,
) -> Result<B::Buf> {
    let missing = || Error::internal("a tiled buffer was used up");
    if t.is_all(n) {
        return x.take().ok_or_else(missing);
    }
    match rows_of(be, x.as_ref().ok_or_else(missing)?, t, n, width)? {
        TileRows::Copy(b) => Ok(b),
        TileRows::All(_) => Err(Error::internal("a part tile copied as all")),
    }
}

/// Runs `f` on rows `t` of `x` `[n, width]` in place: on `x` itself when the tile is all
/// of it, else on a copy of the rows that is written back afterwards.
pub fn rows_mut<B: Backend, R>(
    be: &B,
    x: &mut B::Buf,
    t: Tile,
    n: usize,
    width: usize,
    f: impl FnOnce(&mut B::Buf) -> Result<R>,
) -> Result<R> {
    if t.is_all(n) {
        return f(x);
    }
    let len = t.rows * width;
    let mut part = be.uninit_like(len, x)?;
    be.copy_range(&mut part, 0, x, t.start * width, len)?;
    let r = f(&mut part)?;
    be.copy_range(x, t.start * width, &part, 0, len)?;
    Ok(r)
}

/// A `[n, width]` buffer assembled from its tiles' rows; the tiles must cover it.
pub struct Rows<B: Backend> {
    n: usize,
    width: usize,
    buf: Option<B::Buf>,
}

impl<B: Backend> Rows<B> {
    pub fn new(n: usize, width: usize) -> Self {
        Rows {
            n,
            width,
            buf: None,
        }
    }

    /// Rows `t` are `part` (`[t.rows, width]`).
    pub fn put(&mut self, be: &B, t: Tile, part: B::Buf) -> Result<()> {
        if t.is_all(self.n) {
            self.buf = Some(part);
            return Ok(());
        }
        let total = self.n * self.width;
        let buf = match &mut self.buf {
            Some(b) => b,
            // written in full by the tiles, which cover every row; of the tiles' type
            None => self.buf.insert(be.uninit_like(total, &part)?),
        };
        let len = t.rows * self.width;
        be.copy_range(buf, t.start * self.width, &part, 0, len)
    }

    /// The assembled buffer.
    pub fn finish(self, be: &B) -> Result<B::Buf> {
        match self.buf {
            Some(b) => Ok(b),
            None => be.uninit(self.n * self.width),
        }
    }
}

/// What a block's backward holds per token, in f32 bytes: for the whole call, and per row
/// of the tile in flight. From the shapes, as an upper estimate for choosing a tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBytes {
    /// Held for every token of the call while attention's backward runs: the block's
    /// input and dy (which becomes dx), q, k, v, the attention output and their
    /// gradients, lse, q and k before their norms (where there are any), and the
    /// attention kernels' half copies.
    pub whole: u64,
    /// Held per row of the tile in flight: the MLP's activations and their gradients, the
    /// residual stream and the norms' outputs.
    pub tile: u64,
}

/// The tile rows of a block call of `n` tokens: at most [`AUTO_TILE_ROWS`], and fewer
/// when that many would not fit in `avail` bytes, `fixed` of them being spoken for and
/// the block holding `per` per token. None when the whole call fits in one such tile
/// (untiled); else a multiple of [`TILE_ROWS_STEP`] (at least one step, even when
/// nothing fits: the allocation then fails with its own message).
pub fn rows_within(n: usize, avail: u64, fixed: u64, per: TokenBytes) -> Option<usize> {
    let left = avail.saturating_sub(fixed.saturating_add(per.whole.saturating_mul(n as u64)));
    let rows = (left / per.tile.max(1)).min(AUTO_TILE_ROWS as u64);
    if rows >= n as u64 {
        return None;
    }
    let step = TILE_ROWS_STEP as u64;
    Some(((rows / step).max(1) * step) as usize).filter(|&r| r < n)
}

/// Granularity of an automatic tile: rows in multiples of it keep the GEMMs' row blocks
/// whole.
pub const TILE_ROWS_STEP: usize = 256;

/// The largest automatic tile: 8192 rows already make every GEMM of a 7B–70B block a
/// large one (8192 × 4096 × 4096 and up), and a larger tile would only take memory that
/// grows with the sequence (a Llama-3-8B block's MLP half holds about 0.44 MB per row:
/// 3.6 GB at 8192). Calls of up to this many tokens run untiled, exactly as without
/// tiles.
pub const AUTO_TILE_ROWS: usize = 8192;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_rows_in_order() {
        let cover = |n, r| tiles(n, r).map(|t| (t.start, t.rows)).collect::<Vec<_>>();
        assert_eq!(cover(7, None), vec![(0, 7)]);
        assert_eq!(cover(7, Some(0)), vec![(0, 7)]);
        assert_eq!(cover(7, Some(7)), vec![(0, 7)]);
        assert_eq!(cover(7, Some(9)), vec![(0, 7)]);
        assert_eq!(cover(7, Some(3)), vec![(0, 3), (3, 3), (6, 1)]);
        assert_eq!(cover(4, Some(1)).len(), 4);
        assert!(cover(0, Some(3)).is_empty());
        assert!(tiles(7, None).next().unwrap().is_all(7));
    }

    #[test]
    fn automatic_rows_fit_the_memory_left() {
        let per = TokenBytes {
            whole: 100,
            tile: 1000,
        };
        // everything fits: untiled
        assert_eq!(rows_within(1000, 2_000_000, 0, per), None);
        // 1000 tokens: 100 000 whole, 500 000 left for 500 rows → 256
        assert_eq!(rows_within(1000, 600_000 + 5, 5, per), Some(256));
        // nothing left: one step of rows, the allocation decides
        assert_eq!(rows_within(1000, 10, 0, per), Some(TILE_ROWS_STEP));
        // a call smaller than one step is never tiled by the rule
        assert_eq!(rows_within(100, 10, 0, per), None);
        // plenty of memory: tiles of AUTO_TILE_ROWS past that many tokens, none below
        let n = 3 * AUTO_TILE_ROWS + 7;
        assert_eq!(rows_within(n, u64::MAX, 0, per), Some(AUTO_TILE_ROWS));
        assert_eq!(rows_within(AUTO_TILE_ROWS, u64::MAX, 0, per), None);
    }
}
