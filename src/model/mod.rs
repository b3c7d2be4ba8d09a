//! The model-definition layer. One file per architecture ([`llama`], [`mistral`],
//! [`qwen2`], [`qwen3`], [`phi3`], [`gemma3`], [`gpt2`]) describes
//! it as data — tensor names, the linears with their layouts, the head and embedding, and
//! a [`decoder::BlockDesc`] per layer — in an [`ArchDef`] found through [`arch_def`]; the
//! generic block in [`decoder`] runs every architecture's forward and backward. The
//! trainer, checkpoint, merge and import code ask a [`Model`] and never match on
//! architectures.

pub mod decoder;
pub mod family;
pub mod gemma3;
pub mod gguf;
pub mod gpt2;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod mistral;
pub mod phi3;
pub mod quantized;
pub mod qwen2;
pub mod qwen3;
pub mod tiles;

pub use decoder::{BlockSaved, NormStats, Saved};
pub use tiles::Tile;

use crate::backend::{Accumulate, Backend, DeviceBuf};
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
            .ok_or_else(|| Error::internal(format!("layer weights lack '{name}'")))
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
    /// Token rows per tile of a block's per-token parts (None: the whole call in one;
    /// see [`tiles`]).
    pub tile: Option<usize>,
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
            tile: None,
        }
    }

    /// This shape with its blocks' per-token parts run over tiles of `rows` tokens at
    /// most (None: untiled).
    pub fn with_tile(mut self, rows: Option<usize>) -> Self {
        self.tile = rows;
        self
    }

    /// The tiles a block runs its per-token parts over, in order.
    pub fn tiles(&self) -> impl Iterator<Item = Tile> + use<> {
        tiles::tiles(self.tokens(), self.tile)
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
            tile: None,
        }
    }

    /// The attention ops' `key_start` argument.
    pub fn key_start(&self) -> Option<&[u32]> {
        self.segment_start.as_deref()
    }

    /// `key_start` for attention within a sliding window of `w` keys (the query's own
    /// included): token t's first key is the later of its segment's start and t − w + 1.
    /// Without a window, [`StepShape::key_start`].
    pub fn key_start_within(&self, window: Option<usize>) -> Option<std::borrow::Cow<'_, [u32]>> {
        let Some(w) = window.filter(|&w| w < self.seq) else {
            return self.key_start().map(std::borrow::Cow::Borrowed);
        };
        let w = w.max(1);
        let ks = (0..self.tokens())
            .map(|i| {
                let t = i % self.seq;
                let seg = self.segment_start.as_ref().map_or(0, |s| s[i] as usize);
                seg.max((t + 1).saturating_sub(w)) as u32
            })
            .collect();
        Some(std::borrow::Cow::Owned(ks))
    }
    /// Number of tokens, B·T.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

pub use crate::linears::{BlockLinears, LinearSpec};

/// One tensor the model expects in the weights file.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// `embed(model, file, ids, positions)`: `[N, C]` f32 rows.
/// Writes the embedding of `ids` at `positions` into `out` (`[N, hidden]`, every element).
pub type EmbedFn = fn(&Model, &crate::gbi::Gbi, &[u32], &[u32], &mut [f32]) -> Result<()>;

/// One architecture, as data and a few functions: what [`Model`] asks of it. Each
/// architecture's file defines one (`pub static DEF`), and [`arch_def`] finds it.
pub struct ArchDef {
    /// What the rest of lema asks without building a model (PEFT flags, targets, sizes).
    pub family: &'static family::Family,
    /// Prefix of block `i`'s tensor names (`model.layers.3.`).
    pub block_prefix: fn(usize) -> String,
    /// Names of the head group's tensors (final norm and LM head).
    pub head_names: &'static [&'static str],
    /// The linears of one block, with shapes from the config.
    pub linears: fn(&ModelConfig) -> Vec<LinearSpec>,
    /// Every tensor with its expected shape (for validating the file).
    pub tensor_specs: fn(&Model) -> Vec<TensorSpec>,
    /// The embedding of ids at positions as `[N, C]` f32 rows, read from the file.
    pub embed: EmbedFn,
    /// The description of block `layer`.
    pub block: for<'m> fn(&'m Model, usize) -> decoder::BlockDesc<'m>,
    /// The final norm.
    pub final_norm: fn(&ModelConfig) -> decoder::NormDesc,
}

