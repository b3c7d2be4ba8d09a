//! The CUDA weight stream (copy stream, VRAM slot ring, registered or pinned host memory,
//! VRAM budget) gives exactly the losses and weights of whole-layer uploads: the same
//! kernels read the same bytes, only their way to the GPU differs. Runs on a GPU machine;
//! prints SKIP elsewhere.
#![cfg(feature = "cuda")]

mod common;
use common::*;
use lema::backend::DType;
use lema::rng::Rng;
use lema::{Batch, Device, LemaConfig, LemaModel, OptimizerConfig, Strategy, Trainer};
use std::path::Path;

/// Turn on `LEMA_CUDA_POISON=1` for this test process, so that the backends `LemaModel`
/// builds from the environment also fill `Backend::uninit` buffers with NaN and a read
/// before a write fails the comparisons. Every test that touches CUDA calls this first:
/// the `Once` holds them all until the variable is set, so no thread is inside the CUDA
/// libraries (which read the environment through libc) while it changes.
fn poison_uninit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: see above: no other thread of this process reads the environment outside
        // std's lock (which `set_var` takes) until every caller has passed the `Once`.
        unsafe { std::env::set_var("LEMA_CUDA_POISON", "1") };
    });
}

/// Whether a GPU is here; first turns on NaN-filled `uninit` buffers for every backend
/// this process builds.
fn gpu() -> bool {
    poison_uninit();
    match lema::backend::cuda::CudaBackend::new(0) {
        Ok(_) => true,
        Err(e) => {
            println!("SKIP: no CUDA device ({e})");
            false
        }
    }
}

fn run(
    path: &Path,
    strategy: Strategy,
    depth: usize,
    max_vram: Option<u64>,
    offload: bool,
    steps: usize,
) -> (Vec<f64>, Vec<Vec<f32>>) {
    let mut c = LemaConfig::new(path);
    c.device = Device::Cuda;
    c.strategy = strategy;
    c.prefetch_depth = depth;
    c.max_vram = max_vram;
    c.offload_activations = offload;
    c.lora_rank = 4;
    c.lora_alpha = 8.0;
    c.lora_dropout = 0.1;
    c.lora_target_modules = Some(vec!["all-linear".into()]);
    let mut m = LemaModel::new(c).unwrap();
    m.initialize_lora().unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-2)).unwrap();
    let mut r = Rng::new(3);
    let v = t.model.model_config().vocab_size as u64;
    let ids: Vec<u32> = (0..2 * 24).map(|_| r.below(v) as u32).collect();
    let b = Batch::language_modeling(ids, 2, 24).unwrap();
    let losses = (0..steps).map(|_| t.train_step(&b).unwrap().loss).collect();
    let w = t
        .model
        .lora_tensors()
        .unwrap()
        .into_iter()
        .map(|(_, _, w)| w)
        .collect();
    (losses, w)
}

#[test]
fn ring_budget_and_pinned_copies_match_exactly() {
    if !gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut shape = lema::bench::preset("tiny").unwrap();
    shape.layers = 5;
    let bf16 = lema::bench::write_random_model(dir.path(), &shape, DType::BF16, 4, 0.5).unwrap();
    for path in [
        bf16.as_path(),
        &fixture("llama_gqa").join("model.safetensors"),
        &fixture("gpt2").join("model.safetensors"),
    ] {
        // reference: everything resident on the GPU
        let reference = run(path, Strategy::Budget, 2, Some(u64::MAX / 2), false, 3);
        for (strategy, depth, budget, offload) in [
            (Strategy::Streaming, 1, None, false),
            (Strategy::Streaming, 2, None, false),
            (Strategy::Streaming, 4, None, false),
            (Strategy::Resident, 2, None, false),
            (Strategy::Budget, 1, Some(1), false), // budget below one layer: all streamed
            (Strategy::Streaming, 2, None, true),  // saved activations parked in host memory
        ] {
            let got = run(path, strategy, depth, budget, offload, 3);
            assert!(
                got.0.iter().all(|l| l.is_finite()),
                "{}: non-finite loss",
                path.display()
            );
            assert_eq!(
                got,
                reference,
                "{}: {strategy:?} depth {depth} budget {budget:?} offload {offload} differs",
                path.display()
            );
        }
        println!(
            "PASS {}: streaming (depth 1, 2, 4), resident, budget, offloaded activations all equal: losses {:?}",
            path.display(),
            reference.0
        );
    }
}
