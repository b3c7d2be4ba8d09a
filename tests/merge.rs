//! `lema merge`: the merged model alone gives the logits of base + adapter, on the tiny
//! fixtures (Llama with GQA, tied and untied; GPT-2 with Conv1D weights), in f32 (to
//! ~1e-6: only summation order differs) and in bf16 (where each merged weight is rounded
//! once to bf16, so we check the stored values exactly against W + scale·B·A rounded,
//! and the logits to bf16's precision).

mod common;
use common::*;
use lema::merge::merge_adapter;
use lema::{Batch, Device, LemaConfig, LemaModel};
use std::path::Path;

fn logits(model: &Path, adapter: Option<&Path>, batch: &Batch) -> Vec<f64> {
    let mut c = LemaConfig::new(model);
    c.adapter_path = adapter.map(Path::to_path_buf);
    c.device = Device::Cpu;
    let mut m = LemaModel::new(c).expect("model");
    f64s(&m.evaluate(batch, true).unwrap().2.unwrap())
}

fn random_batch(vocab: usize, seed: u64) -> Batch {
    let mut r = lema::rng::Rng::new(seed);
    let ids: Vec<u32> = (0..2 * 9).map(|_| r.below(vocab as u64) as u32).collect();
    Batch::language_modeling(ids, 2, 9).unwrap()
}

fn vocab(case: &str) -> usize {
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(case).join("config.json")).unwrap())
            .unwrap();
    c["vocab_size"].as_u64().unwrap() as usize
}

#[test]
fn merged_f32_model_equals_base_plus_adapter() {
    // every architecture: fused linears (phi3, gpt2's Conv1D), biases, q/k norms, Gemma's
    // post-norms and soft-cap
    for case in [
        "llama_gqa",
        "llama_tied",
        "gpt2",
        "mistral_sw",
        "qwen2_tied",
        "qwen3",
        "phi3",
        "phi3_longrope",
        "qwen2_yarn",
        "gemma3",
    ] {
        let dir = fixture(case);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged/model.safetensors");
        let report = merge_adapter(&dir.join("model.safetensors"), &dir.join("adapter"), &out)
            .expect("merge");
        assert!(!report.merged.is_empty());
        assert!(tmp.path().join("merged/config.json").is_file());
        let batch = random_batch(vocab(case), 4);
        let want = logits(
            &dir.join("model.safetensors"),
            Some(&dir.join("adapter")),
            &batch,
        );
        let got = logits(&out, None, &batch);
        assert_close(&format!("{case} merged vs base+adapter"), &got, &want, 1e-5);
        // the adapter matters here, so the comparison above can fail
        let base = logits(&dir.join("model.safetensors"), None, &batch);
        assert!(
            rel_err(&base, &want) > 1e-3,
            "{case}: adapter has no effect"
        );
    }
}

