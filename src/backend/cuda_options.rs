//! The CUDA backend's options, one definition for the real backend and the stand-in of
//! builds without the `cuda` feature (so the two cannot drift apart).

use crate::backend::DType;
use std::path::PathBuf;

/// Where compiled kernels are kept between processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelCache {
    /// `$XDG_CACHE_HOME/lema/kernels`, else `~/.cache/lema/kernels`.
    Default,
    /// This folder.
    Dir(PathBuf),
    /// No disk cache (kernels are still cached in memory for the process).
    Off,
}

/// How a CUDA backend is set up (the same options with or without the `cuda` feature;
/// a build without it accepts and ignores them).
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Which GPU (0-based, as the driver numbers them).
    pub ordinal: usize,
    /// Storage type of frozen weights stored as F32 in the file: F32 keeps them (exact
    /// GEMMs, twice the memory), BF16 or F16 converts them once at upload. Weights stored
    /// as BF16 or F16 always keep their type.
    pub weight_dtype: DType,
    /// Upper bound on the f32 logits of one row chunk in `lm_head_loss`, in bytes; a chunk
    /// has at least one row.
    pub logits_chunk_bytes: usize,
    /// Where compiled kernels are cached between runs.
    pub kernel_cache: KernelCache,
    /// Synchronise after every kernel so that a fault names its kernel (slow; default from
    /// the environment variable `LEMA_CUDA_SYNC=1`).
    pub sync_each_launch: bool,
    /// Run attention with the f32 CUDA-core kernels (exact to f32 rounding, about ten times
    /// slower) instead of the bf16 tensor-core kernels used for head dimensions 64 and 128
    /// on sm_80 and newer (default from the environment variable
    /// `LEMA_CUDA_EXACT_ATTENTION=1`).
    pub exact_attention: bool,
    /// Sequences at least this long use the "wide" tensor-core attention kernels (128
    /// queries a block; shorter ones the 64-query kernels, which give the GPU twice the
    /// blocks). Both give the same bits; tests lower it to run the wide kernels at small
    /// sizes. Default 8192.
    pub wide_attention_from: usize,
    /// On sm_90 (Hopper), run the tensor-core attention on the wgmma kernels
    /// (`attention_wgmma.cu`: the mma.sync kernels' arithmetic and bits, faster) instead of
    /// the mma.sync ones; other architectures ignore it. Default from the environment
    /// variable `LEMA_CUDA_WGMMA` (on unless `0`).
    pub wgmma_attention: bool,
    /// Time every kernel, GEMM and copy of the compute stream, for
    /// `CudaBackend::profile_take` (default from the environment variable
    /// `LEMA_CUDA_PROFILE=1`).
    pub profile: bool,
    /// Fill every buffer from `Backend::uninit` with 0xFF bytes (NaN as f32), so that an
    /// element read before it is written shows up as NaN instead of as a stale value
    /// (tests; costs a memset per buffer). Also on whenever `sync_each_launch` is. Default
    /// from the environment variable `LEMA_CUDA_POISON=1`.
    pub poison_uninit: bool,
    /// The most host memory the process may use (`max_host_memory`): page-locked
    /// allocations are checked against it (and the cgroup limit and what the system has
    /// available) before they are made.
    pub max_host_memory: Option<u64>,
    /// Capture a training step whose inputs repeat the previous step's as a CUDA graph,
    /// and replay it for the steps after (`backend/cuda/graph.rs`). On by default; off
    /// with `LEMA_CUDA_GRAPHS=0` or `LemaConfig::step_graphs = false`.
    pub step_graphs: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            ordinal: 0,
            weight_dtype: DType::F32,
            logits_chunk_bytes: 64 << 20,
            kernel_cache: KernelCache::Default,
            sync_each_launch: std::env::var("LEMA_CUDA_SYNC").is_ok_and(|v| v == "1"),
            exact_attention: std::env::var("LEMA_CUDA_EXACT_ATTENTION").is_ok_and(|v| v == "1"),
            wide_attention_from: 8192,
            wgmma_attention: std::env::var("LEMA_CUDA_WGMMA").map_or(true, |v| v != "0"),
            profile: std::env::var("LEMA_CUDA_PROFILE").is_ok_and(|v| v == "1"),
            poison_uninit: std::env::var("LEMA_CUDA_POISON").is_ok_and(|v| v == "1"),
            max_host_memory: None,
            step_graphs: std::env::var("LEMA_CUDA_GRAPHS").map_or(true, |v| v != "0"),
        }
    }
}
