//! The key/value cache of inference: for every block, the post-RoPE keys and values of
//! all tokens seen so far, so that each new token costs one token's work per layer.
//! Blocks still come from the weight stream one at a time; only the cache stays.
//!
//! Shapes: B rows, `cap` positions per row, W = KVH·D (key/value width of one token).
//! Each layer holds k, v `[B, cap, W]`; positions `0..len` of every row are filled.
//! Rows may be left-padded (prompts of different lengths in one batch): `key_start[b]`
//! is the first real position of row b, and no query attends to a key before it.

use super::Model;
use crate::backend::{Accumulate, Backend, DecodeDims};
use crate::error::{Error, Result};

/// Cached keys and values of every block for a batch of sequences.
pub struct KvCache<B: Backend> {
    batch: usize,
    cap: usize,
    len: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// `(k, v)` of each block, each `[B, cap, KVH·D]`.
    layers: Vec<(B::Buf, B::Buf)>,
    key_start: Vec<u32>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` rows of up to `cap` positions each, for `model`.
    /// `key_start` (`[B]`) gives each row's first real position (its left padding);
    /// None means no padding.
    pub fn new(
        be: &B,
        model: &Model,
        batch: usize,
        cap: usize,
        key_start: Option<Vec<u32>>,
    ) -> Result<Self> {
        let cfg = model.config();
        let a = model.block(0).attn;
        let (h, kvh, d) = (a.n_heads, a.n_kv_heads, a.head_dim);
        if batch == 0 || cap == 0 {
            return Err(Error::config(format!(
                "a KV cache needs at least one row of one position (got {batch} × {cap})"
            )));
        }
        if super::family::family(cfg.arch).learned_positions && cap > cfg.max_position_embeddings {
            return Err(Error::config(format!(
                "{cap} positions exceed the model's {} learned positions; shorten the prompt or max_new_tokens",
                cfg.max_position_embeddings
            )));
        }
        let key_start = key_start.unwrap_or_else(|| vec![0; batch]);
        if key_start.len() != batch {
            return Err(Error::config(format!(
                "key_start has {} entries for {batch} rows",
                key_start.len()
            )));
        }
        let n = batch
            .checked_mul(cap)
            .and_then(|x| x.checked_mul(kvh * d))
            .ok_or_else(|| Error::config("KV cache size overflows"))?;
        // zeros, not uninit: positions past `len` are never attended to, but a kernel that
        // loads whole tiles multiplies them by a zero probability (0 · NaN = NaN); one
        // memset per generation is cheap
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| Ok((be.zeros(n)?, be.zeros(n)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            batch,
            cap,
            len: 0,
            n_heads: h,
            n_kv_heads: kvh,
            head_dim: d,
            layers,
            key_start,
        })
    }

    /// Rows of the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Positions filled in every row.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Positions each row can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// First real position of each row.
    pub fn key_start(&self) -> &[u32] {
        &self.key_start
    }

    /// Positions of `q_len` new tokens in each row (for RoPE and learned positions),
    /// counted from each row's first real token: `[B·q_len]`.
    pub fn positions(&self, q_len: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.batch * q_len);
        for &s in &self.key_start {
            for i in 0..q_len {
                out.push(((self.len + i) as u32).saturating_sub(s));
            }
        }
        out
    }

    /// Check that `q_len` more positions fit.
    pub fn check_room(&self, q_len: usize) -> Result<()> {
        if q_len == 0 || self.len + q_len > self.cap {
            return Err(Error::config(format!(
                "KV cache of {} positions cannot take {q_len} more after {}",
                self.cap, self.len
            )));
        }
        Ok(())
    }

    /// Store the new keys and values of block `layer` (k, v `[B, Tq, KVH·D]`, after RoPE)
    /// at positions `len..len+Tq` and return the attention of q `[B, Tq, H·D]` over the
    /// cache: `[B, Tq, H·D]`. The cache's length moves on only at [`KvCache::advance`],
    /// once every block has been through.
    ///
    /// `scale` multiplies q·k; with a sliding `window`, a query at cache position p sees
    /// keys from p − window + 1 on (queries then go one at a time: each has its own
    /// first key).
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &mut self,
        be: &B,
        layer: usize,
        q: &B::Buf,
        k: &B::Buf,
        v: &B::Buf,
        q_len: usize,
        scale: f32,
        window: Option<usize>,
    ) -> Result<B::Buf> {
        self.check_room(q_len)?;
        let w = self.n_kv_heads * self.head_dim;
        let (kc, vc) = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::internal(format!("KV cache has no layer {layer}")))?;
        // cache[b, len..len+Tq, :] = new[b, :, :] (seen as [B, cap·W] and [B, Tq·W])
        for (cache, new) in [(&mut *kc, k), (&mut *vc, v)] {
            be.copy_cols(
                cache,
                self.cap * w,
                self.len * w,
                new,
                q_len * w,
                0,
                q_len * w,
                Accumulate::Overwrite,
            )?;
        }
        let dims = |q_len: usize, kv_len: usize| DecodeDims {
            batch: self.batch,
            q_len,
            cap: self.cap,
            kv_len,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            scale,
        };
        let hd = self.n_heads * self.head_dim;
        // overwritten (attention_decode writes every query row; the per-query copies
        // cover every column)
        let mut out = be.uninit(self.batch * q_len * hd)?;
        match window.filter(|&w| w < self.len + q_len) {
            None => {
                let d = dims(q_len, self.len + q_len);
                be.attention_decode(&mut out, q, kc, vc, d, Some(&self.key_start))?;
            }
            Some(w) => {
                for i in 0..q_len {
                    let p = self.len + i;
                    let first = (p + 1).saturating_sub(w.max(1)) as u32;
                    let ks: Vec<u32> = self.key_start.iter().map(|&s| s.max(first)).collect();
                    // q_i [B, 1, H·D] = column block i of q seen as [B, Tq·H·D]
                    let mut qi = be.uninit(self.batch * hd)?;
                    be.copy_cols(
                        &mut qi,
                        hd,
                        0,
                        q,
                        q_len * hd,
                        i * hd,
                        hd,
                        Accumulate::Overwrite,
                    )?;
                    let mut oi = be.uninit(self.batch * hd)?;
                    be.attention_decode(&mut oi, &qi, kc, vc, dims(1, p + 1), Some(&ks))?;
                    be.copy_cols(
                        &mut out,
                        q_len * hd,
                        i * hd,
                        &oi,
                        hd,
                        0,
                        hd,
                        Accumulate::Overwrite,
                    )?;
                }
            }
        }
        Ok(out)
    }

    /// Mark `q_len` more positions as filled (after every block has attended).
    pub fn advance(&mut self, q_len: usize) -> Result<()> {
        self.check_room(q_len)?;
        self.len += q_len;
        Ok(())
    }
}
