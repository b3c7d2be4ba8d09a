//! Stand-in for the CUDA backend in builds without the `cuda` feature (candle's pattern):
//! the same names, and constructors that say how to get the real one, so that callers
//! need no `cfg` of their own.

use crate::error::{Error, Result};

const WHY: &str = "this build of lema has no CUDA support; rebuild with `--features cuda`";

/// Says why CUDA cannot be used: in this build, never.
pub fn probe(_ordinal: usize) -> std::result::Result<(), String> {
    Err(WHY.to_string())
}

pub use crate::backend::cuda_options::{CudaOptions, KernelCache};

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
