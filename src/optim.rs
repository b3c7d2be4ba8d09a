//! Optimizers over the LoRA parameters (PyTorch semantics), global-norm gradient
//! clipping, and their state for checkpoints.

use crate::backend::{Accumulate, AdamWItem, AdamWStep, Backend, SgdItem, SgdStep};
use crate::error::{Error, Result};
use crate::lora::LoraParams;
use serde::{Deserialize, Serialize};

/// Which optimizer and its hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// `torch.optim.AdamW`.
    AdamW {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
    /// `torch.optim.SGD` with momentum (dampening 0, no Nesterov).
    Sgd {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    },
}

impl OptimizerConfig {
    /// AdamW with PyTorch's defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01).
    pub fn adamw(lr: f32) -> Self {
        OptimizerConfig::AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    /// SGD with the given momentum and no weight decay.
    pub fn sgd(lr: f32, momentum: f32) -> Self {
        OptimizerConfig::Sgd {
            lr,
            momentum,
            weight_decay: 0.0,
        }
    }

    /// The configured (peak) learning rate.
    pub fn lr(&self) -> f32 {
        match self {
            OptimizerConfig::AdamW { lr, .. } | OptimizerConfig::Sgd { lr, .. } => *lr,
        }
    }

    /// Reject values that would silently misbehave.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f32| {
            Err(Error::config(format!(
                "optimizer {what} = {v} is out of range"
            )))
        };
        match *self {
            OptimizerConfig::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                if !(lr.is_finite() && lr >= 0.0) {
                    return bad("lr", lr);
                }
                if !(0.0..1.0).contains(&beta1) {
                    return bad("beta1", beta1);
                }
                if !(0.0..1.0).contains(&beta2) {
                    return bad("beta2", beta2);
                }
                if !(eps.is_finite() && eps > 0.0) {
                    return bad("eps", eps);
                }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) {
                    return bad("weight_decay", weight_decay);
                }
            }
            OptimizerConfig::Sgd {
                lr,
                momentum,
                weight_decay,
            } => {
                if !(lr.is_finite() && lr >= 0.0) {
                    return bad("lr", lr);
                }
                if !(0.0..1.0).contains(&momentum) {
                    return bad("momentum", momentum);
                }
                if !(weight_decay.is_finite() && weight_decay >= 0.0) {
                    return bad("weight_decay", weight_decay);
                }
            }
        }
        Ok(())
    }

    /// Names of the per-parameter state tensors, as PyTorch names them.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerConfig::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
            OptimizerConfig::Sgd { .. } => &["momentum_buffer"],
        }
    }
}

/// An optimizer with its per-parameter state, in the order of
/// [`LoraParams::named_params`].
pub struct Optimizer<B: Backend> {
    pub cfg: OptimizerConfig,
    /// Updates done so far.
    pub step: u64,
    /// `state[i][j]`: state tensor j (see [`OptimizerConfig::state_names`]) of parameter i.
    pub state: Vec<Vec<B::Buf>>,
    /// The state lives in host memory the device reads over the bus
    /// ([`Backend::zeros_host`]) instead of in device memory.
    pub offload: bool,
}

impl<B: Backend> Optimizer<B> {
    /// Fresh state (zeros) for every parameter of `params`, in device memory, or with
    /// `offload` in host memory that the update kernels read and write over the bus
    /// ([`Backend::zeros_host`]; same numbers, no device memory for the state).
    pub fn new(
        be: &B,
        cfg: OptimizerConfig,
        params: &LoraParams<B>,
        offload: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let n_state = cfg.state_names().len();
        let zeros = |n: usize| {
            if offload {
                be.zeros_host(n)
            } else {
                be.zeros(n)
            }
        };
        let state = params
            .named_params()
            .iter()
            .map(|(_, shape, _, _)| (0..n_state).map(|_| zeros(shape[0] * shape[1])).collect())
            .collect::<Result<Vec<_>>>()?;
        Ok(Optimizer {
            cfg,
            step: 0,
            state,
            offload,
        })
    }

    /// A state buffer holding `data`, placed where this optimizer keeps its state (for
    /// loading a checkpoint). With offloading the values pass through a temporary device
    /// buffer of one tensor and are copied exactly.
    pub fn state_buf(&self, be: &B, data: &[f32]) -> Result<B::Buf> {
        if !self.offload {
            return be.upload(data);
        }
        let n = data.len();
        let mut buf = be.zeros_host(n)?;
        if n > 0 {
            let src = be.upload(data)?;
            be.copy_cols(&mut buf, n, 0, &src, n, 0, n, Accumulate::Overwrite)?;
        }
        Ok(buf)
    }

    /// One update of every parameter with learning rate `lr` (the schedule's value), all
    /// tensors at once ([`Backend::adamw_step_all`], [`Backend::sgd_step_all`]).
    pub fn update(&mut self, be: &B, params: &mut LoraParams<B>, lr: f32) -> Result<()> {
        let tensors = params.named_params_mut();
        if tensors.len() != self.state.len() {
            return Err(Error::internal(format!(
                "the optimizer holds state for {} tensors, the adapters have {}",
                self.state.len(),
                tensors.len()
            )));
        }
        self.step += 1;
        let step = self.step;
        let pairs = tensors.into_iter().zip(&mut self.state);
        let mismatch = || Error::internal("optimizer state does not match its kind");
        match self.cfg {
            OptimizerConfig::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
                ..
            } => {
                let mut items = pairs
                    .map(|((_, p, g), st)| match st.as_mut_slice() {
                        [m, v] => Ok(AdamWItem { p, g, m, v }),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let h = AdamWStep {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    step,
                };
                be.adamw_step_all(&mut items, h)
            }
            OptimizerConfig::Sgd {
                momentum,
                weight_decay,
                ..
            } => {
                let mut items = pairs
                    .map(|((_, p, g), st)| match st.as_mut_slice() {
                        [buf] => Ok(SgdItem { p, g, buf }),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let h = SgdStep {
                    lr,
                    momentum,
                    weight_decay,
                    first: step == 1,
                };
                be.sgd_step_all(&mut items, h)
            }
        }
    }
}

/// `x *= alpha`, keeping `x` where it is (its memory may be shared, e.g. with torch
/// through DLPack): through a temporary, since axpy reads and writes different buffers.
pub fn scale_in_place<B: Backend>(be: &B, x: &mut B::Buf, alpha: f32) -> Result<()> {
    let mut tmp = be.uninit(crate::backend::DeviceBuf::len(x))?;
    be.axpy(&mut tmp, alpha, x, Accumulate::Overwrite)?;
    be.axpy(x, 1.0, &tmp, Accumulate::Overwrite)
}

/// Global L2 norm of all gradients; when `max_norm` is given and exceeded, scale every
/// gradient by `max_norm / (norm + 1e-6)` as `torch.nn.utils.clip_grad_norm_` does.
/// Returns the norm before clipping. The buffers stay where they are.
pub fn clip_grad_norm<B: Backend>(
    be: &B,
    params: &mut LoraParams<B>,
    max_norm: Option<f32>,
) -> Result<f64> {
    let grads: Vec<&B::Buf> = params
        .named_params()
        .into_iter()
        .map(|(_, _, _, g)| g)
        .collect();
    let norm = be.sum_squares_all(&grads)?.sqrt();
    if let Some(max) = max_norm {
        let coef = max as f64 / (norm + 1e-6);
        if coef < 1.0 {
            for (_, _, g) in params.named_params_mut() {
                scale_in_place(be, g, coef as f32)?;
            }
        }
    }
    Ok(norm)
}
