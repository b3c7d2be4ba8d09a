//! The one pre-norm decoder block every architecture runs: its forward and backward are
//! written here once, parametrised by a [`BlockDesc`] that an architecture's file builds
//! from its config — the norm, whether q/k/v are one fused linear, RoPE or not, the
//! attention's heads and scale, and a gated or plain MLP with its activation.
//!
//! ```text
//! ln1 = norm1(x);  q, k, v = ln1·Wqᵀ, ln1·Wkᵀ, ln1·Wvᵀ  (or split from ln1·Wqkv)
//! q, k = qk_norm(q), qk_norm(k)  (per head, if any);  q, k = rope(q), rope(k)
//! att = causal_attention(q, k, v)  (within a sliding window, if any)
//! h = x + post_attn_norm(att·Woᵀ)  (the norm only where the architecture has it)
//! ln2 = norm2(h);  act = act(ln2·Wgᵀ) ⊙ (ln2·Wuᵀ)  (or split from ln2·Wguᵀ; or act(ln2·Wfcᵀ))
//! y = h + post_mlp_norm(act·Wdᵀ)
//! ```
//!
//! Shapes: N = B·T tokens, C hidden, H query heads, KVH key/value heads, D head dim,
//! I MLP width. Every linear may carry LoRA ([`super::linear::Linear`]).

use super::kv_cache::KvCache;
use super::linear::{Linear, keep_for_backward};
use super::quantized::Weights;
use super::tiles::{Rows, Tile, TokenBytes, input_rows, rows_mut, rows_of, take_rows};
use super::{Keep, LinearSpec, StepShape, keep_in};
pub use crate::backend::Activation;
use crate::backend::{Accumulate, AttnDims, Backend, RopeAngles};
use crate::error::{Error, Result};
use crate::lora::BlockLora;

/// How a norm normalises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// `x / rms(x) · w`.
    Rms,
    /// `x / rms(x) · (1 + w)`, the 1 added in f32 (Gemma; its weights start at 0).
    RmsUnitOffset,
    /// `(x − mean) / std · w + b`.
    Layer,
}

impl NormKind {
    /// What an RMSNorm adds to its weight (1 for `(1 + w)`).
    fn w_offset(self) -> f32 {
        if self == NormKind::RmsUnitOffset {
            1.0
        } else {
            0.0
        }
    }
}

/// A norm of a block (or the final one): its kind, the weight's name without
/// `.weight` / `.bias`, and ε.
#[derive(Clone, Copy, Debug)]
pub struct NormDesc {
    pub kind: NormKind,
    pub name: &'static str,
    pub eps: f32,
}

/// How q, k and v are projected.
#[derive(Clone, Copy, Debug)]
pub enum Qkv {
    /// Three linears that read the same input.
    Separate {
        q: &'static str,
        k: &'static str,
        v: &'static str,
    },
    /// One linear whose output columns are `[q | k | v]` (GPT-2's `c_attn`).
    Fused(&'static str),
}

/// The first linears of a gated MLP: gate and up.
#[derive(Clone, Copy, Debug)]
pub enum GateUp {
    /// Two linears that read the same input.
    Separate {
        gate: &'static str,
        up: &'static str,
    },
    /// One linear whose output columns are `[gate | up]` (Phi-3's `gate_up_proj`).
    Fused(&'static str),
}

/// The MLP of a block.
#[derive(Clone, Copy, Debug)]
pub enum Mlp {
    /// `down(act(gate(x)) ⊙ up(x))`: SwiGLU with SiLU (Llama), GeGLU with GELU-tanh
    /// (Gemma).
    Gated {
        gate_up: GateUp,
        down: &'static str,
        act: Activation,
    },
    /// `proj(act(fc(x)))`.
    Plain {
        fc: &'static str,
        proj: &'static str,
        act: Activation,
    },
}

impl Mlp {
    /// The linear that maps the MLP back to the hidden size.
    fn down(&self) -> &'static str {
        match *self {
            Mlp::Gated { down, .. } => down,
            Mlp::Plain { proj, .. } => proj,
        }
    }
}

/// RMSNorms applied to each head of q and k after their projections, before RoPE
/// (Qwen3, Gemma 3): weights `[D]` shared by the heads.
#[derive(Clone, Copy, Debug)]
pub struct QkNorm {
    pub q: &'static str,
    pub k: &'static str,
    /// [`NormKind::Rms`] or [`NormKind::RmsUnitOffset`].
    pub kind: NormKind,
    pub eps: f32,
}

impl QkNorm {
    /// The norm of q (`q: true`) or k as a [`NormDesc`].
    fn desc(&self, q: bool) -> NormDesc {
        NormDesc {
            kind: self.kind,
            name: if q { self.q } else { self.k },
            eps: self.eps,
        }
    }
}

/// RoPE's inverse frequencies (`[D/2]`, scaling applied) of a layer.
#[derive(Clone, Copy, Debug)]
pub struct Rope<'m> {
    pub inv_freq: &'m [f32],
    /// LongRoPE (Phi-3): other frequencies for a call whose positions reach past
    /// `beyond` (`max(position) + 1 > beyond`), decided per call as transformers does.
    pub long: Option<(&'m [f32], usize)>,
}

impl<'m> Rope<'m> {
    /// The frequencies of a call at `positions`.
    pub fn for_positions(&self, positions: &[u32]) -> &'m [f32] {
        match self.long {
            Some((long, beyond))
                if positions
                    .iter()
                    .max()
                    .is_some_and(|&p| p as usize + 1 > beyond) =>
            {
                long
            }
            _ => self.inv_freq,
        }
    }
}

/// The attention of a block.
#[derive(Clone, Copy, Debug)]
pub struct AttnDesc<'m> {
    pub qkv: Qkv,
    /// Per-head norms of q and k, if the architecture has them.
    pub qk_norm: Option<QkNorm>,
    /// The output projection.
    pub o: &'static str,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·kᵀ before the softmax.
    pub scale: f32,
    /// RoPE's inverse frequencies, or none (learned positions).
    pub rope: Option<Rope<'m>>,
    /// A sliding window of this many keys (the query's own included), or full causal.
    pub window: Option<usize>,
}