/// The definition of `arch`.
pub fn arch_def(arch: Arch) -> &'static ArchDef {
    match arch {
        Arch::Llama => &llama::DEF,
        Arch::Mistral => &mistral::DEF,
        Arch::Qwen2 => &qwen2::DEF,
        Arch::Qwen3 => &qwen3::DEF,
        Arch::Phi3 => &phi3::DEF,
        Arch::Gemma3 => &gemma3::DEF,
        Arch::Gpt2 => &gpt2::DEF,
    }
}

/// A model: its configuration, its architecture's definition, and what is computed from
/// them once (the linears, RoPE's inverse frequencies).
#[derive(Clone)]
pub struct Model {
    cfg: ModelConfig,
    def: &'static ArchDef,
    linears: Vec<LinearSpec>,
    /// RoPE inverse frequencies (`[D/2]`, scaling applied), or empty.
    inv_freq: Vec<f32>,
    /// The sliding layers' own inverse frequencies, when their base differs (Gemma 3).
    local_inv_freq: Option<Vec<f32>>,
    /// LongRoPE's frequencies past the original context, and that context.
    long_inv_freq: Option<(Vec<f32>, usize)>,
    /// The linears stored quantized in the model file, when there are any.
    quant: Option<std::sync::Arc<quantized::QuantTable>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("arch", &self.cfg.arch)
            .field("layers", &self.cfg.num_hidden_layers)
            .finish()
    }
}

impl Model {
    /// The architecture described by `cfg`.
    pub fn new(cfg: ModelConfig) -> Self {
        let def = arch_def(cfg.arch);
        let (inv_freq, local_inv_freq, long_inv_freq) = if def.family.learned_positions {
            (Vec::new(), None, None)
        } else {
            (
                cfg.rope_inv_freq(),
                cfg.local_rope_inv_freq(),
                cfg.long_rope_inv_freq(),
            )
        };
        Model {
            linears: (def.linears)(&cfg),
            def,
            inv_freq,
            local_inv_freq,
            long_inv_freq,
            quant: None,
            cfg,
        }
    }

    /// This model over a file whose linears `table` lists as quantized.
    pub fn with_quant(mut self, table: Option<quantized::QuantTable>) -> Self {
        self.quant = table.map(std::sync::Arc::new);
        self
    }

    /// The quantized linears of the model file, if any.
    pub fn quant(&self) -> Option<&quantized::QuantTable> {
        self.quant.as_deref()
    }

    /// Every linear weight with the `[out, in]` shape the architecture expects (in the
    /// order of the blocks), for checking a file's quantized layout.
    pub fn linear_weights(&self) -> Vec<(String, Vec<usize>)> {
        (0..self.cfg.num_hidden_layers)
            .flat_map(|i| {
                let p = self.block_prefix(i);
                self.linears.iter().map(move |l| {
                    let shape = match l.layout {
                        linear::Layout::OutIn => vec![l.out_features, l.in_features],
                        linear::Layout::InOut => vec![l.in_features, l.out_features],
                    };
                    (format!("{p}{}.weight", l.name), shape)
                })
            })
            .collect()
    }

