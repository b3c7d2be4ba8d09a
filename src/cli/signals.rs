//! SIGINT (Ctrl-C) and SIGTERM (what Slurm, Kubernetes and systemd send) for `lema
//! train`: the first one asks the run to stop after the current step, which saves a
//! checkpoint; a second one quits at once. Either way the exit status is the shells'
//! convention for a process ended by a signal, 128 + its number (130, 143).

use anyhow::Result;
use std::sync::atomic::{AtomicI32, Ordering};

/// The first stop signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// SIGINT's number where libc does not say it.
#[cfg(not(unix))]
const SIGINT: i32 = 2;

/// The first stop signal received so far.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The exit status of a process stopped by `signal`.
fn exit_status(signal: i32) -> i32 {
    128 + signal
}

/// The exit status of a run stopped on request: 128 + the first signal's number (130 for
/// Ctrl-C, 143 for SIGTERM; 130 when no signal came, as for a stop requested otherwise).
pub fn stop_status() -> i32 {
    exit_status(received().unwrap_or(2))
}

/// Write to stderr from a signal handler (`eprintln!` may lock or allocate).
#[cfg(unix)]
fn say(msg: &[u8]) {
    // SAFETY: write(2) is async-signal-safe; the buffer outlives the call.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

#[cfg(unix)]
extern "C" fn on_signal(signal: libc::c_int) {
    let first = RECEIVED
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok();
    if first {
        say(if signal == libc::SIGTERM {
            b"\nSIGTERM: finishing this step and saving a checkpoint (a second signal quits at once)\n"
        } else {
            b"\nCtrl-C: finishing this step and saving a checkpoint (press again to quit at once)\n"
        });
    } else {
        say(b"\nsecond stop signal: exiting without saving\n");
        // SAFETY: _exit is async-signal-safe (no destructors, no stdio flush).
        unsafe { libc::_exit(exit_status(signal)) }
    }
}

/// Install the handlers for SIGINT and SIGTERM.
#[cfg(unix)]
pub fn install() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler
        // only touches an atomic and calls async-signal-safe functions.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(signal, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            anyhow::bail!(
                "installing the handler of signal {signal}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Install the Ctrl-C handler (no SIGTERM outside Unix).
#[cfg(not(unix))]
pub fn install() -> Result<()> {
    use anyhow::Context;
    ctrlc::set_handler(|| {
        if RECEIVED
            .compare_exchange(0, SIGINT, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            eprintln!("\nsecond Ctrl-C: exiting without saving");
            std::process::exit(exit_status(SIGINT));
        }
        eprintln!(
            "\nCtrl-C: finishing this step and saving a checkpoint (press again to quit at once)"
        );
    })
    .context("installing the Ctrl-C handler")
}
