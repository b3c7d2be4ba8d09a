//! The `lema` command-line tool. The binary is glue over the library: it parses
//! arguments, calls the library and prints errors (with their whole chain) in one place.
//!
//! Exit codes: 0 success, 1 error (message on stderr), 2 invalid command line, 130 (143)
//! a training run stopped by Ctrl-C (SIGTERM) after saving a checkpoint.

mod cli;

/// mimalloc instead of glibc's allocator: data loading tokenizes on every core, and
/// glibc's per-thread arenas kept the freed pages of every batch (peak RSS grew by about
/// 0.4 GB per GB of records read while the live heap stayed under 40 MB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's C API (linked in by the `mimalloc` crate).
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same index in v2 and v3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// How long freed memory stays mapped before mimalloc returns it to the OS (its default
/// is 1 s). A training step frees its activations and allocates the same sizes again
/// in the next step; when that comes more than the delay later, every page is faulted
/// and zeroed by the kernel again — on the CPU backend 11–17% of a SmolLM2 step's
/// cycles were `clear_page` (issue 12). Freed memory is still returned, 10 s later.
/// `MIMALLOC_PURGE_DELAY` in the environment wins.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

fn main() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    std::process::exit(cli::main());
}
