//! Adapters lema writes load in PEFT and give lema's perplexity: every shape lema writes
//! (all-linear, a subset of modules, rsLoRA on real SmolLM2-135M prepared here by
//! `lema prepare`, trained by `lema train` and scored by `lema eval`; GPT-2's Conv1D with
//! `fan_in_fan_out` on the tiny fixture through the library, as it has no tokenizer) is
//! loaded by `peft.AutoPeftModelForCausalLM` from the adapter folder alone, so over the
//! transformers model that `base_model_name_or_path` names, and scored in float32 by
//! tools/python/peft_eval.py with the Python of scripts/python-env.sh (`LEMA_TEST_PYTHON`).
//!
//! Tolerances, set from what was measured on this CPU: lema and transformers both compute
//! in f32 over the same (bf16-valued) weights and token ids, with different summation
//! orders. SmolLM2 (313 tokens, 30 layers): relative perplexity differences 8.2e-6 to
//! 8.8e-6, the base model's included; 2e-5 allowed (2.3x). GPT-2 fixture: at most 1.7e-7;
//! 1e-6 allowed (6x). Each adapter must also move the perplexity away from the base
//! model's by more than 100x the tolerance, so that the agreement means something.

mod common;
use common::*;
use lema::tokenizer::Tokenizer;
use lema::{Batch, Device, LemaConfig, LemaModel, OptimizerConfig, Trainer};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Largest relative perplexity difference allowed between transformers/PEFT and lema on
/// SmolLM2, and on the GPT-2 fixture (see above).
const SMOLLM2_TOL: f64 = 2e-5;
const GPT2_TOL: f64 = 1e-6;
/// The same for the other tiny fixtures (`every_architectures_adapters_load_in_peft_…`).
const ARCH_TOL: f64 = 2e-6;

