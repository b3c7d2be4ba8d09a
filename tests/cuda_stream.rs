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

fn gpu() -> bool {
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
    steps: usize,
) -> (Vec<f64>, Vec<Vec<f32>>) {
    let mut c = LemaConfig::new(path);
    c.device = Device::Cuda;
    c.strategy = strategy;
    c.prefetch_depth = depth;
    c.max_vram = max_vram;
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
        let reference = run(path, Strategy::Budget, 2, Some(u64::MAX / 2), 3);
        for (strategy, depth, budget) in [
            (Strategy::Streaming, 1, None),
            (Strategy::Streaming, 2, None),
            (Strategy::Streaming, 4, None),
            (Strategy::Resident, 2, None),
            (Strategy::Budget, 1, Some(1)), // budget below one layer: all streamed
        ] {
            let got = run(path, strategy, depth, budget, 3);
            assert!(
                got.0.iter().all(|l| l.is_finite()),
                "{}: non-finite loss",
                path.display()
            );
            assert_eq!(
                got,
                reference,
                "{}: {strategy:?} depth {depth} budget {budget:?} differs",
                path.display()
            );
        }
        println!(
            "PASS {}: streaming (depth 1, 2, 4), resident, budget all equal: losses {:?}",
            path.display(),
            reference.0
        );
    }
}
