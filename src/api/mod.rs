//! The library's front door, after the seed's Python API: a [`LemaConfig`], a
//! [`LemaModel`] built from it, LoRA initialisation, a [`Trainer`] made from an
//! optimizer, `train_step`, and checkpoints that save and load.
//!
//! ```no_run
//! use lema::{LemaConfig, LemaModel, Trainer, OptimizerConfig};
//! # fn main() -> lema::Result<()> {
//! let config = LemaConfig::new("models/smollm2/model.safetensors");
//! let mut model = LemaModel::new(config)?;
//! model.initialize_lora()?;
//! println!("{} trainable parameters", model.trainable_parameters());
//! let mut trainer = Trainer::new(model, OptimizerConfig::adamw(1e-4))?;
//! let ids: Vec<u32> = vec![1, 2, 3, 4];
//! let out = trainer.train_step(&lema::Batch::language_modeling(ids, 1, 4)?)?;
//! println!("loss {}", out.loss);
//! trainer.save_checkpoint("out/checkpoint-1".as_ref())?;
//! # Ok(()) }
//! ```

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{self, CudaBackend, CudaOptions};
use crate::backend::{Backend, DType};
use crate::checkpoint;
use crate::config::{Arch, ModelConfig};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::gbi::Gbi;
use crate::generate::{GenerateOptions, Generated, LogitsOf};
use crate::lora::{LoraConfig, LoraParams};
use crate::model::Model;
use crate::optim::OptimizerConfig;
use crate::rng::Rng;
use crate::stream::Strategy;
use crate::tiers::WeightSource;
use crate::trainer::{Engine, StepOutput};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the computation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when a GPU and driver are present, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

impl std::str::FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            _ => Err(Error::config(format!(
                "unknown device '{s}'; supported: auto, cpu, cuda"
            ))),
        }
    }
}

/// Everything needed to build a model for training (the seed's `LemaConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LemaConfig {
    /// The monolithic `.safetensors` produced by `lema prepare`.
    pub model_path: PathBuf,
    /// The HF config.json; default: `config.json` beside the model file.
    pub config_path: Option<PathBuf>,
    /// Where to write the global binary index (tensor → group, offset, dtype, shape) as
    /// JSON for inspection; lema itself always re-reads and re-validates the header.
    pub gbi_path: Option<PathBuf>,
    pub lora_rank: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    /// None: the architecture's PEFT default (Llama: q_proj, v_proj; GPT-2: c_attn).
    pub lora_target_modules: Option<Vec<String>>,
    pub use_rslora: bool,
    pub strategy: Strategy,
    /// true, false or auto ([`crate::GradientCheckpointing`]).
    pub gradient_checkpointing: crate::GradientCheckpointing,
    /// Compute type of the GEMMs on an accelerator (the CPU computes in f32).
    pub dtype: Option<DType>,
    pub device: Device,
    pub seed: u64,
    /// Start from this PEFT adapter folder instead of a fresh initialisation.
    pub adapter_path: Option<PathBuf>,
    /// CUDA, strategy `budget`: bytes of GPU memory for frozen layers kept resident
    /// (default: what is free, less 4 GiB for activations).
    #[serde(default)]
    pub max_vram: Option<u64>,
    /// CUDA: layers copied ahead of the one in use (default 2).
    #[serde(default = "default_prefetch_depth")]
    pub prefetch_depth: usize,
    /// Keep each block's saved input in (pinned) host memory between the forward and the
    /// backward instead of on the device: less device memory at long sequences, at the
    /// cost of a device→host and a host→device copy per layer.
    #[serde(default)]
    pub offload_activations: bool,
    /// With `offload_activations`, park the block inputs in the half type the GEMMs read
    /// (bf16/f16 weights on CUDA) instead of f32: half the host memory (L·C·2 bytes a
    /// token instead of L·C·4) and half the copies. The forward and the loss are
    /// unchanged; the backward re-runs each block from its rounded input, so the
    /// gradients move by about that rounding. No effect where the GEMMs read f32.
    #[serde(default)]
    pub offload_activations_half: bool,
    /// Keep the optimizer state (AdamW's two moments, SGD's momentum: two f32 per LoRA
    /// parameter for AdamW) in page-locked host memory that the update kernels read and
    /// write over the bus instead of in device memory: saves their device memory (0.32 GB
    /// for 40 M LoRA parameters) at the cost of one pass over PCIe per optimizer step. The
    /// numbers are the same. The CPU backend ignores it.
    #[serde(default)]
    pub offload_optimizer: bool,
    /// CUDA: time every kernel, GEMM and compute-stream copy, for
    /// [`LemaModel::profile_take`] (also on with `LEMA_CUDA_PROFILE=1`).
    #[serde(default)]
    pub profile: bool,
    /// The most host memory the process may use, in bytes (besides its cgroup limit and
    /// what the system has available, which always count). STREAMING keeps the frozen
    /// layers that do not fit in half of it in the file and reads them from disk at each
    /// use; RESIDENT and pinned allocations are refused when they would exceed it.
    #[serde(default)]
    pub max_host_memory: Option<u64>,
    /// Where STREAMING takes the layers from on the host: `auto` (the mapped file when
    /// they fit the host budget, else RAM for as many as fit and disk for the rest),
    /// `mapped` or `disk` (every streamed layer through the staging ring).
    #[serde(default)]
    pub weight_source: WeightSource,
    /// Tokens per sequence tile: a block's norms, projections, RoPE, MLP and residual
    /// run over this many tokens at a time (attention over the whole sequence), so their
    /// memory is one tile's. None: on a GPU, tiles of 8192 tokens, fewer when the device
    /// memory free at the step asks for it (sequences up to 8192 tokens untiled; the CPU
    /// never tiles unless asked); 0: never tiled.
    #[serde(default)]
    pub seq_tile: Option<usize>,
    /// CUDA: capture a training step as a CUDA graph once its shape repeats, and replay it
    /// for the steps after with their own tokens (`backend/cuda/graph.rs`), so that a
    /// small step is not bound by the host's kernel launches. The same bits as without.
    /// On by default (CUDA.md, "Step graphs"); off with `false` or `LEMA_CUDA_GRAPHS=0`.
    #[serde(default = "default_step_graphs")]
    pub step_graphs: bool,
}

