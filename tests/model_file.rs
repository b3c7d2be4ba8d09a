//! The model file through the real binary: a checkpoint resumes only on the weights it was
//! trained on (content fingerprint), a model file truncated or replaced under a running
//! `lema train` is reported by name (never a bare SIGBUS), and a GGUF, a PyTorch pickle, a
//! folder still to prepare or a FIFO given as a model is named as what it is, with what to
//! do instead, by every command.

use lema::backend::DType;
use lema::bench::{preset, write_random_model};
use lema::tokenizer::write_byte_level_tokenizer;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A folder with a tiny random Llama (`model/`), a byte-level tokenizer and data.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let s = Setup { dir };
        s.write_model(&s.path("model"), 11);
        let lines: Vec<String> = (0..32)
            .map(|i| format!(r#"{{"prompt": "Q{i} is? ", "completion": "yes"}}"#))
            .collect();
        std::fs::write(s.path("d.jsonl"), lines.join("\n") + "\n").unwrap();
        s
    }

    /// A model of the one tiny shape with weights drawn from `seed`, and its tokenizer.
    fn write_model(&self, dir: &Path, seed: u64) -> PathBuf {
        let mut shape = preset("tiny").unwrap();
        shape.vocab = 272;
        shape.layers = 2;
        let p = write_random_model(dir, &shape, DType::F32, seed, 0.5).unwrap();
        write_byte_level_tokenizer(dir, &["<|endoftext|>"], Some("<|endoftext|>"), None).unwrap();
        p
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn model_file(&self) -> PathBuf {
        self.path("model/model.safetensors")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lema"));
        c.args(args).current_dir(self.dir.path());
        c
    }

    fn lema(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `lema train` on the tiny model into `out`, with extra flags.
    fn train_args<'a>(&self, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec![
            "train",
            "--model",
            "model",
            "--data",
            "d.jsonl",
            "--output-dir",
            out,
            "--max-seq-length",
            "32",
            "--batch-size",
            "4",
            "--lora-rank",
            "4",
            "--device",
            "cpu",
        ];
        v.extend_from_slice(extra);
        v
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn expect_ok(o: &Output) {
    assert_eq!(o.status.code(), Some(0), "expected success:\n{}", text(o));
}

/// Exit status 1 and a stderr that contains every needle.
fn expect_refused(o: &Output, needles: &[&str]) -> String {
    assert_eq!(o.status.code(), Some(1), "expected exit 1:\n{}", text(o));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{}", text(o));
    }
    err
}

/// The content fingerprint a checkpoint recorded for its base model.
fn recorded_fingerprint(ckpt: &Path) -> Option<String> {
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    st["model_fingerprint"]["content"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn resume_on_other_weights_of_the_same_shape_is_refused() {
    let s = Setup::new();
    let first = s.lema(&s.train_args("run", &["--max-steps", "4", "--save-steps", "2"]));
    expect_ok(&first);
    let ckpt = s.path("run/checkpoint-2");
    let original = lema::modelfile::content_fingerprint_of(&s.model_file()).unwrap();
    assert_eq!(
        recorded_fingerprint(&ckpt).as_deref(),
        Some(original.as_str())
    );

    // the same shape, config.json and size, other weights (another fine-tune)
    let other = s.write_model(&s.path("other"), 12);
    assert_eq!(
        std::fs::metadata(&other).unwrap().len(),
        std::fs::metadata(s.model_file()).unwrap().len()
    );
    assert_eq!(
        std::fs::read(s.path("other/config.json")).unwrap(),
        std::fs::read(s.path("model/config.json")).unwrap()
    );
    std::fs::copy(&other, s.model_file()).unwrap();
    let changed = lema::modelfile::content_fingerprint_of(&s.model_file()).unwrap();
    assert_ne!(changed, original);

    let ck = ckpt.to_str().unwrap();
    let o = s.lema(&s.train_args("run", &["--max-steps", "4", "--resume", ck]));
    let model = s.model_file().canonicalize().unwrap();
    let err = expect_refused(
        &o,
        &[
            "cannot resume",
            &model.display().to_string(),
            "weights are not those the checkpoint was trained on",
            &original,
            &changed,
        ],
    );
    assert!(!err.contains("config.json differs"), "{err}");
    // nothing was trained or written on the wrong base
    assert!(!s.path("run/checkpoint-3").exists());

    // the library refuses too
    let e = lema::Trainer::from_checkpoint(&ckpt, None)
        .err()
        .expect("from_checkpoint on other weights must fail")
        .to_string();
    for n in ["different base model", &original, &changed] {
        assert!(e.contains(n), "{e} lacks {n}");
    }

    // the original weights again: the same fingerprint, and the resume goes through
    std::fs::copy(s.write_model(&s.path("orig"), 11), s.model_file()).unwrap();
    assert_eq!(
        lema::modelfile::content_fingerprint_of(&s.model_file()).unwrap(),
        original
    );
    expect_ok(&s.lema(&s.train_args("run", &["--max-steps", "4", "--resume", ck])));
}

#[test]
fn a_checkpoint_without_a_fingerprint_resumes_with_a_warning() {
    let s = Setup::new();
    expect_ok(&s.lema(&s.train_args("run", &["--max-steps", "4", "--save-steps", "2"])));
    // what lema wrote before content fingerprints: size and config.json only
    let ckpt = s.path("run/checkpoint-2");
    let state_path = ckpt.join("trainer_state.json");
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    st["model_fingerprint"]
        .as_object_mut()
        .unwrap()
        .remove("content");
    std::fs::write(&state_path, st.to_string()).unwrap();
    let ck = ckpt.to_str().unwrap();
    let o = s.lema(&s.train_args("run", &["--max-steps", "4", "--resume", ck]));
    expect_ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning:")
            && err.contains(ck)
            && err.contains("predates model content fingerprints"),
        "{}",
        text(&o)
    );
    // the checkpoints of the resumed run carry the fingerprint again
    let fp = lema::modelfile::content_fingerprint_of(&s.model_file()).unwrap();
    assert_eq!(
        recorded_fingerprint(&s.path("run/checkpoint-4")).as_deref(),
        Some(fp.as_str())
    );
}

/// A running `lema train` and everything it wrote to stderr so far.
struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn start(s: &Setup, args: &[&str]) -> Running {
        let mut child = s
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Running { child, stderr }
    }

    /// Wait until `done` holds (checked every 20 ms), at most 120 s.
    fn wait_until(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        let t0 = Instant::now();
        while !done(&self.stderr.lock().unwrap()) {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("lema exited ({st}) before {what}:\n{}", self.stderr());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, waiting at most 120 s (then the child is killed).
    fn finish(&mut self) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // let the reader thread take the last bytes
                std::thread::sleep(Duration::from_millis(100));
                return st;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                panic!("lema did not exit:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

/// Steps done so far, from the run's metrics.
fn steps_done(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

#[test]
fn truncating_the_model_under_a_running_train_names_the_file() {
    truncate_under_train("cpu");
}

/// The same on the GPU, where the stream copies layers from the mapped file registered as
/// pinned memory (prints SKIP without one).
#[cfg(feature = "cuda")]
#[test]
fn truncating_the_model_under_a_running_cuda_train_names_the_file() {
    if let Err(e) = lema::backend::cuda::CudaBackend::new(0) {
        println!("SKIP: no CUDA device ({e})");
        return;
    }
    truncate_under_train("cuda");
}

/// Start `lema train` on `device`, truncate the model file after two steps: exit 1 with a
/// message naming the file, not a signal.
fn truncate_under_train(device: &str) {
    use std::os::unix::process::ExitStatusExt;
    let s = Setup::new();
    let out = s.path("run");
    let mut args = s.train_args("run", &["--max-steps", "1000000"]);
    let at = args.iter().position(|a| *a == "cpu").unwrap();
    args[at] = device;
    let mut r = Running::start(&s, &args);
    let t0 = Instant::now();
    while steps_done(&out) < 2 {
        assert!(
            r.child.try_wait().unwrap().is_none(),
            "lema exited early:\n{}",
            r.stderr()
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no steps");
        std::thread::sleep(Duration::from_millis(20));
    }
    let len = std::fs::metadata(s.model_file()).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(s.model_file())
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let st = r.finish();
    let err = r.stderr();
    assert_eq!(st.signal(), None, "killed by a signal:\n{err}");
    assert_eq!(st.code(), Some(1), "{err}");
    // the check before each layer read, or (in the moment between it and the read) the
    // SIGBUS handler: both name the file and say what to do
    let model = s.model_file().canonicalize().unwrap();
    for n in [
        model.display().to_string().as_str(),
        "the model file",
        "while lema was reading it",
        "Restore the file and resume from the last checkpoint",
    ] {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

#[test]
fn replacing_the_model_under_a_running_train_warns_and_keeps_the_opened_weights() {
    let s = Setup::new();
    let original = lema::modelfile::content_fingerprint_of(&s.model_file()).unwrap();
    let out = s.path("run");
    let mut r = Running::start(&s, &s.train_args("run", &["--max-steps", "1000000"]));
    let t0 = Instant::now();
    while steps_done(&out) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no steps");
        std::thread::sleep(Duration::from_millis(20));
    }
    // a new file renamed over the model: what `lema prepare` into the same folder does
    let other = s.write_model(&s.path("other"), 12);
    std::fs::rename(&other, s.model_file()).unwrap();
    let model = s.model_file().canonicalize().unwrap();
    let warning = format!("warning: {}: the model file was replaced", model.display());
    r.wait_until("the replacement warning", |e| e.contains(&warning));
    // Ctrl-C: the run saves a checkpoint of what it trained (on the opened weights)
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(r.child.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let st = r.finish();
    let err = r.stderr();
    assert_eq!(st.code(), Some(130), "{err}");
    assert_eq!(err.matches(&warning).count(), 1, "warned once:\n{err}");
    let (_, ckpt) = lema::train::list_checkpoints(&out)
        .pop()
        .expect("a checkpoint saved on Ctrl-C");
    assert_eq!(
        recorded_fingerprint(&ckpt).as_deref(),
        Some(original.as_str())
    );
    // and that checkpoint does not resume on the weights now at the path
    let ck = ckpt.to_str().unwrap();
    let o = s.lema(&s.train_args("run", &["--max-steps", "1000000", "--resume", ck]));
    expect_refused(&o, &["cannot resume", &original, "weights are not those"]);
}

/// Environment variable that turns [`fault_child`] into the process under test.
const CHILD_ENV: &str = "LEMA_TEST_FAULT_CHILD";

/// In a child process (see [`a_fault_in_a_mapped_model_file_names_it`]): map the model
/// file, truncate it, read the vanished bytes.
#[test]
fn fault_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let path = PathBuf::from(path);
    if std::env::var("LEMA_TEST_FAULT_HANDLER").is_ok() {
        lema::modelfile::install_fault_handler();
    }
    let gbi = lema::gbi::Gbi::open(&path).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    let t = gbi.tensors().last().unwrap();
    let bytes = gbi.bytes(t);
    // SAFETY: a read of a live mapping; that it faults is what is tested.
    let b = unsafe { std::ptr::read_volatile(&bytes[bytes.len() - 1]) };
    eprintln!("read {b} without a fault");
}

#[test]
fn a_fault_in_a_mapped_model_file_names_it() {
    use std::os::unix::process::ExitStatusExt;
    let run_child = |handler: bool| {
        let s = Setup::new();
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args([
            "--exact",
            "fault_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, s.model_file());
        if handler {
            c.env("LEMA_TEST_FAULT_HANDLER", "1");
        }
        let o = c.output().unwrap();
        (s, o)
    };
    // without the handler: a bare SIGBUS, which is what the handler exists for
    let (_s, o) = run_child(false);
    assert_eq!(o.status.signal(), Some(libc::SIGBUS), "{}", text(&o));
    // with it: a message naming the file, and status 1
    let (s, o) = run_child(true);
    let err = expect_refused(
        &o,
        &[
            &format!(
                "error: {}: the model file became shorter",
                s.model_file().display()
            ),
            "Restore the file and resume from the last checkpoint",
        ],
    );
    assert!(!err.contains("without a fault"), "{err}");
}

/// A model argument that is not a prepared model is named as what it is by train, eval
/// and generate, with what to do; `lema info` refuses what it cannot read.
fn refused_by_every_command(s: &Setup, model: &str, needles: &[&str]) {
    let runs = [
        vec![
            "train", "--model", model, "--data", "d.jsonl", "--device", "cpu",
        ],
        vec![
            "eval", "--model", model, "--data", "d.jsonl", "--device", "cpu",
        ],
        vec![
            "generate", "--model", model, "--raw", "--device", "cpu", "hi",
        ],
    ];
    for args in runs {
        let o = s.lema(&args);
        let err = expect_refused(&o, needles);
        assert!(!err.contains("tokenizer.json"), "{args:?}: {err}");
        assert!(!err.contains("header size"), "{args:?}: {err}");
    }
}

#[test]
fn a_gguf_given_as_the_model_says_to_prepare_it() {
    let s = Setup::new();
    // a GGUF beside a model folder's tokenizer: the tokenizer is not what is wrong
    let mut gguf = b"GGUF".to_vec();
    gguf.extend_from_slice(&3u32.to_le_bytes());
    gguf.extend_from_slice(&[0; 16]);
    std::fs::write(s.path("model/m.gguf"), &gguf).unwrap();
    refused_by_every_command(
        &s,
        "model/m.gguf",
        &[
            "model/m.gguf: this is a GGUF file",
            "run `lema prepare ",
            "model/m.gguf --out DIR` once and give DIR as the model",
        ],
    );
}

#[test]
fn a_pytorch_pickle_given_as_the_model_is_named_as_one() {
    let s = Setup::new();
    // the zip archive of torch.save (≥ 1.6) and the legacy pickle (protocol 2)
    std::fs::write(
        s.path("model/pytorch_model.bin"),
        b"PK\x03\x04\x14\0\0\0\0\0archive/data.pkl",
    )
    .unwrap();
    std::fs::write(
        s.path("model/model.pt"),
        b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
    )
    .unwrap();
    // and a file of no known form, named like a pickle
    std::fs::write(
        s.path("model/weights.pth"),
        b"\x01\x02\x03\x04 weights of some kind",
    )
    .unwrap();
    for (file, form) in [
        (
            "model/pytorch_model.bin",
            " (a zip archive written by torch.save)",
        ),
        ("model/model.pt", " (a legacy torch.save pickle)"),
        ("model/weights.pth", ";"),
    ] {
        refused_by_every_command(
            &s,
            file,
            &[
                &format!("{file}: this is a PyTorch pickle checkpoint{form}"),
                "lema does not load pickles",
                "save_pretrained",
                "safe_serialization=True",
                "lema prepare",
            ],
        );
    }
}

#[test]
fn a_folder_to_prepare_given_as_the_model_says_to_prepare_it() {
    let s = Setup::new();
    std::fs::create_dir_all(s.path("hf")).unwrap();
    std::fs::copy(s.path("model/config.json"), s.path("hf/config.json")).unwrap();
    refused_by_every_command(
        &s,
        "hf",
        &[
            "hf: no such model: the folder has no model.safetensors",
            "convert it once with `lema prepare ",
            "hf --out DIR` and give DIR",
        ],
    );
}

#[test]
fn a_fifo_is_refused_by_name_and_never_blocks() {
    let s = Setup::new();
    for name in ["pipe", "pipe.safetensors", "pipe.gguf"] {
        let fifo = s.path(name);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // opening a FIFO for reading blocks until a writer comes: the commands must
        // refuse it from its metadata alone
        let mut runs = vec![
            vec!["info", name],
            vec!["prepare", name, "--out", "prepared"],
        ];
        runs.push(vec![
            "train", "--model", name, "--data", "d.jsonl", "--device", "cpu",
        ]);
        runs.push(vec![
            "eval", "--model", name, "--data", "d.jsonl", "--device", "cpu",
        ]);
        runs.push(vec![
            "generate", "--model", name, "--raw", "--device", "cpu", "hi",
        ]);
        for args in runs {
            let mut child = s
                .command(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let t0 = Instant::now();
            let st = loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break st;
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    panic!("{args:?} blocked on the FIFO");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert_eq!(st.code(), Some(1), "{args:?}: {err}");
            assert!(
                err.contains(&format!("{name}: is a FIFO (named pipe)")),
                "{args:?}: {err}"
            );
        }
    }
}
