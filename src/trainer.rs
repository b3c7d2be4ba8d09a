//! The layer-wise schedule: forward over the blocks keeping each block's input (and,
//! for the blocks that `crate::recompute` lets keep them, its activations), head and
//! loss, then the blocks in reverse, each other one re-run from its saved input before
//! its backward (gradient checkpointing); gradient accumulation, clipping and the
//! optimizer step. It never knows which backend or memory strategy runs.

use crate::backend::{Backend, DeviceBuf, LossSum};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::gbi::Gbi;
use crate::lora::LoraParams;
use crate::model::{Model, StepShape};
use crate::optim::{Optimizer, OptimizerConfig, clip_grad_norm};
use crate::recompute::{GradientCheckpointing, kept_blocks};
use crate::rng::mix_seed;
use crate::stream::{Part, WeightStream};
use crate::types::IGNORE_INDEX;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What one optimizer step reports.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    /// Mean cross-entropy over the counted tokens of all micro-batches.
    pub loss: f64,
    /// Counted tokens.
    pub tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// `[B, T, V]` logits of the (single) micro-batch, when asked for.
    pub logits: Option<Vec<f32>>,
}

/// Everything a training run holds on one backend.
pub struct Engine<B: Backend> {
    pub be: B,
    pub model: Model,
    pub gbi: Arc<Gbi>,
    pub stream: Box<dyn WeightStream<B>>,
    pub lora: Option<LoraParams<B>>,
    pub optimizer: Option<Optimizer<B>>,
    /// Which blocks are re-run in the backward ([`GradientCheckpointing`]).
    pub gradient_checkpointing: GradientCheckpointing,
    /// With `auto` checkpointing: the bytes the kept blocks' activations may take, in
    /// place of the memory free at the start of
    /// each call less what the rest of the call needs ([`Engine::auto_room`]).
    pub activation_budget: Option<u64>,
    /// The blocks whose activations the last call kept (the rest were re-run), for
    /// reports.
    pub last_kept: usize,
    /// Bytes per token one block kept in the first call that kept any (what `auto`
    /// counts with afterwards).
    saved_per_token: Option<u64>,
    /// Keep the blocks' saved inputs in host memory between forward and backward.
    pub offload_activations: bool,
    /// With offloading: park them rounded to the half type the GEMMs read (half weights
    /// on CUDA): half the host memory and bus traffic; the backward re-runs each block
    /// from the rounded input. No effect where the GEMMs read f32.
    pub offload_activations_half: bool,
    /// With offloading: how many blocks ahead the backward starts bringing saved inputs
    /// back: the weight stream's prefetch depth, so that an input's copy is queued with
    /// its block's weights and not behind those of the blocks after it (copies to the
    /// device run in the order they were queued). One block more was measured slower at
    /// 8 × 512 with prefetch 1 (0.631 against 0.585 s on an H100).
    pub activation_prefetch: usize,
    /// Keep the optimizer state in host memory that the device reads over the bus
    /// (applies to optimizers created after it is set).
    pub offload_optimizer: bool,
    /// Token rows per sequence tile of the blocks' per-token parts: None chooses from the
    /// device memory free at each call ([`Engine::tile_rows`]), 0 runs every call
    /// untiled, N tiles of N rows.
    pub seq_tile: Option<usize>,
    /// The tile rows the last call ran with (None: untiled), for reports.
    pub last_tile: Option<usize>,
    /// Base of the dropout seeds.
    pub seed: u64,
    /// When set and raised, a forward or backward stops at the next block with
    /// [`Error::Interrupted`], before any parameter changes (the Python bindings raise it
    /// on Ctrl-C).
    pub cancel: Option<Arc<AtomicBool>>,
    /// The inputs of the last step that could run as a step graph
    /// ([`Engine::forward_backward_graphed`]): a step that repeats them is captured.
    graph_key: Option<u64>,
    /// A capture was dropped: no more are tried.
    graphs_failed: bool,
}

/// Gradients accumulated over micro-batches that arrive one call at a time
/// ([`Engine::accumulate`]): the counted tokens and micro-batches so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accumulation {
    pub tokens: usize,
    pub micro_batches: u64,
}