fn default_step_graphs() -> bool {
    true
}

fn default_prefetch_depth() -> usize {
    2
}

impl LemaConfig {
    /// Defaults for the model at `model_path`: rank 16, α 32, no dropout, PEFT's default
    /// targets, STREAMING with gradient checkpointing, automatic device, seed 42.
    pub fn new(model_path: impl Into<PathBuf>) -> Self {
        LemaConfig {
            model_path: model_path.into(),
            config_path: None,
            gbi_path: None,
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            lora_target_modules: None,
            use_rslora: false,
            strategy: Strategy::Streaming,
            gradient_checkpointing: crate::GradientCheckpointing::Every,
            dtype: None,
            device: Device::Auto,
            seed: 42,
            adapter_path: None,
            max_vram: None,
            prefetch_depth: 2,
            offload_activations: false,
            offload_activations_half: false,
            offload_optimizer: false,
            profile: false,
            max_host_memory: None,
            weight_source: WeightSource::Auto,
            seq_tile: None,
            step_graphs: default_step_graphs(),
        }
    }

    /// The config.json path in effect.
    pub fn config_json(&self) -> PathBuf {
        self.config_path.clone().unwrap_or_else(|| {
            self.model_path
                .parent()
                .map(|p| p.join("config.json"))
                .unwrap_or_else(|| PathBuf::from("config.json"))
        })
    }

    /// The LoRA settings in effect for `arch`.
    pub fn lora_config(&self, arch: Arch) -> LoraConfig {
        LoraConfig {
            r: self.lora_rank,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self
                .lora_target_modules
                .clone()
                .unwrap_or_else(|| default_targets(arch)),
            use_rslora: self.use_rslora,
        }
    }
}

/// PEFT's default LoRA targets for each architecture.
pub fn default_targets(arch: Arch) -> Vec<String> {
    crate::model::family::family(arch)
        .default_lora_targets
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// An engine on whichever backend was chosen; the dispatch happens here once.
enum AnyEngine {
    Cpu(Box<Engine<CpuBackend<f32>>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<Engine<CudaBackend>>),
}

macro_rules! with_engine {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            AnyEngine::Cpu($e) => $body,
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda($e) => $body,
        }
    };
}

// after the macro, which it uses
mod interop;
pub use interop::{Memory, SharedTensor};

/// The CUDA backend's options for `config`: its `dtype` (when set) is the storage type of
/// frozen weights that the file stores as F32.
fn cuda_options(config: &LemaConfig) -> CudaOptions {
    let mut opts = CudaOptions::default();
    if let Some(dt) = config.dtype {
        opts.weight_dtype = dt;
    }
    opts.profile |= config.profile;
    opts.max_host_memory = config.max_host_memory;
    opts.step_graphs &= config.step_graphs;
    opts
}