/// Everything the generic block needs to know about one layer of an architecture.
#[derive(Clone, Debug)]
pub struct BlockDesc<'m> {
    pub hidden: usize,
    /// The linears of the block with their shapes, layouts and biases.
    pub linears: &'m [LinearSpec],
    pub norm1: NormDesc,
    pub attn: AttnDesc<'m>,
    /// A norm of the attention's output before the residual add (Gemma's
    /// `post_attention_layernorm`).
    pub post_attn_norm: Option<NormDesc>,
    pub norm2: NormDesc,
    pub mlp: Mlp,
    /// A norm of the MLP's output before the residual add (Gemma's
    /// `post_feedforward_layernorm`).
    pub post_mlp_norm: Option<NormDesc>,
}

/// A norm's saved statistics: the mean (LayerNorm only) and 1/std per row.
pub struct NormStats<B: Backend> {
    pub mean: Option<B::Buf>,
    pub rstd: B::Buf,
}

/// What one part of a block's forward keeps for its backward, for one tile or for the
/// whole call (typed: each field is one activation). Fields the backward is done with
/// are taken, freeing them early.
pub struct Saved<B: Backend> {
    /// Input of the q/k/v projections (norm1's output, or only its GEMM copy).
    pub ln1: Option<B::Buf>,
    pub norm1: Option<NormStats<B>>,
    /// With per-head q/k norms: q and k as projected, and the norms' statistics.
    pub q_pre: Option<B::Buf>,
    pub k_pre: Option<B::Buf>,
    pub q_norm: Option<NormStats<B>>,
    pub k_norm: Option<NormStats<B>>,
    /// q and k after RoPE.
    pub q: Option<B::Buf>,
    pub k: Option<B::Buf>,
    pub v: Option<B::Buf>,
    pub att: Option<B::Buf>,
    /// log-sum-exp of the attention rows.
    pub lse: Option<B::Buf>,
    /// With a post-attention norm: the attention's output projection, and the norm's
    /// statistics.
    pub attn_out: Option<B::Buf>,
    pub post_attn: Option<NormStats<B>>,
    /// The residual stream after attention.
    pub h: Option<B::Buf>,
    /// Input of the MLP's first linears (norm2's output, or its GEMM copy).
    pub ln2: Option<B::Buf>,
    pub norm2: Option<NormStats<B>>,
    /// Gated MLP: gate and up outputs; plain MLP: `up` holds the fc output.
    pub gate: Option<B::Buf>,
    pub up: Option<B::Buf>,
    /// Input of the down / proj linear.
    pub act: Option<B::Buf>,
    /// With a post-MLP norm: the down / proj output, and the norm's statistics.
    pub mlp_out: Option<B::Buf>,
    pub post_mlp: Option<NormStats<B>>,
    /// LoRA intermediates `t = drop(x)·Aᵀ`, by the linear's name.
    pub lora_t: Vec<(&'static str, B::Buf)>,
}

impl<B: Backend> Default for Saved<B> {
    fn default() -> Self {
        Saved {
            ln1: None,
            norm1: None,
            q_pre: None,
            k_pre: None,
            q_norm: None,
            k_norm: None,
            q: None,
            k: None,
            v: None,
            att: None,
            lse: None,
            attn_out: None,
            post_attn: None,
            h: None,
            ln2: None,
            norm2: None,
            gate: None,
            up: None,
            act: None,
            mlp_out: None,
            post_mlp: None,
            lora_t: Vec::new(),
        }
    }
}

/// What a block's forward keeps for its backward: each tile's activations before
/// attention (`pre`) and after it (`post`, none when the backward re-runs that part per
/// tile), and attention's q, k, v, output and lse for the whole call (`attn`).
pub struct BlockSaved<B: Backend> {
    pub pre: Vec<Saved<B>>,
    pub attn: Saved<B>,
    pub post: Vec<Saved<B>>,
}

impl<B: Backend> Default for BlockSaved<B> {
    fn default() -> Self {
        BlockSaved {
            pre: Vec::new(),
            attn: Saved::default(),
            post: Vec::new(),
        }
    }
}

impl<B: Backend> BlockSaved<B> {
    /// Bytes held, for memory accounting.
    pub fn bytes(&self) -> usize {
        self.pre
            .iter()
            .chain(&self.post)
            .map(Saved::bytes)
            .sum::<usize>()
            + self.attn.bytes()
    }
}

/// A saved activation the backward needs, or an internal error naming it.
pub(crate) fn need<'a, T>(x: &'a Option<T>, what: &str) -> Result<&'a T> {
    x.as_ref()
        .ok_or_else(|| Error::internal(format!("activation '{what}' was not saved")))
}

impl<B: Backend> Saved<B> {
    /// The LoRA intermediate of linear `name`.
    pub fn lora_t(&self, name: &str) -> Result<&B::Buf> {
        self.lora_t
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::internal(format!("activation '{name}.lora_t' was not saved")))
    }

    /// Bytes held, for memory accounting.
    pub fn bytes(&self) -> usize {
        use crate::backend::DeviceBuf;
        let one = |b: &Option<B::Buf>| b.as_ref().map_or(0, |b| b.bytes());
        let stats =
            |s: &Option<NormStats<B>>| s.as_ref().map_or(0, |s| s.rstd.bytes() + one(&s.mean));
        [
            &self.ln1,
            &self.q_pre,
            &self.k_pre,
            &self.q,
            &self.k,
            &self.v,
            &self.att,
            &self.lse,
            &self.attn_out,
            &self.h,
            &self.ln2,
            &self.gate,
            &self.up,
            &self.act,
            &self.mlp_out,
        ]
        .into_iter()
        .map(one)
        .sum::<usize>()
            + stats(&self.norm1)
            + stats(&self.norm2)
            + stats(&self.q_norm)
            + stats(&self.k_norm)
            + stats(&self.post_attn)
            + stats(&self.post_mlp)
            + self.lora_t.iter().map(|(_, t)| t.bytes()).sum::<usize>()
    }
}

