//! Bad inputs to the library's front door: each gives an error whose message says what
//! was wrong (the file, the tensor, the value) — never a panic.

mod common;
use common::*;
use lema::{Batch, Device, LemaConfig, LemaModel, OptimizerConfig, Trainer};
use std::path::Path;

/// A copy of a fixture case in a temp folder, so tests can damage it.
fn copy_case(case: &str, to: &Path) -> LemaConfig {
    let src = fixture(case);
    std::fs::create_dir_all(to).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(src.join(f), to.join(f)).unwrap();
    }
    let mut c = LemaConfig::new(to.join("model.safetensors"));
    c.device = Device::Cpu;
    c.lora_rank = 2;
    c.lora_alpha = 4.0;
    c
}

fn err_of<T>(r: lema::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} should mention {p:?}");
    }
}

#[test]
fn truncated_model_file_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    let c = copy_case("llama_gqa", d.path());
    let bytes = std::fs::read(&c.model_path).unwrap();
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&c.model_path, &bytes[..cut]).unwrap();
        let msg = err_of(LemaModel::new(c.clone()));
        // the whole path (not just a name the fixture shares) and what is wrong with it
        let path = c.model_path.display().to_string();
        assert_mentions(&msg, &[&path, "truncated"]);
    }
}

#[test]
fn missing_tensor_and_wrong_shape_name_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    let c = copy_case("llama_gqa", d.path());
    // config.json claims a wider MLP than the weights have
    let cfg_path = d.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["intermediate_size"] = serde_json::json!(64);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = err_of(LemaModel::new(c.clone()));
    assert_mentions(&msg, &["model.safetensors", "mlp.gate_proj.weight", "64"]);
    // one layer more than the file holds
    cfg["intermediate_size"] = serde_json::json!(56);
    cfg["num_hidden_layers"] = serde_json::json!(3);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = err_of(LemaModel::new(c));
    assert_mentions(&msg, &["model.layers.2.", "missing"]);
}

#[test]
fn unknown_architecture_lists_supported_ones() {
    let d = tempfile::tempdir().unwrap();
    let c = copy_case("llama_gqa", d.path());
    let cfg_path = d.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = serde_json::json!("mamba");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = err_of(LemaModel::new(c));
    assert_mentions(&msg, &["mamba", "llama", "gpt2"]);
}

#[test]
fn missing_config_json_says_where_it_looked() {
    let d = tempfile::tempdir().unwrap();
    let c = copy_case("gpt2", d.path());
    let cfg = d.path().join("config.json");
    std::fs::remove_file(&cfg).unwrap();
    let msg = err_of(LemaModel::new(c));
    assert_mentions(
        &msg,
        &[
            &cfg.display().to_string(),
            "missing",
            "`lema prepare` writes it",
        ],
    );
}

#[test]
fn lora_targets_that_match_nothing_list_the_modules() {
    let mut c = LemaConfig::new(fixture("llama_gqa").join("model.safetensors"));
    c.device = Device::Cpu;
    c.lora_target_modules = Some(vec!["c_attn".into()]);
    let mut m = LemaModel::new(c).unwrap();
    let msg = err_of(m.initialize_lora());
    assert_mentions(&msg, &["c_attn", "match no module", "self_attn.q_proj"]);
}

#[test]
fn training_before_lora_or_on_bad_tokens_is_refused() {
    let mut c = LemaConfig::new(fixture("gpt2").join("model.safetensors"));
    c.device = Device::Cpu;
    let m = LemaModel::new(c.clone()).unwrap();
    let msg = err_of(Trainer::new(m, OptimizerConfig::adamw(1e-3)));
    assert_mentions(&msg, &["initialise LoRA"]);

    let mut m = LemaModel::new(c).unwrap();
    m.initialize_lora().unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-3)).unwrap();
    let bad = Batch::language_modeling(vec![1, 2, 500, 3], 1, 4).unwrap();
    assert_mentions(
        &err_of(t.train_step(&bad)),
        &["token id 500", "vocabulary of 96"],
    );
    let long = Batch::language_modeling(vec![1; 65], 1, 65).unwrap();
    assert_mentions(&err_of(t.train_step(&long)), &["sequence length 65", "64"]);
    let none = Batch::new(vec![1, 2, 3], vec![-100, -100, -100], 1, 3).unwrap();
    assert_mentions(&err_of(t.train_step(&none)), &["no counted tokens"]);
    let bad_opt = OptimizerConfig::AdamW {
        lr: 1e-3,
        beta1: 1.5,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut c2 = LemaConfig::new(fixture("gpt2").join("model.safetensors"));
    c2.device = Device::Cpu;
    let mut m2 = LemaModel::new(c2).unwrap();
    m2.initialize_lora().unwrap();
    assert_mentions(&err_of(Trainer::new(m2, bad_opt)), &["beta1", "1.5"]);
}