impl<B: Backend> Engine<B> {
    /// An engine over an opened model, with no adapters or optimizer yet.
    pub fn new(
        be: B,
        model: Model,
        gbi: Arc<Gbi>,
        strategy: crate::stream::Strategy,
        gradient_checkpointing: impl Into<GradientCheckpointing>,
        seed: u64,
    ) -> Self {
        let stream = crate::stream::make_stream(strategy, gbi.clone(), model.clone());
        Self::with_stream(be, model, gbi, stream, gradient_checkpointing, seed)
    }

    /// Check a batch against the model before any work.
    /// An engine whose weights come from `stream` (a backend-specific strategy).
    pub fn with_stream(
        be: B,
        model: Model,
        gbi: Arc<Gbi>,
        stream: Box<dyn WeightStream<B>>,
        gradient_checkpointing: impl Into<GradientCheckpointing>,
        seed: u64,
    ) -> Self {
        Engine {
            be,
            stream,
            model,
            gbi,
            lora: None,
            optimizer: None,
            gradient_checkpointing: gradient_checkpointing.into(),
            activation_budget: None,
            last_kept: 0,
            saved_per_token: None,
            offload_activations: false,
            offload_activations_half: false,
            activation_prefetch: 1,
            offload_optimizer: false,
            seq_tile: None,
            last_tile: None,
            seed,
            cancel: None,
            graph_key: None,
            graphs_failed: false,
        }
    }

    /// The tile rows of a call of `n` tokens (None: untiled): [`Engine::seq_tile`] when
    /// set, else, on a device with memory of its own,
    /// [`crate::model::tiles::AUTO_TILE_ROWS`], or the largest multiple of
    /// [`crate::model::tiles::TILE_ROWS_STEP`] rows below it whose backward fits in the
    /// memory free now beside what the call holds for every token (the blocks' saved
    /// inputs on the device, each block's whole-call tensors, [`TILE_MARGIN_BYTES`] for
    /// the runtime); untiled when the call fits in one such tile. On the CPU, and without
    /// checkpointing (a block keeps every activation anyway), nothing is tiled unless
    /// asked for.
    pub fn tile_rows(&self, n: usize, keep_all: bool) -> Option<usize> {
        match self.seq_tile {
            Some(0) => None,
            Some(r) => Some(r).filter(|&r| r < n),
            None if keep_all => None,
            None => {
                let avail = self.be.free_memory()?;
                crate::model::tiles::rows_within(
                    n,
                    avail,
                    TILE_MARGIN_BYTES + self.inputs_on_device() * self.row_bytes(n),
                    self.model.token_bytes(),
                )
            }
        }
    }

