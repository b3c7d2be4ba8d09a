//! Memory bounded by what is kept (issue 15, item 5): long texts are encoded in pieces
//! with exactly the tokens of whole-text encoding (checked on the real SmolLM2
//! tokenizer), and numbers that would size an allocation (a flag, a file's header) are
//! refused with a message before anything is allocated, through the real binary.

mod common;

use lema::bench::preset;
use lema::dataset::{BadLinePolicy, DataOptions, load_file};
use lema::tokenizer::{PIECE_BYTES, Tokenizer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// SmolLM2's tokenizer, from the folder this test binary prepares from the cached GGUF;
/// None after a visible SKIP when the GGUF is absent (under CI that fails instead).
fn smollm2_tokenizer() -> Option<Tokenizer> {
    let dir = common::smollm2::prepared_or_skip()?;
    Some(Tokenizer::from_dir(&dir).unwrap())
}

/// Deterministic text of many pieces with what pre-tokenizers treat specially.
fn mixed_text(bytes: usize, mut seed: u64) -> String {
    let words = [
        "the",
        "of",
        "and",
        "2024",
        "3.14",
        "café",
        "naïve",
        "日本語",
        "don't",
        "it's",
        "x1",
        "(a)",
        "--",
        "...",
        "<|im_end|>",
        "$5.99",
        "ZZZ",
        "über",
        "\t",
        "a.b",
        "Hello,",
        "world!",
        "'s",
        "12345678",
        "emoji🙂",
        "—",
    ];
    let seps = [
        " ", " ", " ", " ", "  ", "   ", "\n", "\n\n", " \n", "\t", "",
    ];
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut s = String::new();
    while s.len() < bytes {
        s += words[next(words.len())];
        s += seps[next(seps.len())];
    }
    s
}

#[test]
fn smollm2_pieces_give_the_tokens_of_the_whole_text() {
    let Some(tok) = smollm2_tokenizer() else {
        return;
    };
    assert!(
        tok.encodes_in_pieces(),
        "SmolLM2's byte-level tokenizer should be cut at spaces"
    );
    for seed in [1, 2, 3] {
        let text = mixed_text(6 * PIECE_BYTES + 999, seed);
        let (ids, offsets) = tok.encode_with_offsets(&text, true).unwrap();
        let all = tok.encode_bounded(&text, true, None).unwrap();
        assert!(all.complete);
        assert_eq!(all.ids.len(), ids.len(), "seed {seed}");
        assert!(all.ids == ids && all.offsets == offsets, "seed {seed}");
        for limit in [64, 2048, 30_000] {
            let b = tok.encode_bounded(&text, true, Some(limit)).unwrap();
            assert!(
                !b.complete && b.ids.len() > limit,
                "seed {seed}, limit {limit}"
            );
            assert!(
                b.ids.len() < ids.len(),
                "seed {seed}, limit {limit}: not bounded"
            );
            assert_eq!(b.ids[..], ids[..b.ids.len()], "seed {seed}, limit {limit}");
            assert_eq!(b.offsets[..], offsets[..b.ids.len()]);
        }
    }
}

#[test]
fn smollm2_data_files_keep_what_whole_text_tokenization_keeps() {
    let Some(tok) = smollm2_tokenizer() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let text = mixed_text(5 * PIECE_BYTES * rayon::current_num_threads() + 321, 9);
    let opts = |max| DataOptions {
        max_seq_length: max,
        on_bad_line: BadLinePolicy::Error,
    };
    // a .txt file: every window of the whole text's tokens
    let p = dir.path().join("corpus.txt");
    std::fs::write(&p, &text).unwrap();
    let (ex, _) = load_file(&p, &tok, &opts(64)).unwrap();
    let ids = tok.encode(&text, true).unwrap();
    let got: Vec<u32> = ex
        .iter()
        .flat_map(|e| e.input_ids.iter().copied())
        .collect();
    assert_eq!(got.len(), ids.len());
    assert!(
        got == ids,
        "the streamed windows differ from the whole text's tokens"
    );
    assert!(ex.iter().rev().skip(1).all(|e| e.input_ids.len() == 64));
    // one long JSONL record: its first max_seq_length tokens
    let p = dir.path().join("one.jsonl");
    std::fs::write(&p, serde_json::json!({ "text": text }).to_string()).unwrap();
    for max in [64, 5000] {
        let (ex, rep) = load_file(&p, &tok, &opts(max)).unwrap();
        assert_eq!((ex.len(), rep.truncated), (1, 1));
        assert_eq!(ex[0].input_ids, ids[..max], "max_seq_length {max}");
    }
}

/// A folder with a tiny random Llama (vocabulary: 256 bytes + 3 special tokens) and a
/// byte-level tokenizer, and a JSONL file of `n` short records (one micro-batch each, unpacked).
struct Setup {
    tiny: common::tiny::Tiny,
}

impl Setup {
    fn new(n: usize) -> Self {
        let tiny = common::tiny::Tiny::new(None);
        let lines: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"prompt": "Q{i}? ", "completion": "yes"}}"#))
            .collect();
        tiny.write("d.jsonl", &lines.join("\n"));
        Setup { tiny }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tiny.path(rel)
    }

    /// `lema ARGS` in the folder, under a 4 GiB address-space limit when `limit_memory`:
    /// an allocation sized by a huge number fails there instead of being overcommitted.
    fn lema(&self, args: &[&str], limit_memory: bool) -> (Output, Duration) {
        let bin = env!("CARGO_BIN_EXE_lema");
        let mut cmd = if limit_memory {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg("ulimit -v 4194304 && exec \"$0\" \"$@\"")
                .arg(bin)
                .args(args);
            c
        } else {
            let mut c = Command::new(bin);
            c.args(args);
            c
        };
        let t = Instant::now();
        let out = cmd.current_dir(self.tiny.dir.path()).output().unwrap();
        (out, t.elapsed())
    }

    fn train(&self, out: &str, extra: &[&str]) -> (Output, Duration) {
        let mut args = vec![
            "train",
            "--model",
            "model",
            "--data",
            "d.jsonl",
            "--output-dir",
            out,
            "--device",
            "cpu",
            "--max-seq-length",
            "32",
            "--batch-size",
            "1",
            "--packing",
            "false",
        ];
        args.extend_from_slice(extra);
        self.lema(&args, true)
    }
}