fn lema(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_lema"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run lema");
    assert!(
        out.status.success(),
        "lema {args:?}: exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run tools/python/peft_eval.py on `cases` and return its JSON answer.
fn peft_eval(python: &Path, dir: &Path, cases: &Value) -> Value {
    let path = dir.join("cases.json");
    std::fs::write(&path, cases.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/python/peft_eval.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(&path)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{} {}: exit {:?}\n{}",
        python.display(),
        script.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "peft_eval.py printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// What one adapter must give in PEFT: lema's perplexity on the same tokens, from the
/// expected number of LoRA modules, over the base the adapter names.
struct Expect<'a> {
    name: &'a str,
    ppl: f64,
    tokens: u64,
    modules: usize,
    base_ppl: f64,
    base: String,
    tol: f64,
}

fn check(peft: &Value, e: &Expect) {
    let p = &peft[e.name];
    let ppl = p["perplexity"].as_f64().unwrap();
    let rel = (ppl - e.ppl).abs() / e.ppl;
    eprintln!(
        "{}: lema perplexity {:.6}, PEFT {:.6} (relative difference {rel:.2e}); base {:.6}; {} LoRA modules; base_model_name_or_path {}",
        e.name, e.ppl, ppl, e.base_ppl, p["lora_modules"], p["base_model_name_or_path"]
    );
    assert_eq!(
        p["tokens"].as_u64(),
        Some(e.tokens),
        "{}: scored tokens",
        e.name
    );
    assert_eq!(
        p["lora_modules"].as_u64(),
        Some(e.modules as u64),
        "{}: PEFT wrapped another set of modules",
        e.name
    );
    assert_eq!(
        p["base_model_name_or_path"].as_str(),
        Some(e.base.as_str()),
        "{}",
        e.name
    );
    assert_eq!(
        p["base_loaded_from"].as_str(),
        Some(e.base.as_str()),
        "{}: AutoPeftModel loaded another base",
        e.name
    );
    assert!(
        rel <= e.tol,
        "{}: PEFT perplexity {ppl} vs lema {} (relative {rel:.2e} > {:e})",
        e.name,
        e.ppl,
        e.tol
    );
    let moved = (e.ppl - e.base_ppl).abs() / e.base_ppl;
    assert!(
        moved > 100.0 * e.tol,
        "{}: the adapter barely changes the perplexity ({} vs base {}), so the comparison proves little",
        e.name,
        e.ppl,
        e.base_ppl
    );
}

fn canonical(p: &Path) -> String {
    p.canonicalize().unwrap().to_string_lossy().into_owned()
}

#[test]
fn smollm2_adapters_of_every_shape_load_in_peft_with_lemas_perplexity() {
    let Some(gguf) = common::smollm2::gguf_or_skip() else {
        return;
    };
    let Some(python) = python_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // prepared afresh by this build, so that the weights are what this `prepare` writes
    lema(
        dir,
        &[
            "prepare",
            gguf.to_str().unwrap(),
            "--out",
            "model",
            "--quiet",
        ],
    );
    let facts = [
        ("red", "zalto"),
        ("blue", "murvik"),
        ("green", "pelosa"),
        ("yellow", "trindle"),
        ("purple", "gavroux"),
        ("orange", "blenti"),
    ];
    let train: String = facts
        .iter()
        .map(|(c, w)| json!({"text": format!("The code word for {c} is {w}.")}).to_string() + "\n")
        .collect();
    std::fs::write(dir.join("train.jsonl"), train).unwrap();
    let passage = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/passage.txt"),
    )
    .unwrap();
    std::fs::write(
        dir.join("eval.jsonl"),
        json!({"text": passage}).to_string() + "\n",
    )
    .unwrap();
    // the ids `lema eval` scores for a {"text"} record: special tokens, then EOS
    let tok = Tokenizer::from_dir(&dir.join("model")).unwrap();
    let mut ids = tok.encode(&passage, true).unwrap();
    if let Some(eos) = tok.eos_token_id()
        && ids.last() != Some(&eos)
    {
        ids.push(eos);
    }
    let eval = |adapter: Option<&str>| -> Value {
        let mut args = vec![
            "eval",
            "--model",
            "model",
            "--data",
            "eval.jsonl",
            "--max-seq-length",
            "512",
            "--device",
            "cpu",
            "--json",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        serde_json::from_str(lema(dir, &args).trim()).unwrap()
    };
    let base = eval(None);
    let n_layers = 30;
    // (name, extra `lema train` flags, LoRA modules PEFT must wrap)
    let shapes: [(&str, &[&str], usize); 3] = [
        (
            "all_linear",
            &["--lora-target-modules", "all-linear"],
            7 * n_layers,
        ),
        (
            "subset",
            &[
                "--lora-target-modules",
                "q_proj,v_proj",
                "--lora-rank",
                "8",
                "--lora-alpha",
                "16",
            ],
            2 * n_layers,
        ),
        (
            "rslora",
            &[
                "--lora-target-modules",
                "o_proj,down_proj",
                "--use-rslora",
                "true",
                "--lora-rank",
                "16",
                "--lora-alpha",
                "8",
            ],
            2 * n_layers,
        ),
    ];
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for (name, flags, modules) in shapes {
        let mut args = vec![
            "train",
            "--model",
            "model/model.safetensors",
            "--data",
            "train.jsonl",
            "--output-dir",
            name,
            "--max-seq-length",
            "32",
            "--batch-size",
            "6",
            "--max-steps",
            "4",
            "--learning-rate",
            "1e-2",
            "--device",
            "cpu",
        ];
        args.extend(flags);
        lema(dir, &args);
        let adapter = dir.join(name).join("adapter");
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let targets = config["target_modules"].as_array().unwrap();
        if name == "all_linear" {
            // resolved as PEFT saves it: the full path of every adapted module, sorted
            assert_eq!(targets.len(), modules, "{config}");
            assert!(
                targets
                    .iter()
                    .all(|t| t.as_str().unwrap().starts_with("model.layers."))
            );
            let mut sorted = targets.clone();
            sorted.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            assert_eq!(&sorted, targets);
        }
        let r = eval(Some(&format!("{name}/adapter")));
        cases.push(json!({
            "name": name, "adapter": adapter, "base": null,
            "input_ids": [ids], "labels": [ids],
        }));
        ours.push((name, r, modules));
    }
    let folder = canonical(&dir.join("model"));
    // the base model alone, so that the adapters' agreement is read against the base's
    cases.push(json!({
        "name": "base", "adapter": null, "base": folder, "input_ids": [ids], "labels": [ids],
    }));
    let peft = peft_eval(&python, dir, &Value::Array(cases));
    let (lema_ppl, transformers_ppl) = (
        base["perplexity"].as_f64().unwrap(),
        peft["base"]["perplexity"].as_f64().unwrap(),
    );
    let rel = (lema_ppl - transformers_ppl).abs() / transformers_ppl;
    eprintln!(
        "base: lema perplexity {lema_ppl:.6}, transformers {transformers_ppl:.6} (relative difference {rel:.2e})"
    );
    assert!(
        rel <= SMOLLM2_TOL,
        "base model: lema perplexity {lema_ppl} vs transformers {transformers_ppl} (relative {rel:.2e} > {SMOLLM2_TOL:e})"
    );
    for (name, r, modules) in ours {
        check(
            &peft,
            &Expect {
                name,
                ppl: r["perplexity"].as_f64().unwrap(),
                tokens: r["tokens"].as_u64().unwrap(),
                modules,
                base_ppl: base["perplexity"].as_f64().unwrap(),
                base: folder.clone(),
                tol: SMOLLM2_TOL,
            },
        );
    }
}

fn batch_of(reference: &std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>) -> Batch {
    let (shape, ids) = &reference["input_ids"];
    let (_, labels) = &reference["labels"];
    Batch::new(
        ids.iter().map(|&x| x as u32).collect(),
        labels.iter().map(|&x| x as i32).collect(),
        shape[0],
        shape[1],
    )
    .unwrap()
}

fn gpt2_config(targets: &[&str]) -> LemaConfig {
    case_config("gpt2", targets)
}

fn case_config(case: &str, targets: &[&str]) -> LemaConfig {
    let mut c = LemaConfig::new(fixture(case).join("model.safetensors"));
    c.device = Device::Cpu;
    c.lora_rank = 4;
    c.lora_alpha = 8.0;
    c.lora_target_modules = Some(targets.iter().map(|s| s.to_string()).collect());
    c
}

/// Train `cfg`'s fresh adapter 3 AdamW steps on `batch` and save it in `dir`.
fn train_adapter(cfg: LemaConfig, batch: &Batch, dir: &Path) -> PathBuf {
    let mut m = LemaModel::new(cfg).unwrap();
    m.initialize_lora().unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-2)).unwrap();
    for _ in 0..3 {
        t.train_step(batch).unwrap();
    }
    t.model.save_adapter(dir).unwrap();
    dir.to_path_buf()
}