    fn check_batch(&self, b: &Batch) -> Result<()> {
        let cfg = self.model.config();
        if crate::model::family::family(cfg.arch).learned_positions
            && b.seq > cfg.max_position_embeddings
        {
            return Err(Error::config(format!(
                "sequence length {} exceeds the model's {} learned positions; use max_seq_length ≤ {}",
                b.seq, cfg.max_position_embeddings, cfg.max_position_embeddings
            )));
        }
        if let Some(&id) = b.input_ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(Error::config(format!(
                "token id {id} is outside the vocabulary of {} ids; was the data tokenized for another model?",
                cfg.vocab_size
            )));
        }
        if let Some(&l) = b
            .labels
            .iter()
            .find(|&&l| l >= 0 && l as usize >= cfg.vocab_size)
        {
            return Err(Error::config(format!(
                "label {l} is outside the vocabulary of {} ids",
                cfg.vocab_size
            )));
        }
        Ok(())
    }

    /// The bytes `auto` checkpointing lets the kept blocks' activations take in a call
    /// of `n` tokens: [`Engine::activation_budget`] when set, else the memory free now
    /// (the device's; the host's on the CPU) less what the call needs beside them: every
    /// block's saved input on the device (the few brought back ahead with offloading),
    /// the head's rows, one re-run block's backward ([`Model::token_bytes`]) and
    /// [`TILE_MARGIN_BYTES`].
    pub fn auto_room(&self, n: usize) -> u64 {
        if let Some(b) = self.activation_budget {
            return b;
        }
        let free = self
            .be
            .free_memory()
            .unwrap_or_else(|| crate::hostmem::HostBudget::probe(None).available);
        // the head's rows: the last block's output, the final norm's, their gradients
        let rows = self.inputs_on_device() + 4;
        let t = self.model.token_bytes();
        let rerun = (t.whole + t.tile) * n as u64;
        free.saturating_sub(TILE_MARGIN_BYTES + rows * self.row_bytes(n) + rerun)
    }

    /// How many blocks' saved inputs the backward holds on the device at once: every
    /// block's, or with activation offloading the few brought back ahead.
    fn inputs_on_device(&self) -> u64 {
        if self.offload_activations {
            self.activation_prefetch.max(1) as u64 + 1
        } else {
            self.model.config().num_hidden_layers as u64
        }
    }

    /// Bytes of one f32 `[n, hidden]` activation.
    fn row_bytes(&self, n: usize) -> u64 {
        (n * self.model.config().hidden_size * 4) as u64
    }

    /// Bytes per token one block's activations took, measured in the first call that
    /// kept any under `auto` (None before).
    pub fn saved_bytes_per_token(&self) -> Option<u64> {
        self.saved_per_token
    }

    /// Forward (and, with `train`, backward) of one micro-batch. The loss gradient is
    /// scaled by `loss_scale` (1 / counted tokens of the whole accumulated batch), and
    /// LoRA gradients are added into the parameters' gradient buffers.
    pub fn forward_backward(
        &mut self,
        batch: &Batch,
        loss_scale: f32,
        train: bool,
        want_logits: bool,
        dropout_seed: u64,
    ) -> Result<(LossSum, Option<Vec<f32>>)> {
        self.check_batch(batch)?;
        let mode = self.gradient_checkpointing;
        let keep_all = train && mode == GradientCheckpointing::Off;
        let shape = StepShape::of_batch(batch);
        let tile = self.tile_rows(shape.tokens(), keep_all);
        let shape = shape.with_tile(tile);
        self.last_tile = tile;
        let n = shape.tokens();
        let c = self.model.config().hidden_size;
        let layers = self.model.config().num_hidden_layers;
        // the blocks 0..kept keep their activations; `auto` only where the call runs
        // untiled (a tiled call is one whose re-run alone fills the memory), counting
        // with an upper bound of a block's activations until one block has been measured
        let auto = train && mode == GradientCheckpointing::Auto && tile.is_none();
        let (room, mut per_block) = if auto {
            let per_token = self.saved_per_token.unwrap_or_else(|| {
                let t = self.model.token_bytes();
                t.whole + t.tile
            });
            (self.auto_room(n), per_token * n as u64)
        } else {
            (0, 0)
        };
        let mut kept = if keep_all {
            layers
        } else if auto {
            kept_blocks(layers, room, per_block)
        } else {
            0
        };
        let be = &self.be;
        // training needs adapters; evaluation runs the base model when there are none
        let mut lora = if train {
            Some(need_lora(&mut self.lora)?)
        } else {
            self.lora.as_mut()
        };
        // the parameters as they are now (a host optimizer may have written them)
        if let Some(l) = lora.as_deref_mut() {
            l.drop_gemm_copies();
        }
        let dropout = match &lora {
            Some(l) if train => l.cfg.dropout,
            _ => 0.0,
        };
        let block_seed = |i: usize| mix_seed(&[dropout_seed, i as u64]);

        // h[0][N, C] = embedding, gathered on the host from the mapped file straight into
        // the memory the device copies it from
        // the inputs of the blocks, kept for the backward: on the device, or parked in host
        // memory with activation offloading; none for an evaluation
        be.profile_phase("forward");
        let mut hs: Vec<Checkpoint<B>> = Vec::new();
        let (model, gbi) = (&self.model, &self.gbi);
        let mut x = be.upload_with(n * c, &mut |out| {
            model.embed_into(gbi, &batch.input_ids, &shape.positions, out)
        })?;
        let mut saved = Vec::new();
        for i in 0..layers {
            let next = if i + 1 < layers {
                Part::Block(i + 1)
            } else {
                Part::Head
            };
            check_cancel(self.cancel.as_deref())?;
            let w = self.stream.get(be, Part::Block(i), Some(next))?;
            let bl = LoraParams::block_or_none(lora.as_deref_mut(), i, block_seed(i), dropout);
            let (y, sv) = self
                .model
                .block_forward(be, i, &w, &bl, &x, &shape, i < kept)?;
            if auto && i == 0 && kept > 0 && self.saved_per_token.is_none() {
                // what a block keeps, measured: the count for the other blocks
                per_block = sv.bytes() as u64;
                self.saved_per_token = Some(per_block.div_ceil(n.max(1) as u64));
                kept = kept_blocks(layers, room, per_block).max(1);
            }
            let input = std::mem::replace(&mut x, y);
            if train {
                hs.push(if self.offload_activations {
                    let half = if self.offload_activations_half {
                        self.model.half_copy(be, i, &w, &input)?
                    } else {
                        None
                    };
                    match half {
                        Some(h) => Checkpoint::ParkedHalf(be.park(h)?),
                        None => Checkpoint::Parked(be.park(input)?),
                    }
                } else {
                    Checkpoint::Device(input)
                });
            }
            if i < kept {
                saved.push(sv);
            }
        }
        self.last_kept = if train { kept } else { 0 };

        // head: final norm, LM head and cross-entropy, row-chunked in the backend
        let last = layers.checked_sub(1).map(Part::Block);
        be.profile_phase("head");
        let hw = self.stream.get(be, Part::Head, last)?;
        let x_last = x;
        let (xf, fsv) = self.model.final_norm_forward(be, &hw, &x_last)?;
        let labels = batch.shifted_labels();
        // both overwritten in full by lm_head_loss (dh by an `Overwrite` GEMM per row chunk,
        // ignored rows included; logits copied chunk by chunk)
        let mut dxf = if train { Some(be.uninit(n * c)?) } else { None };
        let mut logits = if want_logits {
            Some(be.uninit(n * self.model.config().vocab_size)?)
        } else {
            None
        };
        let loss = be.lm_head_loss(
            &xf,
            hw.get("lm_head.weight")?,
            &labels,
            c,
            loss_scale,
            self.model.logit_softcap(),
            dxf.as_mut(),
            logits.as_mut(),
        )?;
        let logits = logits.map(|l| be.download(&l)).transpose()?;
        let Some(dxf) = dxf else {
            return Ok((loss, logits));
        };
        let mut dh = self
            .model
            .final_norm_backward(be, &hw, &x_last, &fsv, &dxf)?;
        drop((xf, dxf, x_last, hw));
        be.profile_phase("backward");
        let long = n >= PREFETCH_INPUTS_BELOW;

        for i in (0..layers).rev() {
            check_cancel(self.cancel.as_deref())?;
            let next = i.checked_sub(1).map(Part::Block);
            let w = self.stream.get(be, Part::Block(i), next)?;
            let x = match hs.pop() {
                Some(Checkpoint::Device(b)) => b,
                Some(Checkpoint::Parked(p)) => be.unpark(p)?,
                // kept half on the device too: the block widens it a tile at a time
                Some(Checkpoint::ParkedHalf(p)) => be.unpark(p)?,
                None => return Err(Error::internal("hidden state stack")),
            };
            // the inputs of the next blocks down come back while this one computes; a long
            // call's when needed (`PREFETCH_INPUTS_BELOW`)
            let ahead = if long {
                hs.len()
            } else {
                hs.len().saturating_sub(self.activation_prefetch.max(1))
            };
            for c in hs[ahead..].iter_mut().rev() {
                if let Checkpoint::Parked(p) | Checkpoint::ParkedHalf(p) = c {
                    be.prefetch(p)?;
                }
            }
            let mut bl = LoraParams::block_or_none(lora.as_deref_mut(), i, block_seed(i), dropout);
            let kept_here = if i < kept { saved.pop() } else { None };
            dh = match kept_here {
                Some(mut sv) => self
                    .model
                    .block_backward(be, i, &w, &mut bl, &x, &mut sv, dh, &shape)?,
                // gradient checkpointing: re-run this block's forward from its input
                None => self
                    .model
                    .block_recompute_backward(be, i, &w, &mut bl, &x, dh, &shape)?,
            };
        }
        Ok((loss, logits))
    }

    /// [`Engine::forward_backward`] of a training step through the backend's step graphs
    /// (`backend/cuda/graph.rs`): a step whose key ([`Engine::step_graph_key`]) repeats
    /// the previous step's is captured as it runs, and the steps after it with the same
    /// key replay it with their own tokens, without running the host code. The same
    /// arithmetic in the same order: the same bits as the eager path. Runs eagerly where
    /// the backend or the configuration does not allow it.
    fn forward_backward_graphed(
        &mut self,
        batch: &Batch,
        scale: f32,
        seed: u64,
    ) -> Result<(LossSum, Option<Vec<f32>>)> {
        // a backend without step graphs (the CPU) reports none
        let key = match self.be.step_graph_report() {
            Some(_) => self.step_graph_key(batch, scale),
            None => None,
        };
        let Some(key) = key else {
            return self.forward_backward(batch, scale, true, false, seed);
        };
        if !self.stream.static_on_device() {
            // e.g. before the first step, which waits for the weights' uploads
            self.graph_key = Some(key);
            return self.forward_backward(batch, scale, true, false, seed);
        }
        // what a replay skips of `forward_backward`'s checks
        self.check_batch(batch)?;
        check_cancel(self.cancel.as_deref())?;
        // what every pass starts with (`forward_backward`): here it frees the copies a
        // capture left in the adapters before the graph allocates them again
        if let Some(l) = self.lora.as_mut() {
            l.drop_gemm_copies();
        }
        // the inputs that depend on the tokens, as `forward_backward` uploads them
        let shape = StepShape::of_batch(batch);
        let labels = batch.shifted_labels();
        let (model, gbi) = (&self.model, &self.gbi);
        let mut embed =
            |out: &mut [f32]| model.embed_into(gbi, &batch.input_ids, &shape.positions, out);
        if let Some(loss) = self.be.step_graph_replay(key, &mut embed, &labels)? {
            return Ok((loss, None));
        }
        if self.graph_key.replace(key) != Some(key) || !self.be.step_graph_begin(key)? {
            return self.forward_backward(batch, scale, true, false, seed);
        }
        let mut embedded = vec![0f32; shape.tokens() * self.model.config().hidden_size];
        self.model
            .embed_into(&self.gbi, &batch.input_ids, &shape.positions, &mut embedded)?;
        let r = self.forward_backward(batch, scale, true, false, seed);
        let ok = r.is_ok();
        // freed inside the graph, so that nothing the step allocates outlives it
        if let Some(l) = self.lora.as_mut() {
            l.drop_gemm_copies();
        }
        match (r, self.be.step_graph_end(ok, &embedded, &labels)) {
            (Ok((_, logits)), Ok(Some(loss))) => Ok((loss, logits)),
            (Err(Error::Interrupted), _) => Err(Error::Interrupted),
            (_, Err(e)) => Err(e),
            // nothing of the capture ran: the step again, eagerly (where an op could not
            // be captured, it runs; a real error comes back from it as from any step)
            (_, Ok(_)) => {
                self.graphs_failed = true;
                self.forward_backward(batch, scale, true, false, seed)
            }
        }
    }

    /// What names a training step for [`Engine::forward_backward_graphed`]: everything
    /// the step's host code decides from, which is all but the tokens' values (the
    /// batch's shape and packing, the counted tokens and the loss scale, the adapters'
    /// configuration and buffers, the engine's settings). None when the step cannot run
    /// as a graph: offloaded activations, dropout (a new mask every step), labels that the
    /// eager step rejects. (Weights that are not all on the device, which a step copies
    /// and waits for, are checked at the step: the first step waits for them too.)
    fn step_graph_key(&self, batch: &Batch, scale: f32) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let lora = self.lora.as_ref()?;
        if self.graphs_failed
            || self.offload_activations
            || lora.cfg.dropout > 0.0
            || batch.labels.iter().any(|&l| l < 0 && l != IGNORE_INDEX)
        {
            return None;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (batch.batch, batch.seq).hash(&mut h);
        batch.segment_ids.hash(&mut h);
        let counted = batch
            .shifted_labels()
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .count();
        (counted, scale.to_bits()).hash(&mut h);
        format!("{:?}", lora.cfg).hash(&mut h);
        for (name, shape, p, g) in lora.named_params() {
            (name, shape, p.address(), g.address()).hash(&mut h);
        }
        format!(
            "{:?} {:?} {:?}",
            self.gradient_checkpointing, self.activation_budget, self.seq_tile
        )
        .hash(&mut h);
        Some(h.finish())
    }

    /// One optimizer step over the micro-batches (gradient accumulation), equal to one
    /// step on their concatenation: the loss is the mean over all their counted tokens.
    pub fn train_step(
        &mut self,
        micro: &[Batch],
        lr: Option<f32>,
        max_grad_norm: Option<f32>,
        want_logits: bool,
    ) -> Result<StepOutput> {
        if micro.is_empty() {
            return Err(Error::config("train_step needs at least one batch"));
        }
        if self.optimizer.is_none() {
            return Err(Error::config(
                "no optimizer: build a Trainer with an optimizer config first",
            ));
        }
        let total: usize = micro.iter().map(Batch::counted_tokens).sum();
        if total == 0 {
            return Err(Error::config(NO_COUNTED_TOKENS));
        }
        let step = self.optimizer.as_ref().map_or(0, |o| o.step);
        let mut acc = Accumulation::default();
        let mut sum = 0.0;
        let mut logits = None;
        for b in micro {
            let want = want_logits && micro.len() == 1;
            let (l, lg) = self.accumulate_into(&mut acc, b, step, Some(total), want)?;
            sum += l.sum;
            logits = lg;
        }
        let loss = sum / total as f64;
        if !loss.is_finite() {
            return Err(Error::NonFinite(format!(
                "loss is {loss} at step {}; the parameters were not updated",
                step + 1
            )));
        }
        let grad_norm = self.clip_gradients(&acc, max_grad_norm, step)?;
        self.optimizer_update(lr)?;
        Ok(StepOutput {
            loss,
            tokens: total,
            grad_norm,
            logits,
        })
    }

    /// Add the gradients of one more micro-batch of optimizer step `step` to those in
    /// the LoRA gradient buffers, for callers that get micro-batches one call at a time
    /// (the Python API). Afterwards the buffers hold the gradient of the mean loss over
    /// every counted token of the micro-batches in `acc`, as [`Engine::train_step`] over
    /// them would: the first micro-batch overwrites the buffers, each later one first
    /// scales them by T/(T+t) (T tokens so far, t in this batch) and adds its own
    /// gradient at 1/(T+t). Dropout masks are those of `train_step`. Returns the
    /// batch's loss sum and count (and logits when asked for). The buffers stay where
    /// they are, so memory shared with another library sees the gradients. After an
    /// error the buffers hold a partial gradient: start a fresh [`Accumulation`].
    pub fn accumulate(
        &mut self,
        acc: &mut Accumulation,
        batch: &Batch,
        step: u64,
        want_logits: bool,
    ) -> Result<(LossSum, Option<Vec<f32>>)> {
        self.accumulate_into(acc, batch, step, None, want_logits)
    }

    /// [`Engine::accumulate`]; with `total` (the counted tokens of the whole step, when
    /// known in advance) every micro-batch is scaled by 1/total and nothing is rescaled.
    fn accumulate_into(
        &mut self,
        acc: &mut Accumulation,
        batch: &Batch,
        step: u64,
        total: Option<usize>,
        want_logits: bool,
    ) -> Result<(LossSum, Option<Vec<f32>>)> {
        let t = batch.counted_tokens();
        let all = total.unwrap_or(acc.tokens + t);
        let lora = need_lora(&mut self.lora)?;
        if acc.micro_batches == 0 {
            lora.zero_grads(&self.be)?;
        } else if total.is_none() && acc.tokens > 0 && t > 0 {
            let keep = acc.tokens as f32 / all as f32;
            for (_, _, g) in lora.named_params_mut() {
                crate::optim::scale_in_place(&self.be, g, keep)?;
            }
        }
        let seed = mix_seed(&[self.seed, step, acc.micro_batches]);
        let scale = if all == 0 { 0.0 } else { 1.0 / all as f32 };
        // a step of one micro-batch may run as a step graph
        let whole_step = acc.micro_batches == 0 && total == Some(t);
        let out = if whole_step && !want_logits {
            self.forward_backward_graphed(batch, scale, seed)?
        } else {
            self.forward_backward(batch, scale, true, want_logits, seed)?
        };
        acc.tokens += t;
        acc.micro_batches += 1;
        Ok(out)
    }

    /// Clip the accumulated gradients to the global norm `max_grad_norm` in place (None:
    /// no clipping) and return their norm before clipping. Fails when nothing was
    /// counted or the norm is not finite (step `step` + 1 in the message).
    pub fn clip_gradients(
        &mut self,
        acc: &Accumulation,
        max_grad_norm: Option<f32>,
        step: u64,
    ) -> Result<f64> {
        if acc.tokens == 0 {
            return Err(Error::config(NO_COUNTED_TOKENS));
        }
        let lora = need_lora(&mut self.lora)?;
        self.be.profile_phase("optimizer");
        let grad_norm = clip_grad_norm(&self.be, lora, max_grad_norm)?;
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite(format!(
                "gradient norm is {grad_norm} at step {}; the parameters were not updated",
                step + 1
            )));
        }
        Ok(grad_norm)
    }

    /// One update of the engine's own optimizer from the gradient buffers, at `lr` (None:
    /// the optimizer's).
    pub fn optimizer_update(&mut self, lr: Option<f32>) -> Result<()> {
        let lora = need_lora(&mut self.lora)?;
        let opt = self.optimizer.as_mut().ok_or_else(|| {
            Error::config("no optimizer: build a Trainer with an optimizer config first")
        })?;
        let lr = lr.unwrap_or_else(|| opt.cfg.lr());
        opt.update(&self.be, lora, lr)
    }

    /// Loss (sum and count) of a batch without gradients.
    pub fn eval(
        &mut self,
        batch: &Batch,
        want_logits: bool,
    ) -> Result<(LossSum, Option<Vec<f32>>)> {
        self.forward_backward(batch, 1.0, false, want_logits, 0)
    }

    /// Attach a fresh optimizer to the current adapters (its state in host memory when
    /// [`Engine::offload_optimizer`] is set).
    pub fn set_optimizer(&mut self, cfg: OptimizerConfig) -> Result<()> {
        let be = &self.be;
        let lora = self
            .lora
            .as_ref()
            .ok_or_else(|| Error::config("initialise LoRA before creating the optimizer"))?;
        self.optimizer = Some(Optimizer::new(be, cfg, lora, self.offload_optimizer)?);
        Ok(())
    }
}

