//! `lema bench`: a random-init model of a named shape written to a temporary folder, a
//! few warm-up steps, N timed steps, and a report of step time, tokens/s, memory and the
//! fraction of the machine's own GEMM throughput that a training step reaches.

use crate::api::{Device, LemaConfig, LemaModel};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Accumulate, Backend, DType, Gemm};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::optim::OptimizerConfig;
use crate::rng::Rng;
use crate::stream::Strategy;
use crate::trainer::StepOutput;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The shape of a Llama-family or GPT-2 model.
#[derive(Clone, Debug, Serialize)]
pub struct Shape {
    pub name: String,
    pub gpt2: bool,
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub max_positions: usize,
    pub tied: bool,
}

/// Named shapes: `llama2-7b`, `llama3-8b`, `tinyllama-1.1b`, `smollm2-135m`, `gpt2`,
/// `gpt2-xl`, and `tiny` (for tests).
pub fn preset(name: &str) -> Result<Shape> {
    let s =
        |gpt2, vocab, hidden, intermediate, layers, heads, kv_heads, max_positions, tied| Shape {
            name: name.to_string(),
            gpt2,
            vocab,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            max_positions,
            tied,
        };
    Ok(match name {
        "llama2-7b" => s(false, 32000, 4096, 11008, 32, 32, 32, 4096, false),
        "llama3-8b" => s(false, 128256, 4096, 14336, 32, 32, 8, 8192, false),
        "tinyllama-1.1b" => s(false, 32000, 2048, 5632, 22, 32, 4, 2048, false),
        "smollm2-135m" => s(false, 49152, 576, 1536, 30, 9, 3, 8192, true),
        "gpt2" => s(true, 50257, 768, 3072, 12, 12, 12, 1024, true),
        "gpt2-xl" => s(true, 50257, 1600, 6400, 48, 25, 25, 1024, true),
        "llama3-70b" => s(false, 128256, 8192, 28672, 80, 64, 8, 8192, false),
        "tiny" => s(false, 256, 64, 128, 2, 4, 2, 512, false),
        _ => {
            return Err(Error::config(format!(
                "unknown model shape '{name}'; known: llama2-7b, llama3-8b, llama3-70b, tinyllama-1.1b, smollm2-135m, gpt2, gpt2-xl, tiny"
            )));
        }
    })
}

impl Shape {
    /// The HF config.json of this shape.
    pub fn config_json(&self) -> serde_json::Value {
        if self.gpt2 {
            serde_json::json!({
                "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": self.vocab, "n_embd": self.hidden, "n_layer": self.layers,
                "n_head": self.heads, "n_positions": self.max_positions, "n_inner": self.intermediate,
                "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
                "tie_word_embeddings": true,
            })
        } else {
            serde_json::json!({
                "model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "vocab_size": self.vocab, "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "max_position_embeddings": self.max_positions, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": self.tied,
            })
        }
    }

    /// Frozen parameters inside the blocks (the streamed part).
    pub fn block_params(&self) -> usize {
        let (c, i) = (self.hidden, self.intermediate);
        let kv = c / self.heads * self.kv_heads;
        if self.gpt2 {
            self.layers * (4 * c * c + 2 * c * i)
        } else {
            self.layers * (2 * c * c + 2 * c * kv + 3 * c * i)
        }
    }
}

/// Write a random-init model of `shape` (block weights with standard deviation 0.02,
/// embedding and head with `embed_std`, norms 1, biases 0) as `dir/model.safetensors` +
/// `dir/config.json`; returns the weights path. Values are uniform with the given
/// standard deviation (cheap to draw for multi-billion-parameter shapes), generated in
/// parallel chunks and streamed to disk tensor by tensor, so memory stays at one tensor.
pub fn write_random_model(
    dir: &Path,
    shape: &Shape,
    dtype: DType,
    seed: u64,
    embed_std: f64,
) -> Result<PathBuf> {
    write_random(dir, shape, dtype, seed, embed_std, None)
}