/// Host options of the weight stream for `config`.
fn host_options(config: &LemaConfig, working_bytes: u64) -> crate::host_tiers::HostOptions {
    crate::host_tiers::HostOptions {
        source: config.weight_source,
        max_host_memory: config.max_host_memory,
        on_device: 0,
        working_bytes,
        pins_mapping: false,
    }
}

/// A STREAMING source over the tiers planned for this host; buffers on the heap (the
/// backend uploads from them synchronously).
fn tiered_stream<B: Backend>(
    config: &LemaConfig,
    gbi: &Arc<Gbi>,
    model: &Model,
    working_bytes: u64,
) -> Result<Box<dyn crate::stream::WeightStream<B>>> {
    let tiers = crate::host_tiers::HostTiers::planned(
        gbi.clone(),
        model,
        host_options(config, working_bytes),
        &mut crate::hostmem::HeapBuf::alloc,
    )?;
    Ok(Box::new(crate::stream::Streaming::<B>::with_tiers(
        gbi.clone(),
        model.clone(),
        tiers,
    )))
}

/// An engine on GPU 0, its weights streamed by the CUDA ring (copy stream, events,
/// pinned host memory) unless the weights need converting on upload.
#[cfg(feature = "cuda")]
fn cuda_engine(config: &LemaConfig, model: Model, gbi: Arc<Gbi>) -> Result<AnyEngine> {
    use crate::stream::ring::{CudaRing, RingOptions};
    let be = CudaBackend::with_options(cuda_options(config))?;
    let converts =
        gbi.tensors().any(|t| t.dtype == DType::F32) && be.options().weight_dtype != DType::F32;
    let stream: Box<dyn crate::stream::WeightStream<CudaBackend>> = if converts {
        match config.strategy {
            Strategy::Streaming => tiered_stream(
                config,
                &gbi,
                &model,
                crate::backend::cuda::RUNTIME_HOST_BYTES,
            )?,
            _ => crate::stream::make_stream(config.strategy, gbi.clone(), model.clone()),
        }
    } else {
        let opts = RingOptions::for_strategy(
            &be,
            config.strategy,
            config.max_vram,
            config.prefetch_depth,
            config.weight_source,
            config.max_host_memory,
        );
        Box::new(CudaRing::new(&be, gbi.clone(), model.clone(), opts)?)
    };
    Ok(AnyEngine::Cuda(Box::new(Engine::with_stream(
        be,
        model,
        gbi,
        stream,
        config.gradient_checkpointing,
        config.seed,
    ))))
}

/// Without the `cuda` feature the backend cannot be made (its constructor says why).
#[cfg(not(feature = "cuda"))]
fn cuda_engine(config: &LemaConfig, _model: Model, _gbi: Arc<Gbi>) -> Result<AnyEngine> {
    match CudaBackend::with_options(cuda_options(config))? {}
}

/// An engine on the CPU. Its "device" copies of the weights are f32 in host memory: they
/// count against the host budget (two layers in use while streaming, all of them when
/// resident).
fn cpu_engine(config: &LemaConfig, model: Model, gbi: Arc<Gbi>) -> Result<AnyEngine> {
    let f32_bytes = |p| -> Result<u64> {
        Ok(crate::stream::part_tensors(&gbi, &model, p)?
            .iter()
            .map(|(_, t)| 4 * t.shape.iter().product::<usize>() as u64)
            .sum())
    };
    let layers = model.config().num_hidden_layers;
    let mut decoded = vec![f32_bytes(crate::stream::Part::Head)?];
    for i in 0..layers {
        decoded.push(f32_bytes(crate::stream::Part::Block(i))?);
    }
    let stream = match config.strategy {
        Strategy::Streaming => {
            let largest = decoded.iter().copied().max().unwrap_or(0);
            tiered_stream::<CpuBackend<f32>>(config, &gbi, &model, 2 * largest)?
        }
        Strategy::Resident | Strategy::Budget => {
            crate::hostmem::HostBudget::probe(config.max_host_memory).check(
                decoded.iter().sum(),
                &format!(
                    "strategy {} on the CPU (every layer decoded to f32)",
                    if config.strategy == Strategy::Resident { "resident" } else { "budget" }
                ),
                "use --strategy streaming, which keeps one or two layers and reads the others from the file, or raise the memory limit (max_host_memory, the cgroup's memory.max)",
            )?;
            crate::stream::make_stream(config.strategy, gbi.clone(), model.clone())
        }
    };
    Ok(AnyEngine::Cpu(Box::new(Engine::with_stream(
        CpuBackend::new(),
        model,
        gbi,
        stream,
        config.gradient_checkpointing,
        config.seed,
    ))))
}

