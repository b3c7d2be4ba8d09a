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
        &["field `batch_size`", "\"four\""],
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
    expect_fail(
        &o,
        1,
        &[
            "cannot resume from run/checkpoint-1",
            "d.jsonl): checkpoint ",
            ", now ",
        ],
    );
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
        &[
            "nowhere/checkpoint-9/trainer_state.json",
            "missing: this folder is not a complete lema checkpoint",
        ],
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
        .filter(|e| lema::fsutil::parse_temporary(&e.file_name().to_string_lossy()).is_some())
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

// ---- The run folder: where a run writes, one run per folder, signals, leftovers ----

/// Every file under `dir` (relative path → bytes), to show a folder was not touched.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// `cp -r from to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Fail, naming the files that differ, unless `dir` holds exactly `before`; the lock
/// file is not compared (a refused run takes the lock, writing its PID, before it checks).
fn assert_unchanged(dir: &Path, before: &std::collections::BTreeMap<PathBuf, Vec<u8>>) {
    let now = snapshot(dir);
    let changed: Vec<_> = before
        .keys()
        .chain(now.keys())
        .filter(|k| k.as_os_str() != ".lema.lock" && before.get(*k) != now.get(*k))
        .collect();
    assert!(
        changed.is_empty(),
        "{} was written: {changed:?}",
        dir.display()
    );
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The id of a process that has exited.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// `cp -r runs/base runs/copy; lema train --resume runs/copy/checkpoint-2` continues in
/// runs/copy: neither the output_dir saved in the checkpoint (even edited), nor a config
/// file's, sends the writes elsewhere, and a folder holding another run is never written.
#[test]
fn resume_writes_next_to_the_checkpoint_it_was_given() {
    let s = Setup::new(None);
    s.easy_data("d.jsonl", 16);
    s.config(
        "t.toml",
        "d.jsonl",
        "base",
        "max_steps = 4\nsave_steps = 2\nbatch_size = 2",
    );
    expect_ok(&s.lema(&["train", "-c", "t.toml"]));
    let full = trajectory(&metrics(&s.path("base")));
    let base = snapshot(&s.path("base"));
    copy_dir(&s.path("base"), &s.path("copy"));

    // the checkpoint's own output_dir, pointed elsewhere by hand, is not where it writes
    let state_path = s.path("copy/checkpoint-2/trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let saved_out = &mut state["extra"]["lema_train"]["config"]["output_dir"];
    assert!(
        saved_out.as_str().is_some_and(|p| p.ends_with("base")),
        "the checkpoint records where it was written: {saved_out}"
    );
    *saved_out = s.path("elsewhere").to_str().unwrap().into();
    std::fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();

    let o = s.lema(&["train", "--resume", "copy/checkpoint-2"]);
    expect_ok(&o);
    assert_eq!(trajectory(&metrics(&s.path("copy"))), full);
    assert!(
        !s.path("elsewhere").exists(),
        "wrote where the checkpoint said"
    );
    assert_unchanged(&s.path("base"), &base);

    // a config file naming base: the resume still goes next to its checkpoint, and says so
    let o = s.lema(&["train", "-c", "t.toml", "--resume", "copy/checkpoint-2"]);
    expect_ok(&o);
    assert!(
        stderr(&o).contains("is not used on resume (pass --output-dir to write elsewhere)"),
        "{}",
        text(&o)
    );
    assert_eq!(trajectory(&metrics(&s.path("copy"))), full);
    assert_unchanged(&s.path("base"), &base);

    // asking for a folder that holds another run is refused before anything is written
    let o = s.lema(&[
        "train",
        "--resume",
        "copy/checkpoint-2",
        "--output-dir",
        "base",
    ]);
    expect_fail(
        &o,
        1,
        &[
            "already holds a run (last checkpoint",
            "base/checkpoint-4",
            "would overwrite it; choose another output_dir",
        ],
    );
    assert_unchanged(&s.path("base"), &base);

    // a checkpoint of another run put into this run's folder does not resume there...
    s.config(
        "other.toml",
        "d.jsonl",
        "other",
        "max_steps = 4\nsave_steps = 2\nbatch_size = 2\nseed = 7",
    );
    expect_ok(&s.lema(&["train", "-c", "other.toml"]));
    copy_dir(&s.path("other/checkpoint-2"), &s.path("copy/checkpoint-1"));
    let copy = snapshot(&s.path("copy"));
    let o = s.lema(&["train", "--resume", "copy/checkpoint-1"]);
    expect_fail(
        &o,
        1,
        &[
            "cannot resume from",
            "copy/checkpoint-1 in its folder",
            "belongs to run",
            "not to this checkpoint's run",
            "--output-dir",
        ],
    );
    assert_unchanged(&s.path("copy"), &copy);
    // ...but does in a folder of its own, and elsewhere with --output-dir
    copy_dir(&s.path("other/checkpoint-2"), &s.path("alone/checkpoint-2"));
    expect_ok(&s.lema(&["train", "--resume", "alone/checkpoint-2"]));
    assert_eq!(
        trajectory(&metrics(&s.path("alone"))),
        trajectory(&metrics(&s.path("other")))[2..]
    );
    let o = s.lema(&[
        "train",
        "--resume",
        "copy/checkpoint-1",
        "--output-dir",
        "forked",
    ]);
    expect_ok(&o);
    assert_eq!(
        trajectory(&metrics(&s.path("forked"))),
        trajectory(&metrics(&s.path("other")))[2..]
    );
}

/// Wait for a child up to `secs` seconds; kill it (and fail) past that.
fn wait_with_timeout(mut child: std::process::Child, secs: u64, what: &str) -> Output {
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed().as_secs() >= secs {
            let _ = child.kill();
            panic!(
                "{what}: still running after {secs} s:\n{}",
                text(&child.wait_with_output().unwrap())
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Start `lema train` with `args` and wait until metrics.jsonl in `run` has more than
/// `lines` lines.
fn start_training(s: &Setup, args: &[&str], run: &str, lines: usize) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lema"))
        .args(args)
        .current_dir(s.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mpath = s.path(run).join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&mpath).map_or(0, |t| t.lines().count()) <= lines {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "lema train ended early ({st}):\n{}",
                text(&child.wait_with_output().unwrap())
            );
        }
        assert!(
            t0.elapsed().as_secs() < 120,
            "no new training steps after 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

fn signal(child: &std::process::Child, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Two `lema train` into one folder: the second stops at once and names the first's PID.
/// SIGTERM then saves a checkpoint and exits 143, and the run resumes from it.
#[test]
fn one_run_per_folder_and_sigterm_saves_and_exits_143() {
    let s = Setup::new(None);
    s.easy_data("train.jsonl", 20);
    s.config(
        "train.toml",
        "train.jsonl",
        "run",
        "max_steps = 1000000\nlearning_rate = 1e-4\nlogging_steps = 1000000",
    );
    let first = start_training(&s, &["train", "--config", "train.toml"], "run", 1);
    let pid = first.id();

    // the second, fresh or resuming, is refused while the first runs
    for args in [
        vec!["train", "--config", "train.toml"],
        vec![
            "train",
            "--config",
            "train.toml",
            "--output-dir",
            "./run/../run",
        ],
    ] {
        let second = Command::new(env!("CARGO_BIN_EXE_lema"))
            .args(&args)
            .current_dir(s.dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let o = wait_with_timeout(second, 60, "the second lema train");
        expect_fail(
            &o,
            1,
            &[
                "is in use",
                &format!("lema process {pid} is running there"),
                ".lema.lock",
                "wait for it to finish or stop it, or choose another output_dir",
            ],
        );
    }

    signal(&first, "-TERM");
    let o = wait_with_timeout(first, 120, "lema train after SIGTERM");
    let m = metrics(&s.path("run"));
    let last = m.last().unwrap().step;
    let ck = format!("run/checkpoint-{last}");
    expect_fail(
        &o,
        143,
        &[
            "SIGTERM: finishing this step",
            "interrupted after step",
            &ck,
        ],
    );
    assert!(s.path(&ck).join("adapter_model.safetensors").exists());
    assert_eq!(lema::Trainer::read_state(&s.path(&ck)).unwrap().step, last);
    // steps are numbered 1.. without a gap or a repeat: nobody else wrote these metrics
    assert_eq!(
        m.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );

    // the lock went with the process: the run resumes from its checkpoint, in place
    let resumed = start_training(&s, &["train", "--resume", &ck], "run", last as usize);
    signal(&resumed, "-INT");
    let o = wait_with_timeout(resumed, 120, "the resumed lema train after SIGINT");
    expect_fail(
        &o,
        130,
        &["Ctrl-C: finishing this step", "interrupted after step"],
    );
    assert!(
        stderr(&o).contains(&format!("(resuming after step {last})")),
        "{}",
        text(&o)
    );
    let m = metrics(&s.path("run"));
    assert!(m.len() > last as usize);
    assert_eq!(
        m.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=m.len() as u64).collect::<Vec<_>>()
    );
}

/// What a `kill -9` mid-save leaves (temporary folders and files named with the dead
/// writer's PID) is removed by the next run in the folder, which says so; a temporary of
/// a process that still runs is left alone.
#[test]
fn the_next_run_removes_what_a_killed_run_left() {
    let s = Setup::new(None);
    s.easy_data("d.jsonl", 8);
    s.config("t.toml", "d.jsonl", "run", "max_steps = 3\nsave_steps = 1");
    expect_ok(&s.lema(&["train", "-c", "t.toml"]));
    let dead = dead_pid();
    let live = std::process::id();
    let partial = s.path(&format!("run/.checkpoint-3.tmp-{dead}"));
    std::fs::create_dir(&partial).unwrap();
    std::fs::write(partial.join("adapter_model.safetensors"), b"partial").unwrap();
    let tmp_file = s.path(&format!("run/.metrics.jsonl.tmp-{dead}-0"));
    std::fs::write(&tmp_file, b"partial").unwrap();
    let running = s.path(&format!("run/.loss.svg.tmp-{live}-0"));
    std::fs::write(&running, b"being written").unwrap();

    let o = s.lema(&["train", "--resume", "run/checkpoint-1"]);
    expect_ok(&o);
    let err = stderr(&o);
    for (path, what) in [
        (&partial, "removed"),
        (&tmp_file, "removed"),
        (&running, "left"),
    ] {
        let line = err
            .lines()
            .find(|l| l.contains(path.file_name().unwrap().to_str().unwrap()))
            .unwrap_or_else(|| panic!("{} not reported:\n{}", path.display(), text(&o)));
        assert!(line.starts_with(&format!("note: {what} ")), "{line}");
    }
    assert!(
        err.contains(&format!("left by process {dead} (no longer running)")),
        "{err}"
    );
    assert!(
        err.contains(&format!("process {live}, which wrote it, is still running")),
        "{err}"
    );
    assert!(!partial.exists() && !tmp_file.exists());
    assert!(running.exists());
    assert_eq!(metrics(&s.path("run")).len(), 3);
}

/// An `output_dir` that cannot be a folder is refused by name, and a `config.toml` of the
/// user's in the run folder is never overwritten: the effective configuration goes beside.
#[test]
fn output_dir_must_be_a_folder_and_a_users_config_toml_is_kept() {
    let s = Setup::new(None);
    s.easy_data("d.jsonl", 8);
    s.config("t.toml", "d.jsonl", "run", "max_steps = 2");
    expect_fail(
        &s.lema(&["train", "-c", "t.toml", "--output-dir", ""]),
        1,
        &["output_dir is empty; name the run folder"],
    );
    expect_fail(
        &s.lema(&["train", "-c", "t.toml", "--output-dir", "d.jsonl"]),
        1,
        &["output_dir d.jsonl is a file, not a folder; choose a folder"],
    );
    expect_fail(
        &s.lema(&["train", "-c", "t.toml", "--output-dir", "d.jsonl/run"]),
        1,
        &["output_dir d.jsonl/run is inside d.jsonl, which is a file"],
    );
    assert!(!s.path("run").exists());
    // a folder with a run's final adapter (or metrics) but no checkpoint is not fresh
    for name in ["adapter", "metrics.jsonl"] {
        let dir = s.path(&format!("has-{name}"));
        std::fs::create_dir_all(dir.join(name)).unwrap();
        let out = dir.to_str().unwrap();
        expect_fail(
            &s.lema(&["train", "-c", "t.toml", "--output-dir", out]),
            1,
            &[&format!(
                "output_dir {out} already holds a run's {name}; choose another output_dir, or remove it"
            )],
        );
    }

    // the user's own config file in the run folder (output_dir "." is that folder)
    std::fs::create_dir(s.path("mine")).unwrap();
    let mine = s.write(
        "mine/config.toml",
        "# my run\nmodel = \"../model\"\ndata = \"../d.jsonl\"\noutput_dir = \".\"\nmax_seq_length = 32\nbatch_size = 4\nlora_rank = 4\ndevice = \"cpu\"\nmax_steps = 2\n",
    );
    let before = std::fs::read(&mine).unwrap();
    let o = s.lema(&[
        "train",
        "-c",
        "mine/config.toml",
        "--learning-rate",
        "0.003",
    ]);
    expect_ok(&o);
    assert_eq!(
        std::fs::read(&mine).unwrap(),
        before,
        "the user's config.toml was overwritten"
    );
    assert!(
        stderr(&o).contains(
            "config.toml was not written by lema (or was edited since): it is left as it is"
        ),
        "{}",
        text(&o)
    );
    let effective = TrainConfig::load(Some(&s.path("mine/config.lema.toml")), &[]).unwrap();
    assert_eq!(effective.learning_rate, 0.003);
    assert_eq!(effective.max_steps, Some(2));

    // lema's own config.toml is rewritten on resume; once edited by hand, it is the user's
    expect_ok(&s.lema(&["train", "-c", "t.toml", "--save-steps", "1"]));
    expect_ok(&s.lema(&["train", "--resume", "run/checkpoint-1"]));
    assert!(!s.path("run/config.lema.toml").exists());
    let mut edited = std::fs::read_to_string(s.path("run/config.toml")).unwrap();
    edited.push_str("# my note\n");
    std::fs::write(s.path("run/config.toml"), &edited).unwrap();
    expect_ok(&s.lema(&["train", "--resume", "run/checkpoint-1"]));
    assert_eq!(
        std::fs::read_to_string(s.path("run/config.toml")).unwrap(),
        edited
    );
    assert!(s.path("run/config.lema.toml").exists());
}

/// A partial model file left by a killed `lema prepare` is removed by the next one into
/// that folder.
#[test]
fn prepare_removes_what_a_killed_prepare_left() {
    let s = Setup::new(None);
    std::fs::create_dir(s.path("prepared")).unwrap();
    let name = format!("prepared/.model.safetensors.tmp-{}-0", dead_pid());
    let partial = s.path(&name);
    std::fs::write(&partial, vec![0u8; 4096]).unwrap();
    let o = s.lema(&["prepare", "model", "--out", "prepared", "--quiet"]);
    expect_ok(&o);
    assert!(!partial.exists(), "{}", text(&o));
    assert!(
        stderr(&o).contains(&format!("note: removed {name}, left by process")),
        "{}",
        text(&o)
    );
    assert!(s.path("prepared/model.safetensors").is_file());
}

/// The temporary names in `dir` (what a writer killed mid-write leaves).
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| lema::fsutil::parse_temporary(n).is_some())
        .collect()
}

/// `kill -9` while a checkpoint is saved at every step: the folder still resumes from its
/// last checkpoint, and the resumed run removes (and reports) every temporary left.
#[test]
fn kill_9_while_saving_leaves_a_folder_the_next_run_cleans_and_resumes() {
    let s = Setup::new(None);
    s.easy_data("train.jsonl", 20);
    s.config(
        "train.toml",
        "train.jsonl",
        "run",
        "max_steps = 1000000\nsave_steps = 1\nlearning_rate = 1e-4\nlogging_steps = 1000000",
    );
    let first = start_training(&s, &["train", "--config", "train.toml"], "run", 3);
    signal(&first, "-KILL");
    let o = wait_with_timeout(first, 60, "lema train after kill -9");
    assert_eq!(o.status.code(), None, "killed by the signal: {}", text(&o));
    let left = temporaries(&s.path("run"));
    eprintln!("left by the kill: {left:?}");
    let (step, last) = train::list_checkpoints(&s.path("run")).pop().unwrap();

    let ck = last.to_str().unwrap().to_string();
    let mut resumed = Command::new(env!("CARGO_BIN_EXE_lema"))
        .args(["train", "--resume", &ck])
        .current_dir(s.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let next = s.path(&format!("run/checkpoint-{}", step + 1));
    let t0 = std::time::Instant::now();
    while !next.exists() {
        if let Some(st) = resumed.try_wait().unwrap() {
            panic!(
                "resume ended early ({st}):\n{}",
                text(&resumed.wait_with_output().unwrap())
            );
        }
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    signal(&resumed, "-TERM");
    let o = wait_with_timeout(resumed, 120, "the resumed lema train after SIGTERM");
    expect_fail(&o, 143, &["interrupted after step"]);
    for name in &left {
        assert!(
            stderr(&o).contains(&format!(
                "note: removed {}",
                s.path("run").join(name).display()
            )),
            "{name} not reported removed:\n{}",
            text(&o)
        );
    }
    assert_eq!(temporaries(&s.path("run")), Vec::<String>::new());
    let m = metrics(&s.path("run"));
    assert_eq!(
        m.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=m.len() as u64).collect::<Vec<_>>()
    );
    assert!(m.len() as u64 > step);
}

/// A run folder from before run ids (no `.lema-run`, checkpoints without an id) resumes in
/// place, from its old checkpoints as often as asked and from the new ones.
#[test]
fn checkpoints_without_a_run_id_resume_in_their_folder() {
    let s = Setup::new(None);
    s.easy_data("d.jsonl", 8);
    s.config("t.toml", "d.jsonl", "run", "max_steps = 3\nsave_steps = 1");
    expect_ok(&s.lema(&["train", "-c", "t.toml"]));
    let full = trajectory(&metrics(&s.path("run")));
    std::fs::remove_file(s.path("run/.lema-run")).unwrap();
    for (step, _) in train::list_checkpoints(&s.path("run")) {
        let p = s.path(&format!("run/checkpoint-{step}/trainer_state.json"));
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let run = v["extra"]["lema_train"].as_object_mut().unwrap();
        assert!(
            run.remove("run_id").is_some(),
            "the checkpoint records its run"
        );
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    }
    for ck in ["run/checkpoint-1", "run/checkpoint-1", "run/checkpoint-2"] {
        let o = s.lema(&["train", "--resume", ck]);
        expect_ok(&o);
        assert_eq!(trajectory(&metrics(&s.path("run"))), full, "{ck}");
    }
}

/// `max_seq_length = 131072` (issue 14) and `seq_tile` through `lema train`: nothing on
/// the way (validation, data, packing, the run folder) caps the length; a text window of
/// 3000 tokens trains in tiles of 512, and the echoed config keeps both. (A full 131072-
/// token step is a GPU run: the CPU's attention at that length takes hours.)
#[test]
fn train_takes_128k_sequences_and_seq_tile() {
    let s = Setup::new(None);
    let corpus: String = (0..3000).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    s.write("long.txt", &corpus);
    let cfg = s.config(
        "t.toml",
        "long.txt",
        "run",
        "max_seq_length = 131072\nbatch_size = 1\nmax_steps = 2\nseq_tile = 512\n",
    );
    let o = s.lema(&["train", "--config", cfg.to_str().unwrap()]);
    expect_ok(&o);
    let m = metrics(&s.path("run"));
    assert_eq!(m.len(), 2, "{}", text(&o));
    assert!(m.iter().all(|r| r.loss.is_finite()));
    let echoed = std::fs::read_to_string(s.path("run/config.toml")).unwrap();
    assert!(
        echoed.contains("max_seq_length = 131072") && echoed.contains("seq_tile = 512"),
        "{echoed}"
    );
}