impl<'m> BlockDesc<'m> {
    /// The frozen linear `name` of this block, over weights `w`.
    pub(crate) fn linear<'w, B: Backend>(
        &self,
        w: &'w Weights<'_, B>,
        name: &'static str,
    ) -> Result<Linear<'w, B>> {
        let spec = self
            .linears
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::internal(format!("no linear '{name}'")))?;
        Ok(Linear {
            name,
            w: w.get(&format!("{name}.weight"))?,
            bias: if spec.bias {
                Some(w.get(&format!("{name}.bias"))?)
            } else {
                None
            },
            layout: spec.layout,
            in_features: spec.in_features,
            out_features: spec.out_features,
        })
    }

    /// What this block's backward holds per token ([`TokenBytes`]), in f32 bytes.
    pub fn token_bytes(&self) -> TokenBytes {
        let a = &self.attn;
        let (c, heads) = (self.hidden as u64, a.n_heads as u64);
        let (qd, kvd) = self.qkv_widths();
        let (qd, kvd) = (qd as u64, kvd as u64);
        let qk_pre = if a.qk_norm.is_some() { qd + kvd } else { 0 };
        // x, dy; q, att, datt, dq; k, v, dk, dv; lse; q, k before their norms; the
        // kernels' half copies of q, dO, k, v (2·(qd + kvd) halves: qd + kvd f32s); the
        // LoRA intermediates (R a linear) are left out. An upper bound: they never all
        // coexist (the attention backward frees its inputs as it is done with them,
        // `Backend::attention_backward_owned`)
        let whole = 2 * c + 4 * qd + 4 * kvd + heads + qk_pre + (qd + kvd);
        let width = |name: &str| {
            self.linears
                .iter()
                .find(|l| l.name == name)
                .map_or(0, |l| l.in_features as u64)
        };
        // the down / proj linear's input is the MLP's width
        let i = width(self.mlp.down());
        // gated: gate, up, act, dact, dgate, dup (a fused [gate | up] copy in place of
        // act); plain: fc output, act, dact, dfc; with h, ln2, the output projection's,
        // dln2 and the post norms' rows
        let tile = match self.mlp {
            Mlp::Gated { .. } => 6 * i,
            Mlp::Plain { .. } => 4 * i,
        } + 6 * c;
        TokenBytes {
            whole: 4 * whole,
            tile: 4 * tile,
        }
    }

    fn attn_dims(&self, s: &StepShape) -> AttnDims {
        AttnDims {
            batch: s.batch,
            seq: s.seq,
            n_heads: self.attn.n_heads,
            n_kv_heads: self.attn.n_kv_heads,
            head_dim: self.attn.head_dim,
            scale: self.attn.scale,
        }
    }

    /// The block forward, attention over this call's tokens (training, evaluation) or,
    /// with a cache, over the cache they are appended to (generation). The per-token
    /// parts run over the tiles of `s` ([`StepShape::tiles`]); with `keep.saved()` what
    /// the backward reads is kept, per tile.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        lora: &BlockLora<B>,
        x: &B::Buf,
        s: &StepShape,
        keep: Keep,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Result<(Option<B::Buf>, BlockSaved<B>)> {
        let (n, c) = (s.tokens(), self.hidden);
        let (qd, _) = self.qkv_widths();
        let mut bs = self.forward_attention(be, w, lora, x, s, keep, cache)?;
        let att = bs
            .attn
            .att
            .take()
            .ok_or_else(|| Error::internal("attention output"))?;
        let mut y = Rows::new(n, c);
        for t in s.tiles() {
            let x_t = input_rows(be, x, t, n, c)?;
            let att_t = rows_of(be, &att, t, n, qd)?;
            let (y_t, sv) = self.post_forward(be, w, lora, &x_t, &att_t, t, keep)?;
            if let Some(y_t) = y_t {
                y.put(be, t, y_t)?;
            }
            if keep.saved() {
                bs.post.push(sv);
            }
        }
        if keep.saved() {
            bs.attn.att = Some(att);
        }
        let y = if keep.output() {
            Some(y.finish(be)?)
        } else {
            None
        };
        Ok((y, bs))
    }

    /// The block up to and including attention: norm1, the q/k/v projections, their
    /// norms and RoPE over the tiles of `s`, then attention over the whole call (or the
    /// cache). Returns the attention's output in `attn.att` and, with `keep.saved()`,
    /// what the backward reads (q, k, v and lse; each tile's projection inputs).
    #[allow(clippy::too_many_arguments)]
    fn forward_attention<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        lora: &BlockLora<B>,
        x: &B::Buf,
        s: &StepShape,
        keep: Keep,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Result<BlockSaved<B>> {
        // the block's LoRA GEMM copies at once, before its first linear
        lora.make_gemm_copies(be, |name| Ok(self.linear(w, name)?.w))?;
        let a = &self.attn;
        let (n, c) = (s.tokens(), self.hidden);
        let (qd, kvd) = self.qkv_widths();
        // LongRoPE chooses its frequencies by the whole call's positions, not a tile's
        let inv_freq = a.rope.map(|r| r.for_positions(&s.positions));
        let mut bs = BlockSaved::default();
        // the attention kernels read q, k, v as `Backend::attention_operand` makes them;
        // the cache keeps them as projected (f32)
        let operands = cache.is_none();
        let (mut q, mut k, mut v) = (Rows::new(n, qd), Rows::new(n, kvd), Rows::new(n, kvd));
        for t in s.tiles() {
            let x_t = input_rows(be, x, t, n, c)?;
            let ([q_t, k_t, v_t], sv) =
                self.pre_forward(be, w, lora, &x_t, s, t, inv_freq, keep, operands)?;
            q.put(be, t, q_t)?;
            k.put(be, t, k_t)?;
            v.put(be, t, v_t)?;
            if keep.saved() {
                bs.pre.push(sv);
            }
        }
        let (q, k, v) = (q.finish(be)?, k.finish(be)?, v.finish(be)?);
        // att[N, H·D] = causal_attention(q, k, v), or over the cache that k, v join
        let (att, lse) = match cache {
            Some((cache, layer)) => (
                cache.attend(be, layer, &q, &k, &v, s.seq, a.scale, a.window)?,
                None,
            ),
            None => {
                // every query attends at least to itself: out and lse of every row written
                let mut att = be.uninit(n * qd)?;
                let mut lse = be.uninit(s.batch * a.n_heads * s.seq)?;
                be.attention_forward(
                    &mut att,
                    &mut lse,
                    &q,
                    &k,
                    &v,
                    self.attn_dims(s),
                    s.key_start_within(a.window).as_deref(),
                )?;
                (att, Some(lse))
            }
        };
        if keep.saved() {
            let lse = lse.ok_or_else(|| Error::internal("a cached forward keeps nothing"))?;
            bs.attn.lse = Some(lse);
            (bs.attn.q, bs.attn.k, bs.attn.v) = (Some(q), Some(k), Some(v));
        }
        bs.attn.att = Some(att);
        Ok(bs)
    }

    /// norm1, the q/k/v projections, their per-head norms and RoPE (at `inv_freq`) on the
    /// rows `x` of tile `t`: the tile's q, k, v rows (as attention operands with
    /// `operands`, [`Backend::attention_operand`]; else f32) and, with `keep.saved()`,
    /// what their backward reads.
    #[allow(clippy::too_many_arguments)]
    fn pre_forward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        lora: &BlockLora<B>,
        x: &B::Buf,
        s: &StepShape,
        t: Tile,
        inv_freq: Option<&[f32]>,
        keep: Keep,
        operands: bool,
    ) -> Result<([B::Buf; 3], Saved<B>)> {
        let a = &self.attn;
        let n = t.rows;
        let mut sv = Saved::default();
        // ln1[n, C] = norm1(x); only GEMMs read it unless LoRA drops its input out
        let (ln1, stats1) = self.input_norm(be, w, &self.norm1, x, n, self.qkv_first(), lora)?;
        // q[n, H·D], k, v[n, KVH·D]
        let (in1, mut q, mut k, mut v) = match a.qkv {
            Qkv::Separate { q, k, v } => {
                let (lq, lk, lv) = (self.linear(w, q)?, self.linear(w, k)?, self.linear(w, v)?);
                let in1 = lq.input_from(&ln1, t.start);
                let [q, k, v] = Linear::forward_group(
                    [&lq, &lk, &lv],
                    be,
                    &in1,
                    n,
                    lora,
                    keep_in(keep, &mut sv),
                )?;
                (in1, q, k, v)
            }
            Qkv::Fused(name) => {
                let wa = self.linear(w, name)?;
                let in1 = wa.input_from(&ln1, t.start);
                let qkv = wa.forward(be, &in1, n, lora, keep_in(keep, &mut sv))?;
                let [q, k, v] = self.split_qkv(be, &qkv, n)?;
                (in1, q, k, v)
            }
        };
        // per-head norms: rows of D
        let mut qk_saved = None;
        if let Some(qn) = a.qk_norm {
            let d = a.head_dim;
            let (qo, qs) = norm_forward(be, w, &qn.desc(true), &q, n * a.n_heads, d)?;
            let (ko, ks) = norm_forward(be, w, &qn.desc(false), &k, n * a.n_kv_heads, d)?;
            let (q_pre, k_pre) = (std::mem::replace(&mut q, qo), std::mem::replace(&mut k, ko));
            qk_saved = Some((q_pre, k_pre, qs, ks));
        }
        let rope = inv_freq.map(|inv_freq| RopeAngles {
            positions: t.of(&s.positions),
            inv_freq,
        });
        if operands {
            let d = a.head_dim;
            q = be.attention_operand(q, rope, a.n_heads, d)?;
            k = be.attention_operand(k, rope, a.n_kv_heads, d)?;
            v = be.attention_operand(v, None, a.n_kv_heads, d)?;
        } else if let Some(r) = rope {
            be.rope_forward(&mut q, r.positions, r.inv_freq, a.n_heads)?;
            be.rope_forward(&mut k, r.positions, r.inv_freq, a.n_kv_heads)?;
        }
        if keep.saved() {
            // ln1 is read by the backward only as the projections' input. A checkpointed
            // re-run (`SavedOnly`) keeps neither it nor its statistics across attention:
            // the backward makes them again from the tile's rows of x, which is cheaper
            // than holding them for the whole call
            if keep == Keep::OutputAndSaved {
                sv.ln1 = Some(keep_for_backward(in1.into_gemm_copy(), ln1, lora.dropout));
                sv.norm1 = Some(stats1);
            }
            if let Some((q_pre, k_pre, qs, ks)) = qk_saved {
                (sv.q_pre, sv.k_pre) = (Some(q_pre), Some(k_pre));
                (sv.q_norm, sv.k_norm) = (Some(qs), Some(ks));
            }
        }
        Ok(([q, k, v], sv))
    }

    /// The block after attention on the rows of tile `t` (`x` the block input's, `att`
    /// the attention output's): the output projection, the residual, norm2, the MLP and
    /// the residual again. Returns the tile's output rows (unless `keep` is
    /// [`Keep::SavedOnly`]) and, with `keep.saved()`, what the backward reads.
    #[allow(clippy::too_many_arguments)]
    fn post_forward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        lora: &BlockLora<B>,
        x: &B::Buf,
        att: &B::Buf,
        t: Tile,
        keep: Keep,
    ) -> Result<(Option<B::Buf>, Saved<B>)> {
        let a = &self.attn;
        let n = t.rows;
        let mut sv = Saved::default();
        // h[n, C] = x + att · Woᵀ, or x + post_attn_norm(att · Woᵀ)
        let wo = self.linear(w, a.o)?;
        let o = wo.forward(
            be,
            &wo.input_from(att, t.start),
            n,
            lora,
            keep_in(keep, &mut sv),
        )?;
        let (h, post_attn) = match &self.post_attn_norm {
            None => {
                let mut h = o;
                be.axpy(&mut h, 1.0, x, Accumulate::Add)?;
                (h, None)
            }
            Some(pn) => {
                let (mut h, st) = norm_forward(be, w, pn, &o, n, self.hidden)?;
                be.axpy(&mut h, 1.0, x, Accumulate::Add)?;
                (h, Some((o, st)))
            }
        };
        // ln2 = norm2(h)
        let (ln2, stats2) = self.input_norm(be, w, &self.norm2, &h, n, self.mlp_first(), lora)?;
        // act[n, I] = act(ln2·Wgᵀ) · (ln2·Wuᵀ), or act(ln2·Wfcᵀ)
        let (in2, gate, up, act) = match self.mlp {
            Mlp::Gated { gate_up, act, .. } => {
                let (in2, g, u) = match gate_up {
                    GateUp::Separate { gate, up } => {
                        let (lg, lu) = (self.linear(w, gate)?, self.linear(w, up)?);
                        let in2 = lg.input_from(&ln2, t.start);
                        let [g, u] = Linear::forward_group(
                            [&lg, &lu],
                            be,
                            &in2,
                            n,
                            lora,
                            keep_in(keep, &mut sv),
                        )?;
                        (in2, g, u)
                    }
                    GateUp::Fused(gate_up) => {
                        let wgu = self.linear(w, gate_up)?;
                        let in2 = wgu.input_from(&ln2, t.start);
                        let gu = wgu.forward(be, &in2, n, lora, keep_in(keep, &mut sv))?;
                        let i = wgu.out_features / 2;
                        let [g, u] = split_cols(be, &gu, n, [i, i])?;
                        (in2, g, u)
                    }
                };
                // only the down GEMM reads act, unless LoRA drops its input out
                let mut a = if lora.dropout == 0.0 {
                    be.gemm_output(g.len_of(), self.linear(w, self.mlp.down())?.w)?
                } else {
                    be.uninit(g.len_of())?
                };
                be.gated_forward(act, &mut a, &g, &u)?;
                (in2, Some(g), u, a)
            }
            Mlp::Plain { fc, act, .. } => {
                let wf = self.linear(w, fc)?;
                let in2 = wf.input_from(&ln2, t.start);
                let f = wf.forward(be, &in2, n, lora, keep_in(keep, &mut sv))?;
                let mut a = be.uninit(f.len_of())?;
                match act {
                    Activation::GeluTanh => be.gelu_forward(&mut a, &f)?,
                    Activation::Silu => {
                        return Err(Error::internal("a plain MLP with SiLU has no kernel"));
                    }
                }
                (in2, None, f, a)
            }
        };
        // y[n, C] = h + act · Wdᵀ, or h + post_mlp_norm(act · Wdᵀ)
        let wd = self.linear(w, self.mlp.down())?;
        let ia = wd.input_from(&act, t.start);
        let (y, post_mlp) = match &self.post_mlp_norm {
            None => (
                wd.forward_residual(be, &ia, &h, n, lora, keep, &mut sv)?,
                None,
            ),
            Some(pn) => {
                // the backward reads the down output, so a recompute computes it too
                let m = wd.forward(be, &ia, n, lora, keep_in(keep, &mut sv))?;
                let (mut y, st) = norm_forward(be, w, pn, &m, n, self.hidden)?;
                let y = if keep.output() {
                    be.axpy(&mut y, 1.0, &h, Accumulate::Add)?;
                    Some(y)
                } else {
                    None
                };
                (y, Some((m, st)))
            }
        };
        if keep.saved() {
            // ln2 and act are read by the backward only as linear inputs
            let p = lora.dropout;
            sv.ln2 = Some(keep_for_backward(in2.into_gemm_copy(), ln2, p));
            sv.act = Some(keep_for_backward(ia.into_gemm_copy(), act, p));
            if let Some((o, st)) = post_attn {
                (sv.attn_out, sv.post_attn) = (Some(o), Some(st));
            }
            if let Some((m, st)) = post_mlp {
                (sv.mlp_out, sv.post_mlp) = (Some(m), Some(st));
            }
            sv.norm2 = Some(stats2);
            sv.h = Some(h);
            sv.gate = gate;
            sv.up = Some(up);
        }
        Ok((y, sv))
    }

    /// The first linear that reads norm1's output (q, or the fused qkv).
    fn qkv_first(&self) -> &'static str {
        match self.attn.qkv {
            Qkv::Separate { q, .. } => q,
            Qkv::Fused(name) => name,
        }
    }

    /// The first linear that reads norm2's output (gate, the fused gate_up, or fc).
    fn mlp_first(&self) -> &'static str {
        match self.mlp {
            Mlp::Gated {
                gate_up: GateUp::Separate { gate, .. },
                ..
            } => gate,
            Mlp::Gated {
                gate_up: GateUp::Fused(name),
                ..
            } => name,
            Mlp::Plain { fc, .. } => fc,
        }
    }

    /// A norm whose output is the input of the linears led by `first`: written for their
    /// GEMMs ([`norm_forward_into`]) unless LoRA dropout reads it in f32.
    #[allow(clippy::too_many_arguments)]
    fn input_norm<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        d: &NormDesc,
        x: &B::Buf,
        n: usize,
        first: &'static str,
        lora: &BlockLora<B>,
    ) -> Result<(B::Buf, NormStats<B>)> {
        let gemm_w = if lora.dropout == 0.0 {
            Some(self.linear(w, first)?.w)
        } else {
            None
        };
        norm_forward_into(be, w, d, x, n, self.hidden, gemm_w)
    }

    /// q, k, v `[N, H·D]`, `[N, KVH·D]` ×2 as column blocks of a fused projection.
    fn split_qkv<B: Backend>(&self, be: &B, qkv: &B::Buf, n: usize) -> Result<[B::Buf; 3]> {
        let (qd, kvd) = self.qkv_widths();
        split_cols(be, qkv, n, [qd, kvd, kvd])
    }

    fn qkv_widths(&self) -> (usize, usize) {
        let a = &self.attn;
        (a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim)
    }

    /// Block backward: from `dy` (taken: its memory becomes dx's) and what the forward on
    /// `x` kept (`sv`), returns dx and adds the LoRA gradients into `lora`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        lora: &mut BlockLora<B>,
        x: &B::Buf,
        sv: &mut BlockSaved<B>,
        dy: B::Buf,
        s: &StepShape,
    ) -> Result<B::Buf> {
        self.backward_tiles(be, w, lora, x, sv, dy, s, false)
    }

    /// The backward of a checkpointed block: the forward re-run from its input `x` up to
    /// attention, then, tile by tile, the rest of the forward re-run (without the output,
    /// which the first forward produced: the last linear's frozen GEMM and the residual
    /// add are skipped) and at once its backward, so that only one tile's MLP activations
    /// exist at a time; then attention's backward over the whole call and the first
    /// half's, tile by tile. Returns dx (in `dy`'s memory).
    #[allow(clippy::too_many_arguments)]
    pub fn recompute_backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        lora: &mut BlockLora<B>,
        x: &B::Buf,
        dy: B::Buf,
        s: &StepShape,
    ) -> Result<B::Buf> {
        let mut bs = self.forward_attention(be, w, lora, x, s, Keep::SavedOnly, None)?;
        self.backward_tiles(be, w, lora, x, &mut bs, dy, s, true)
    }

    /// The backward over the tiles of `s`: per tile the part after attention (its saved
    /// activations taken from `bs.post`, or with `recompute` made again from the tile's
    /// rows), turning `dy`'s rows into the residual stream's gradient dh and giving the
    /// attention output's; then attention over the whole call (dK and dV need every
    /// query tile); then per tile the part before attention, adding its input gradient
    /// into dh. dh is then dx.
    #[allow(clippy::too_many_arguments)]
    fn backward_tiles<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        lora: &mut BlockLora<B>,
        x: &B::Buf,
        bs: &mut BlockSaved<B>,
        mut dy: B::Buf,
        s: &StepShape,
        recompute: bool,
    ) -> Result<B::Buf> {
        let (n, c) = (s.tokens(), self.hidden);
        let (qd, kvd) = self.qkv_widths();
        let tiles: Vec<Tile> = s.tiles().collect();
        if bs.pre.len() != tiles.len() || (!recompute && bs.post.len() != tiles.len()) {
            return Err(Error::internal(format!(
                "{} tiles, but the forward kept {} and {}",
                tiles.len(),
                bs.pre.len(),
                bs.post.len()
            )));
        }
        let mut datt = Rows::new(n, qd);
        {
            let att = need(&bs.attn.att, "att")?;
            for (i, &t) in tiles.iter().enumerate() {
                let att_t = rows_of(be, att, t, n, qd)?;
                let mut sv = if recompute {
                    let x_t = input_rows(be, x, t, n, c)?;
                    self.post_forward(be, w, lora, &x_t, &att_t, t, Keep::SavedOnly)?
                        .1
                } else {
                    std::mem::take(&mut bs.post[i])
                };
                let datt_t = rows_mut(be, &mut dy, t, n, c, |dy_t| {
                    self.post_backward(be, w, lora, &mut sv, dy_t, &att_t, t)
                })?;
                // stored as the attention backward reads it (bf16 on CUDA's tensor cores:
                // the whole call's dout at half the memory, rounded as the kernels would)
                let (h, d) = (self.attn.n_heads, self.attn.head_dim);
                datt.put(be, t, be.attention_operand(datt_t, None, h, d)?)?;
            }
        }
        let datt = datt.finish(be)?;
        // att = attention(q, k, v)
        let (dq, dk, dv) = self.attention_backward(be, &mut bs.attn, datt, s)?;
        let inv_freq = self.attn.rope.map(|r| r.for_positions(&s.positions));
        let (mut dq, mut dk, mut dv) = (Some(dq), Some(dk), Some(dv));
        for (i, &t) in tiles.iter().enumerate() {
            let x_t = input_rows(be, x, t, n, c)?;
            let d = [
                take_rows(be, &mut dq, t, n, qd)?,
                take_rows(be, &mut dk, t, n, kvd)?,
                take_rows(be, &mut dv, t, n, kvd)?,
            ];
            let mut sv = std::mem::take(&mut bs.pre[i]);
            rows_mut(be, &mut dy, t, n, c, |dh_t| {
                self.pre_backward(be, w, lora, &mut sv, &x_t, d, dh_t, s, t, inv_freq)
            })?;
        }
        Ok(dy)
    }

    /// Backward of [`Self::post_forward`] on tile `t` (`att` the attention output's rows):
    /// turns `dy`, the tile's rows of the block output's gradient, into dh, the
    /// residual stream's after attention, in place; returns the gradient of `att`.
    #[allow(clippy::too_many_arguments)]
    fn post_backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        lora: &mut BlockLora<B>,
        sv: &mut Saved<B>,
        dy: &mut B::Buf,
        att: &B::Buf,
        t: Tile,
    ) -> Result<B::Buf> {
        let a = &self.attn;
        let (c, n) = (self.hidden, t.rows);
        let (qd, _) = self.qkv_widths();

        // y = h + m, m = act·Wdᵀ (or post_mlp_norm of it)  ⇒  dh = dy (residual), dm
        // (outputs of an `Overwrite` backward or of an elementwise kernel start uninit)
        let post_mlp_grad = match &self.post_mlp_norm {
            None => None,
            Some(pn) => Some(self.post_norm_backward(
                be,
                w,
                pn,
                dy,
                sv.mlp_out.take(),
                sv.post_mlp.take(),
                "mlp",
            )?),
        };
        let dm = post_mlp_grad.as_ref().unwrap_or(dy);
        // m = act·Wdᵀ  ⇒  dact = dm·Wd
        let wd = self.linear(w, self.mlp.down())?;
        let mut dact = be.uninit(n * wd.in_features)?;
        wd.backward(
            be,
            &mut dact,
            dm,
            &wd.input_from(need(&sv.act, "act")?, t.start),
            n,
            lora,
            sv,
            Accumulate::Overwrite,
        )?;
        drop(post_mlp_grad);
        sv.act = None;
        let mut dln2 = be.uninit(n * c)?;
        match self.mlp {
            Mlp::Gated { gate_up, act, .. } => {
                // act = act(g)·u; separate gate and up read dg, du only in their GEMMs
                let (mut dg, mut du) = match gate_up {
                    GateUp::Separate { gate, .. } => {
                        let gw = self.linear(w, gate)?.w;
                        (
                            be.gemm_output(dact.len_of(), gw)?,
                            be.gemm_output(dact.len_of(), gw)?,
                        )
                    }
                    GateUp::Fused(_) => (be.uninit(dact.len_of())?, be.uninit(dact.len_of())?),
                };
                be.gated_backward(
                    act,
                    &mut dg,
                    &mut du,
                    &dact,
                    need(&sv.gate, "gate")?,
                    need(&sv.up, "up")?,
                )?;
                drop(dact);
                (sv.gate, sv.up) = (None, None);
                match gate_up {
                    GateUp::Separate { gate, up } => {
                        // g = ln2·Wgᵀ, u = ln2·Wuᵀ
                        let (lg, lu) = (self.linear(w, gate)?, self.linear(w, up)?);
                        let in2 = lg.input_from(need(&sv.ln2, "ln2")?, t.start);
                        Linear::backward_group(
                            [&lg, &lu],
                            be,
                            &mut dln2,
                            [&dg, &du],
                            &in2,
                            n,
                            lora,
                            sv,
                            Accumulate::Overwrite,
                        )?;
                    }
                    GateUp::Fused(gate_up) => {
                        // [g | u] = ln2·Wguᵀ; the two copies cover every column of dgu
                        let i = dg.len_of() / n.max(1);
                        let mut dgu = be.uninit(n * 2 * i)?;
                        be.copy_cols(&mut dgu, 2 * i, 0, &dg, i, 0, i, Accumulate::Overwrite)?;
                        be.copy_cols(&mut dgu, 2 * i, i, &du, i, 0, i, Accumulate::Overwrite)?;
                        drop((dg, du));
                        let wgu = self.linear(w, gate_up)?;
                        wgu.backward(
                            be,
                            &mut dln2,
                            &dgu,
                            &wgu.input_from(need(&sv.ln2, "ln2")?, t.start),
                            n,
                            lora,
                            sv,
                            Accumulate::Overwrite,
                        )?;
                    }
                }
            }
            Mlp::Plain { fc, act, .. } => {
                // act = act(f)
                let mut df = be.uninit(dact.len_of())?;
                match act {
                    Activation::GeluTanh => {
                        be.gelu_backward(&mut df, &dact, need(&sv.up, "fc output")?)?
                    }
                    Activation::Silu => {
                        return Err(Error::internal("a plain MLP with SiLU has no kernel"));
                    }
                }
                drop(dact);
                sv.up = None;
                // f = ln2·Wfcᵀ
                let wf = self.linear(w, fc)?;
                wf.backward(
                    be,
                    &mut dln2,
                    &df,
                    &wf.input_from(need(&sv.ln2, "ln2")?, t.start),
                    n,
                    lora,
                    sv,
                    Accumulate::Overwrite,
                )?;
            }
        }
        // ln2 = norm2(h)  ⇒  dh = dy + norm2_backward(dln2), in dy's memory
        norm_backward(
            be,
            w,
            &self.norm2,
            dy,
            &dln2,
            need(&sv.h, "h")?,
            need(&sv.norm2, "norm2")?,
            Accumulate::Add,
        )?;
        drop(dln2);
        let dh = &*dy;
        // h = x + o (or post_attn_norm(o)), o = att·Woᵀ  ⇒  do, datt = do·Wo
        let post_attn_grad = match &self.post_attn_norm {
            None => None,
            Some(pn) => Some(self.post_norm_backward(
                be,
                w,
                pn,
                dh,
                sv.attn_out.take(),
                sv.post_attn.take(),
                "attention",
            )?),
        };
        let mut datt = be.uninit(n * qd)?;
        let wo = self.linear(w, a.o)?;
        wo.backward(
            be,
            &mut datt,
            post_attn_grad.as_ref().unwrap_or(dh),
            &wo.input_from(att, t.start),
            n,
            lora,
            sv,
            Accumulate::Overwrite,
        )?;
        Ok(datt)
    }

    /// Backward of [`Self::pre_forward`] on tile `t` (`x` the block input's rows): from the
    /// gradients of the tile's q, k, v rows (`d`), adds the gradient of `x` into `dh`.
    #[allow(clippy::too_many_arguments)]
    fn pre_backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        lora: &mut BlockLora<B>,
        sv: &mut Saved<B>,
        x: &B::Buf,
        d: [B::Buf; 3],
        dh: &mut B::Buf,
        s: &StepShape,
        t: Tile,
        inv_freq: Option<&[f32]>,
    ) -> Result<()> {
        let a = &self.attn;
        let (c, n) = (self.hidden, t.rows);
        let [mut dq, mut dk, dv] = d;
        // q, k were rotated in place after their projections
        if let Some(inv_freq) = inv_freq {
            let positions = t.of(&s.positions);
            be.rope_backward(&mut dq, positions, inv_freq, a.n_heads)?;
            be.rope_backward(&mut dk, positions, inv_freq, a.n_kv_heads)?;
        }
        // q, k = per-head norms of the projections
        if let Some(qn) = a.qk_norm {
            let per_head = |d: &B::Buf, is_q: bool| -> Result<B::Buf> {
                let (pre, st) = if is_q {
                    (&sv.q_pre, &sv.q_norm)
                } else {
                    (&sv.k_pre, &sv.k_norm)
                };
                let mut d_pre = be.uninit(d.len_of())?;
                norm_backward(
                    be,
                    w,
                    &qn.desc(is_q),
                    &mut d_pre,
                    d,
                    need(pre, "q/k before its norm")?,
                    need(st, "q/k norm")?,
                    Accumulate::Overwrite,
                )?;
                Ok(d_pre)
            };
            (dq, dk) = (per_head(&dq, true)?, per_head(&dk, false)?);
            (sv.q_pre, sv.k_pre, sv.q_norm, sv.k_norm) = (None, None, None, None);
        }
        if sv.ln1.is_none() {
            // a checkpointed re-run kept neither: norm1 of the same rows gives the same
            let (ln1, stats1) =
                self.input_norm(be, w, &self.norm1, x, n, self.qkv_first(), lora)?;
            (sv.ln1, sv.norm1) = (Some(ln1), Some(stats1));
        }
        let mut dln1 = be.uninit(n * c)?;
        match a.qkv {
            Qkv::Separate { q, k, v } => {
                let (lq, lk, lv) = (self.linear(w, q)?, self.linear(w, k)?, self.linear(w, v)?);
                let in1 = lq.input_from(need(&sv.ln1, "ln1")?, t.start);
                Linear::backward_group(
                    [&lq, &lk, &lv],
                    be,
                    &mut dln1,
                    [&dq, &dk, &dv],
                    &in1,
                    n,
                    lora,
                    sv,
                    Accumulate::Overwrite,
                )?;
            }
            Qkv::Fused(name) => {
                // q, k, v = column blocks of qkv; the three copies cover every column
                let (qd, kvd) = self.qkv_widths();
                let total = qd + 2 * kvd;
                let mut dqkv = be.uninit(n * total)?;
                let mut off = 0;
                for (d, width) in [(&dq, qd), (&dk, kvd), (&dv, kvd)] {
                    be.copy_cols(
                        &mut dqkv,
                        total,
                        off,
                        d,
                        width,
                        0,
                        width,
                        Accumulate::Overwrite,
                    )?;
                    off += width;
                }
                drop((dq, dk, dv));
                let wa = self.linear(w, name)?;
                wa.backward(
                    be,
                    &mut dln1,
                    &dqkv,
                    &wa.input_from(need(&sv.ln1, "ln1")?, t.start),
                    n,
                    lora,
                    sv,
                    Accumulate::Overwrite,
                )?;
            }
        }
        // ln1 = norm1(x)  ⇒  dx = dh + norm1_backward(dln1)
        norm_backward(
            be,
            w,
            &self.norm1,
            dh,
            &dln1,
            x,
            need(&sv.norm1, "norm1")?,
            Accumulate::Add,
        )
    }

    /// `d(input)` of a post norm (of the attention's or the MLP's output, `what`) from the
    /// gradient of its output and what its forward saved.
    #[allow(clippy::too_many_arguments)]
    fn post_norm_backward<B: Backend>(
        &self,
        be: &B,
        w: &Weights<'_, B>,
        d: &NormDesc,
        dout: &B::Buf,
        input: Option<B::Buf>,
        stats: Option<NormStats<B>>,
        what: &str,
    ) -> Result<B::Buf> {
        let missing = |x| Error::internal(format!("the post-{what} norm's {x} was not saved"));
        let input = input.ok_or_else(|| missing("input"))?;
        let stats = stats.ok_or_else(|| missing("statistics"))?;
        let mut dx = be.uninit(input.len_of())?;
        norm_backward(
            be,
            w,
            d,
            &mut dx,
            dout,
            &input,
            &stats,
            Accumulate::Overwrite,
        )?;
        Ok(dx)
    }

    /// Backward of the causal attention on the saved `q`, `k`, `v` (after RoPE), output
    /// `att` and `lse` of the whole call and the output's gradient `datt`: returns (dq,
    /// dk, dv). Nothing after it reads its inputs, so they are handed over to be freed
    /// as soon as the backend is done with them ([`Backend::attention_backward_owned`]).
    fn attention_backward<B: Backend>(
        &self,
        be: &B,
        sv: &mut Saved<B>,
        datt: B::Buf,
        s: &StepShape,
    ) -> Result<(B::Buf, B::Buf, B::Buf)> {
        let take = |b: &mut Option<B::Buf>, what: &str| {
            b.take()
                .ok_or_else(|| Error::internal(format!("activation '{what}' was not saved")))
        };
        let (q, k, v) = (
            take(&mut sv.q, "q")?,
            take(&mut sv.k, "k")?,
            take(&mut sv.v, "v")?,
        );
        let att = take(&mut sv.att, "att")?;
        let lse = take(&mut sv.lse, "lse")?;
        be.attention_backward_owned(
            datt,
            att,
            &lse,
            q,
            k,
            v,
            self.attn_dims(s),
            s.key_start_within(self.attn.window).as_deref(),
        )
    }
}