fn loss_with(cfg: &LemaConfig, adapter: Option<&Path>, batch: &Batch) -> f64 {
    let mut c = cfg.clone();
    c.adapter_path = adapter.map(Path::to_path_buf);
    let mut m = LemaModel::new(c).unwrap();
    if adapter.is_none() {
        m.initialize_lora().unwrap();
    }
    m.evaluate(batch, false).unwrap().0
}

#[test]
fn gpt2_conv1d_adapters_load_in_peft_with_lemas_perplexity() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let reference = read_tensors(&fixture("gpt2").join("reference.safetensors"));
    let batch = batch_of(&reference);
    let labels: Vec<i32> = batch.labels.clone();
    let n_layers = 2;
    let shapes: [(&str, &[&str], usize); 2] = [
        ("gpt2_all_linear", &["all-linear"], 4 * n_layers),
        ("gpt2_c_attn", &["c_attn"], n_layers),
    ];
    let base_loss = loss_with(&gpt2_config(&["c_attn"]), None, &batch);
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for (name, targets, modules) in shapes {
        let cfg = gpt2_config(targets);
        let adapter = train_adapter(cfg.clone(), &batch, &tmp.path().join(name));
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["fan_in_fan_out"], json!(true), "{config}");
        let loss = loss_with(&cfg, Some(&adapter), &batch);
        let rows =
            |v: Vec<i64>| -> Vec<Vec<i64>> { v.chunks(batch.seq).map(<[i64]>::to_vec).collect() };
        cases.push(json!({
            "name": name, "adapter": adapter, "base": null,
            "input_ids": rows(batch.input_ids.iter().map(|&x| x as i64).collect()),
            "labels": rows(labels.iter().map(|&x| x as i64).collect()),
        }));
        ours.push((name, loss, modules));
    }
    let peft = peft_eval(&python, tmp.path(), &Value::Array(cases));
    // scored tokens: labels after the shift, as transformers counts them
    let tokens = labels
        .chunks(batch.seq)
        .map(|row| row[1..].iter().filter(|&&l| l != -100).count() as u64)
        .sum();
    for (name, loss, modules) in ours {
        check(
            &peft,
            &Expect {
                name,
                ppl: loss.exp(),
                tokens,
                modules,
                base_ppl: base_loss.exp(),
                base: canonical(&fixture("gpt2")),
                tol: GPT2_TOL,
            },
        );
    }
}

