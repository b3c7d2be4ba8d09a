//! What a host language needs to drive a model one call at a time with an optimizer of
//! its own (the Python bindings): the LoRA masters and their gradients as raw memory to
//! share (DLPack), the engine's work ordered against the host's stream, gradients
//! accumulated one micro-batch per call, cancellation between blocks, the engine's own
//! optimizer on demand, and checkpoints that carry the host's optimizer state.

use super::{AnyEngine, LemaModel, STATE_FORMAT, TrainerState};
use crate::backend::{Accumulate, Backend, DeviceBuf, LossSum};
use crate::checkpoint;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::optim::OptimizerConfig;
use crate::trainer::Accumulation;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// One LoRA matrix as memory to share: f32, row-major, `shape` elements, at `param` (the
/// master) and `grad` (its gradient buffer), in host memory ([`Memory::Host`]) or device
/// memory ([`Memory::Cuda`]). The addresses stay valid while the model lives and its
/// adapters are not replaced ([`LemaModel::load_adapter`] replaces them;
/// [`LemaModel::load_adapter_in_place`] does not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedTensor {
    /// PEFT key, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    pub shape: [usize; 2],
    pub param: usize,
    pub grad: usize,
}

/// Where the memory of [`SharedTensor`]s is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    Host,
    /// Device memory of GPU `ordinal`, allocated in its primary context.
    Cuda {
        ordinal: usize,
    },
}

impl LemaModel {
    /// Every LoRA matrix, in [`crate::lora::LoraParams::named_params`] order, as memory
    /// to share.
    pub fn shared_tensors(&self) -> Result<Vec<SharedTensor>> {
        with_engine!(&self.engine, e => {
            let lora = e.lora.as_ref().ok_or_else(not_initialised)?;
            Ok(lora
                .named_params()
                .into_iter()
                .map(|(name, shape, p, g)| SharedTensor { name, shape, param: p.address(), grad: g.address() })
                .collect())
        })
    }

    /// Where the memory of [`LemaModel::shared_tensors`] is.
    pub fn memory(&self) -> Memory {
        match &self.engine {
            AnyEngine::Cpu(_) => Memory::Host,
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(_) => Memory::Cuda { ordinal: 0 },
        }
    }

    /// Make `stream` (a `CUstream` of the GPU's primary context; 0 or 1: the legacy
    /// default stream) wait for the engine's queued work. Nothing to do on the CPU.
    pub fn order_before(&self, _stream: u64) -> Result<()> {
        match &self.engine {
            AnyEngine::Cpu(_) => Ok(()),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.be.order_before(_stream),
        }
    }

    /// Make the engine's next work wait for what `stream` has queued so far.
    pub fn order_after(&self, _stream: u64) -> Result<()> {
        match &self.engine {
            AnyEngine::Cpu(_) => Ok(()),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.be.order_after(_stream),
        }
    }

    /// Wait until the engine's queued work is done.
    pub fn synchronize(&self) -> Result<()> {
        with_engine!(&self.engine, e => e.be.synchronize())
    }

    /// The flag that stops a forward or backward at the next block (None: never).
    pub fn set_cancel(&mut self, flag: Option<Arc<AtomicBool>>) {
        with_engine!(&mut self.engine, e => e.cancel = flag);
    }

    /// [`crate::trainer::Engine::accumulate`]: one more micro-batch of step `step`.
    pub fn accumulate(
        &mut self,
        acc: &mut Accumulation,
        batch: &Batch,
        step: u64,
        want_logits: bool,
    ) -> Result<(LossSum, Option<Vec<f32>>)> {
        with_engine!(&mut self.engine, e => e.accumulate(acc, batch, step, want_logits))
    }

    /// [`crate::trainer::Engine::clip_gradients`].
    pub fn clip_gradients(
        &mut self,
        acc: &Accumulation,
        max_grad_norm: Option<f32>,
        step: u64,
    ) -> Result<f64> {
        with_engine!(&mut self.engine, e => e.clip_gradients(acc, max_grad_norm, step))
    }

    /// Set every gradient buffer to zero (in place).
    pub fn zero_grads(&mut self) -> Result<()> {
        with_engine!(&mut self.engine, e => {
            let lora = e.lora.as_mut().ok_or_else(not_initialised)?;
            lora.zero_grads(&e.be)
        })
    }

    /// Attach the engine's own optimizer (fresh state) to the adapters.
    pub fn set_optimizer(&mut self, cfg: OptimizerConfig) -> Result<()> {
        cfg.validate()?;
        with_engine!(&mut self.engine, e => e.set_optimizer(cfg))
    }

    /// One update of the engine's optimizer at `lr` (None: its configured rate); returns
    /// the number of updates done.
    pub fn optimizer_update(&mut self, lr: Option<f32>) -> Result<u64> {
        with_engine!(&mut self.engine, e => {
            e.optimizer_update(lr)?;
            Ok(e.optimizer.as_ref().map_or(0, |o| o.step))
        })
    }