/// [`write_random_model`] with every block linear stored in NF4 as bitsandbytes stores
/// it (double quantization, expanding to bf16; random codes and block scales around
/// 0.035, so weights of about the same spread), everything else in bf16 — as a
/// bitsandbytes 4-bit checkpoint holds a model. Written directly, so a shape whose bf16
/// weights would not fit the disk (Llama-3-70B: 141 GB; 37 GB in NF4) can be benchmarked.
pub fn write_random_nf4_model(dir: &Path, shape: &Shape, seed: u64) -> Result<PathBuf> {
    write_random_quantized_model(dir, shape, crate::quant::Format::Nf4, seed)
}

/// [`write_random_model`] with every block linear stored in `format` (NF4: see
/// [`write_random_nf4_model`]; FP8: random E4M3 codes of magnitude 0.5–7.5 with block
/// scales of 0.004, so weights of about the same spread as the dense model's) and
/// everything else in bf16. Written directly, without a dense model first.
pub fn write_random_quantized_model(
    dir: &Path,
    shape: &Shape,
    format: crate::quant::Format,
    seed: u64,
) -> Result<PathBuf> {
    write_random(dir, shape, DType::BF16, seed, 0.02, Some(format))
}

/// A random NF4 tensor of `shape` (see [`write_random_nf4_model`]).
fn random_nf4(shape: &[usize], seed: u64) -> crate::quant::Nf4Tensor {
    use crate::quant::nf4::{Absmax, Nested};
    let n: usize = shape.iter().product();
    let blocks = n.div_ceil(64);
    let bytes = |len: usize, stream: u64| random_bytes(len, seed, stream);
    crate::quant::Nf4Tensor {
        shape: shape.to_vec(),
        dtype: DType::BF16,
        blocksize: 64,
        packed: bytes(n.div_ceil(2), 0),
        absmax: Absmax::Nested(Nested {
            codes: bytes(blocks, 1),
            absmax: vec![0.005; blocks.div_ceil(256)],
            code: crate::quant::dynamic::dynamic_map().to_vec(),
            blocksize: 256,
            offset: 0.035,
        }),
    }
}

/// Random bytes, `len` of them, drawn in parallel chunks from `seed` and `stream`.
fn random_bytes(len: usize, seed: u64, stream: u64) -> Vec<u8> {
    use rayon::prelude::*;
    let mut v = vec![0u8; len];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(ci, c)| {
        let mut rng = Rng::new(crate::rng::mix_seed(&[seed, stream, ci as u64]));
        for b in c.chunks_mut(8) {
            let x = rng.next_u64().to_le_bytes();
            b.copy_from_slice(&x[..b.len()]);
        }
    });
    v
}

/// A random FP8 `[rows, cols]` weight (see [`write_random_quantized_model`]): codes with a
/// random sign, exponent field 6–9 (2^-1 … 2^2) and mantissa, so never NaN.
fn random_fp8(shape: &[usize], seed: u64) -> crate::quant::fp8::Fp8Tensor {
    use rayon::prelude::*;
    let &[rows, cols] = shape else {
        unreachable!("block linears are matrices")
    };
    let mut codes = random_bytes(rows * cols, seed, 0);
    codes.par_iter_mut().for_each(|b| *b = (*b & 0x9f) + 0x30);
    let [br, bc] = crate::quant::fp8::scale_shape(rows, cols);
    crate::quant::fp8::Fp8Tensor {
        shape: [rows, cols],
        codes,
        scale_inv: vec![0.004; br * bc],
    }
}

/// The stored parts of a random block linear `name` of `shape` in `format`.
fn random_parts(
    format: crate::quant::Format,
    name: &str,
    shape: &[usize],
    seed: u64,
) -> Vec<crate::quant::StoredTensor> {
    match format {
        crate::quant::Format::Nf4 => crate::quant::encode_bnb4(name, &random_nf4(shape, seed)),
        crate::quant::Format::Fp8 => crate::quant::encode_fp8(name, random_fp8(shape, seed)),
    }
}

