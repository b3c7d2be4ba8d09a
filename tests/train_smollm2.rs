//! `lema train` / `lema eval` and the data pipeline on the real SmolLM2-135M-Instruct
//! (its own tokenizer and chat template), prepared afresh by `common::smollm2`. Each test
//! skips visibly when the model is absent (scripts/fetch-smollm2.sh fetches it; a
//! failure under CI).

mod common;
use lema::dataset::{BadLinePolicy, DataOptions, load_file};
use lema::tokenizer::Tokenizer;
use std::process::Command;

const CHAT: &str = r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]}"#;

#[test]
fn assistant_turns_are_found_with_the_real_chat_template() {
    let Some(dir) = common::smollm2::prepared_or_skip() else {
        return;
    };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    std::fs::write(
        &data,
        format!("{CHAT}\n{}\n", r#"{"prompt": "2+2=", "completion": " 4"}"#),
    )
    .unwrap();
    let opts = DataOptions {
        max_seq_length: 256,
        on_bad_line: BadLinePolicy::Error,
    };
    let (ex, _) = load_file(&data, &tok, &opts).unwrap();
    let scored = |i: usize| {
        let ids: Vec<u32> = ex[i]
            .labels
            .iter()
            .filter(|&&l| l >= 0)
            .map(|&l| l as u32)
            .collect();
        tok.decode(&ids, false).unwrap()
    };
    let whole = tok.decode(&ex[0].input_ids, false).unwrap();
    assert!(
        whole.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "the template's default system prompt: {whole:?}"
    );
    assert_eq!(
        scored(0),
        "Paris.<|im_end|>\nRome.<|im_end|>\n",
        "whole: {whole:?}"
    );
    assert_eq!(scored(1), " 4<|im_end|>");
}

#[test]
fn train_then_eval_on_smollm2_lowers_the_loss() {
    let Some(dir) = common::smollm2::prepared_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let lines: Vec<String> = [("red", "zalto"), ("blue", "murvik"), ("green", "pelosa"), ("yellow", "trindle")]
        .iter()
        .map(|(c, w)| {
            format!(r#"{{"messages": [{{"role": "user", "content": "Code word for {c}?"}}, {{"role": "assistant", "content": "{w}"}}]}}"#)
        })
        .collect();
    std::fs::write(tmp.path().join("d.jsonl"), lines.join("\n")).unwrap();
    let model = dir.join("model.safetensors");
    let lema = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_lema"))
            .args(args)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let text = format!(
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), Some(0), "{args:?}:\n{text}");
        o
    };
    let m = model.to_str().unwrap();
    lema(&[
        "train",
        "--model",
        m,
        "--data",
        "d.jsonl",
        "--output-dir",
        "run",
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--max-seq-length",
        "64",
        "--learning-rate",
        "3e-3",
        "--lora-rank",
        "8",
        "--device",
        "cpu",
        "--strategy",
        "resident",
    ]);
    let eval = |adapter: Option<&str>| {
        let mut a = vec![
            "eval",
            "--model",
            m,
            "--data",
            "d.jsonl",
            "--max-seq-length",
            "64",
            "--device",
            "cpu",
            "--json",
        ];
        if let Some(d) = adapter {
            a.extend(["--adapter", d]);
        }
        let o = lema(&a);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let (base, tuned) = (eval(None), eval(Some("run/adapter")));
    println!("SmolLM2 answer loss: base {base:.4}, after 4 steps {tuned:.4}");
    assert!(
        tuned.is_finite() && tuned < base,
        "base {base} → tuned {tuned}"
    );
}
