//! Engine work that Ctrl-C can stop. The work runs on a thread of its own with the GIL
//! released, while the calling thread waits for it and, every 50 ms, lets Python run its
//! signal handlers; when one raises (SIGINT's raises `KeyboardInterrupt`) the engine's
//! cancel flag stops the work at the next block, before any parameter changes, and the
//! exception is raised once the work has stopped. A panic in the work is a
//! `RuntimeError`, never an abort of the interpreter.

use crate::errors::to_py;
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Run `work` with the GIL released; Ctrl-C raises `cancel` and then the Python exception.
pub fn run<T: Send>(
    py: Python<'_>,
    cancel: &AtomicBool,
    work: impl FnOnce() -> lema::Result<T> + Send,
) -> PyResult<T> {
    cancel.store(false, Ordering::SeqCst);
    let done = (Mutex::new(false), Condvar::new());
    std::thread::scope(|s| {
        let done = &done;
        let handle = s.spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            *done.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
            done.1.notify_all();
            r
        });
        let mut raised: Option<PyErr> = None;
        loop {
            let finished = py.detach(|| {
                let flag = done.0.lock().unwrap_or_else(|p| p.into_inner());
                let (flag, _) = done
                    .1
                    .wait_timeout_while(flag, Duration::from_millis(50), |d| !*d)
                    .unwrap_or_else(|p| p.into_inner());
                *flag
            });
            if finished {
                break;
            }
            if raised.is_none()
                && let Err(e) = py.check_signals()
            {
                cancel.store(true, Ordering::SeqCst);
                raised = Some(e);
            }
        }
        let outcome = py.detach(|| handle.join());
        cancel.store(false, Ordering::SeqCst);
        match outcome {
            Ok(Ok(Ok(v))) => match raised {
                // the signal came after the work's last check: it is done, but the caller
                // asked to stop, so the step goes no further
                Some(e) => Err(e),
                None => Ok(v),
            },
            Ok(Ok(Err(lema::Error::Interrupted))) => {
                Err(raised.unwrap_or_else(|| PyKeyboardInterrupt::new_err("interrupted")))
            }
            Ok(Ok(Err(e))) => Err(raised.unwrap_or_else(|| to_py(e))),
            Ok(Err(panic)) | Err(panic) => Err(PyRuntimeError::new_err(format!(
                "internal error in lema (please report it): {}",
                panic_message(&panic)
            ))),
        }
    })
}

/// Run `work` with the GIL released, a panic turned into `RuntimeError` (for work that
/// is not worth interrupting: opening a model, saving a checkpoint).
pub fn detached<T: Send>(
    py: Python<'_>,
    work: impl FnOnce() -> lema::Result<T> + Send,
) -> PyResult<T> {
    match py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))) {
        Ok(r) => r.map_err(to_py),
        Err(panic) => Err(PyRuntimeError::new_err(format!(
            "internal error in lema (please report it): {}",
            panic_message(&panic)
        ))),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}
