//! Skipping a test that lacks something it needs, where the harness shows it.
//!
//! A test that cannot run calls [`skip`] (or [`skip_without_gpu`]) and returns. The line
//! `SKIP: <test>: <why>` goes straight to the process's stderr, which libtest does not
//! capture (it captures only `print!`/`eprint!`), and is appended to the file named by
//! `LEMA_TEST_SKIPS` when set: scripts/test sets it and prints the count and the list at
//! the end. Under CI (`CI=true`, as .ci/run runs) only the GPU may be absent: the model,
//! NVRTC or a Python environment are fetched by scripts/test, so a test that lacks one
//! fails there instead of skipping.
//!
//! Standalone (std only), so that the library's own unit tests can include it too
//! (`#[path = …] mod …`).
#![allow(dead_code)]

use std::io::Write;

/// Skip the running test because `why` (something scripts/test fetches is missing);
/// under `CI=true` this fails the test instead.
pub fn skip(why: &str) {
    if running_in_ci() {
        panic!(
            "{}: {why}. CI=true: only a missing GPU may skip a test; scripts/test fetches \
             everything else, so a fetch failed or this test looks in the wrong place",
            test_name()
        );
    }
    record(why);
}

/// Skip the running test because there is no usable GPU (`why`: the probe's answer). The
/// one reason allowed under CI too.
pub fn skip_without_gpu(why: &str) {
    record(&format!("no CUDA device ({why})"));
}

/// Whether the CI variable says this is a CI run.
pub fn running_in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The running test's name: libtest names each test's thread after it.
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_string()
}

fn record(why: &str) {
    let line = format!("SKIP: {}: {why}\n", test_name());
    // not eprint!: libtest would capture that and show it only when the test fails
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os("LEMA_TEST_SKIPS") {
        // one write of one short line in append mode: lines from parallel tests and test
        // binaries do not interleave
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("LEMA_TEST_SKIPS={}: {e}", path.to_string_lossy());
        }
    }
}