/// Device memory an automatic tile leaves to the runtime and to what the estimate does
/// not count: cuBLAS's workspace, quantized weights expanded for a block, the pool's
/// fragmentation.
pub const TILE_MARGIN_BYTES: u64 = 1 << 30;

/// Calls of fewer tokens bring the next blocks' parked inputs back while the current
/// block computes (`activation_prefetch`); longer ones bring each back when its block
/// starts. At this length a Llama-3-8B block's backward takes about 1 s on an H200 and its
/// bf16 input's copy about 20 ms (attention grows with the square of the length, the copy
/// with the length), while a prefetched input would hold 0.5 GB more at the peak (1 GB at
/// 128k, 2 GB at 256k).
pub const PREFETCH_INPUTS_BELOW: usize = 65536;

const NO_COUNTED_TOKENS: &str =
    "the batch has no counted tokens (every label is -100 or sequences have length 1)";

/// [`Error::Interrupted`] when the flag of [`Engine::cancel`] is raised.
fn check_cancel(cancel: Option<&AtomicBool>) -> Result<()> {
    match cancel {
        Some(c) if c.load(Ordering::Relaxed) => Err(Error::Interrupted),
        _ => Ok(()),
    }
}

fn need_lora<B: Backend>(lora: &mut Option<LoraParams<B>>) -> Result<&mut LoraParams<B>> {
    lora.as_mut().ok_or_else(|| {
        Error::config("LoRA is not initialised: call initialize_lora() or load an adapter first")
    })
}

/// A block's saved input between the forward and the backward.
enum Checkpoint<B: Backend> {
    Device(B::Buf),
    Parked(B::Parked),
    /// Parked as its half copy ([`Model::half_copy`]), widened back to f32 on return.
    ParkedHalf(B::Parked),
}
