//! The model layer's results, bit for bit, against a recording (issue 10: Llama and GPT-2
//! move onto one model-definition layer unchanged). For each PEFT fixture case, with f32
//! and bf16 weights, streaming with checkpointing and resident without, with and
//! without LoRA dropout: the loss of 3 AdamW steps, every LoRA gradient of the first and
//! the logits (as FNV-1a hashes of their f32 bits), the evaluation loss, and the logits
//! through the KV cache. Recorded per backend in `tests/data/golden/model-<backend>.json`
//! (the CPU once per kernel family: `cpu` for AVX2/FMA, `cpu-avx512`) with
//! `LEMA_GOLDEN=write`; compared otherwise (CUDA only where a GPU is present).
//!
//! A change that moves any bit fails here; one that means to (a new kernel, a new
//! summation order) records again and says why in its commit.

mod common;
use common::*;
use lema::{Batch, Device, LemaConfig, LemaModel, OptimizerConfig, Strategy, Trainer};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fnv(values: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}/{}", values.len())
}

fn batch_of(case: &str) -> Batch {
    fixture_batch(&read_tensors(&fixture(case).join("reference.safetensors")))
}

/// What one configuration produces, as strings that compare exactly.
fn record(
    model_path: &std::path::Path,
    case: &str,
    cfg_of: impl Fn(&mut LemaConfig),
) -> serde_json::Value {
    let batch = batch_of(case);
    let mut cfg = LemaConfig::new(model_path);
    cfg.adapter_path = Some(fixture(case).join("adapter"));
    cfg_of(&mut cfg);
    let model = LemaModel::new(cfg).expect("model");
    let mut t = Trainer::new(model, OptimizerConfig::adamw(1e-2)).expect("trainer");
    let first = t.train_step_with_logits(&batch).expect("step");
    let mut grads = BTreeMap::new();
    for (k, g) in t.model.lora_grads().unwrap() {
        grads.insert(k, fnv(&g));
    }
    let mut losses = vec![format!("{:016x}", first.loss.to_bits())];
    for _ in 1..3 {
        let l = t.train_step(&batch).expect("step").loss;
        losses.push(format!("{:016x}", l.to_bits()));
    }
    let (eval, _, _) = t.model.evaluate(&batch, false).expect("eval");
    let pieces = [3, batch.seq - 3];
    let cached = t
        .model
        .logits_through_cache(&batch.input_ids, batch.batch, &pieces)
        .expect("cached logits");
    serde_json::json!({
        "losses": losses,
        "logits": fnv(first.logits.as_ref().unwrap()),
        "grads": grads,
        "eval_loss": format!("{:016x}", eval.to_bits()),
        "cached_logits": fnv(&cached),
    })
}

fn run(device: Device) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    let tmp = tempfile::tempdir().unwrap();
    for case in ["llama_gqa", "llama_tied", "gpt2"] {
        let bf16_dir = tmp.path().join(case);
        std::fs::create_dir_all(&bf16_dir).unwrap();
        let weights: [(&str, PathBuf); 2] = [
            ("f32", fixture(case).join("model.safetensors")),
            ("bf16", bf16_copy(case, &bf16_dir)),
        ];
        for (wname, path) in &weights {
            for (sname, strategy, ckpt, dropout) in [
                ("streaming-ckpt", Strategy::Streaming, true, 0.0),
                ("resident", Strategy::Resident, false, 0.0),
                ("streaming-ckpt-dropout", Strategy::Streaming, true, 0.1),
            ] {
                let key = format!("{case}/{wname}/{sname}");
                let v = record(path, case, |c| {
                    c.device = device;
                    c.strategy = strategy;
                    c.gradient_checkpointing = ckpt.into();
                    c.lora_dropout = dropout;
                    c.seed = 5;
                });
                out.insert(key, v);
            }
        }
    }
    out
}

/// The CPU recording for the GEMM kernels this processor runs: the `gemm` crate takes its
/// AVX-512 kernels wherever the processor has AVX-512F (its `x86-v4` feature), else its
/// AVX2/FMA ones, and the two sum in different orders.
fn cpu_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return "cpu-avx512";
    }
    "cpu"
}

fn check(device: Device, name: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/data/golden/model-{name}.json"));
    let local = PathBuf::from(format!("tests/data/golden/model-{name}.json"));
    let got = run(device);
    if std::env::var("LEMA_GOLDEN").as_deref() == Ok("write") {
        let target = if local.parent().is_some_and(|p| p.exists()) {
            local
        } else {
            path
        };
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(&target, serde_json::to_string_pretty(&got).unwrap() + "\n").unwrap();
        eprintln!("recorded {}", target.display());
        return;
    }
    let file = if local.exists() { local } else { path };
    let want: BTreeMap<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())),
    )
    .unwrap();
    let mut bad = Vec::new();
    for (k, w) in &want {
        match got.get(k) {
            Some(g) if g == w => {}
            Some(g) => bad.push(format!("{k}:\n  recorded {w}\n  now      {g}")),
            None => bad.push(format!("{k}: not run")),
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} configurations changed:\n{}",
        bad.len(),
        want.len(),
        bad.join("\n")
    );
}

#[test]
fn cpu_results_are_bit_for_bit_the_recorded_ones() {
    check(Device::Cpu, cpu_kernels());
}

#[test]
fn cuda_results_are_bit_for_bit_the_recorded_ones() {
    poison_uninit();
    if let Err(why) = lema::backend::cuda::probe(0) {
        skip_without_gpu(&why.to_string());
        return;
    }
    check(Device::Cuda, "cuda");
}
