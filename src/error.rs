//! The library's error type. Every message names what was wrong (the file, the tensor,
//! the op, the value) and, where one is known, what to do about it.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in lema, as concrete variants that quote their input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model or checkpoint file whose contents are malformed.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A tensor that is missing or disagrees with the model configuration.
    #[error("{path}: tensor '{tensor}': {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// An invalid or unsupported configuration value.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A broken invariant inside lema: a bug, whatever the input.
    #[error(
        "internal error (a bug in lema; please report it with the command that caused it): {0}"
    )]
    Internal(String),
    /// A backend op rejected its arguments or failed on the device.
    #[error("{backend} op '{op}': {msg}")]
    Backend {
        backend: &'static str,
        op: &'static str,
        msg: String,
    },
    /// A bad record in a data file, at a 1-based line number.
    #[error("{}:{line}: {msg}", path.display())]
    Data {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// A model's chat template is at fault (it does not parse, or it exceeded its budget
    /// of work or output), whatever it renders; `path` is the file that holds it.
    #[error("{}: chat_template {msg}", path.display())]
    Template { path: PathBuf, msg: String },
    /// Training produced a non-finite value.
    #[error("{0}")]
    NonFinite(String),
    /// Host memory the process may use would be exceeded (its cgroup limit, what the
    /// system has available, or `max_host_memory`); the message has the numbers.
    #[error("not enough host memory: {0}")]
    HostMemory(String),
    /// The caller asked the work to stop (Ctrl-C in the Python bindings) before it
    /// changed any parameter.
    #[error("interrupted before the parameters were updated")]
    Interrupted,
    /// A model from the Hugging Face Hub could not be had: the Hub refused or failed a
    /// request, a download broke off or came out wrong, or (offline) the cache lacks it.
    /// `subject` names the repository and file; the message says what to do.
    #[error("{subject}: {msg}")]
    Hub {
        kind: HubErrorKind,
        subject: String,
        msg: String,
    },
}

/// What went wrong with the Hugging Face Hub, for callers that react differently (the
/// Python bindings raise a different exception for each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HubErrorKind {
    /// 401/403: a private or gated repository, or a token that does not grant access.
    Unauthorized,
    /// 404: no such repository, revision or file.
    NotFound,
    /// The Hub (or `HF_ENDPOINT`) could not be reached.
    Network,
    /// A download broke off; the part is kept and a rerun resumes it.
    Incomplete,
    /// A downloaded file's content does not match the Hub's checksum; it was removed.
    Checksum,
    /// Offline (`HF_HUB_OFFLINE`): the cache does not hold what was asked for.
    NotCached,
    /// The server answered something a Hub does not (a missing header, bad JSON).
    Protocol,
}

impl Error {
    /// Attach a path to an `std::io::Error`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error on a file.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// A problem with one named tensor of a file.
    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }

    /// A bad record at `path:line`.
    pub fn data(path: impl Into<PathBuf>, line: usize, msg: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            line,
            msg: msg.into(),
        }
    }

    /// A Hugging Face Hub error about `subject` (a repository, or a file of one).
    pub fn hub(kind: HubErrorKind, subject: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Hub {
            kind,
            subject: subject.into(),
            msg: msg.into(),
        }
    }

    /// A configuration error.
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }

    /// A broken invariant inside lema (a bug, not the user's input).
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }
}