fn write_random(
    dir: &Path,
    shape: &Shape,
    dtype: DType,
    seed: u64,
    embed_std: f64,
    quant: Option<crate::quant::Format>,
) -> Result<PathBuf> {
    use rayon::prelude::*;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    let path = dir.join("model.safetensors");
    let stamp = dir.join("random-model.json");
    let want = serde_json::json!({ "shape": shape, "dtype": dtype, "seed": seed, "embed_std": embed_std, "quant": quant });
    // reuse a model this function wrote before with the same parameters (benchmarks of
    // multi-GB shapes run several configurations on one file)
    if path.exists()
        && std::fs::read_to_string(&stamp)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v == want)
    {
        return Ok(path);
    }
    let _ = std::fs::remove_file(&stamp);
    let mut config = shape.config_json();
    if let Some(format) = quant {
        config["quantization_config"] = format.quantization_config(dtype);
    }
    crate::checkpoint::write_json(&cfg_path, &config)?;
    let cfg = crate::config::ModelConfig::from_file(&cfg_path)?;
    let model = crate::model::Model::new(cfg);
    let specs = model.tensor_specs();
    // quantized: the block linears as their stored parts (names, types and shapes of a
    // tensor depend on its shape only, so one encoding per shape gives the specs)
    let quantized: std::collections::HashSet<String> = if quant.is_some() {
        model.linear_weights().into_iter().map(|(n, _)| n).collect()
    } else {
        Default::default()
    };
    // per shape: each part's name suffix, type and shape
    let mut parts_of_shape: BTreeMap<Vec<usize>, Vec<crate::fsutil::TensorSpec>> = BTreeMap::new();
    let mut out_specs = Vec::new();
    for s in &specs {
        if !quantized.contains(&s.name) {
            out_specs.push(crate::fsutil::TensorSpec {
                name: s.name.clone(),
                dtype,
                shape: s.shape.clone(),
            });
            continue;
        }
        let format = quant.expect("quantized names only with a format");
        let parts = parts_of_shape.entry(s.shape.clone()).or_insert_with(|| {
            random_parts(format, "", &s.shape, seed)
                .into_iter()
                .map(|p| crate::fsutil::TensorSpec {
                    name: p.name,
                    dtype: crate::quant::stored_dtype(p.dtype),
                    shape: p.shape,
                })
                .collect()
        });
        for p in parts.iter() {
            out_specs.push(crate::fsutil::TensorSpec {
                name: format!("{}{}", s.name, p.name),
                dtype: p.dtype,
                shape: p.shape.clone(),
            });
        }
    }
    let mut w = crate::fsutil::SafetensorsWriter::create(&path, out_specs, &BTreeMap::new())?;
    const CHUNK: usize = 1 << 16;
    for (ti, spec) in specs.iter().enumerate() {
        let n: usize = spec.shape.iter().product();
        let name = &spec.name;
        if let Some(format) = quant.filter(|_| quantized.contains(name)) {
            let seed = crate::rng::mix_seed(&[seed, ti as u64]);
            for part in random_parts(format, name, &spec.shape, seed) {
                w.write(&part.name, &part.data)?;
            }
            continue;
        }
        let vector = spec.shape.len() == 1;
        let std = if name.contains("embed") || name.contains("wte") || name.starts_with("lm_head") {
            embed_std
        } else {
            0.02
        };
        let mut vals = vec![0.0f32; n];
        if vector {
            let is_norm_weight =
                (name.contains("norm") || name.contains("ln_")) && name.ends_with(".weight");
            vals.fill(if is_norm_weight { 1.0 } else { 0.0 });
        } else {
            let half_width = std * 3f64.sqrt();
            vals.par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(ci, chunk)| {
                    let mut rng = Rng::new(crate::rng::mix_seed(&[seed, ti as u64, ci as u64]));
                    for v in chunk {
                        *v = rng.uniform(-half_width, half_width) as f32;
                    }
                });
        }
        w.write(name, &encode(&vals, dtype))?;
    }
    w.finish()?;
    crate::checkpoint::write_json(&stamp, &want)?;
    Ok(path)
}