/// A model ready for LoRA training: validated weights file, architecture, memory
/// strategy and backend.
pub struct LemaModel {
    config: LemaConfig,
    engine: AnyEngine,
    /// The device in use (`Cpu` or `Cuda`, never `Auto`).
    device: Device,
    /// Why `Device::Auto` settled on the CPU, when it did.
    device_note: Option<String>,
}

/// Open the weights and config of `config` and check every tensor the architecture
/// needs against the file (name, shape).
pub fn open_model(config: &LemaConfig) -> Result<(Arc<Gbi>, Model)> {
    let cfg = ModelConfig::from_file(&config.config_json())?;
    let mut gbi = Gbi::open(&config.model_path)?;
    let model = Model::new(cfg);
    // a tied head that the checkpoint leaves out (HF's save_pretrained does): the
    // embedding serves as the head, as transformers ties it
    let embed = crate::model::family::family(model.config().arch).embed_name;
    if model.config().tie_word_embeddings
        && gbi.get("lm_head.weight").is_none()
        && gbi.get(embed).is_some()
    {
        gbi.alias("lm_head.weight", embed)?;
    }
    // linears stored quantized (NF4, FP8) are checked against their parts
    let config_path = config.config_json();
    let raw_config: serde_json::Value =
        serde_json::from_str(&crate::fsutil::read_text(&config_path)?)
            .map_err(|e| Error::format(&config_path, format!("not valid JSON: {e}")))?;
    let quant =
        crate::model::quantized::QuantTable::read(&gbi, &model.linear_weights(), &raw_config)?;
    for spec in model.tensor_specs() {
        if quant.as_ref().is_some_and(|q| q.get(&spec.name).is_some()) {
            continue;
        }
        gbi.expect(&spec.name, &spec.shape)?;
    }
    let model = model.with_quant(quant);
    if let Some(p) = &config.gbi_path {
        write_gbi_json(&gbi, p)?;
    }
    Ok((Arc::new(gbi), model))
}

fn write_gbi_json(gbi: &Gbi, path: &Path) -> Result<()> {
    let tensors: Vec<serde_json::Value> = gbi
        .tensors()
        .map(|t| {
            serde_json::json!({
                "name": t.name, "group": format!("{:?}", Gbi::group_of(&t.name)),
                "dtype": t.dtype.safetensors_name(), "shape": t.shape,
                "offset": t.offset, "len": t.len,
            })
        })
        .collect();
    checkpoint::write_json(
        path,
        &serde_json::json!({ "file": gbi.path(), "num_layers": gbi.num_layers(), "tensors": tensors }),
    )
}

impl LemaModel {
    /// Open and validate the model described by `config` on its device.
    pub fn new(config: LemaConfig) -> Result<Self> {
        let (gbi, model) = open_model(&config)?;
        let mut device_note = None;
        let (engine, device) = match config.device {
            Device::Cpu => (cpu_engine(&config, model, gbi)?, Device::Cpu),
            Device::Cuda => {
                if let Err(why) = cuda::probe(0) {
                    return Err(Error::config(format!(
                        "device 'cuda' was requested, but {why}; use --device cpu, or auto to fall back to the CPU"
                    )));
                }
                (cuda_engine(&config, model, gbi)?, Device::Cuda)
            }
            Device::Auto => match cuda::probe(0) {
                Ok(()) => match cuda_engine(&config, model.clone(), gbi.clone()) {
                    Ok(e) => (e, Device::Cuda),
                    Err(e) => {
                        device_note = Some(format!(
                            "CUDA is present but could not be used ({e}); running on the CPU"
                        ));
                        (cpu_engine(&config, model, gbi)?, Device::Cpu)
                    }
                },
                Err(why) => {
                    device_note = Some(format!("{why}; running on the CPU"));
                    (cpu_engine(&config, model, gbi)?, Device::Cpu)
                }
            },
        };
        let mut m = LemaModel {
            config,
            engine,
            device,
            device_note,
        };
        let (offload, offload_opt) = (m.config.offload_activations, m.config.offload_optimizer);
        let ahead = m.config.prefetch_depth.max(1);
        let seq_tile = m.config.seq_tile;
        let half = m.config.offload_activations_half;
        with_engine!(&mut m.engine, e => {
            e.offload_activations = offload;
            e.offload_activations_half = half;
            e.activation_prefetch = ahead;
            e.offload_optimizer = offload_opt;
            e.seq_tile = seq_tile;
        });
        if let Some(dir) = m.config.adapter_path.clone() {
            m.load_adapter(&dir)?;
        }
        Ok(m)
    }

