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

/// Freed memory stays mapped for the process to reuse, as PyTorch's caching allocator
/// keeps GPU memory: a training step frees its activations and allocates the same sizes
/// again in the next step, and every page mimalloc hands back to the OS is faulted and
/// zeroed by the kernel again when it is reused. Its default (a 1 s delay) made that
/// 11–17% of a SmolLM2 step's cycles on the CPU backend (`clear_page`, issue 12). A 10 s
/// delay still left 11.8k page faults in a 6-step 1 × 512 bench on a Zen 4 VM, against
/// 2.1k with no purging (and 2.1k at 60 s, for a run shorter than that), at the same peak
/// RSS: so nothing is purged.
/// `MIMALLOC_PURGE_DELAY` in the environment wins (milliseconds; -1 never).
const PURGE_DELAY_MS: std::ffi::c_long = -1;

fn main() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    std::process::exit(cli::main());
}