    /// Overwrite the adapters' values with those of a PEFT adapter folder whose
    /// configuration (rank, alpha, targets, …) equals the model's, keeping their memory
    /// where it is (shared views stay valid).
    pub fn load_adapter_in_place(&mut self, dir: &Path) -> Result<()> {
        with_engine!(&mut self.engine, e => {
            let lora = e.lora.as_mut().ok_or_else(not_initialised)?;
            let loaded = checkpoint::load_adapter(&e.be, &e.model, dir)?;
            let shapes = |l: &crate::lora::LoraParams<_>| -> Vec<(String, [usize; 2])> {
                l.named_params().into_iter().map(|(k, s, _, _)| (k, s)).collect()
            };
            let (a, b) = (&loaded.cfg, &lora.cfg);
            if (a.r, a.alpha, a.use_rslora) != (b.r, b.alpha, b.use_rslora) || shapes(&loaded) != shapes(lora) {
                return Err(Error::config(format!(
                    "the adapter in {} ({}) differs from this model's ({}); build the model from that adapter instead",
                    dir.display(),
                    describe(a),
                    describe(b)
                )));
            }
            for ((_, dst, _), (_, _, src, _)) in lora.named_params_mut().into_iter().zip(loaded.named_params()) {
                e.be.axpy(dst, 1.0, src, Accumulate::Overwrite)?;
            }
            Ok(())
        })
    }

    /// Write a checkpoint folder atomically: the PEFT adapter, the engine optimizer's
    /// state when it has one, the caller's `files` (name, contents: e.g. a torch
    /// optimizer's state) and `trainer_state.json` (with `step` updates done by an
    /// optimizer outside the engine when it has none).
    pub fn write_checkpoint(
        &self,
        dir: &Path,
        step: u64,
        max_grad_norm: Option<f32>,
        extra: serde_json::Value,
        files: &[(String, Vec<u8>)],
    ) -> Result<()> {
        for (name, _) in files {
            let plain = Path::new(name)
                .file_name()
                .is_some_and(|f| f == name.as_str());
            let taken = [
                checkpoint::TRAINER_STATE,
                checkpoint::ADAPTER_CONFIG,
                checkpoint::ADAPTER_WEIGHTS,
                checkpoint::OPTIMIZER_STATE,
            ];
            if !plain || taken.contains(&name.as_str()) {
                return Err(Error::config(format!(
                    "checkpoint file name '{name}' must be a plain file name other than {}",
                    taken.join(", ")
                )));
            }
        }
        let config = self.config.clone();
        let model_fingerprint = self.base_fingerprint()?;
        let base = checkpoint::base_model_id(&config.model_path, &config.config_json());
        with_engine!(&self.engine, e => {
            let lora = e.lora.as_ref().ok_or_else(not_initialised)?;
            let opt = e.optimizer.as_ref();
            let arch = e.model.config().arch;
            checkpoint::write_dir_atomically(dir, |tmp| {
                checkpoint::write_adapter(&e.be, lora, arch, Some(&base), tmp)?;
                if let Some(opt) = opt {
                    checkpoint::write_optimizer(&e.be, lora, opt, tmp)?;
                }
                for (name, bytes) in files {
                    let path = tmp.join(name);
                    std::fs::write(&path, bytes).map_err(|err| Error::io(&path, err))?;
                }
                let state = TrainerState {
                    format: STATE_FORMAT.into(),
                    step: opt.map_or(step, |o| o.step),
                    optimizer: opt.map(|o| o.cfg.clone()),
                    max_grad_norm,
                    config,
                    model_fingerprint,
                    extra,
                };
                let v = serde_json::to_value(&state).map_err(|e| Error::config(e.to_string()))?;
                checkpoint::write_json(&tmp.join(checkpoint::TRAINER_STATE), &v)
            })
        })
    }

    /// Resume the state a checkpoint written by [`LemaModel::write_checkpoint`] holds
    /// into this model, in place: the adapter values, and the engine optimizer's state
    /// and step when it has one (the checkpoint must then hold one of the same kind).
    /// The base model must be the checkpoint's. Returns the trainer state.
    pub fn resume_in_place(&mut self, dir: &Path) -> Result<TrainerState> {
        let st = super::Trainer::read_state(dir)?;
        let diffs = super::base_model_differences(&st, &self.config)?;
        if !diffs.is_empty() {
            return Err(Error::config(format!(
                "checkpoint {} was made with a different base model:\n  {}",
                dir.display(),
                diffs.join("\n  ")
            )));
        }
        self.load_adapter_in_place(dir)?;
        with_engine!(&mut self.engine, e => {
            if let Some(opt) = e.optimizer.as_mut() {
                if st.optimizer.as_ref() != Some(&opt.cfg) {
                    return Err(Error::config(format!(
                        "checkpoint {} was trained with optimizer {}; this trainer's is {:?}",
                        dir.display(),
                        st.optimizer.as_ref().map_or("outside the engine (torch)".to_string(), |o| format!("{o:?}")),
                        opt.cfg
                    )));
                }
                let lora = e.lora.as_ref().ok_or_else(not_initialised)?;
                checkpoint::read_optimizer(&e.be, lora, opt, dir)?;
                opt.step = st.step;
            }
        });
        Ok(st)
    }
}

fn not_initialised() -> Error {
    Error::config("LoRA is not initialised: call initialize_lora() or load an adapter first")
}

fn describe(c: &crate::lora::LoraConfig) -> String {
    format!(
        "rank {}, alpha {}, targets {:?}{}",
        c.r,
        c.alpha,
        c.target_modules,
        if c.use_rslora { ", rsLoRA" } else { "" }
    )
}