/// f32 values as little-endian bytes of `dtype` (in parallel: multi-GB tensors).
pub fn encode(v: &[f32], dtype: DType) -> Vec<u8> {
    use rayon::prelude::*;
    v.par_chunks(4096)
        .map(|x| {
            let mut out = Vec::new();
            dtype.encode_into(x, &mut out);
            out
        })
        .flatten_iter()
        .collect()
}

/// What to benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct BenchOptions {
    pub shape: Shape,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    pub strategy: Strategy,
    pub dtype: DType,
    /// The block linears stored quantized ([`write_random_quantized_model`]); `dtype` is
    /// then bf16.
    pub quant: Option<crate::quant::Format>,
    pub lora_rank: usize,
    pub device: Device,
    pub gradient_checkpointing: crate::GradientCheckpointing,
    pub prefetch_depth: usize,
    pub max_vram: Option<u64>,
    /// Also time the same steps with every layer resident on the device, to tell how much
    /// of a streamed step is spent waiting for weights.
    pub compare_resident: bool,
    /// Keep saved activations in host memory between forward and backward.
    pub offload_activations: bool,
    /// Park them in the weights' half type.
    pub offload_activations_half: bool,
    /// Keep the optimizer state in host memory the GPU reads over the bus.
    pub offload_optimizer: bool,
    /// CUDA: time every kernel of the timed steps and report where the step's GPU time
    /// goes (adds a little host time per launch).
    pub profile: bool,
    /// The most host memory the process may use.
    pub max_host_memory: Option<u64>,
    /// Where streamed layers come from on the host.
    pub weight_source: crate::tiers::WeightSource,
    /// Tokens per sequence tile (None: chosen from the free memory; 0: untiled).
    pub seq_tile: Option<usize>,
}

/// The benchmark's findings.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub options: BenchOptions,
    pub device: String,
    pub threads: usize,
    pub step_seconds_median: f64,
    pub step_seconds_all: Vec<f64>,
    pub tokens_per_second: f64,
    /// Model FLOPs of one step ([`step_flops`]: 6·P per token, attention and head, the
    /// same count whether or not blocks are re-run).
    pub step_flops: f64,
    pub achieved_tflops: f64,
    /// CPU only: the machine's f32 GEMM rate on a large square product, the better of
    /// lema's GEMM and a BLAS found at run time ([`MachineGemm`]); `gemm_gflops` is that
    /// better rate.
    pub gemm_gflops: Option<f64>,
    pub machine_gemm: Option<MachineGemm>,
    /// `achieved_tflops` over `gemm_gflops`: the step's FLOPs (6·P per token, see
    /// [`step_flops`]) as a fraction of the machine's GEMM rate.
    pub fraction_of_gemm: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    /// GPU only: the most device memory in use after any step, as the driver reports it
    /// (context included; the allocator keeps a step's peak reserved).
    pub peak_vram_bytes: Option<u64>,
    /// Frozen weights copied host → device per step.
    pub weight_bytes_per_step: f64,
    /// Those bytes over the median step time.
    pub h2d_gb_per_s: f64,
    /// Median step with every layer resident on the device (when compared).
    pub resident_step_seconds: Option<f64>,
    /// 1 − resident / streamed step time: the share of a step spent waiting for weights.
    pub weight_wait_share: Option<f64>,
    pub stream_note: Option<String>,
    /// Tokens per sequence tile of the timed steps (None: untiled).
    pub seq_tile: Option<usize>,
    /// The blocks whose activations the last timed step kept (the others were re-run).
    pub kept_blocks: usize,
    /// Timed steps replayed as a step graph (CUDA; None on the CPU).
    pub graph_replays: Option<u64>,
    /// Why the step's capture was not kept, when it was not.
    pub graph_note: Option<String>,
    /// Where the frozen layers come from (the tier plan).
    pub weights_plan: Option<String>,
    /// Bytes read from disk through the staging ring per step.
    pub disk_bytes_per_step: f64,
    pub model_file_bytes: u64,
    pub final_loss: f64,
    /// With `profile`: GPU milliseconds per timed step by kernel, largest first, `idle`
    /// being the compute stream waiting (for weights, offloaded activations or the host).
    pub profile: Option<Vec<crate::backend::ProfileLine>>,
}