#[test]
fn merged_bf16_weights_are_the_rounded_sums() {
    for case in ["llama_gqa", "gpt2"] {
        let tmp = tempfile::tempdir().unwrap();
        let base = bf16_copy(case, tmp.path());
        let adapter = fixture(case).join("adapter");
        let out = tmp.path().join("out/merged.safetensors");
        let report = merge_adapter(&base, &adapter, &out).expect("merge");
        let merged = lema::checkpoint::read_f32_tensors(&out).unwrap();
        let before = lema::checkpoint::read_f32_tensors(&base).unwrap();
        let ad =
            lema::checkpoint::read_f32_tensors(&adapter.join("adapter_model.safetensors")).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let scale = cfg["lora_alpha"].as_f64().unwrap() / cfg["r"].as_f64().unwrap();
        assert_eq!(merged.len(), before.len());
        for name in &report.merged {
            let path = name.trim_end_matches(".weight");
            let (sa, a) = &ad[&format!("base_model.model.{path}.lora_A.weight")];
            let (sb, b) = &ad[&format!("base_model.model.{path}.lora_B.weight")];
            let (r, fin, fout) = (sa[0], sa[1], sb[0]);
            let (shape, w) = &before[name];
            let mut want = Vec::with_capacity(w.len());
            for (i, &x) in w.iter().enumerate() {
                // Llama [out, in]; GPT-2 Conv1D [in, out]
                let (o, j) = if case == "gpt2" {
                    (i % fout, i / fout)
                } else {
                    (i / fin, i % fin)
                };
                let d: f64 = (0..r)
                    .map(|k| b[o * r + k] as f64 * a[k * fin + j] as f64)
                    .sum();
                want.push(half::bf16::from_f64(x as f64 + scale * d).to_f32());
            }
            let (gshape, got) = &merged[name];
            assert_eq!(gshape, shape);
            // one bf16 ulp at most: our f32 sum may round to the other neighbour
            for (k, (&g, &w)) in got.iter().zip(&want).enumerate() {
                let ulp = (w.abs() * 2f32.powi(-7)).max(1e-30);
                assert!((g - w).abs() <= ulp, "{case} {name}[{k}]: {g} vs {w}");
            }
        }
        // tensors without an adapter are copied bit for bit
        for (name, (_, v)) in &before {
            if !report.merged.contains(name) {
                assert_eq!(&merged[name].1, v, "{name}");
            }
        }
        let batch = random_batch(vocab(case), 6);
        let want = logits(&base, Some(&adapter), &batch);
        let got = logits(&out, None, &batch);
        assert_close(&format!("{case} bf16 merged"), &got, &want, 1e-2);
    }
}

#[test]
fn bad_merges_are_refused() {
    let dir = fixture("llama_gqa");
    let model = dir.join("model.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    // an adapter made for another model
    let e = merge_adapter(
        &model,
        &fixture("gpt2").join("adapter"),
        &tmp.path().join("m.safetensors"),
    )
    .unwrap_err();
    // the adapter's config, what it targets, and the likely cause
    for part in [
        "adapter_config.json",
        "c_attn",
        "match no module of this model",
        "trained for another model",
    ] {
        assert!(e.to_string().contains(part), "{part:?} not in: {e}");
    }
    assert!(!tmp.path().join("m.safetensors").exists());
    let e = merge_adapter(&model, &dir.join("adapter"), &model).unwrap_err();
    assert!(e.to_string().contains("base model itself"), "{e}");
    let e = merge_adapter(&model, &dir.join("adapter"), &tmp.path().join("m.bin")).unwrap_err();
    assert!(
        e.to_string()
            .contains("m.bin must be a .safetensors file path"),
        "{e}"
    );
    let e = merge_adapter(
        &model,
        &tmp.path().join("nope"),
        &tmp.path().join("m.safetensors"),
    )
    .unwrap_err();
    // the file it looked for, not just the folder the test named
    let wanted = tmp.path().join("nope").join("adapter_config.json");
    assert!(e.to_string().contains(&wanted.display().to_string()), "{e}");
}

/// The merged model is another model: its config.json keeps every field of the base's but
/// the Hub id (`_name_or_path`), which adapters trained on it would otherwise name as
/// their base (`base_model_name_or_path`).
#[test]
fn merged_config_drops_the_hub_id_and_keeps_the_rest() {
    let dir = fixture("llama_gqa");
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(
        dir.join("model.safetensors"),
        base.join("model.safetensors"),
    )
    .unwrap();
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let mut config = read(&dir.join("config.json"));
    config["_name_or_path"] = "org/base-model".into();
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();
    let out = tmp.path().join("merged/model.safetensors");
    merge_adapter(&base.join("model.safetensors"), &dir.join("adapter"), &out).expect("merge");
    let merged = read(&tmp.path().join("merged/config.json"));
    config.as_object_mut().unwrap().remove("_name_or_path");
    assert_eq!(merged, config);
}
