//! lema's errors as Python exceptions: the Rust message, in the exception a Python user
//! expects (a missing file is `FileNotFoundError`, a bad value `ValueError`, an
//! interruption `KeyboardInterrupt`, too little host memory `MemoryError`; a Hub refusal `PermissionError`, a broken download
//! `ConnectionError`).

use pyo3::PyErr;
use pyo3::exceptions::{
    PyConnectionError, PyFileNotFoundError, PyFloatingPointError, PyKeyboardInterrupt,
    PyMemoryError, PyOSError, PyPermissionError, PyRuntimeError, PyValueError,
};

/// The Python exception for a lema error.
pub fn to_py(e: lema::Error) -> PyErr {
    use lema::Error;
    let msg = e.to_string();
    match &e {
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        Error::Interrupted => PyKeyboardInterrupt::new_err(msg),
        Error::Hub { kind, .. } => {
            use lema::error::HubErrorKind as K;
            match kind {
                K::Unauthorized => PyPermissionError::new_err(msg),
                K::NotFound | K::NotCached => PyFileNotFoundError::new_err(msg),
                K::Network | K::Incomplete => PyConnectionError::new_err(msg),
                K::Checksum | K::Protocol => PyOSError::new_err(msg),
            }
        }
        Error::NonFinite(_) => PyFloatingPointError::new_err(msg),
        Error::HostMemory(_) => PyMemoryError::new_err(msg),
        Error::Backend { .. } | Error::Internal(_) => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// `Result` with the error turned into a Python exception.
pub trait IntoPy<T> {
    fn py_err(self) -> pyo3::PyResult<T>;
}

impl<T> IntoPy<T> for lema::Result<T> {
    fn py_err(self) -> pyo3::PyResult<T> {
        self.map_err(to_py)
    }
}