/// FLOPs of one training step with gradient checkpointing: forward twice and the input
/// gradient of every frozen GEMM (2·P each per token), attention (causal), LM head.
pub fn step_flops(shape: &Shape, batch: usize, seq: usize) -> f64 {
    let tokens = (batch * seq) as f64;
    let linear = 6.0 * shape.block_params() as f64 * tokens;
    // causal attention forward: QKᵀ and PV over (T+1)/2 keys on average, 2 FLOPs each;
    // recomputed once, backward ≈ 2× forward
    let attn_fwd =
        4.0 * shape.hidden as f64 * (seq as f64 + 1.0) / 2.0 * tokens * shape.layers as f64;
    let head = 4.0 * (shape.hidden * shape.vocab) as f64 * tokens;
    linear + 4.0 * attn_fwd + head
}

/// The machine's f32 GEMM rate, measured on an `n × n × n` product ([`MACHINE_GEMM_N`]):
/// lema's own GEMM (the CPU backend's, the `gemm` crate) and, when one can be loaded at
/// run time, a BLAS library's `sgemm` on the same product; `gflops` is the better of the
/// two. Each is the best of several runs, so a busy machine lowers it less than a median
/// would.
#[derive(Clone, Debug, Serialize)]
pub struct MachineGemm {
    pub n: usize,
    /// lema's GEMM (what the CPU backend's steps run on).
    pub lema_gflops: f64,
    /// The BLAS library found ([`blas::load`]) and its rate; `None` when none was found.
    pub blas_library: Option<String>,
    pub blas_gflops: Option<f64>,
    /// The better of the two: the rate a step's FLOPs are compared with.
    pub gflops: f64,
}

/// The size of the square product the machine's GEMM rate is measured on.
pub const MACHINE_GEMM_N: usize = 2048;

/// Measure [`MachineGemm`] on `threads` threads (the CPU backend's rayon pool; a BLAS
/// runs on its own threads, which it sizes to the machine unless told otherwise).
pub fn machine_gemm() -> Result<MachineGemm> {
    let n = MACHINE_GEMM_N;
    let mut rng = Rng::new(1);
    let a: Vec<f32> = (0..n * n).map(|_| rng.normal() as f32).collect();
    let b: Vec<f32> = (0..n * n).map(|_| rng.normal() as f32).collect();
    let flops = 2.0 * (n * n * n) as f64;
    let best = |mut run: Box<dyn FnMut() -> Result<()> + '_>| -> Result<f64> {
        run()?; // warm-up: pages, packing buffers, the library's threads
        let mut t_best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            run()?;
            t_best = t_best.min(t.elapsed().as_secs_f64());
        }
        Ok(flops / t_best / 1e9)
    };
    let be = CpuBackend::<f32>::new();
    let (ab, bb) = (be.upload(&a)?, be.upload(&b)?);
    let mut cb = be.zeros(n * n)?;
    let g = Gemm {
        m: n,
        n,
        k: n,
        trans_a: false,
        trans_b: false,
        alpha: 1.0,
        accumulate: Accumulate::Overwrite,
    };
    let lema_gflops = best(Box::new(|| be.matmul(&mut cb, &ab, &bb, g)))?;
    let ours = be.download(&cb)?;
    drop(cb);
    let (blas_library, blas_gflops) = match blas::load() {
        Some(lib) => {
            let mut c = vec![0f32; n * n];
            let r = best(Box::new(|| {
                lib.sgemm(n, &a, &b, &mut c);
                Ok(())
            }))?;
            // a library whose product differs (a wrong interface guessed) is not a rate
            let scale = ours.iter().fold(0f32, |m, x| m.max(x.abs()));
            let off = ours
                .iter()
                .zip(&c)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            if off <= 1e-4 * scale {
                (Some(lib.name.clone()), Some(r))
            } else {
                (
                    Some(format!(
                        "{} (refused: its product differs from lema's by {off:e})",
                        lib.name
                    )),
                    None,
                )
            }
        }
        None => (None, None),
    };
    Ok(MachineGemm {
        n,
        lema_gflops,
        gflops: lema_gflops.max(blas_gflops.unwrap_or(0.0)),
        blas_library,
        blas_gflops,
    })
}

