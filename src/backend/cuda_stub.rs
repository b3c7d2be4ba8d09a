//! Stand-in for the CUDA backend in builds without the `cuda` feature (candle's pattern):
//! the same names, and constructors that say how to get the real one, so that callers
//! need no `cfg` of their own.

use crate::backend::DType;
use crate::error::{Error, Result};
use std::path::PathBuf;

const WHY: &str = "this build of lema has no CUDA support; rebuild with `--features cuda`";

/// Says why CUDA cannot be used: in this build, never.
pub fn probe(_ordinal: usize) -> std::result::Result<(), String> {
    Err(WHY.to_string())
}

/// Where compiled kernels would be cached (unused without CUDA).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelCache {
    Default,
    Dir(PathBuf),
    Off,
}

/// Options of the CUDA backend (accepted and ignored without CUDA).
#[derive(Clone, Debug)]
pub struct CudaOptions {
    pub ordinal: usize,
    pub weight_dtype: DType,
    pub logits_chunk_bytes: usize,
    pub kernel_cache: KernelCache,
    pub sync_each_launch: bool,
    pub exact_attention: bool,
    pub profile: bool,
    pub poison_uninit: bool,
    pub max_host_memory: Option<u64>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            ordinal: 0,
            weight_dtype: DType::F32,
            logits_chunk_bytes: 256 << 20,
            kernel_cache: KernelCache::Default,
            sync_each_launch: false,
            exact_attention: false,
            profile: false,
            poison_uninit: false,
            max_host_memory: None,
        }
    }
}

pub use crate::backend::ProfileLine;

/// The CUDA backend, which cannot exist in this build (no value of this type is ever made).
pub enum CudaBackend {}

impl CudaBackend {
    /// Always an error in this build.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_options(CudaOptions {
            ordinal,
            ..CudaOptions::default()
        })
    }

    /// Always an error in this build.
    pub fn with_options(_opts: CudaOptions) -> Result<Self> {
        Err(Error::Backend {
            backend: "cuda",
            op: "init",
            msg: WHY.to_string(),
        })
    }
}
