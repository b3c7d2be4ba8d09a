//! A temporary folder with a tiny random Llama (vocabulary: 256 bytes + 3 special tokens)
//! and a byte-level tokenizer written by the test, and the real `lema` binary run in it.

use lema::backend::DType;
use lema::bench::{preset, write_random_model};
use lema::tokenizer::write_byte_level_tokenizer;
use std::path::PathBuf;
use std::process::{Command, Output};

/// The tiny model lives in `model/` (model.safetensors, config.json, tokenizer files).
pub struct Tiny {
    pub dir: tempfile::TempDir,
}

impl Tiny {
    /// A tiny model whose tokenizer_config.json has `template` as its chat_template.
    pub fn new(template: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut shape = preset("tiny").unwrap();
        shape.vocab = 272;
        shape.layers = 2;
        write_random_model(&dir.path().join("model"), &shape, DType::F32, 11, 0.5).unwrap();
        write_byte_level_tokenizer(
            &dir.path().join("model"),
            &["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
            Some("<|endoftext|>"),
            template,
        )
        .unwrap();
        Tiny { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Run `lema args` in the folder.
    pub fn lema(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_lema"))
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// `lema train` on `data` into `run/` on the CPU, with `extra` flags.
    pub fn train(&self, data: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "train",
            "--model",
            "model",
            "--data",
            data,
            "--output-dir",
            "run",
            "--device",
            "cpu",
            "--max-seq-length",
            "32",
            "--batch-size",
            "2",
            "--lora-rank",
            "4",
        ];
        args.extend_from_slice(extra);
        self.lema(&args)
    }
}

/// Exit code, stdout and stderr of a run, for failure messages.
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The run succeeded.
pub fn expect_ok(o: &Output) {
    assert_eq!(
        o.status.code(),
        Some(0),
        "expected success, got:\n{}",
        text(o)
    );
}

/// The run failed with exit code 1 and its stderr holds each of `needles`; returns stderr.
pub fn expect_error(o: &Output, needles: &[&str]) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit 1, got:\n{}",
        text(o)
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    for n in needles {
        assert!(
            err.contains(n),
            "expected stderr to contain {n:?}; actual:\n{}",
            text(o)
        );
    }
    err
}

/// Overwrite value `index` of the F32 tensor `tensor` in the safetensors file `path`.
pub fn poke_f32(path: &std::path::Path, tensor: &str, index: usize, value: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header[tensor];
    assert_eq!(t["dtype"], "F32", "{tensor} in {}", path.display());
    let at = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize + 4 * index;
    assert!(at + 4 <= 8 + n + t["data_offsets"][1].as_u64().unwrap() as usize);
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// Names of the tensors of the safetensors file `path`, sorted.
pub fn tensor_names(path: &std::path::Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut names: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    names.sort();
    names
}
