//! Model definitions: parameter names and shapes, and each block's forward and backward
//! composed from backend ops. Adding an architecture means adding one file here and one
//! arm to [`Model`]; the trainer never looks inside.

pub mod family;
pub mod gpt2;
pub mod kv_cache;
pub mod linear;
pub mod llama;

use crate::backend::{Backend, DeviceBuf};
use crate::config::{Arch, ModelConfig};
use crate::error::{Error, Result};
use crate::lora::BlockLora;
use std::collections::HashMap;

/// Frozen weights of one group (a block, or the head), on the device, keyed by their name
/// relative to the group's prefix (e.g. `self_attn.q_proj.weight`).
pub struct LayerWeights<B: Backend> {
    pub tensors: HashMap<String, B::Buf>,
}

impl<B: Backend> LayerWeights<B> {
    /// The tensor called `name`; the index was validated at open, so a miss is a bug in
    /// the model file (reported, not panicked).
    pub fn get(&self, name: &str) -> Result<&B::Buf> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::config(format!("internal: layer weights lack '{name}'")))
    }

    /// The tensor called `name` when the model has it (optional biases).
    pub fn opt(&self, name: &str) -> Option<&B::Buf> {
        self.tensors.get(name)
    }

    /// Elements held, for memory accounting.
    pub fn numel(&self) -> usize {
        self.tensors.values().map(|b| b.len()).sum()
    }
}

/// Activations a block's forward keeps for its backward, by name.
pub struct Saved<B: Backend> {
    bufs: HashMap<String, B::Buf>,
}

impl<B: Backend> Default for Saved<B> {
    fn default() -> Self {
        Saved {
            bufs: HashMap::new(),
        }
    }
}

impl<B: Backend> Saved<B> {
    /// Keep `buf` under `name`.
    pub fn put(&mut self, name: impl Into<String>, buf: B::Buf) {
        self.bufs.insert(name.into(), buf);
    }
    /// Borrow a saved buffer.
    pub fn get(&self, name: &str) -> Result<&B::Buf> {
        self.bufs
            .get(name)
            .ok_or_else(|| Error::config(format!("internal: activation '{name}' was not saved")))
    }
    /// Free saved buffers the rest of the backward no longer reads (lower peak memory).
    pub fn release(&mut self, names: &[&str]) {
        for n in names {
            self.bufs.remove(*n);
        }
    }
    /// Elements held, for memory accounting.
    pub fn numel(&self) -> usize {
        self.bufs.values().map(|b| b.len()).sum()
    }
}

/// Per-call facts a block needs beyond its weights.
#[derive(Clone, Debug)]
pub struct StepShape {
    pub batch: usize,
    pub seq: usize,
    /// Position of each token (`[B·T]`), for RoPE or learned positions; restarts at 0
    /// at each packed segment.
    pub positions: Vec<u32>,
    /// For packed rows: the index within its row of the first token of each token's
    /// segment (`[B·T]`), the first key it may attend to.
    pub segment_start: Option<Vec<u32>>,
}

impl StepShape {
    /// Positions 0..T for each of `batch` rows.
    pub fn new(batch: usize, seq: usize) -> Self {
        let positions = (0..batch).flat_map(|_| 0..seq as u32).collect();
        StepShape {
            batch,
            seq,
            positions,
            segment_start: None,
        }
    }

    /// The shape of `b`, with positions and attention confined to its segments when the
    /// batch is packed.
    pub fn of_batch(b: &crate::data::Batch) -> Self {
        let Some(seg) = &b.segment_ids else {
            return Self::new(b.batch, b.seq);
        };
        let mut positions = Vec::with_capacity(seg.len());
        let mut starts = Vec::with_capacity(seg.len());
        for row in seg.chunks(b.seq) {
            let mut start = 0;
            for (t, &id) in row.iter().enumerate() {
                if t > 0 && id != row[t - 1] {
                    start = t;
                }
                positions.push((t - start) as u32);
                starts.push(start as u32);
            }
        }
        StepShape {
            batch: b.batch,
            seq: b.seq,
            positions,
            segment_start: Some(starts),
        }
    }

