//! Inputs as users write them, through the real binary: `lema info` on a config.json no
//! model can have, files that start with a UTF-8 byte order mark (Windows editors write
//! one), and negative numbers on the command line.

use lema::backend::DType;
use lema::bench::{preset, write_random_model};
use lema::tokenizer::write_byte_level_tokenizer;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A tiny random Llama with its byte-level tokenizer in `<tmp>/model`.
fn model_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut shape = preset("tiny").unwrap();
    shape.vocab = 272;
    write_random_model(&dir.path().join("model"), &shape, DType::F32, 3, 0.5).unwrap();
    write_byte_level_tokenizer(
        &dir.path().join("model"),
        &["<|endoftext|>"],
        Some("<|endoftext|>"),
        None,
    )
    .unwrap();
    dir
}

fn lema(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lema"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn expect_ok(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "expected success:\n{}", show(o));
}

fn expect_fail(o: &Output, code: i32, needles: &[&str]) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}:\n{}",
        show(o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    for n in needles {
        assert!(
            err.contains(n),
            "expected stderr to contain {n:?}:\n{}",
            show(o)
        );
    }
}

/// Edit the model's config.json.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let p = dir.join("model/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
    p
}

#[test]
fn info_on_an_impossible_config_names_the_field_and_exits_non_zero() {
    let d = model_folder();
    let cfg = d.path().join("model/config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    // the control: a loadable model is described, exit 0
    expect_ok(&lema(d.path(), &["info", "model/model.safetensors"]));
    let cases: [(&str, serde_json::Value, &[&str]); 4] = [
        (
            "model_type",
            "mamba".into(),
            &[
                "unsupported model_type 'mamba'",
                "supported: llama, mistral, qwen2, qwen3, phi3, gemma3_text, gpt2",
            ],
        ),
        (
            "num_attention_heads",
            0.into(),
            &["num_attention_heads", "must be > 0"],
        ),
        (
            "hidden_size",
            (1u64 << 62).into(),
            &["hidden_size = 4611686018427387904", "weights"],
        ),
        (
            "vocab_size",
            (1u64 << 44).into(),
            &["vocab_size = 17592186044416", "weights"],
        ),
    ];
    for (field, value, needles) in cases {
        std::fs::write(&cfg, &original).unwrap();
        edit_config(d.path(), |v| v[field] = value.clone());
        for target in ["model/model.safetensors", "model"] {
            let o = lema(d.path(), &["info", target]);
            let mut want = vec!["model/config.json", "train, eval and generate will refuse"];
            want.extend_from_slice(needles);
            expect_fail(&o, 1, &want);
            // what the file holds is still shown
            assert!(
                String::from_utf8_lossy(&o.stdout).contains("tensors"),
                "{field} = {value}, info {target}:\n{}",
                show(&o)
            );
        }
    }
}

/// Prefix a file with a UTF-8 byte order mark.
fn add_bom(p: &Path) {
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(std::fs::read(p).unwrap());
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn a_utf8_bom_is_accepted_in_every_text_input() {
    let d = model_folder();
    let p = |rel: &str| d.path().join(rel);
    std::fs::write(
        p("t.toml"),
        "model = \"model\"\ndata = \"d.jsonl\"\noutput_dir = \"run\"\nmax_seq_length = 16\n\
         batch_size = 2\nmax_steps = 1\nlora_rank = 2\ndevice = \"cpu\"\n",
    )
    .unwrap();
    std::fs::write(
        p("d.jsonl"),
        "{\"text\": \"one two\"}\n{\"prompt\": \"a\", \"completion\": \"b\"}\n",
    )
    .unwrap();
    std::fs::write(
        p("corpus.txt"),
        "plain text to score, twice over. ".repeat(4),
    )
    .unwrap();
    for f in [
        "t.toml",
        "d.jsonl",
        "corpus.txt",
        "model/config.json",
        "model/tokenizer.json",
        "model/tokenizer_config.json",
    ] {
        add_bom(&p(f));
    }
    expect_ok(&lema(d.path(), &["info", "model/model.safetensors"]));
    let o = lema(d.path(), &["train", "-c", "t.toml"]);
    expect_ok(&o);
    // the BOM is not part of the first record: both records are used
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("2 records, 2 used"), "{}", show(&o));
    let o = lema(
        d.path(),
        &[
            "eval",
            "--model",
            "model",
            "--data",
            "corpus.txt",
            "--device",
            "cpu",
            "--json",
        ],
    );
    expect_ok(&o);
    // the BOM is not scored as text: 132 bytes, one window, 131 predicted tokens
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tokens"].as_u64(), Some(131), "{}", show(&o));
}

#[test]
fn negative_numbers_parse_and_are_refused_by_name() {
    let d = model_folder();
    std::fs::write(d.path().join("d.jsonl"), "{\"text\": \"one two\"}\n").unwrap();
    let base = [
        "train", "--model", "model", "--data", "d.jsonl", "--device", "cpu",
    ];
    for lr in [["--learning-rate", "-1e-3"], ["--learning-rate", "-0.001"]] {
        let args: Vec<&str> = base.iter().chain(&lr).copied().collect();
        expect_fail(
            &lema(d.path(), &args),
            1,
            &["learning_rate", "-0.001 must be a finite number ≥ 0"],
        );
    }
    let args: Vec<&str> = base
        .iter()
        .chain(&["--max-grad-norm", "-1"])
        .copied()
        .collect();
    expect_fail(
        &lema(d.path(), &args),
        1,
        &["max_grad_norm", "-1 must be a finite number ≥ 0"],
    );
    // the derived flags of the other commands too
    expect_fail(
        &lema(
            d.path(),
            &["generate", "-m", "model", "--temperature", "-1e-3", "hi"],
        ),
        1,
        &["temperature must be ≥ 0 (0 = greedy), got -0.001"],
    );
    // a negative number where the argument is unsigned: clap names the argument
    expect_fail(
        &lema(
            d.path(),
            &["generate", "-m", "model", "--max-new-tokens", "-5", "hi"],
        ),
        2,
        &["'-5'", "--max-new-tokens"],
    );
}
