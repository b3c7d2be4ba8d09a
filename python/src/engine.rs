//! `lema._lema.Engine`: one [`LemaModel`] driven from Python. Everything heavy runs with
//! the GIL released ([`crate::interrupt`]); numbers cross the boundary as little-endian
//! bytes (token ids as int64, logits as float32) that the Python layer makes arrays of.

use crate::dlpack::Buffer;
use crate::errors::IntoPy;
use crate::interrupt;
use lema::api::Memory;
use lema::trainer::Accumulation;
use lema::{Batch, Error, LemaConfig, LemaModel, OptimizerConfig};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

/// The model, shared by the Python object and every DLPack capsule made from it, and the
/// flag that stops its work.
pub struct Shared {
    model: Mutex<LemaModel>,
    cancel: Arc<AtomicBool>,
}

impl Shared {
    /// The model (a panic in an earlier call does not lock it out).
    pub fn lock(&self) -> lema::Result<MutexGuard<'_, LemaModel>> {
        Ok(self.model.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A model on its device, with the state of the optimizer step being accumulated.
#[pyclass(module = "lema._lema")]
pub struct Engine {
    shared: Option<Arc<Shared>>,
    acc: Accumulation,
}

/// (PEFT key, shape, master, gradient)
type SharedPair = (String, (usize, usize), Buffer, Buffer);

/// (loss sum, counted tokens, logits as float32 bytes or None)
type LossOut = (f64, usize, Option<Py<PyBytes>>);

impl Engine {
    fn shared(&self) -> PyResult<&Arc<Shared>> {
        self.shared.as_ref().ok_or_else(|| {
            PyRuntimeError::new_err("this model is closed; build a new LemaModel to go on")
        })
    }

    /// Run `f` on the model with the GIL released.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut LemaModel) -> lema::Result<T> + Send,
    ) -> PyResult<T> {
        let shared = self.shared()?.clone();
        interrupt::detached(py, move || f(&mut *shared.lock()?))
    }

    /// Run `f` on the model with the GIL released; Ctrl-C stops it.
    fn interruptible<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut LemaModel) -> lema::Result<T> + Send,
    ) -> PyResult<T> {
        let shared = self.shared()?.clone();
        let cancel = shared.cancel.clone();
        interrupt::run(py, &cancel, move || f(&mut *shared.lock()?))
    }
}

/// Token ids from little-endian int64 bytes, checked to be ids.
fn ids_of(bytes: &[u8], what: &str) -> PyResult<Vec<u32>> {
    int64s(bytes, what)?
        .into_iter()
        .map(|v| {
            u32::try_from(v).map_err(|_| {
                PyValueError::new_err(format!(
                    "{what} holds {v}, which is not a token id (ids are 0 or more)"
                ))
            })
        })
        .collect()
}

