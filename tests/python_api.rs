//! The Python API (the `lema` wheel that scripts/test installs into the project's Python
//! environment) against the Rust API on the same model, seed and batches: the engine's
//! AdamW driven from Python gives the Rust path's losses and adapter bit for bit, and
//! torch's AdamW on the shared parameters gives them to float tolerance.

mod common;

use common::tiny::Tiny;
use lema::{Batch, LemaConfig, LemaModel, OptimizerConfig, Trainer};
use std::process::Command;

const STEPS: usize = 3;
const LR: f32 = 1e-2;

fn ids(step: usize) -> Vec<u32> {
    (0..32)
        .map(|i| ((i * 7 + step * 13 + 3) % 272) as u32)
        .collect()
}

const SCRIPT: &str = r#"
import json, sys
import torch
from lema import LemaConfig, LemaModel
model_file, out, steps, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
def ids(step):
    return [[(i * 7 + step * 13 + 3) % 272 for i in range(r * 16, r * 16 + 16)] for r in range(2)]
result = {}
for kind in ("engine", "torch"):
    cfg = LemaConfig(gbi_path=model_file, lora_rank=4, lora_target_modules=["q_proj", "v_proj"],
                     device="cpu", seed=7)
    with LemaModel(cfg) as m:
        m.initialize_lora()
        if kind == "engine":
            t = m.get_trainer(None, lr=lr, weight_decay=0.01)
        else:
            t = m.get_trainer(torch.optim.AdamW(m.get_trainable_parameters(), lr=lr, weight_decay=0.01))
        result[kind] = [t.train_step(ids(s))[1] for s in range(steps)]
        m.save_pretrained(f"{out}/{kind}")
print(json.dumps(result))
"#;

#[test]
fn python_path_equals_rust_path() {
    let Some(py) = common::python_or_skip() else {
        return;
    };
    let tiny = Tiny::new(None);
    let model_file = tiny.path("model/model.safetensors");
    let mut cfg = LemaConfig::new(&model_file);
    cfg.lora_rank = 4;
    cfg.lora_target_modules = Some(vec!["q_proj".into(), "v_proj".into()]);
    cfg.device = lema::Device::Cpu;
    cfg.seed = 7;
    let mut model = LemaModel::new(cfg).unwrap();
    model.initialize_lora().unwrap();
    let mut trainer = Trainer::new(model, OptimizerConfig::adamw(LR)).unwrap();
    let rust: Vec<f64> = (0..STEPS)
        .map(|s| {
            let b = Batch::language_modeling(ids(s), 2, 16).unwrap();
            trainer.train_step(&b).unwrap().loss
        })
        .collect();
    let rust_adapter = tiny.path("rust");
    trainer.model.save_adapter(&rust_adapter).unwrap();

    let out = Command::new(&py)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&model_file)
        .arg(tiny.path(""))
        .arg(STEPS.to_string())
        .arg(LR.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let losses = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let read = |dir: &str| {
        lema::checkpoint::read_f32_tensors(&tiny.path(dir).join("adapter_model.safetensors"))
            .unwrap()
    };
    let theirs = read("rust");
    assert!(
        theirs
            .iter()
            .any(|(k, (_, v))| k.contains("lora_B") && v.iter().any(|&x| x != 0.0)),
        "the Rust steps left every B at zero"
    );
    // the engine's optimizer from Python: the same computation. The adapters are equal bit
    // for bit; the reported losses may differ in the last bit, from the order in which
    // the parallel loss sum adds up (rayon splits it differently from run to run)
    let engine = losses("engine");
    assert_eq!(engine[0], rust[0]);
    for (a, b) in engine.iter().zip(&rust) {
        assert!(
            (a - b).abs() <= 1e-13 * b.abs(),
            "engine {engine:?} vs rust {rust:?}"
        );
    }
    let close = |ours: &lema::checkpoint::TensorMap, rel: f32| {
        assert_eq!(ours.len(), theirs.len());
        let mut worst = 0f32;
        for (k, (shape, vals)) in &theirs {
            let (s2, v2) = &ours[k];
            assert_eq!(shape, s2);
            for (a, b) in vals.iter().zip(v2) {
                let d = (a - b).abs() / (b.abs() + 1e-6);
                worst = worst.max(d);
                assert!(d <= rel, "{k}: {a} vs {b}");
            }
        }
        eprintln!("largest relative difference of the adapters: {worst:e}");
    };
    close(&read("engine"), 0.0);
    // torch's AdamW on the shared parameters: the same to float tolerance
    let torch = losses("torch");
    assert_eq!(torch[0], rust[0], "the first forward precedes any update");
    for (a, b) in torch.iter().zip(&rust) {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "torch {torch:?} vs rust {rust:?}"
        );
    }
    close(&read("torch"), 1e-3);
}