#[test]
fn adapter_for_another_model_is_refused_with_the_tensor() {
    // the llama_tied adapter (r = 8, q/v/down) on the llama_gqa model works shape-wise
    // only where shapes agree; the GPT-2 adapter names modules llama does not have
    let mut c = LemaConfig::new(fixture("llama_gqa").join("model.safetensors"));
    c.device = Device::Cpu;
    c.adapter_path = Some(fixture("gpt2").join("adapter"));
    let msg = err_of(LemaModel::new(c.clone()));
    // names the adapter's config, the modules it wants, what this model has, and the
    // likely cause (the path alone already contains "adapter")
    let gpt2_cfg = fixture("gpt2").join("adapter").join("adapter_config.json");
    assert_mentions(
        &msg,
        &[
            &gpt2_cfg.display().to_string(),
            "c_attn",
            "match no module of this model",
            "self_attn.q_proj",
            "trained for another model",
        ],
    );
    // an adapter whose matrices have the wrong shape
    let d = tempfile::tempdir().unwrap();
    let src = fixture("llama_gqa").join("adapter");
    let dst = d.path().join("adapter");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dst.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg_text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&cfg_text).unwrap();
    cfg["r"] = serde_json::json!(8);
    std::fs::write(dst.join("adapter_config.json"), cfg.to_string()).unwrap();
    c.adapter_path = Some(dst.clone());
    let msg = err_of(LemaModel::new(c.clone()));
    assert_mentions(
        &msg,
        &[
            "adapter_model.safetensors",
            "lora_A",
            "has shape [4, 32]",
            "[8, 32]",
        ],
    );
    // DoRA adapters are not silently treated as LoRA
    cfg["r"] = serde_json::json!(4);
    cfg["use_dora"] = serde_json::json!(true);
    std::fs::write(dst.join("adapter_config.json"), cfg.to_string()).unwrap();
    assert_mentions(&err_of(LemaModel::new(c)), &["use_dora", "DoRA"]);
}

#[test]
fn incomplete_or_foreign_checkpoints_do_not_load() {
    let d = tempfile::tempdir().unwrap();
    // a folder without trainer_state.json (what a crash before the final rename leaves
    // under the temporary name) is not a checkpoint
    let half = d.path().join("half");
    std::fs::create_dir_all(&half).unwrap();
    let msg = err_of(Trainer::from_checkpoint(&half, None));
    assert_mentions(
        &msg,
        &["trainer_state.json", "not a complete lema checkpoint"],
    );

    // a checkpoint resumed on a different base model is refused with the difference
    let c = copy_case("llama_gqa", &d.path().join("model"));
    let mut m = LemaModel::new(c.clone()).unwrap();
    m.initialize_lora().unwrap();
    let t = Trainer::new(m, OptimizerConfig::adamw(1e-3)).unwrap();
    let ck = d.path().join("ck");
    t.save_checkpoint(&ck).unwrap();
    let cfg_path = d.path().join("model/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rms_norm_eps"] = serde_json::json!(1e-3);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = err_of(Trainer::from_checkpoint(&ck, None));
    assert_mentions(&msg, &["different base model", "config.json"]);
}

#[test]
fn a_failed_save_leaves_the_previous_checkpoint_intact() {
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    let mut c = LemaConfig::new(fixture("gpt2").join("model.safetensors"));
    c.device = Device::Cpu;
    let mut m = LemaModel::new(c).unwrap();
    m.initialize_lora().unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-2)).unwrap();
    let b = Batch::language_modeling((0..16).collect(), 2, 8).unwrap();
    t.train_step(&b).unwrap();
    t.save_checkpoint(&ck).unwrap();
    let saved = Trainer::from_checkpoint(&ck, None)
        .unwrap()
        .model
        .lora_tensors()
        .unwrap();
    t.train_step(&b).unwrap();
    // the save fails midway: a file is written, then a real write fails
    let mut failed = std::path::PathBuf::new();
    let r = lema::checkpoint::write_dir_atomically(&ck, |tmp| {
        std::fs::write(tmp.join("adapter_model.safetensors"), b"partial").unwrap();
        failed = tmp.join("no-such-folder").join("optimizer.safetensors");
        lema::checkpoint::write_json(&failed, &serde_json::json!({}))
    });
    // the error that stopped the save comes back naming where it could not write, and why
    let folder = failed.parent().unwrap().display().to_string();
    assert_mentions(&err_of(r), &[&folder, "No such file or directory"]);
    let after = Trainer::from_checkpoint(&ck, None).unwrap();
    assert_eq!(after.step(), 1);
    assert_eq!(after.model.lora_tensors().unwrap(), saved);
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary folders left behind: {leftovers:?}"
    );
}
