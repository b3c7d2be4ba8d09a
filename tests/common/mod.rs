//! Shared helpers for integration tests: fixture loading, comparisons that fail on NaN,
//! visible skips ([`skip`]) and the real test model ([`smollm2`]).
#![allow(dead_code)]

pub mod skip;
pub mod smollm2;
#[allow(unused_imports)] // each test binary uses some of them
pub use skip::{running_in_ci, skip, skip_without_gpu};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The fixture cases with a transformers reference for every architecture lema builds
/// (`tools/fixtures/make_fixtures.py`).
pub const EVERY_ARCHITECTURE: &[&str] = &[
    "llama_gqa",
    "llama_tied",
    "gpt2",
    "qwen2_tied",
    "qwen3",
    "mistral_sw",
    "qwen2_sw",
    "phi3",
    "phi3_longrope",
    "qwen2_yarn",
    "gemma3",
];

/// Folder of a PEFT fixture case. Looked up under the working directory first, so that
/// test binaries built here also run from a copy of the tree elsewhere (the GPU machine).
pub fn fixture(case: &str) -> PathBuf {
    let local = Path::new("tests/fixtures").join(case);
    if local.exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(case)
}

/// All tensors of a safetensors file as f64, with shapes (any numeric dtype).
pub fn read_tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let vals: Vec<f64> = match view.dtype() {
            safetensors::Dtype::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            safetensors::Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("unexpected dtype {other:?} for {name}"),
        };
        out.insert(name, (view.shape().to_vec(), vals));
    }
    out
}

/// ‖a − b‖ / ‖b‖, NaN-safe: any NaN gives infinity.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        num += (x - y).powi(2);
        den += y * y;
    }
    (num / den.max(1e-300)).sqrt()
}

/// Assert relative error below `tol`, with a message naming `what`.
pub fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    let e = rel_err(a, b);
    if std::env::var_os("LEMA_TEST_VERBOSE").is_some() {
        eprintln!("{what}: relative error {e:.3e} (tolerance {tol:.1e})");
    }
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}

/// f32 slice to f64 vector.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A bf16 copy of a fixture model (config.json beside it).
pub fn bf16_copy(case: &str, dir: &Path) -> PathBuf {
    copy_of(case, dir, lema::backend::DType::BF16, |_| true)
}

/// A copy of fixture `case`'s model in `dir` with its tensors stored as `dtype` and only
/// those whose name `keep` accepts, beside its config.json: the path of the copy.
pub fn copy_of(
    case: &str,
    dir: &Path,
    dtype: lema::backend::DType,
    keep: impl Fn(&str) -> bool,
) -> PathBuf {
    let src = fixture(case);
    let t = read_tensors(&src.join("model.safetensors"));
    let mut names: Vec<_> = t.keys().filter(|n| keep(n)).cloned().collect();
    names.sort();
    let tensors: Vec<lema::fsutil::TensorOut> = names
        .iter()
        .map(|n| {
            let (shape, v) = &t[n];
            let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            lema::fsutil::TensorOut {
                name: n.clone(),
                dtype,
                shape: shape.clone(),
                data: std::borrow::Cow::Owned(lema::bench::encode(&v, dtype)),
            }
        })
        .collect();
    let path = dir.join("model.safetensors");
    lema::fsutil::write_safetensors(&path, &tensors, &Default::default()).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    path
}

/// The batch of a fixture's `reference.safetensors` (`input_ids`, `labels`).
pub fn fixture_batch(reference: &HashMap<String, (Vec<usize>, Vec<f64>)>) -> lema::Batch {
    let (shape, ids) = &reference["input_ids"];
    let (_, labels) = &reference["labels"];
    lema::Batch::new(
        ids.iter().map(|&x| x as u32).collect(),
        labels.iter().map(|&x| x as i32).collect(),
        shape[0],
        shape[1],
    )
    .expect("fixture batch")
}

/// Turn on `LEMA_CUDA_POISON=1` for this test process, so that the backends `LemaModel`
/// builds from the environment also fill `Backend::uninit` buffers with NaN and a read
/// before a write fails the comparisons. Every test that touches CUDA calls this first:
/// the `Once` holds them all until the variable is set, so no thread is inside the CUDA
/// libraries (which read the environment through libc) while it changes.
pub fn poison_uninit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: see above: no other thread of this process reads the environment outside
        // std's lock (which `set_var` takes) until every caller has passed the `Once`.
        unsafe { std::env::set_var("LEMA_CUDA_POISON", "1") };
    });
}

pub mod mock_hub;
pub mod tiny;

/// The Python of the project's environment (torch, transformers, peft: scripts/python-env.sh),
/// from `LEMA_TEST_PYTHON` (scripts/test sets it), or `None` after [`skip`] (which fails
/// under CI).
pub fn python_or_skip() -> Option<PathBuf> {
    let fix = "run scripts/test, or set LEMA_TEST_PYTHON=$(scripts/python-env.sh)";
    match std::env::var_os("LEMA_TEST_PYTHON").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        Some(p) => {
            skip(&format!(
                "LEMA_TEST_PYTHON={} is not a file ({fix})",
                p.display()
            ));
            None
        }
        None => {
            skip(&format!("LEMA_TEST_PYTHON is not set ({fix})"));
            None
        }
    }
}