    /// The attention ops' `key_start` argument.
    pub fn key_start(&self) -> Option<&[u32]> {
        self.segment_start.as_deref()
    }
    /// Number of tokens, B·T.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// A linear layer inside a block that LoRA may adapt.
#[derive(Clone, Debug)]
pub struct LinearSpec {
    /// Module path relative to the block, as HF names it (`self_attn.q_proj`).
    pub name: &'static str,
    pub in_features: usize,
    pub out_features: usize,
}

/// One tensor the model expects in the weights file.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// A supported architecture, chosen from the config.
#[derive(Clone, Debug)]
pub enum Model {
    Llama(llama::Llama),
    Gpt2(gpt2::Gpt2),
}

/// Dispatch a method call to the architecture inside a [`Model`].
macro_rules! dispatch {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            Model::Llama($m) => $e,
            Model::Gpt2($m) => $e,
        }
    };
}

impl Model {
    /// The architecture described by `cfg`.
    pub fn new(cfg: ModelConfig) -> Self {
        match cfg.arch {
            Arch::Llama => Model::Llama(llama::Llama {
                inv_freq: cfg.rope_inv_freq(),
                cfg,
            }),
            Arch::Gpt2 => Model::Gpt2(gpt2::Gpt2 { cfg }),
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        dispatch!(self, m => &m.cfg)
    }

    /// Prefix of block `i`'s tensor names (`model.layers.3.`).
    pub fn block_prefix(&self, i: usize) -> String {
        dispatch!(self, m => m.block_prefix(i))
    }

    /// Names of the head group's tensors (final norm and LM head).
    pub fn head_names(&self) -> &'static [&'static str] {
        dispatch!(self, m => m.head_names())
    }

    /// Every tensor of the model with its expected shape (for validating the file).
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        dispatch!(self, m => m.tensor_specs())
    }

    /// The linears of one block that LoRA can target.
    pub fn linears(&self) -> Vec<LinearSpec> {
        dispatch!(self, m => m.linears())
    }

    /// The embedding of `ids` at `positions` as `[N, C]` f32 rows, read from the file on
    /// the host (only the rows used are touched, so the table never moves to the device).
    pub fn embed(&self, gbi: &crate::gbi::Gbi, ids: &[u32], positions: &[u32]) -> Result<Vec<f32>> {
        dispatch!(self, m => m.embed(gbi, ids, positions))
    }

    /// Block forward: `y = block(x)`; returns y and, when `keep` is set, the activations
    /// its backward needs.
    pub fn block_forward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        lora: &BlockLora<B>,
        x: &B::Buf,
        shape: &StepShape,
        keep: bool,
    ) -> Result<(B::Buf, Saved<B>)> {
        let keep = if keep {
            Keep::OutputAndSaved
        } else {
            Keep::Output
        };
        let (y, saved) = dispatch!(self, m => m.block_forward(be, w, lora, x, shape, keep, None))?;
        let y = y.ok_or_else(|| Error::config("internal: block output"))?;
        Ok((y, saved))
    }

    /// The re-run of a checkpointed block's forward for its backward: the activations the
    /// backward reads, without the block's output (which the first forward produced).
    pub fn block_recompute<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        lora: &BlockLora<B>,
        x: &B::Buf,
        shape: &StepShape,
    ) -> Result<Saved<B>> {
        Ok(dispatch!(self, m => m.block_forward(be, w, lora, x, shape, Keep::SavedOnly, None))?.1)
    }

    /// Block forward of new tokens against a KV cache (generation): their keys and values
    /// join block `layer` of `cache`, and attention reads every cached position. The
    /// caller advances the cache once all blocks are done.
    #[allow(clippy::too_many_arguments)]
    pub fn block_forward_cached<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        lora: &BlockLora<B>,
        x: &B::Buf,
        shape: &StepShape,
        cache: &mut kv_cache::KvCache<B>,
        layer: usize,
    ) -> Result<B::Buf> {
        let cache = Some((cache, layer));
        dispatch!(self, m => m.block_forward(be, w, lora, x, shape, Keep::Output, cache))?
            .0
            .ok_or_else(|| Error::config("internal: block output"))
    }

    /// Block backward: from `dy` and the saved activations of the forward on `x`, returns
    /// dx and adds the LoRA gradients into `lora`.
    #[allow(clippy::too_many_arguments)]
    pub fn block_backward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        lora: &mut BlockLora<B>,
        x: &B::Buf,
        saved: &mut Saved<B>,
        dy: &B::Buf,
        shape: &StepShape,
    ) -> Result<B::Buf> {
        dispatch!(self, m => m.block_backward(be, w, lora, x, saved, dy, shape))
    }

    /// Final norm forward: returns the normed hidden state and the saved statistics.
    pub fn final_norm_forward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        x: &B::Buf,
    ) -> Result<(B::Buf, Saved<B>)> {
        dispatch!(self, m => m.final_norm_forward(be, w, x))
    }

    /// Final norm backward: dx from d(normed).
    pub fn final_norm_backward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        x: &B::Buf,
        saved: &Saved<B>,
        dout: &B::Buf,
    ) -> Result<B::Buf> {
        dispatch!(self, m => m.final_norm_backward(be, w, x, saved, dout))
    }
}