/// A BLAS library loaded at run time (`dlopen`), so that `lema bench` can compare with a
/// tuned BLAS where the machine has one, while lema itself builds and runs without any.
pub mod blas {
    use std::ffi::{CString, c_char, c_int, c_void};

    /// Libraries tried in order when `LEMA_BLAS` is not set.
    pub const CANDIDATES: &[&str] = &[
        "libmkl_rt.so.2",
        "libmkl_rt.so",
        "libopenblas.so.0",
        "libopenblas.so",
        "libblis.so.4",
        "libblis.so",
        "libblas.so.3",
    ];

    type Lp64 = unsafe extern "C" fn(
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        f32,
        *const f32,
        c_int,
        *const f32,
        c_int,
        f32,
        *mut f32,
        c_int,
    );
    type Ilp64 = unsafe extern "C" fn(
        c_int,
        c_int,
        c_int,
        i64,
        i64,
        i64,
        f32,
        *const f32,
        i64,
        *const f32,
        i64,
        f32,
        *mut f32,
        i64,
    );

    enum Sgemm {
        Lp64(Lp64),
        Ilp64(Ilp64),
    }

    /// An open library and its `cblas_sgemm`.
    pub struct Blas {
        pub name: String,
        f: Sgemm,
        _handle: *mut c_void,
    }

    /// The BLAS named by `LEMA_BLAS` (a path or a soname), else the first of
    /// [`CANDIDATES`] that loads; `None` when none does or it lacks `cblas_sgemm` (or the
    /// ILP64 `scipy_cblas_sgemm64_` of the OpenBLAS that numpy's wheels bundle).
    pub fn load() -> Option<Blas> {
        let names: Vec<String> = match std::env::var("LEMA_BLAS") {
            Ok(p) if !p.is_empty() => vec![p],
            _ => CANDIDATES.iter().map(|s| s.to_string()).collect(),
        };
        for name in names {
            let c = CString::new(name.clone()).ok()?;
            // SAFETY: dlopen with a valid C string; the handle is kept for the
            // process's life (never closed: a BLAS may leave threads running).
            let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            if h.is_null() {
                continue;
            }
            let sym = |s: &str| {
                let s = CString::new(s).expect("symbol name");
                // SAFETY: a valid handle and C string.
                unsafe { libc::dlsym(h, s.as_ptr() as *const c_char) }
            };
            let lp = sym("cblas_sgemm");
            let f = if !lp.is_null() {
                // SAFETY: cblas_sgemm has this signature in every CBLAS (LP64: int).
                Sgemm::Lp64(unsafe { std::mem::transmute::<*mut c_void, Lp64>(lp) })
            } else {
                let ilp = sym("scipy_cblas_sgemm64_");
                if ilp.is_null() {
                    continue;
                }
                // SAFETY: OpenBLAS's ILP64 cblas_sgemm: the same with 64-bit integers.
                Sgemm::Ilp64(unsafe { std::mem::transmute::<*mut c_void, Ilp64>(ilp) })
            };
            return Some(Blas {
                name,
                f,
                _handle: h,
            });
        }
        None
    }

