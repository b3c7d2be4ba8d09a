//! `lema train` and `lema eval` end to end: the real binary on a temporary folder with a
//! tiny random Llama and a byte-level tokenizer written by the test. Failures print the
//! expected text beside the command's actual output.

use lema::backend::DType;
use lema::bench::{preset, write_random_model};
use lema::tokenizer::write_byte_level_tokenizer;
use lema::train::{self, Observer, StepRecord, TrainConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A folder with a tiny model (vocabulary: 256 bytes + 3 special tokens) and its tokenizer.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(template: Option<&str>) -> Self {
        Self::with_layers(template, 2)
    }

    fn with_layers(template: Option<&str>, layers: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut shape = preset("tiny").unwrap();
        shape.vocab = 272;
        shape.layers = layers;
        write_random_model(&dir.path().join("model"), &shape, DType::F32, 11, 0.5).unwrap();
        write_byte_level_tokenizer(
            &dir.path().join("model"),
            &["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
            Some("<|endoftext|>"),
            template,
        )
        .unwrap();
        Setup { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// A task that is quick to learn: every completion is the same word.
    fn easy_data(&self, rel: &str, n: usize) -> PathBuf {
        let lines: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"prompt": "Q{i} is? ", "completion": "yes"}}"#))
            .collect();
        self.write(rel, &(lines.join("\n") + "\n"))
    }

    /// A config file for the tiny model; `extra` (TOML lines) adds or replaces fields.
    fn config(&self, rel: &str, data: &str, out: &str, extra: &str) -> PathBuf {
        let mut t: toml::Table = toml::from_str(&format!(
            "model = \"model/model.safetensors\"\ndata = \"{data}\"\noutput_dir = \"{out}\"\nmax_seq_length = 32\nbatch_size = 4\nlearning_rate = 1e-2\nlora_rank = 4\ndevice = \"cpu\"\n"
        ))
        .unwrap();
        let extra: toml::Table = toml::from_str(extra).unwrap();
        t.extend(extra);
        self.write(rel, &toml::to_string(&t).unwrap())
    }

    fn lema(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_lema"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn expect_ok(o: &Output) {
    assert_eq!(
        o.status.code(),
        Some(0),
        "expected success, got:\n{}",
        text(o)
    );
}

fn expect_fail(o: &Output, code: i32, needles: &[&str]) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}, got:\n{}",
        text(o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    for n in needles {
        assert!(
            err.contains(n),
            "expected stderr to contain {n:?}; actual:\n{}",
            text(o)
        );
    }
}

fn metrics(dir: &Path) -> Vec<StepRecord> {
    train::read_metrics(&dir.join("metrics.jsonl")).unwrap()
}

#[test]
fn train_writes_a_complete_run_folder_and_learns() {
    let s = Setup::new(Some(CHATML));
    s.easy_data("train.jsonl", 48);
    s.easy_data("eval.jsonl", 8);
    s.config(
        "train.toml",
        "train.jsonl",
        "run",
        "eval_data = \"eval.jsonl\"\neval_steps = 4\nsave_steps = 4\nmax_steps = 12\nlr_scheduler = \"cosine\"\nwarmup_steps = 2\nlearning_rate = 0.5",
    );
    // the flag overrides the file's learning_rate
    let o = s.lema(&["train", "--config", "train.toml", "--learning-rate", "0.01"]);
    expect_ok(&o);
    let run = s.path("run");
    let echoed = TrainConfig::load(Some(&run.join("config.toml")), &[]).unwrap();
    assert_eq!(
        echoed.learning_rate, 0.01,
        "the flag must win over the file"
    );
    assert_eq!(echoed.max_steps, Some(12));

    let m = metrics(&run);
    assert_eq!(
        m.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert!(
        m.iter()
            .all(|r| r.loss.is_finite() && r.grad_norm.is_finite() && r.tokens > 0)
    );
    // cosine with 2 warm-up steps, written out: lr(s) for the update after s steps
    for r in &m {
        let s0 = (r.step - 1) as f64;
        let want = if s0 < 2.0 {
            0.01 * s0 / 2.0
        } else {
            0.01 * 0.5 * (1.0 + (std::f64::consts::PI * (s0 - 2.0) / 10.0).cos())
        };
        assert!(
            (r.lr - want).abs() < 1e-12,
            "step {}: lr {} want {want}",
            r.step,
            r.lr
        );
    }
    let evals: Vec<(u64, f64)> = m
        .iter()
        .filter_map(|r| Some((r.step, r.eval_loss?)))
        .collect();
    assert_eq!(
        evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![4, 8, 12]
    );
    for r in m.iter().filter(|r| r.eval_loss.is_some()) {
        assert!((r.eval_ppl.unwrap() - r.eval_loss.unwrap().exp()).abs() < 1e-9);
    }
    assert!(
        evals[2].1 < evals[1].1 && evals[1].1 < evals[0].1,
        "eval loss should fall on a one-word task: {evals:?}"
    );

    for f in [
        "checkpoint-4",
        "checkpoint-8",
        "checkpoint-12",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "loss.svg",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let svg = std::fs::read_to_string(run.join("loss.svg")).unwrap();
    assert!(
        svg.contains("class=\"train\"") && svg.contains("class=\"eval\""),
        "{svg}"
    );

    // lema eval with the adapter reproduces the run's last eval loss; the base model is worse
    let eval_args = |adapter: Option<&str>| {
        let mut a = vec![
            "eval",
            "--model",
            "model/model.safetensors",
            "--data",
            "eval.jsonl",
            "--max-seq-length",
            "32",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--json",
        ];
        if let Some(d) = adapter {
            a.extend(["--adapter", d]);
        }
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run_eval = |adapter| {
        let args = eval_args(adapter);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = s.lema(&refs);
        expect_ok(&o);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let tuned = run_eval(Some("run/adapter"));
    let base = run_eval(None);
    assert!(
        (tuned - evals[2].1).abs() <= 1e-9 * tuned.abs(),
        "lema eval {tuned} vs the run's final eval loss {}",
        evals[2].1
    );
    assert!(
        tuned < base,
        "adapter {tuned} should beat the base model {base}"
    );
}

#[test]
fn eval_reads_plain_text_in_windows() {
    let s = Setup::new(None);
    s.write(
        "corpus.txt",
        &"the quick brown fox jumps over the lazy dog. ".repeat(10),
    );
    let o = s.lema(&[
        "eval",
        "--model",
        "model",
        "--data",
        "corpus.txt",
        "--max-seq-length",
        "64",
        "--device",
        "cpu",
        "--json",
    ]);
    expect_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (loss, ppl) = (
        v["loss"].as_f64().unwrap(),
        v["perplexity"].as_f64().unwrap(),
    );
    assert!(loss.is_finite() && loss > 0.0, "{v}");
    assert!((ppl - loss.exp()).abs() < 1e-9 * ppl);
    // 450 bytes → windows of 64 → 8 windows (7 full, one of 2), each scoring len-1 tokens
    assert_eq!(v["examples"].as_u64(), Some(8), "{v}");
    assert_eq!(v["tokens"].as_u64(), Some(450 - 8), "{v}");
}

/// `generate` and `merge` take the model as its folder too, as `train` and `eval` do,
/// and a wrong path says what a model is.
#[test]
fn generate_and_merge_take_the_model_folder() {
    let s = Setup::new(None);
    for model in ["model", "model/model.safetensors"] {
        let o = s.lema(&[
            "generate", "--model", model, "--raw", "-n", "3", "--device", "cpu", "hello",
        ]);
        expect_ok(&o);
        assert!(!o.stdout.is_empty(), "{model}: nothing generated");
    }
    let o = s.lema(&[
        "generate", "--model", "nope", "--raw", "--device", "cpu", "hi",
    ]);
    expect_fail(&o, 1, &["nope: no such model", "lema prepare"]);
    // eval and train say the same, not that a tokenizer is missing
    let o = s.lema(&["eval", "--model", "nope", "--data", "x.jsonl"]);
    expect_fail(&o, 1, &["nope: no such model"]);
    let o = s.lema(&[
        "train", "--model", "nope", "--data", "x.jsonl", "--device", "cpu",
    ]);
    expect_fail(&o, 1, &["nope: no such model"]);
    // an adapter trained here, folded into the base given as its folder
    let cfg = s.config("t.toml", "d.jsonl", "run", "max_steps = 2");
    s.easy_data("d.jsonl", 8);
    expect_ok(&s.lema(&["train", "--config", cfg.to_str().unwrap()]));
    let o = s.lema(&[
        "merge",
        "--model",
        "model",
        "--adapter",
        "run/adapter",
        "--out",
        "merged/model.safetensors",
    ]);
    expect_ok(&o);
    assert!(s.path("merged/model.safetensors").is_file());
    let o = s.lema(&[
        "merge",
        "--model",
        "nope",
        "--adapter",
        "run/adapter",
        "--out",
        "m.safetensors",
    ]);
    expect_fail(&o, 1, &["nope: no such model"]);
}

/// Losses, learning rates, gradient norms and eval losses of a run, by step.
type Trajectory = Vec<(u64, f64, f64, f64, Option<f64>)>;

fn trajectory(m: &[StepRecord]) -> Trajectory {
    m.iter()
        .map(|r| (r.step, r.loss, r.lr, r.grad_norm, r.eval_loss))
        .collect()
}

/// `--resume` alone from another working folder: the checkpoint's configuration holds
/// the run's paths as they were resolved, so the run goes on as if uninterrupted.
#[test]
fn resume_from_another_working_folder() {
    let s = Setup::new(None);
    s.easy_data("train.jsonl", 16);
    s.config(
        "train.toml",
        "train.jsonl",
        "run",
        "batch_size = 2\nmax_steps = 6\nsave_steps = 3\neval_fraction = 0.25\neval_steps = 3",
    );
    expect_ok(&s.lema(&["train", "--config", "train.toml"]));
    let full = trajectory(&metrics(&s.path("run")));
    let elsewhere = tempfile::tempdir().unwrap();
    let ck = s.path("run/checkpoint-3");
    let out = elsewhere.path().join("resumed");
    let o = Command::new(env!("CARGO_BIN_EXE_lema"))
        .args(["train", "--resume", ck.to_str().unwrap()])
        .args(["--output-dir", out.to_str().unwrap()])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    expect_ok(&o);
    let resumed = trajectory(&metrics(&out));
    assert_eq!(full.len(), 6);
    assert_eq!(&resumed[..], &full[3..], "resumed elsewhere: {}", text(&o));
}

#[test]
fn resume_continues_bit_identically() {
    let s = Setup::new(None);
    s.easy_data("train.jsonl", 24);
    for packing in [true, false] {
        // accumulation, several epochs, dropout, a warm-up and a held-out split, so that
        // the resume point falls inside the schedule, the shuffle and the dropout stream
        let a = format!("a-{packing}");
        s.config(
            "train.toml",
            "train.jsonl",
            &a,
            &format!("batch_size = 2\ngradient_accumulation_steps = 2\nepochs = 3\nsave_steps = 3\nlora_dropout = 0.1\nlr_scheduler = \"linear\"\nwarmup_ratio = 0.2\nmax_seq_length = 24\neval_fraction = 0.25\neval_steps = 2\npacking = {packing}"),
        );
        expect_ok(&s.lema(&["train", "--config", "train.toml"]));
        let full = trajectory(&metrics(&s.path(&a)));
        assert!(full.len() >= 6, "need several steps, got {}", full.len());
        assert!(
            full.iter().any(|r| r.4.is_some()),
            "the run should evaluate"
        );

        // resume from checkpoint-3 into another folder
        let b = format!("b-{packing}");
        let ck = format!("{a}/checkpoint-3");
        let o = s.lema(&[
            "train",
            "--config",
            "train.toml",
            "--resume",
            &ck,
            "--output-dir",
            &b,
        ]);
        expect_ok(&o);
        let resumed = trajectory(&metrics(&s.path(&b)));
        assert_eq!(
            resumed,
            full[3..].to_vec(),
            "packing = {packing}: resumed run (left) vs uninterrupted run (right)"
        );

        // --resume alone takes the checkpoint's config and continues in the same folder
        expect_ok(&s.lema(&["train", "--resume", &ck]));
        assert_eq!(trajectory(&metrics(&s.path(&a))), full);
    }
}

#[test]
fn old_checkpoints_are_removed_past_the_limit() {
    let s = Setup::new(None);
    s.easy_data("d.jsonl", 8);
    s.config(
        "t.toml",
        "d.jsonl",
        "run",
        "max_steps = 5\nsave_steps = 1\nsave_total_limit = 2\nbatch_size = 1",
    );
    expect_ok(&s.lema(&["train", "-c", "t.toml"]));
    let left: Vec<u64> = train::list_checkpoints(&s.path("run"))
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(left, vec![4, 5]);
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_130() {
    let s = Setup::new(None);
    s.easy_data("train.jsonl", 20);
    s.config(
        "train.toml",
        "train.jsonl",
        "run",
        "max_steps = 1000000\nlearning_rate = 1e-4\nlogging_steps = 1000000",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_lema"))
        .args(["train", "--config", "train.toml"])
        .current_dir(s.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mpath = s.path("run/metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&mpath).map_or(0, |t| t.lines().count()) < 2 {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "lema train ended early ({st}):\n{}",
                text(&child.wait_with_output().unwrap())
            );
        }
        assert!(
            t0.elapsed().as_secs() < 120,
            "no training steps after 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let m = metrics(&s.path("run"));
    let last = m.last().unwrap().step;
    let ck = format!("run/checkpoint-{last}");
    expect_fail(&o, 130, &["interrupted after step", &ck]);
    assert!(s.path(&ck).join("adapter_model.safetensors").exists());
    assert!(s.path("run/loss.svg").exists());
    let st = lema::Trainer::read_state(&s.path(&ck)).unwrap();
    assert_eq!(st.step, last);
    // resuming with a different max_steps would change the schedule: refused
    let o = s.lema(&[
        "train",
        "--resume",
        &ck,
        "--max-steps",
        &(last + 2).to_string(),
    ]);
    expect_fail(
        &o,
        1,
        &["cannot resume", "max_steps: checkpoint 1000000, now"],
    );
}

#[test]
fn bad_data_lines_are_reported_with_file_and_line() {
    let s = Setup::new(None);
    s.write(
        "d.jsonl",
        "{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\n{\"text\": \"broken\n{\"prompt\": \"p\"}\n{\"text\": \"more\"}\n",
    );
    s.config("t.toml", "d.jsonl", "run", "max_steps = 1");
    let o = s.lema(&["train", "-c", "t.toml"]);
    expect_fail(
        &o,
        1,
        &["d.jsonl:3: not valid JSON", "on_bad_line = \"skip\""],
    );
    let o = s.lema(&["train", "-c", "t.toml", "--on-bad-line", "skip"]);
    expect_ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    for n in [
        "5 records, 3 used",
        "2 skipped",
        "d.jsonl:3: not valid JSON",
        "d.jsonl:4: missing \"completion\"",
    ] {
        assert!(err.contains(n), "expected {n:?} in:\n{err}");
    }
}

#[test]
fn long_examples_are_cut_or_skipped_with_counts() {
    let s = Setup::new(None);
    let long_prompt = "p".repeat(50);
    s.write(
        "d.jsonl",
        &format!(
            "{{\"text\": \"{}\"}}\n{{\"prompt\": \"{long_prompt}\", \"completion\": \"a\"}}\n{{\"text\": \"short\"}}\n",
            "x".repeat(80)
        ),
    );
    s.config(
        "t.toml",
        "d.jsonl",
        "run",
        "max_steps = 1\non_bad_line = \"skip\"",
    );
    let o = s.lema(&["train", "-c", "t.toml"]);
    expect_ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    for n in [
        "1 truncated to max_seq_length = 32",
        "1 skipped (1 because the prompt alone fills max_seq_length)",
        "d.jsonl:2: the prompt alone is 50 tokens, max_seq_length is 32",
    ] {
        assert!(err.contains(n), "expected {n:?} in:\n{err}");
    }
}

#[test]
fn empty_data_is_an_error() {
    let s = Setup::new(None);
    s.write("empty.jsonl", "\n\n");
    s.config("t.toml", "empty.jsonl", "run", "");
    expect_fail(
        &s.lema(&["train", "-c", "t.toml"]),
        1,
        &["empty.jsonl: empty data set: it has no records"],
    );
    s.write("bad.jsonl", "{\"nope\": 1}\n");
    s.config("t2.toml", "bad.jsonl", "run", "on_bad_line = \"skip\"");
    expect_fail(
        &s.lema(&["train", "-c", "t2.toml"]),
        1,
        &[
            "empty data set: none of its 1 records could be used",
            "bad.jsonl:1: no \"text\"",
        ],
    );
}

#[test]
fn chat_data_needs_a_working_template() {
    let chat = "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n";
    let s = Setup::new(None);
    s.write("chat.jsonl", chat);
    s.config(
        "t.toml",
        "chat.jsonl",
        "run",
        "max_steps = 1\non_bad_line = \"skip\"",
    );
    expect_fail(
        &s.lema(&["train", "-c", "t.toml"]),
        1,
        &["chat.jsonl:1: chat-format record, but the model has no chat_template"],
    );

    let raising = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}";
    let s = Setup::new(Some(raising));
    s.write("chat.jsonl", chat);
    s.config("t.toml", "chat.jsonl", "run", "max_steps = 1");
    expect_fail(
        &s.lema(&["train", "-c", "t.toml"]),
        1,
        &[
            "chat.jsonl:1: the chat template failed to render this conversation",
            "System role not supported",
        ],
    );
}

#[test]
fn unknown_config_fields_get_a_suggestion() {
    let s = Setup::new(None);
    s.easy_data("d.jsonl", 4);
    s.config("t.toml", "d.jsonl", "run", "lerning_rate = 1e-3");
    expect_fail(
        &s.lema(&["train", "-c", "t.toml"]),
        1,
        &["unknown field `lerning_rate` in t.toml; did you mean `learning_rate`?"],
    );
    // a mistyped flag: clap's own suggestion, exit 2
    s.config("t.toml", "d.jsonl", "run", "");
    expect_fail(
        &s.lema(&["train", "-c", "t.toml", "--lerning-rate", "1"]),
        2,
        &["--learning-rate"],
    );
    // a flag value of the wrong type names the field
    expect_fail(
        &s.lema(&["train", "-c", "t.toml", "--batch-size", "four"]),
        1,
        &["batch_size"],
    );
}

#[test]
fn resume_from_a_different_model_or_config_is_refused() {
    let s = Setup::new(None);
    s.easy_data("d.jsonl", 8);
    s.config("t.toml", "d.jsonl", "run", "max_steps = 2\nsave_steps = 1");
    expect_ok(&s.lema(&["train", "-c", "t.toml"]));
    let o = s.lema(&[
        "train",
        "-c",
        "t.toml",
        "--resume",
        "run/checkpoint-1",
        "--max-seq-length",
        "24",
        "--batch-size",
        "2",
        "--output-dir",
        "r2",
    ]);
    expect_fail(
        &o,
        1,
        &[
            "cannot resume from run/checkpoint-1",
            "max_seq_length: checkpoint 32, now 24",
            "batch_size: checkpoint 4, now 2",
        ],
    );
    // changed data
    s.easy_data("d.jsonl", 9);
    let o = s.lema(&[
        "train",
        "-c",
        "t.toml",
        "--resume",
        "run/checkpoint-1",
        "--output-dir",
        "r3",
    ]);
    expect_fail(&o, 1, &["data (", "checkpoint "]);
    s.easy_data("d.jsonl", 8);
    // another base model (3 layers instead of 2)
    let other = Setup::with_layers(None, 3);
    let o = s.lema(&[
        "train",
        "-c",
        "t.toml",
        "--resume",
        "run/checkpoint-1",
        "--output-dir",
        "r4",
        "--model",
        other.path("model/model.safetensors").to_str().unwrap(),
        "--tokenizer",
        "model",
    ]);
    expect_fail(
        &o,
        1,
        &[
            "cannot resume from run/checkpoint-1",
            "the checkpoint was made on one of",
            "its config.json differs from the one the checkpoint was made with",
        ],
    );
    // a fresh run into a folder that holds one
    expect_fail(
        &s.lema(&["train", "-c", "t.toml"]),
        1,
        &["already holds a run", "--resume"],
    );
    // folders that are not resumable checkpoints
    expect_fail(
        &s.lema(&["train", "--resume", "run/adapter"]),
        1,
        &["trainer_state.json: missing: this folder is not a complete lema checkpoint"],
    );
    expect_fail(
        &s.lema(&["train", "--resume", "nowhere/checkpoint-9"]),
        1,
        &["nowhere/checkpoint-9/trainer_state.json"],
    );
}

/// Overwrite the embedding row of `token` with NaN in a model written by
/// `write_random_model` (F32).
fn poison_embedding(model: &Path, token: usize) {
    let mut bytes = std::fs::read(model).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header["model.embed_tokens.weight"];
    let hidden = t["shape"][1].as_u64().unwrap() as usize;
    let start = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize + token * hidden * 4;
    for i in 0..hidden {
        bytes[start + 4 * i..start + 4 * i + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(model, bytes).unwrap();
}

#[test]
fn non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let s = Setup::new(None);
    poison_embedding(&s.path("model/model.safetensors"), b'~' as usize);
    // in file order (no shuffle) the last row holds the one record with a '~'
    let mut lines: Vec<String> = (0..6)
        .map(|i| format!(r#"{{"text": "fine {i}"}}"#))
        .collect();
    lines.push(r#"{"text": "bad ~"}"#.into());
    s.write("d.jsonl", &lines.join("\n"));
    s.config(
        "t.toml",
        "d.jsonl",
        "run",
        "save_steps = 1\nbatch_size = 1\nshuffle = false\nmax_seq_length = 8\nepochs = 1",
    );
    let o = s.lema(&["train", "-c", "t.toml"]);
    expect_fail(
        &o,
        1,
        &[
            "training stopped: loss is NaN at step 7; the parameters were not updated",
            "the last good checkpoint is ",
            "/run/checkpoint-6",
        ],
    );
    let st = lema::Trainer::read_state(&s.path("run/checkpoint-6")).unwrap();
    assert_eq!(st.step, 6);
    assert!(!s.path("run/checkpoint-7").exists());
    let m = metrics(&s.path("run"));
    assert_eq!(m.len(), 6, "only the finite steps are logged");
    assert!(m.iter().all(|r| r.loss.is_finite()));
}

/// An observer whose second checkpoint write fails the way a full disk does: part of the
/// folder is written, then ENOSPC.
struct FullDisk {
    saves: usize,
}

impl Observer for FullDisk {
    fn save_checkpoint(&mut self, t: &lema::Trainer, dir: &Path) -> lema::Result<()> {
        self.saves += 1;
        if self.saves < 2 {
            return t.save_checkpoint(dir);
        }
        lema::checkpoint::write_dir_atomically(dir, |tmp| {
            std::fs::write(tmp.join("adapter_model.safetensors"), b"partial").unwrap();
            Err(lema::Error::io(
                tmp.join("optimizer.safetensors"),
                std::io::Error::from_raw_os_error(28),
            ))
        })
    }
}

#[test]
fn a_full_disk_during_a_checkpoint_leaves_the_previous_one_intact() {
    let s = Setup::new(None);
    s.easy_data("d.jsonl", 8);
    let cfg = TrainConfig {
        model: Some(s.path("model/model.safetensors")),
        data: Some(s.path("d.jsonl")),
        output_dir: s.path("run"),
        max_seq_length: 32,
        max_steps: Some(4),
        save_steps: 1,
        lora_rank: 4,
        device: lema::Device::Cpu,
        ..Default::default()
    };
    let e = train::run(&cfg, None, &mut FullDisk { saves: 0 })
        .unwrap_err()
        .to_string();
    let prev = s.path("run/checkpoint-1");
    assert!(
        e.contains("checkpoint-2: could not write this checkpoint"),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "the previous checkpoint {} is intact",
            prev.display()
        )),
        "{e}"
    );
    assert!(
        e.contains("No space left on device") || e.contains("os error 28"),
        "{e}"
    );
    assert!(!s.path("run/checkpoint-2").exists());
    let leftovers: Vec<_> = std::fs::read_dir(s.path("run"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary folders left behind: {leftovers:?}"
    );
    // the previous checkpoint loads and resumes
    let t = lema::Trainer::from_checkpoint(&prev, None).unwrap();
    assert_eq!(t.step(), 1);
    let r = train::run(&cfg, Some(&prev), &mut train::Quiet).unwrap();
    assert!(
        matches!(r, train::Outcome::Finished { steps: 4, .. }),
        "{r:?}"
    );
}

#[test]
fn the_readme_config_example_is_valid() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("## Training from the command line")
        .nth(1)
        .expect("README section 'Training from the command line'");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block in the section");
    let c = TrainConfig::from_toml(block, "README.md", None, &[]).unwrap();
    c.validate().unwrap();
    assert_eq!(c.lr_scheduler, lema::schedule::ScheduleKind::Cosine);
}