/// The run failed with exit status 1, quickly, with every one of `needles` in stderr.
fn expect_refused((o, took): &(Output, Duration), needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    let all = format!(
        "exit {:?} after {took:?}\n--- stdout ---\n{}\n--- stderr ---\n{err}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(err.starts_with("error: "), "{all}");
    for n in needles {
        assert!(err.contains(n), "expected {n:?} in stderr:\n{all}");
    }
    assert!(!err.contains("memory allocation"), "{all}");
    assert!(*took < Duration::from_secs(30), "{all}");
}

#[test]
fn numbers_that_would_size_an_allocation_are_checked_first() {
    let s = Setup::new(4);
    // 4 records of batch_size 1: 4 micro-batches per epoch
    expect_refused(
        &s.train("a", &["--gradient-accumulation-steps", "1000000000"]),
        &[
            "gradient_accumulation_steps = 1000000000 is more than the 4 micro-batches of an epoch",
            "set it to at most 4",
        ],
    );
    // PEFT's default targets for Llama are q_proj and v_proj; v_proj is [kv dim, hidden]
    let shape = preset("tiny").unwrap();
    let smallest = shape.kv_heads * shape.hidden / shape.heads;
    expect_refused(
        &s.train("b", &["--lora-rank", "10000000"]),
        &[
            "lora_rank = 10000000 is more than",
            &format!("set lora_rank to at most {}", smallest.min(shape.hidden)),
        ],
    );
    // 2^62 epochs of 4 steps: 2^64 steps, which wrapped to 0 before
    expect_refused(
        &s.train("c", &["--epochs", "4611686018427387904"]),
        &[
            "epochs = 4611686018427387904 × 4 steps per epoch is more steps than can be counted",
            "set max_steps",
        ],
    );
    for out in ["a", "b", "c"] {
        assert!(
            !s.path(out).join("metrics.jsonl").exists(),
            "{out}: a refused run started"
        );
    }
}

/// Write a safetensors file whose one tensor `name` claims `shape` (F32), with a data
/// section as large as the claim but sparse, so the claim fits in the file.
fn write_claiming_header(path: &Path, name: &str, shape: [u64; 2]) {
    let bytes = 4 * shape[0] * shape[1];
    let mut hdr =
        serde_json::json!({ name: {"dtype": "F32", "shape": shape, "data_offsets": [0, bytes]} })
            .to_string()
            .into_bytes();
    hdr.resize(hdr.len().next_multiple_of(8), b' ');
    let mut data = (hdr.len() as u64).to_le_bytes().to_vec();
    data.extend_from_slice(&hdr);
    std::fs::write(path, &data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(data.len() as u64 + bytes).unwrap();
}

#[test]
fn adapter_and_optimizer_headers_are_checked_before_reading() {
    let s = Setup::new(4);
    let (o, _) = s.train(
        "run",
        &[
            "--max-steps",
            "1",
            "--lora-rank",
            "4",
            "--lora-target-modules",
            "q_proj",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ckpt = s.path("run/checkpoint-1");
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let huge = [1_000_000, 1_000_000];
    let hidden = preset("tiny").unwrap().hidden;

    // an adapter whose header claims a [1e6, 1e6] tensor (4 TB, in a sparse file)
    let adapter = s.path("bad-adapter");
    std::fs::create_dir(&adapter).unwrap();
    std::fs::copy(
        s.path("run/adapter/adapter_config.json"),
        adapter.join("adapter_config.json"),
    )
    .unwrap();
    write_claiming_header(&adapter.join("adapter_model.safetensors"), key, huge);
    let r = s.lema(
        &[
            "eval",
            "--model",
            "model",
            "--adapter",
            "bad-adapter",
            "--data",
            "d.jsonl",
            "--device",
            "cpu",
        ],
        false,
    );
    expect_refused(
        &r,
        &[
            "bad-adapter/adapter_model.safetensors",
            key,
            &format!("has shape [1000000, 1000000], the model needs [4, {hidden}]"),
        ],
    );

    // an optimizer state with the same claim, on resume
    let opt = ckpt.join("optimizer.safetensors");
    write_claiming_header(&opt, &format!("{key}.exp_avg"), huge);
    let r = s.lema(&["train", "--resume", ckpt.to_str().unwrap()], false);
    expect_refused(
        &r,
        &[
            "optimizer.safetensors",
            &format!("{key}.exp_avg"),
            &format!("has shape [1000000, 1000000], expected [4, {hidden}]"),
        ],
    );
}