    impl Blas {
        /// c `[n, n]` = a · b, all row-major.
        pub fn sgemm(&self, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
            assert!(a.len() >= n * n && b.len() >= n * n && c.len() >= n * n);
            // CblasRowMajor = 101, CblasNoTrans = 111
            let (major, nt) = (101, 111);
            // SAFETY: the slices hold n·n elements each; lda = ldb = ldc = n.
            unsafe {
                match self.f {
                    Sgemm::Lp64(f) => {
                        let n = n as c_int;
                        f(
                            major,
                            nt,
                            nt,
                            n,
                            n,
                            n,
                            1.0,
                            a.as_ptr(),
                            n,
                            b.as_ptr(),
                            n,
                            0.0,
                            c.as_mut_ptr(),
                            n,
                        )
                    }
                    Sgemm::Ilp64(f) => {
                        let n = n as i64;
                        f(
                            major,
                            nt,
                            nt,
                            n,
                            n,
                            n,
                            1.0,
                            a.as_ptr(),
                            n,
                            b.as_ptr(),
                            n,
                            0.0,
                            c.as_mut_ptr(),
                            n,
                        )
                    }
                }
            }
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak resident set size of this process (Linux), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Timed steps of one configuration: (step times, bytes copied per step, peak device
/// memory, last loss, device name, stream note).
struct Timing {
    times: Vec<f64>,
    bytes_per_step: f64,
    peak_vram: Option<u64>,
    loss: f64,
    device: String,
    note: Option<String>,
    profile: Option<Vec<crate::backend::ProfileLine>>,
    disk_bytes_per_step: f64,
    plan: Option<String>,
    seq_tile: Option<usize>,
    kept_blocks: usize,
    graph_replays: Option<u64>,
    graph_note: Option<String>,
}

fn time_steps(
    opts: &BenchOptions,
    path: &Path,
    strategy: Strategy,
    max_vram: Option<u64>,
) -> Result<Timing> {
    let mut cfg = LemaConfig::new(path);
    cfg.strategy = strategy;
    cfg.device = opts.device;
    cfg.lora_rank = opts.lora_rank;
    cfg.lora_alpha = 2.0 * opts.lora_rank as f32;
    cfg.lora_target_modules = Some(vec!["all-linear".into()]);
    cfg.gradient_checkpointing = opts.gradient_checkpointing;
    cfg.prefetch_depth = opts.prefetch_depth;
    cfg.max_vram = max_vram;
    cfg.offload_activations = opts.offload_activations;
    cfg.offload_activations_half = opts.offload_activations_half;
    cfg.offload_optimizer = opts.offload_optimizer;
    cfg.profile = opts.profile;
    cfg.max_host_memory = opts.max_host_memory;
    cfg.weight_source = opts.weight_source;
    cfg.seq_tile = opts.seq_tile;
    let mut model = LemaModel::new(cfg)?;
    let plan = model.weights_plan();
    model.initialize_lora()?;
    let device = model.device_name();
    let mut trainer = crate::api::Trainer::new(model, OptimizerConfig::adamw(1e-4))?;
    let mut rng = Rng::new(2);
    let n = opts.batch * opts.seq;
    let ids: Vec<u32> = (0..n)
        .map(|_| rng.below(opts.shape.vocab as u64) as u32)
        .collect();
    let batch = Batch::language_modeling(ids, opts.batch, opts.seq)?;
    let mut last = StepOutput::default();
    for _ in 0..opts.warmup {
        last = trainer.train_step(&batch)?;
    }
    let (copied0, _) = trainer.model.stream_stats();
    let read0 = trainer.model.disk_bytes_read();
    let mut times = Vec::with_capacity(opts.steps);
    let mut peak_vram = trainer.model.device_memory_used();
    trainer.model.profile_take()?; // drop the warm-up's regions
    let mut profile: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    let replays0 = trainer.model.step_graphs().map(|g| g.0);
    for _ in 0..opts.steps.max(1) {
        let t = Instant::now();
        last = trainer.train_step(&batch)?; // returns after the loss is on the host
        times.push(t.elapsed().as_secs_f64());
        peak_vram = peak_vram.max(trainer.model.device_memory_used());
        for l in trainer.model.profile_take()?.unwrap_or_default() {
            let e = profile.entry(l.label).or_default();
            e.0 += l.calls;
            e.1 += l.ms;
        }
    }
    let (copied1, note) = trainer.model.stream_stats();
    let seq_tile = trainer.model.last_seq_tile();
    let kept_blocks = trainer.model.last_kept_blocks();
    let graphs = trainer.model.step_graphs();
    let graph_replays = graphs.as_ref().zip(replays0).map(|(g, r0)| g.0 - r0);
    let graph_note = graphs.and_then(|g| g.1);
    let read1 = trainer.model.disk_bytes_read();
    let steps = times.len() as f64;
    let profile = (!profile.is_empty()).then(|| {
        let mut lines: Vec<_> = profile
            .into_iter()
            .map(|(label, (calls, ms))| crate::backend::ProfileLine {
                label,
                calls: (calls as f64 / steps).round() as u64,
                ms: ms / steps,
            })
            .collect();
        lines.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        lines
    });
    Ok(Timing {
        bytes_per_step: (copied1 - copied0) as f64 / times.len() as f64,
        disk_bytes_per_step: (read1 - read0) as f64 / times.len() as f64,
        plan,
        times,
        peak_vram,
        loss: last.loss,
        device,
        note,
        profile,
        seq_tile,
        kept_blocks,
        graph_replays,
        graph_note,
    })
}

/// Run the benchmark in `workdir` (the random model is written there).
pub fn run_bench(opts: &BenchOptions, workdir: &Path) -> Result<BenchReport> {
    let path = if let Some(format) = opts.quant {
        write_random_quantized_model(workdir, &opts.shape, format, 1)?
    } else {
        write_random_model(workdir, &opts.shape, opts.dtype, 1, 0.02)?
    };
    let model_file_bytes = std::fs::metadata(&path)
        .map_err(|e| Error::io(&path, e))?
        .len();
    let main = time_steps(opts, &path, opts.strategy, opts.max_vram)?;
    let mut times = main.times.clone();
    let med = median(&mut times);
    let resident = if opts.compare_resident {
        let r = time_steps(opts, &path, Strategy::Budget, Some(u64::MAX / 2))?;
        let mut t = r.times;
        Some(median(&mut t))
    } else {
        None
    };
    let flops = step_flops(&opts.shape, opts.batch, opts.seq);
    let on_cpu = main.device == "cpu";
    let machine = if on_cpu { Some(machine_gemm()?) } else { None };
    let gemm = machine.as_ref().map(|m| m.gflops);
    let achieved = flops / med / 1e12;
    Ok(BenchReport {
        options: opts.clone(),
        device: main.device,
        threads: rayon::current_num_threads(),
        step_seconds_median: med,
        step_seconds_all: main.times,
        tokens_per_second: (opts.batch * opts.seq) as f64 / med,
        step_flops: flops,
        achieved_tflops: achieved,
        gemm_gflops: gemm,
        machine_gemm: machine,
        fraction_of_gemm: gemm.map(|g| achieved * 1e3 / g),
        peak_rss_bytes: peak_rss_bytes(),
        peak_vram_bytes: main.peak_vram,
        weight_bytes_per_step: main.bytes_per_step,
        h2d_gb_per_s: main.bytes_per_step / med / 1e9,
        resident_step_seconds: resident,
        weight_wait_share: resident.map(|r| (1.0 - r / med).max(0.0)),
        stream_note: main.note,
        seq_tile: main.seq_tile,
        kept_blocks: main.kept_blocks,
        graph_replays: main.graph_replays,
        graph_note: main.graph_note,
        weights_plan: main.plan,
        disk_bytes_per_step: main.disk_bytes_per_step,
        model_file_bytes,
        final_loss: main.loss,
        profile: main.profile,
    })
}