fn int64s(bytes: &[u8], what: &str) -> PyResult<Vec<i64>> {
    if !bytes.len().is_multiple_of(8) {
        return Err(PyValueError::new_err(format!(
            "{what}: {} bytes is not a whole number of int64 values",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn batch_of(ids: &[u8], labels: Option<&[u8]>, batch: usize, seq: usize) -> PyResult<Batch> {
    let input_ids = ids_of(ids, "input_ids")?;
    let labels = match labels {
        None => return Batch::language_modeling(input_ids, batch, seq).py_err(),
        Some(l) => int64s(l, "labels")?
            .into_iter()
            .map(|v| {
                i32::try_from(v).map_err(|_| {
                    PyValueError::new_err(format!(
                        "labels hold {v}, which is not a token id or -100"
                    ))
                })
            })
            .collect::<PyResult<Vec<i32>>>()?,
    };
    Batch::new(input_ids, labels, batch, seq).py_err()
}

fn logits_bytes(py: Python<'_>, logits: Option<Vec<f32>>) -> Option<Py<PyBytes>> {
    logits.map(|l| {
        let bytes: Vec<u8> = l.iter().flat_map(|v| v.to_le_bytes()).collect();
        PyBytes::new(py, &bytes).unbind()
    })
}

fn json_err(what: &str, e: serde_json::Error) -> PyErr {
    PyValueError::new_err(format!("{what}: {e}"))
}

#[pymethods]
impl Engine {
    /// Open the model that `config_json` (lema's `LemaConfig`, as JSON) describes.
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> PyResult<Self> {
        let config: LemaConfig =
            serde_json::from_str(config_json).map_err(|e| json_err("LemaConfig", e))?;
        let model = interrupt::detached(py, move || LemaModel::new(config))?;
        let cancel = Arc::new(AtomicBool::new(false));
        let mut model = model;
        model.set_cancel(Some(cancel.clone()));
        Ok(Engine {
            shared: Some(Arc::new(Shared {
                model: Mutex::new(model),
                cancel,
            })),
            acc: Accumulation::default(),
        })
    }

    /// "cpu" or "cuda".
    #[getter]
    fn device(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |m| {
            Ok(if m.device() == lema::Device::Cuda {
                "cuda"
            } else {
                "cpu"
            }
            .to_string())
        })
    }

    /// The GPU's or CPU's name.
    #[getter]
    fn device_name(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |m| Ok(m.device_name()))
    }

    /// Why device "auto" settled on the CPU, when it did.
    #[getter]
    fn device_note(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.with(py, |m| Ok(m.device_note().map(str::to_string)))
    }

    /// What the model's config asks that lema does not do (shown as warnings).
    #[getter]
    fn model_notes(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.with(py, |m| Ok(m.model_config().notes.clone()))
    }

    /// The effective configuration (lema's `LemaConfig`) as JSON.
    fn config_json(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |m| {
            serde_json::to_string(m.config()).map_err(|e| Error::config(e.to_string()))
        })
    }

    /// (architecture, vocabulary size, hidden size, layers, bytes of the weights file)
    fn model_summary(&self, py: Python<'_>) -> PyResult<(String, usize, usize, usize)> {
        self.with(py, |m| {
            let c = m.model_config();
            Ok((
                format!("{:?}", c.arch).to_lowercase(),
                c.vocab_size,
                c.hidden_size,
                c.num_hidden_layers,
            ))
        })
    }

    fn initialize_lora(&mut self, py: Python<'_>) -> PyResult<()> {
        self.acc = Accumulation::default();
        self.with(py, |m| m.initialize_lora())
    }

    fn load_adapter(&mut self, py: Python<'_>, dir: PathBuf) -> PyResult<()> {
        self.acc = Accumulation::default();
        self.with(py, move |m| m.load_adapter(&dir))
    }

    fn save_adapter(&self, py: Python<'_>, dir: PathBuf) -> PyResult<()> {
        self.with(py, move |m| m.save_adapter(&dir))
    }

    fn trainable_parameters(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |m| Ok(m.trainable_parameters()))
    }

    /// Every LoRA matrix as (PEFT key, shape, master, gradient), the last two DLPack
    /// buffers of engine memory.
    fn buffers(&self, py: Python<'_>) -> PyResult<Vec<SharedPair>> {
        let shared = self.shared()?.clone();
        let (tensors, memory) = self.with(py, |m| Ok((m.shared_tensors()?, m.memory())))?;
        let cuda = match memory {
            Memory::Host => None,
            Memory::Cuda { ordinal } => Some(ordinal),
        };
        Ok(tensors
            .into_iter()
            .map(|t| {
                let buf = |address: usize| Buffer {
                    engine: shared.clone(),
                    name: t.name.clone(),
                    address,
                    shape: t.shape,
                    cuda,
                };
                (
                    t.name.clone(),
                    (t.shape[0], t.shape[1]),
                    buf(t.param),
                    buf(t.grad),
                )
            })
            .collect())
    }

    /// Forward and backward of one micro-batch of optimizer step `step`, its gradient
    /// accumulated into the shared buffers (the first micro-batch of a step overwrites
    /// them). `stream`: the CUDA stream the caller's work runs on (ordered both ways).
    #[pyo3(signature = (input_ids, labels, batch, seq, step, want_logits=false, stream=None))]
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        &mut self,
        py: Python<'_>,
        input_ids: &[u8],
        labels: Option<&[u8]>,
        batch: usize,
        seq: usize,
        step: u64,
        want_logits: bool,
        stream: Option<u64>,
    ) -> PyResult<LossOut> {
        let b = batch_of(input_ids, labels, batch, seq)?;
        let mut acc = self.acc;
        let r = self.interruptible(py, move |m| {
            if let Some(s) = stream {
                m.order_after(s)?;
            }
            let r = m.accumulate(&mut acc, &b, step, want_logits);
            if let Some(s) = stream {
                m.order_before(s)?;
            }
            r.map(|r| (r, acc))
        });
        match r {
            Ok(((loss, logits), acc)) => {
                self.acc = acc;
                Ok((loss.sum, loss.count, logits_bytes(py, logits)))
            }
            Err(e) => {
                // the buffers hold a partial gradient: the step starts over
                self.acc = Accumulation::default();
                Err(e)
            }
        }
    }

    /// (counted tokens, micro-batches) accumulated into the current step.
    #[getter]
    fn accumulated(&self) -> (usize, u64) {
        (self.acc.tokens, self.acc.micro_batches)
    }

    /// Forget the accumulated micro-batches (the next one overwrites the gradients).
    fn reset_accumulation(&mut self) {
        self.acc = Accumulation::default();
    }

    /// Clip the accumulated gradients in place to global norm `max_norm` (None: only
    /// measure); returns the norm before clipping.
    #[pyo3(signature = (max_norm, step, stream=None))]
    fn clip(
        &self,
        py: Python<'_>,
        max_norm: Option<f32>,
        step: u64,
        stream: Option<u64>,
    ) -> PyResult<f64> {
        let acc = self.acc;
        self.with(py, move |m| {
            let n = m.clip_gradients(&acc, max_norm, step)?;
            if let Some(s) = stream {
                m.order_before(s)?;
            }
            Ok(n)
        })
    }

    fn zero_grads(&mut self, py: Python<'_>) -> PyResult<()> {
        self.acc = Accumulation::default();
        self.with(py, |m| m.zero_grads())
    }

    /// Attach the engine's own optimizer (lema's `OptimizerConfig` as JSON).
    fn set_optimizer(&self, py: Python<'_>, config_json: &str) -> PyResult<()> {
        let cfg: OptimizerConfig =
            serde_json::from_str(config_json).map_err(|e| json_err("optimizer", e))?;
        self.with(py, move |m| m.set_optimizer(cfg))
    }

    /// One update of the engine's optimizer; ends the accumulated step. Returns the
    /// number of updates done.
    #[pyo3(signature = (lr=None))]
    fn optimizer_update(&mut self, py: Python<'_>, lr: Option<f32>) -> PyResult<u64> {
        self.acc = Accumulation::default();
        self.with(py, move |m| m.optimizer_update(lr))
    }

    /// Loss of a batch without training (LoRA dropout off).
    #[pyo3(signature = (input_ids, labels, batch, seq, want_logits=false))]
    fn evaluate(
        &self,
        py: Python<'_>,
        input_ids: &[u8],
        labels: Option<&[u8]>,
        batch: usize,
        seq: usize,
        want_logits: bool,
    ) -> PyResult<LossOut> {
        let b = batch_of(input_ids, labels, batch, seq)?;
        let (sum, count, logits) = self.interruptible(py, move |m| {
            let (mean, count, logits) = m.evaluate(&b, want_logits)?;
            Ok((mean * count as f64, count, logits))
        })?;
        Ok((sum, count, logits_bytes(py, logits)))
    }

    /// Continue each prompt (token ids); returns (new tokens, stopped at a stop id).
    #[pyo3(signature = (prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0, stop_ids=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<u32>>,
        max_new_tokens: usize,
        temperature: f32,
        top_k: Option<usize>,
        top_p: Option<f32>,
        seed: u64,
        stop_ids: Vec<u32>,
    ) -> PyResult<Vec<(Vec<u32>, bool)>> {
        let opts = lema::GenerateOptions {
            max_new_tokens,
            sampling: lema::SamplingParams {
                temperature,
                top_k,
                top_p,
                seed,
            },
            stop_ids,
        };
        self.interruptible(py, move |m| {
            let out = m.generate(&prompts, &opts, &mut |_, _| Ok(()))?;
            Ok(out.into_iter().map(|g| (g.tokens, g.stopped)).collect())
        })
    }

    /// Write a checkpoint folder atomically: the adapter, the engine optimizer's state
    /// when it has one, `files` (name, bytes) and trainer_state.json.
    #[pyo3(signature = (dir, step, max_grad_norm, extra_json, files))]
    fn write_checkpoint(
        &self,
        py: Python<'_>,
        dir: PathBuf,
        step: u64,
        max_grad_norm: Option<f32>,
        extra_json: &str,
        files: Vec<(String, Vec<u8>)>,
    ) -> PyResult<()> {
        let extra: serde_json::Value =
            serde_json::from_str(extra_json).map_err(|e| json_err("trainer state", e))?;
        self.with(py, move |m| {
            m.write_checkpoint(&dir, step, max_grad_norm, extra, &files)
        })
    }

    /// Load a checkpoint's adapter (and engine optimizer state) in place; returns its
    /// trainer state as JSON.
    fn resume(&mut self, py: Python<'_>, dir: PathBuf) -> PyResult<String> {
        self.acc = Accumulation::default();
        self.with(py, move |m| {
            let st = m.resume_in_place(&dir)?;
            serde_json::to_string(&st).map_err(|e| Error::config(e.to_string()))
        })
    }

    /// Make CUDA stream `stream` wait for the engine's queued work.
    fn order_before(&self, py: Python<'_>, stream: u64) -> PyResult<()> {
        self.with(py, move |m| m.order_before(stream))
    }

    fn synchronize(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |m| m.synchronize())
    }

    /// Peak device memory of the engine's pool (CUDA), bytes.
    fn device_memory_used(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        self.with(py, |m| Ok(m.device_memory_used()))
    }

    /// Release the model: the weights file, staging and device memory go once no array
    /// made from [`Engine::buffers`] is alive any more.
    fn close(&mut self) {
        self.shared = None;
    }

    #[getter]
    fn closed(&self) -> bool {
        self.shared.is_none()
    }
}