/// The column blocks of `x` `[N, Σ widths]`, each `[N, width]`, in order.
fn split_cols<B: Backend, const K: usize>(
    be: &B,
    x: &B::Buf,
    n: usize,
    widths: [usize; K],
) -> Result<[B::Buf; K]> {
    let total: usize = widths.iter().sum();
    let mut off = 0;
    let mut out = Vec::with_capacity(K);
    for width in widths {
        // all `width` columns of every row copied
        let mut p = be.uninit(n * width)?;
        be.copy_cols(
            &mut p,
            width,
            0,
            x,
            total,
            off,
            width,
            Accumulate::Overwrite,
        )?;
        out.push(p);
        off += width;
    }
    out.try_into().map_err(|_| Error::internal("column split"))
}

/// `norm(x)` `[N, C]` and its statistics (every row of out, mean and rstd written).
pub(crate) fn norm_forward<B: Backend>(
    be: &B,
    w: &Weights<'_, B>,
    d: &NormDesc,
    x: &B::Buf,
    n: usize,
    c: usize,
) -> Result<(B::Buf, NormStats<B>)> {
    norm_forward_into(be, w, d, x, n, c, None)
}

/// [`norm_forward`], or, given `gemm_w`, of a norm whose output only the linears beside
/// that weight read: an RMSNorm then writes it in the type their GEMMs read
/// ([`Backend::gemm_output`]), the values the cast before those GEMMs would make, so no
/// cast follows. A LayerNorm writes f32.
fn norm_forward_into<B: Backend>(
    be: &B,
    w: &Weights<'_, B>,
    d: &NormDesc,
    x: &B::Buf,
    n: usize,
    c: usize,
    gemm_w: Option<&B::Buf>,
) -> Result<(B::Buf, NormStats<B>)> {
    let mut out = match (d.kind, gemm_w) {
        (NormKind::Rms | NormKind::RmsUnitOffset, Some(gw)) => be.gemm_output(n * c, gw)?,
        _ => be.uninit(n * c)?,
    };
    let mut rstd = be.uninit(n)?;
    let weight = w.get(&format!("{}.weight", d.name))?;
    let mean = match d.kind {
        NormKind::Rms | NormKind::RmsUnitOffset => {
            be.rms_norm_forward(&mut out, &mut rstd, x, weight, d.kind.w_offset(), d.eps)?;
            None
        }
        NormKind::Layer => {
            let mut mean = be.uninit(n)?;
            let bias = w.get(&format!("{}.bias", d.name))?;
            be.layer_norm_forward(&mut out, &mut mean, &mut rstd, x, weight, bias, d.eps)?;
            Some(mean)
        }
    };
    Ok((out, NormStats { mean, rstd }))
}

/// `dx (=|+=) norm_backward(dout)` for the forward on `x` with statistics `st`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_backward<B: Backend>(
    be: &B,
    w: &Weights<'_, B>,
    d: &NormDesc,
    dx: &mut B::Buf,
    dout: &B::Buf,
    x: &B::Buf,
    st: &NormStats<B>,
    acc: Accumulate,
) -> Result<()> {
    let weight = w.get(&format!("{}.weight", d.name))?;
    match d.kind {
        NormKind::Rms | NormKind::RmsUnitOffset => {
            be.rms_norm_backward(dx, dout, x, weight, d.kind.w_offset(), &st.rstd, acc)
        }
        NormKind::Layer => {
            let mean = st
                .mean
                .as_ref()
                .ok_or_else(|| Error::internal("a LayerNorm saved no mean"))?;
            be.layer_norm_backward(dx, dout, x, weight, mean, &st.rstd, acc)
        }
    }
}

/// Element counts of buffers, for sizing outputs.
trait LenOf {
    fn len_of(&self) -> usize;
}

impl<D: crate::backend::DeviceBuf> LenOf for D {
    fn len_of(&self) -> usize {
        self.len()
    }
}