    /// The configuration this model was built from.
    pub fn config(&self) -> &LemaConfig {
        &self.config
    }

    /// The device the model runs on: `Cpu` or `Cuda` (what `Device::Auto` chose).
    pub fn device(&self) -> Device {
        self.device
    }

    /// The accelerator's name ("cpu" on the CPU).
    pub fn device_name(&self) -> String {
        match &self.engine {
            AnyEngine::Cpu(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.be.device_name().to_string(),
        }
    }

    /// Device memory in use as the driver reports it (all of this process's memory on
    /// the GPU, context included); None on the CPU.
    pub fn device_memory_used(&self) -> Option<u64> {
        match &self.engine {
            AnyEngine::Cpu(_) => None,
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.be.mem_info().map(|(free, total)| (total - free) as u64),
        }
    }

    /// GPU time per kernel since the last call (waits for queued work), when the model
    /// runs on CUDA with [`LemaConfig::profile`]; `None` otherwise.
    pub fn profile_take(&self) -> Result<Option<Vec<crate::backend::ProfileLine>>> {
        match &self.engine {
            AnyEngine::Cpu(_) => Ok(None),
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(e) => e.be.profile_take(),
        }
    }

    /// Bytes of frozen weights the stream has copied to the device so far, and why it
    /// runs on a slower path, if it does.
    pub fn stream_stats(&self) -> (u64, Option<String>) {
        with_engine!(&self.engine, e => (e.stream.bytes_copied(), e.stream.note()))
    }

    /// Where the frozen layers come from (the tier plan: mapped file, host RAM, disk
    /// through the staging ring; the sizes and why), for printing once at start; the
    /// library prints nothing itself.
    pub fn weights_plan(&self) -> Option<String> {
        with_engine!(&self.engine, e => e.stream.plan())
    }

    /// The tokens per sequence tile of the last step (None: untiled; see
    /// [`LemaConfig::seq_tile`]).
    pub fn last_seq_tile(&self) -> Option<usize> {
        with_engine!(&self.engine, e => e.last_tile)
    }

    /// The blocks whose activations the last training step kept from its forward to its
    /// backward (the others were re-run; see [`LemaConfig::gradient_checkpointing`]).
    pub fn last_kept_blocks(&self) -> usize {
        with_engine!(&self.engine, e => e.last_kept)
    }

    /// Training steps replayed as step graphs so far (CUDA graphs; None on the CPU), and
    /// why the last capture was not kept, if it was not.
    pub fn step_graphs(&self) -> Option<(u64, Option<String>)> {
        with_engine!(&self.engine, e => e.be.step_graph_report())
    }

    /// Bytes of frozen weights read from disk through the staging ring so far.
    pub fn disk_bytes_read(&self) -> u64 {
        with_engine!(&self.engine, e => e.stream.disk_bytes_read())
    }

    /// Why `Device::Auto` chose the CPU (no driver, no GPU, no CUDA build), if it did; the
    /// library prints nothing itself.
    pub fn device_note(&self) -> Option<&str> {
        self.device_note.as_deref()
    }

    /// The architecture's configuration.
    pub fn model_config(&self) -> &ModelConfig {
        with_engine!(&self.engine, e => e.model.config())
    }

    /// Create fresh adapters as PEFT does (A kaiming-uniform from the seed, B zero).
    pub fn initialize_lora(&mut self) -> Result<()> {
        let arch = self.model_config().arch;
        let lcfg = self.config.lora_config(arch);
        let mut rng = Rng::new(self.config.seed);
        with_engine!(&mut self.engine, e => {
            e.lora = Some(LoraParams::init(&e.be, e.model.block_linears(), &lcfg, &mut rng)?);
        });
        Ok(())
    }

    /// Replace the adapters with those of a PEFT adapter folder (its adapter_config.json
    /// decides rank, alpha and targets).
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let lcfg = checkpoint::read_adapter_config(dir)?;
        with_engine!(&mut self.engine, e => {
            e.lora = Some(checkpoint::load_adapter(&e.be, &e.model, dir)?);
        });
        self.config.lora_rank = lcfg.r;
        self.config.lora_alpha = lcfg.alpha;
        self.config.lora_dropout = lcfg.dropout;
        self.config.lora_target_modules = Some(lcfg.target_modules);
        self.config.use_rslora = lcfg.use_rslora;
        Ok(())
    }