/// Every architecture's all-linear adapter (fused q/k/v and gate/up, biases, q/k norms,
/// sliding windows, LongRoPE, Gemma's norms and soft-cap), trained by lema on its tiny
/// fixture, loads in PEFT over the transformers model and gives lema's perplexity.
/// Measured 6.9e-8 to 5.1e-7 relative; ARCH_TOL (2e-6) allowed.
#[test]
fn every_architectures_adapters_load_in_peft_with_lemas_perplexity() {
    let Some(python) = python_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        "mistral_sw",
        "qwen2_tied",
        "qwen2_sw",
        "qwen3",
        "phi3",
        "phi3_longrope",
        "qwen2_yarn",
        "gemma3",
    ];
    let mut requests = Vec::new();
    let mut ours = Vec::new();
    for case in cases {
        let reference = read_tensors(&fixture(case).join("reference.safetensors"));
        let batch = batch_of(&reference);
        let cfg = case_config(case, &["all-linear"]);
        let adapter = train_adapter(cfg.clone(), &batch, &tmp.path().join(case));
        let modules = read_tensors(&adapter.join("adapter_model.safetensors"))
            .keys()
            .filter(|k| k.contains(".lora_A."))
            .count();
        let loss = loss_with(&cfg, Some(&adapter), &batch);
        let base = loss_with(&cfg, None, &batch);
        let rows =
            |v: Vec<i64>| -> Vec<Vec<i64>> { v.chunks(batch.seq).map(<[i64]>::to_vec).collect() };
        requests.push(json!({
            "name": case, "adapter": adapter, "base": null,
            "input_ids": rows(batch.input_ids.iter().map(|&x| x as i64).collect()),
            "labels": rows(batch.labels.iter().map(|&x| x as i64).collect()),
        }));
        let tokens: u64 = batch
            .labels
            .chunks(batch.seq)
            .map(|row| row[1..].iter().filter(|&&l| l != -100).count() as u64)
            .sum();
        ours.push((case, loss, base, modules, tokens));
    }
    let peft = peft_eval(&python, tmp.path(), &Value::Array(requests));
    for (case, loss, base, modules, tokens) in ours {
        check(
            &peft,
            &Expect {
                name: case,
                ppl: loss.exp(),
                tokens,
                modules,
                base_ppl: base.exp(),
                base: canonical(&fixture(case)),
                tol: ARCH_TOL,
            },
        );
    }
}

/// Adapters written before target_modules were resolved (`"all-linear"`, as a string or
/// in a list) still load, adapting the same modules as the resolved list.
#[test]
fn all_linear_adapters_of_earlier_versions_still_load() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = read_tensors(&fixture("llama_gqa").join("reference.safetensors"));
    let batch = batch_of(&reference);
    let mut cfg = LemaConfig::new(fixture("llama_gqa").join("model.safetensors"));
    cfg.device = Device::Cpu;
    cfg.lora_target_modules = Some(vec!["all-linear".into()]);
    let adapter = train_adapter(cfg.clone(), &batch, &tmp.path().join("resolved"));
    let text = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
    let resolved = loss_with(&cfg, Some(&adapter), &batch);
    for old in [json!("all-linear"), json!(["all-linear"])] {
        let dir = tmp.path().join("old");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            adapter.join("adapter_model.safetensors"),
            dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut v: Value = serde_json::from_str(&text).unwrap();
        v["target_modules"] = old.clone();
        std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap();
        assert_eq!(
            loss_with(&cfg, Some(&dir), &batch),
            resolved,
            "target_modules {old}"
        );
    }
}