/// `Some(saved)` when activations are to be kept, for [`linear::Linear::forward`].
pub(crate) fn keep_in<B: Backend>(keep: Keep, saved: &mut Saved<B>) -> Option<&mut Saved<B>> {
    if keep.saved() { Some(saved) } else { None }
}

/// What a block forward produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// The output only (the forward of a checkpointed step, evaluation, generation).
    Output,
    /// The output and the activations its backward reads (no checkpointing).
    OutputAndSaved,
    /// Only the activations its backward reads: the re-run of a checkpointed block,
    /// whose output the first forward already produced, so the last linear's frozen GEMM
    /// and the residual add are skipped.
    SavedOnly,
}

impl Keep {
    pub fn saved(self) -> bool {
        self != Keep::Output
    }
    pub fn output(self) -> bool {
        self != Keep::SavedOnly
    }
}

/// Rows of a `[N, c]` buffer.
pub(crate) fn rows<D: DeviceBuf>(x: &D, c: usize) -> usize {
    x.len() / c.max(1)
}

/// Rows `ids` of the `[V, c]` table `name`, decoded to f32 on the host: `[N, c]`. An id
/// outside the table is an error that quotes it.
pub fn gather_rows(gbi: &crate::gbi::Gbi, name: &str, ids: &[u32], c: usize) -> Result<Vec<f32>> {
    gbi.check_unchanged()?;
    let t = gbi.tensor(name)?;
    let rows = t.shape.first().copied().unwrap_or(0);
    let row_bytes = c * t.dtype.size();
    let bytes = gbi.bytes(t);
    let mut out = vec![0.0f32; ids.len() * c];
    for (o, &id) in out.chunks_exact_mut(c).zip(ids) {
        let id = id as usize;
        if id >= rows {
            return Err(Error::config(format!(
                "token id {id} is outside the model's table '{name}' of {rows} rows; \
                 was the data tokenized for another model?"
            )));
        }
        t.dtype
            .decode_into(&bytes[id * row_bytes..(id + 1) * row_bytes], o);
    }
    Ok(out)
}

/// Backward of the causal attention a block ran on its saved `q`, `k`, `v` (after RoPE),
/// with saved output `att` and `lse`: returns (dq, dk, dv).
pub(crate) fn attention_backward_saved<B: Backend>(
    be: &B,
    sv: &mut Saved<B>,
    datt: &B::Buf,
    dims: crate::backend::AttnDims,
    s: &StepShape,
) -> Result<(B::Buf, B::Buf, B::Buf)> {
    let (q, k, v) = (sv.get("q")?, sv.get("k")?, sv.get("v")?);
    // overwritten by the kernels (no atomics, every row written)
    let mut dq = be.uninit(q.len())?;
    let mut dk = be.uninit(k.len())?;
    let mut dv = be.uninit(v.len())?;
    be.attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        datt,
        sv.get("att")?,
        sv.get("lse")?,
        q,
        k,
        v,
        dims,
        s.key_start(),
    )?;
    // nothing after the attention backward reads these
    sv.release(&["q", "k", "v", "att", "lse"]);
    Ok((dq, dk, dv))
}