    /// Number of trainable (LoRA) scalars; 0 before initialisation.
    pub fn trainable_parameters(&self) -> usize {
        with_engine!(&self.engine, e => e.lora.as_ref().map_or(0, |l| l.num_parameters()))
    }

    /// Every LoRA tensor as (PEFT key, shape, values).
    pub fn lora_tensors(&self) -> Result<Vec<LoraTensor>> {
        with_engine!(&self.engine, e => {
            let lora = e.lora.as_ref().ok_or_else(|| Error::config("LoRA is not initialised"))?;
            lora.named_params().into_iter().map(|(k, s, p, _)| Ok((k, s, e.be.download(p)?))).collect()
        })
    }

    /// Every LoRA gradient as (PEFT key, values), as left by the last step.
    pub fn lora_grads(&self) -> Result<Vec<(String, Vec<f32>)>> {
        with_engine!(&self.engine, e => {
            let lora = e.lora.as_ref().ok_or_else(|| Error::config("LoRA is not initialised"))?;
            lora.named_params().into_iter().map(|(k, _, _, g)| Ok((k, e.be.download(g)?))).collect()
        })
    }

    /// Mean loss and logits of a batch without training (LoRA dropout off).
    pub fn evaluate(
        &mut self,
        batch: &Batch,
        want_logits: bool,
    ) -> Result<(f64, usize, Option<Vec<f32>>)> {
        with_engine!(&mut self.engine, e => {
            let (l, logits) = e.eval(batch, want_logits)?;
            Ok((l.sum / l.count.max(1) as f64, l.count, logits))
        })
    }

    /// Generate continuations of the token-id `prompts` in one batch, with the KV cache;
    /// the adapter, when one is loaded, applies. `on_token(row, id)` sees each new token
    /// as it is chosen.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    ) -> Result<Vec<Generated>> {
        with_engine!(&mut self.engine, e => e.generate(prompts, opts, on_token))
    }

    /// Logits `[B, T, V]` of `ids` (`[B, T]`) fed through the KV cache in pieces of
    /// `pieces[j]` tokens per row (summing to T): the incremental path generation uses,
    /// which must agree with [`LemaModel::evaluate`].
    pub fn logits_through_cache(
        &mut self,
        ids: &[u32],
        batch: usize,
        pieces: &[usize],
    ) -> Result<Vec<f32>> {
        let t: usize = pieces.iter().sum();
        if batch == 0 || ids.len() != batch * t || pieces.contains(&0) {
            return Err(Error::config(format!(
                "{} ids cannot be fed as {batch} rows in pieces {pieces:?}",
                ids.len()
            )));
        }
        with_engine!(&mut self.engine, e => {
            let v = e.model.config().vocab_size;
            let mut cache = e.new_cache(batch, t, None)?;
            let mut out = vec![0f32; batch * t * v];
            let mut t0 = 0;
            for &p in pieces {
                let piece: Vec<u32> = ids
                    .chunks(t)
                    .flat_map(|row| row[t0..t0 + p].iter().copied())
                    .collect();
                let lg = e.forward_cached(&mut cache, &piece, LogitsOf::All)?;
                for (r, rows) in lg.chunks(p * v).enumerate() {
                    out[(r * t + t0) * v..(r * t + t0 + p) * v].copy_from_slice(rows);
                }
                t0 += p;
            }
            Ok(out)
        })
    }

    /// What identifies this model's base in a checkpoint: the size and content
    /// fingerprint of the weights file it maps, and its config.json.
    pub fn base_fingerprint(&self) -> Result<serde_json::Value> {
        let (bytes, content) = with_engine!(&self.engine, e => {
            (e.gbi.mapped().len() as u64, e.gbi.content_fingerprint()?)
        });
        fingerprint_json(&self.config, bytes, content)
    }

    /// How the weights file this model maps stands now: unchanged, replaced (the path
    /// names another file; the model keeps the one it opened) or modified in place.
    pub fn model_file_state(&self) -> Result<crate::modelfile::FileState> {
        with_engine!(&self.engine, e => e.gbi.file_state())
    }

    /// Write the adapter alone (PEFT format) into `dir`, atomically.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let base = checkpoint::base_model_id(&self.config.model_path, &self.config.config_json());
        with_engine!(&self.engine, e => {
            let lora = e.lora.as_ref().ok_or_else(|| Error::config("LoRA is not initialised"))?;
            let arch = e.model.config().arch;
            checkpoint::write_dir_atomically(dir, |tmp| checkpoint::write_adapter(&e.be, lora, arch, Some(&base), tmp))
        })
    }
}