    /// Block `layer`'s weights as its forward and backward read them: NF4-stored linears
    /// expanded (for the duration of the call), the rest as stored.
    fn weights<'w, B: Backend>(
        &self,
        be: &B,
        layer: usize,
        w: &'w LayerWeights<B>,
    ) -> Result<quantized::Weights<'w, B>> {
        let Some(table) = &self.quant else {
            return Ok(quantized::Weights::plain(w));
        };
        let names = self.linears.iter().map(|l| format!("{}.weight", l.name));
        let dense = quantized::expand(be, table, &self.block_prefix(layer), names, w)?;
        Ok(quantized::Weights::with_dense(w, dense))
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// RoPE's inverse frequencies of layer `layer` (empty for learned positions): the
    /// sliding layers' own when the config gives them a base of their own, and
    /// LongRoPE's long ones where it has them.
    pub fn rope_of(&self, layer: usize) -> decoder::Rope<'_> {
        let inv_freq = match &self.local_inv_freq {
            Some(local) if self.cfg.layer_window(layer).is_some() => local,
            _ => &self.inv_freq,
        };
        decoder::Rope {
            inv_freq,
            long: self
                .long_inv_freq
                .as_ref()
                .map(|(f, beyond)| (f.as_slice(), *beyond)),
        }
    }

    /// The final logit soft-cap, if the model has one.
    pub fn logit_softcap(&self) -> Option<f32> {
        self.cfg.final_logit_softcapping
    }

    /// Prefix of block `i`'s tensor names (`model.layers.3.`).
    pub fn block_prefix(&self, i: usize) -> String {
        (self.def.block_prefix)(i)
    }

    /// Names of the head group's tensors (final norm and LM head).
    pub fn head_names(&self) -> &'static [&'static str] {
        self.def.head_names
    }

    /// Every tensor of the model with its expected shape (for validating the file).
    pub fn tensor_specs(&self) -> Vec<TensorSpec> {
        (self.def.tensor_specs)(self)
    }

    /// The linears of one block that LoRA can target.
    pub fn linears(&self) -> Vec<LinearSpec> {
        self.linears.clone()
    }

    /// The linears of one block, borrowed.
    pub fn linear_specs(&self) -> &[LinearSpec] {
        &self.linears
    }

    /// The linears of every block, for LoRA.
    pub fn block_linears(&self) -> BlockLinears<'_> {
        BlockLinears {
            linears: &self.linears,
            layers: self.cfg.num_hidden_layers,
            block_prefix: self.def.block_prefix,
        }
    }

    /// `x` rounded to the half type in which block `layer`'s GEMMs read activations
    /// (bf16/f16 with half weights on CUDA), or None when they read f32: the type a
    /// block input can be parked in at no loss the GEMMs would see. Asked of the block's
    /// first norm weight, which is dense and stored in the compute type whatever the
    /// linears' storage (NF4 and FP8 included).
    pub fn half_copy<B: Backend>(
        &self,
        be: &B,
        layer: usize,
        w: &LayerWeights<B>,
        x: &B::Buf,
    ) -> Result<Option<B::Buf>> {
        let norm = w.get(&format!("{}.weight", self.block(layer).norm1.name))?;
        be.gemm_input(x, norm)
    }

    /// What a block's backward holds per token, the largest over the blocks.
    pub fn token_bytes(&self) -> tiles::TokenBytes {
        (0..self.cfg.num_hidden_layers)
            .map(|i| self.block(i).token_bytes())
            .fold(tiles::TokenBytes { whole: 0, tile: 0 }, |a, b| {
                tiles::TokenBytes {
                    whole: a.whole.max(b.whole),
                    tile: a.tile.max(b.tile),
                }
            })
    }

    /// The description of block `layer` for the generic block.
    pub fn block(&self, layer: usize) -> decoder::BlockDesc<'_> {
        (self.def.block)(self, layer)
    }

    /// The embedding of `ids` at `positions` as `[N, C]` f32 rows, read from the file on
    /// the host (only the rows used are touched, so the table never moves to the device).
    pub fn embed(&self, gbi: &crate::gbi::Gbi, ids: &[u32], positions: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; ids.len() * self.cfg.hidden_size];
        self.embed_into(gbi, ids, positions, &mut out)?;
        Ok(out)
    }

    /// [`Model::embed`] written into `out` (`[N, hidden]`), e.g. a backend's staging
    /// memory ([`Backend::upload_with`]).
    pub fn embed_into(
        &self,
        gbi: &crate::gbi::Gbi,
        ids: &[u32],
        positions: &[u32],
        out: &mut [f32],
    ) -> Result<()> {
        let want = ids.len() * self.cfg.hidden_size;
        if out.len() != want {
            return Err(Error::internal(format!(
                "embedding output of {} values for {} tokens × {}",
                out.len(),
                ids.len(),
                self.cfg.hidden_size
            )));
        }
        (self.def.embed)(self, gbi, ids, positions, out)
    }

    /// Block forward: `y = block(x)`; returns y and, when `keep` is set, the activations
    /// its backward needs. `layer` is the block's index.
    #[allow(clippy::too_many_arguments)]
    pub fn block_forward<B: Backend>(
        &self,
        be: &B,
        layer: usize,
        w: &LayerWeights<B>,
        lora: &BlockLora<B>,
        x: &B::Buf,
        shape: &StepShape,
        keep: bool,
    ) -> Result<(B::Buf, BlockSaved<B>)> {
        let keep = if keep {
            Keep::OutputAndSaved
        } else {
            Keep::Output
        };
        let w = self.weights(be, layer, w)?;
        let (y, saved) = self
            .block(layer)
            .forward(be, &w, lora, x, shape, keep, None)?;
        let y = y.ok_or_else(|| Error::internal("block output"))?;
        Ok((y, saved))
    }

    /// The backward of a checkpointed block: its forward re-run from its input `x` for the
    /// activations the backward reads (without its output, which the first forward
    /// produced: the last linear's frozen GEMM and the residual add are skipped), tile by
    /// tile after attention ([`decoder::BlockDesc::recompute_backward`]), then
    /// [`Model::block_backward`]'s work, with the block's quantized weights expanded once.
    /// `dy` is taken: its memory becomes dx's.
    #[allow(clippy::too_many_arguments)]
    pub fn block_recompute_backward<B: Backend>(
        &self,
        be: &B,
        layer: usize,
        w: &LayerWeights<B>,
        lora: &mut BlockLora<B>,
        x: &B::Buf,
        dy: B::Buf,
        shape: &StepShape,
    ) -> Result<B::Buf> {
        let w = self.weights(be, layer, w)?;
        self.block(layer)
            .recompute_backward(be, &w, lora, x, dy, shape)
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
        let w = self.weights(be, layer, w)?;
        self.block(layer)
            .forward(be, &w, lora, x, shape, Keep::Output, Some((cache, layer)))?
            .0
            .ok_or_else(|| Error::internal("block output"))
    }

    /// Block backward: from `dy` (taken: its memory becomes dx's) and the saved
    /// activations of the forward on `x`, returns dx and adds the LoRA gradients into
    /// `lora`.
    #[allow(clippy::too_many_arguments)]
    pub fn block_backward<B: Backend>(
        &self,
        be: &B,
        layer: usize,
        w: &LayerWeights<B>,
        lora: &mut BlockLora<B>,
        x: &B::Buf,
        saved: &mut BlockSaved<B>,
        dy: B::Buf,
        shape: &StepShape,
    ) -> Result<B::Buf> {
        let w = self.weights(be, layer, w)?;
        self.block(layer)
            .backward(be, &w, lora, x, saved, dy, shape)
    }

    /// Final norm forward: returns the normed hidden state and the saved statistics.
    pub fn final_norm_forward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        x: &B::Buf,
    ) -> Result<(B::Buf, NormStats<B>)> {
        let c = self.cfg.hidden_size;
        let w = quantized::Weights::plain(w);
        decoder::norm_forward(be, &w, &(self.def.final_norm)(&self.cfg), x, rows(x, c), c)
    }

    /// Final norm backward: dx from d(normed).
    pub fn final_norm_backward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        x: &B::Buf,
        saved: &NormStats<B>,
        dout: &B::Buf,
    ) -> Result<B::Buf> {
        let mut dx = be.uninit(x.len())?;
        decoder::norm_backward(
            be,
            &quantized::Weights::plain(w),
            &(self.def.final_norm)(&self.cfg),
            &mut dx,
            dout,
            x,
            saved,
            Accumulate::Overwrite,
        )?;
        Ok(dx)
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
/// outside the table is an error that quotes it. The rows are decoded in parallel: at
/// 8 × 512 tokens of a 4096-wide model this is 16.8M values, which one thread decodes
/// while the GPU waits for the step's first block.
pub fn gather_rows(gbi: &crate::gbi::Gbi, name: &str, ids: &[u32], c: usize) -> Result<Vec<f32>> {
    let mut out = vec![0.0f32; ids.len() * c];
    gather_rows_into(gbi, name, ids, c, &mut out)?;
    Ok(out)
}

/// [`gather_rows`] into `out` (`[N, c]`).
pub fn gather_rows_into(
    gbi: &crate::gbi::Gbi,
    name: &str,
    ids: &[u32],
    c: usize,
    out: &mut [f32],
) -> Result<()> {
    use rayon::prelude::*;
    gbi.check_unchanged()?;
    let t = gbi.tensor(name)?;
    let rows = t.shape.first().copied().unwrap_or(0);
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
        return Err(Error::config(format!(
            "token id {id} is outside the model's table '{name}' of {rows} rows; \
             was the data tokenized for another model?"
        )));
    }
    if out.len() != ids.len() * c || c == 0 {
        return Err(Error::internal(format!(
            "gathering {} rows of {c} into {} values",
            ids.len(),
            out.len()
        )));
    }
    let row_bytes = c * t.dtype.size();
    let bytes = gbi.bytes(t);
    // at least 64 rows a task, so small batches are not split into many tiny tasks
    out.par_chunks_mut(c * 64)
        .zip(ids.par_chunks(64))
        .for_each(|(o, ids)| {
            for (o, &id) in o.chunks_exact_mut(c).zip(ids) {
                let id = id as usize;
                t.dtype
                    .decode_into(&bytes[id * row_bytes..(id + 1) * row_bytes], o);
            }
        });
    Ok(())
}
