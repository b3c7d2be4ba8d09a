//! The CUDA backend's errors: every op's failure is an [`Error::Backend`] naming the op.
//! A leaf module, so that the device, the profiler and the kernels' wrappers all use it
//! without importing each other.

use crate::error::Error;
use cudarc::driver::DriverError;

pub(crate) const BACKEND: &str = "cuda";

/// A backend error for `op`.
pub(crate) fn err(op: &'static str, msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: BACKEND,
        op,
        msg: msg.into(),
    }
}

/// A driver failure inside `op`.
pub(crate) fn driver_err(op: &'static str, e: DriverError) -> Error {
    err(op, format!("CUDA driver call failed: {e:?}"))
}