/// A LoRA tensor as (PEFT key, shape, values).
pub type LoraTensor = (String, [usize; 2], Vec<f32>);

/// Run state saved in `trainer_state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format tag, so that other folders are not mistaken for checkpoints.
    pub format: String,
    /// Optimizer steps done.
    pub step: u64,
    /// The engine's optimizer; None when the parameters were updated by an optimizer
    /// outside the engine (a torch optimizer through the Python API), whose state the
    /// checkpoint holds in files of its own.
    pub optimizer: Option<OptimizerConfig>,
    pub max_grad_norm: Option<f32>,
    pub config: LemaConfig,
    /// What identifies the base model: file size, config.json contents and the content
    /// fingerprint of the weights file (`content`; absent in checkpoints of older lema).
    pub model_fingerprint: serde_json::Value,
    /// State of the caller's data pipeline and schedule (opaque to the trainer).
    pub extra: serde_json::Value,
}

pub(crate) const STATE_FORMAT: &str = "lema-trainer-state-1";

/// Key of the content fingerprint in [`TrainerState::model_fingerprint`].
const CONTENT_KEY: &str = "content";

/// What identifies a base model: the size and content fingerprint
/// ([`crate::modelfile::content_fingerprint`]) of its weights file, and its config.json.
fn fingerprint_json(config: &LemaConfig, bytes: u64, content: String) -> Result<serde_json::Value> {
    let cfg_path = config.config_json();
    let text = crate::fsutil::read_text(&cfg_path)?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, e.to_string()))?;
    Ok(serde_json::json!({ "model_file_bytes": bytes, "config": cfg, CONTENT_KEY: content }))
}

/// The fingerprint of the base model that `config` names, read from the path.
fn fingerprint(config: &LemaConfig) -> Result<serde_json::Value> {
    let path = &config.model_path;
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    fingerprint_json(
        config,
        bytes,
        crate::modelfile::content_fingerprint_of(path)?,
    )
}

/// Whether a checkpoint predates content fingerprints (lema before they were recorded):
/// its base model was identified by file size and config.json alone.
pub fn predates_content_fingerprint(state: &TrainerState) -> bool {
    state.model_fingerprint.get(CONTENT_KEY).is_none()
}

/// How the base model that `config` names differs from the one the checkpoint of `state`
/// was made with, one line per difference (none: the same base). A checkpoint without a
/// content fingerprint ([`predates_content_fingerprint`]) is compared on size and
/// config.json alone.
pub fn base_model_differences(state: &TrainerState, config: &LemaConfig) -> Result<Vec<String>> {
    let now = fingerprint(config)?;
    let then = &state.model_fingerprint;
    let path = config.model_path.display();
    let mut diffs = Vec::new();
    let resized = now["model_file_bytes"] != then["model_file_bytes"];
    if resized {
        diffs.push(format!(
            "model ({path}): the file is {} bytes, the checkpoint was made on one of {} bytes",
            now["model_file_bytes"], then["model_file_bytes"]
        ));
    }
    if now["config"] != then["config"] {
        diffs.push(format!(
            "model config ({}): its config.json differs from the one the checkpoint was made with",
            config.config_json().display()
        ));
    }
    // (a file of another size has other contents: that line says enough)
    if let Some(saved) = then.get(CONTENT_KEY)
        && !resized
        && *saved != now[CONTENT_KEY]
    {
        let show = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
        diffs.push(format!(
            "model ({path}): its weights are not those the checkpoint was trained on (content \
             fingerprint: checkpoint {}, now {})",
            show(saved),
            show(&now[CONTENT_KEY])
        ));
    }
    Ok(diffs)
}

/// A model plus optimizer: the seed's trainer.
pub struct Trainer {
    pub model: LemaModel,
    /// Global-norm clipping threshold; None disables clipping.
    pub max_grad_norm: Option<f32>,
    /// Caller state stored in checkpoints (data position, schedule, …).
    pub extra_state: serde_json::Value,
}

impl Trainer {
    /// A trainer over `model` (whose LoRA must be initialised or loaded) with a fresh
    /// optimizer.
    pub fn new(mut model: LemaModel, optimizer: OptimizerConfig) -> Result<Self> {
        with_engine!(&mut model.engine, e => e.set_optimizer(optimizer)?);
        Ok(Trainer {
            model,
            max_grad_norm: None,
            extra_state: serde_json::Value::Null,
        })
    }

    /// One optimizer step on one batch at the optimizer's learning rate.
    pub fn train_step(&mut self, batch: &Batch) -> Result<StepOutput> {
        self.train_step_accumulated(std::slice::from_ref(batch), None, false)
    }

    /// One step on one batch that also returns its `[B, T, V]` logits.
    pub fn train_step_with_logits(&mut self, batch: &Batch) -> Result<StepOutput> {
        self.train_step_accumulated(std::slice::from_ref(batch), None, true)
    }

    /// One optimizer step over several micro-batches (gradient accumulation), at learning
    /// rate `lr` (None: the optimizer's).
    pub fn train_step_accumulated(
        &mut self,
        micro: &[Batch],
        lr: Option<f32>,
        want_logits: bool,
    ) -> Result<StepOutput> {
        let clip = self.max_grad_norm;
        with_engine!(&mut self.model.engine, e => e.train_step(micro, lr, clip, want_logits))
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        with_engine!(&self.model.engine, e => e.optimizer.as_ref().map_or(0, |o| o.step))
    }

    /// Save adapter, optimizer state and trainer state into `dir` atomically. The base
    /// model is identified by the file this model maps (its size, content fingerprint
    /// and config.json), even if the path names another file now.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let extra = self.extra_state.clone();
        self.model
            .write_checkpoint(dir, self.step(), self.max_grad_norm, extra, &[])
    }

    /// Read a checkpoint's trainer state.
    pub fn read_state(dir: &Path) -> Result<TrainerState> {
        let path = dir.join(checkpoint::TRAINER_STATE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::format(
                    &path,
                    "missing: this folder is not a complete lema checkpoint",
                )
            } else {
                Error::io(&path, e)
            }
        })?;
        let st: TrainerState = serde_json::from_str(&text)
            .map_err(|e| Error::format(&path, format!("not a lema trainer state: {e}")))?;
        if st.format != STATE_FORMAT {
            return Err(Error::format(
                &path,
                format!("format '{}' is not '{STATE_FORMAT}'", st.format),
            ));
        }
        Ok(st)
    }

    /// Resume from a checkpoint folder. `config` overrides the saved configuration (e.g.
    /// to move the model file); the base model must be the one the run started with: the
    /// same file size, config.json and content fingerprint (a checkpoint that predates
    /// content fingerprints is compared on the first two alone; see
    /// [`predates_content_fingerprint`]).
    pub fn from_checkpoint(dir: &Path, config: Option<LemaConfig>) -> Result<Self> {
        let st = Self::read_state(dir)?;
        let mut config = config.unwrap_or(st.config.clone());
        let diffs = base_model_differences(&st, &config)?;
        if !diffs.is_empty() {
            return Err(Error::config(format!(
                "checkpoint {} was made with a different base model:\n  {}",
                dir.display(),
                diffs.join("\n  ")
            )));
        }
        config.adapter_path = Some(dir.to_path_buf());
        let model = LemaModel::new(config)?;
        let optimizer = st.optimizer.clone().ok_or_else(|| {
            Error::config(format!(
                "checkpoint {} holds the state of an optimizer outside the engine (torch, through lema's Python API); resume it with LemaTrainer.load_checkpoint in Python",
                dir.display()
            ))
        })?;
        let mut t = Trainer::new(model, optimizer)?;
        t.max_grad_norm = st.max_grad_norm;
        t.extra_state = st.extra.clone();
        with_engine!(&mut t.model.engine, e => {
            let lora = e.lora.as_ref().ok_or_else(|| Error::internal("lora"))?;
            let opt = e.optimizer.as_mut().ok_or_else(|| Error::internal("optimizer"))?;
            checkpoint::read_optimizer(&e.be, lora, opt, dir)?;
            opt.step = st.step;
        });
        Ok(t)
    }
}
