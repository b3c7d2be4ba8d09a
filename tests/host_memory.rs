//! Models larger than the host memory the process may use (issue 17): under a small
//! `max_host_memory`, STREAMING reads the layers from disk through the staging ring with
//! the same losses as the mapped path, and the process's peak resident set (VmHWM,
//! measured in a child process) stays under the cap, which the mapped path exceeds;
//! RESIDENT is refused with the numbers; a file modified in place is an error naming it
//! on the disk path too; `lema train` prints the plan and takes the settings.

mod common;
use common::tiny::{Tiny, expect_error, expect_ok};
use lema::backend::DType;
use lema::bench::{Shape, write_random_model};
use lema::tiers::WeightSource;
use lema::{Batch, Device, LemaConfig, LemaModel, OptimizerConfig, Strategy, Trainer};
use std::path::{Path, PathBuf};
use std::process::Command;

/// 24 blocks of about 4.2 MB (f32): a 101 MB file.
fn shape() -> Shape {
    Shape {
        name: "host-memory-test".into(),
        gpt2: false,
        vocab: 256,
        hidden: 256,
        intermediate: 1024,
        layers: 24,
        heads: 4,
        kv_heads: 4,
        max_positions: 256,
        tied: false,
    }
}

const SEQ: usize = 64;
const STEPS: usize = 3;
/// The cap of the staged run: below the file's size, above the staging ring and the
/// process itself.
const CAP: u64 = 72 << 20;

fn model(dir: &Path) -> PathBuf {
    write_random_model(dir, &shape(), DType::F32, 7, 0.02).unwrap()
}

fn config(path: &Path, source: WeightSource, cap: Option<u64>) -> LemaConfig {
    let mut c = LemaConfig::new(path);
    c.device = Device::Cpu;
    c.lora_rank = 4;
    c.lora_alpha = 8.0;
    c.weight_source = source;
    c.max_host_memory = cap;
    c
}

fn batch() -> Batch {
    let ids: Vec<u32> = (0..SEQ as u32).map(|i| (i * 37 + 11) % 256).collect();
    Batch::language_modeling(ids, 1, SEQ).unwrap()
}

/// What a child run reports.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct ChildReport {
    losses: Vec<f64>,
    vm_hwm: u64,
    plan: String,
    disk_bytes: u64,
}

fn kb_field(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let l = s.lines().find(|l| l.starts_with(key)).unwrap();
    l[key.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Train `STEPS` steps in a child process (this test binary, running only
/// `child_run`) and return its report.
fn run_child(path: &Path, source: &str, cap: Option<u64>) -> ChildReport {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_run",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LEMA_TEST_MODEL", path)
        .env("LEMA_TEST_SOURCE", source)
        .env(
            "LEMA_TEST_CAP",
            cap.map_or(String::new(), |c| c.to_string()),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("REPORT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no report in: {stdout}"));
    serde_json::from_str(line).unwrap()
}

/// The child side of [`run_child`]; run only by it.
#[test]
#[ignore = "child process of staged_training_matches_mapped_and_stays_under_the_cap"]
fn child_run() {
    let path = PathBuf::from(std::env::var("LEMA_TEST_MODEL").unwrap());
    let source: WeightSource = std::env::var("LEMA_TEST_SOURCE").unwrap().parse().unwrap();
    let cap = std::env::var("LEMA_TEST_CAP").unwrap().parse().ok();
    let mut m = LemaModel::new(config(&path, source, cap)).unwrap();
    m.initialize_lora().unwrap();
    let plan = m.weights_plan().unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-3)).unwrap();
    let b = batch();
    let losses = (0..STEPS).map(|_| t.train_step(&b).unwrap().loss).collect();
    let r = ChildReport {
        losses,
        vm_hwm: kb_field("VmHWM:"),
        plan,
        disk_bytes: t.model.disk_bytes_read(),
    };
    println!("REPORT {}", serde_json::to_string(&r).unwrap());
}

#[test]
fn staged_training_matches_mapped_and_stays_under_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let path = model(dir.path());
    let file = std::fs::metadata(&path).unwrap().len();
    assert!(
        file > CAP + (16 << 20),
        "the model ({file} B) must exceed the cap"
    );

    let mapped = run_child(&path, "mapped", None);
    let staged = run_child(&path, "auto", Some(CAP));
    eprintln!("mapped: {mapped:?}\nstaged: {staged:?}");

    // the automatic choice under the cap is the disk path, and says why with the sizes
    for part in [
        "from disk through a staging ring of 2 ×",
        "exceed",
        "max_host_memory",
    ] {
        assert!(
            staged.plan.contains(part),
            "{part} missing from: {}",
            staged.plan
        );
    }
    assert!(mapped.plan.contains("mapped"), "{}", mapped.plan);
    // the same bytes reach the same arithmetic: the losses agree bit for bit
    assert_eq!(mapped.losses, staged.losses);
    assert!(staged.losses.iter().all(|l| l.is_finite()));
    // every step read the streamed layers from disk (forward and backward)
    assert!(
        staged.disk_bytes as f64 >= 0.8 * STEPS as f64 * file as f64,
        "{} bytes read in {STEPS} steps of a {file}-byte model",
        staged.disk_bytes
    );
    assert_eq!(mapped.disk_bytes, 0);
    // the bound holds, and it is one the mapped path does not meet
    assert!(
        staged.vm_hwm <= CAP,
        "peak RSS {} over the cap {CAP}",
        staged.vm_hwm
    );
    assert!(
        mapped.vm_hwm > CAP,
        "the mapped run's peak RSS {} should exceed {CAP} (else this test proves nothing)",
        mapped.vm_hwm
    );
}

#[test]
fn forced_disk_without_a_cap_reads_every_layer_and_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let path = model(dir.path());
    let b = batch();
    let losses = |source| {
        let mut m = LemaModel::new(config(&path, source, None)).unwrap();
        m.initialize_lora().unwrap();
        let plan = m.weights_plan().unwrap();
        let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-3)).unwrap();
        let l: Vec<f64> = (0..2).map(|_| t.train_step(&b).unwrap().loss).collect();
        (l, plan, t.model.disk_bytes_read())
    };
    let (disk, plan, read) = losses(WeightSource::Disk);
    let (mapped, _, _) = losses(WeightSource::Mapped);
    assert_eq!(disk, mapped);
    assert!(
        plan.contains("24 from disk")
            && !plan.contains("host RAM")
            && plan.contains("weight_source = disk"),
        "{plan}"
    );
    assert!(read > 0);
}

#[test]
fn resident_beyond_the_cap_is_refused_with_the_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = model(dir.path());
    let mut c = config(&path, WeightSource::Auto, Some(CAP));
    c.strategy = Strategy::Resident;
    let msg = LemaModel::new(c)
        .err()
        .expect("RESIDENT must be refused")
        .to_string();
    eprintln!("{msg}");
    for part in [
        "resident",
        "needs",
        "may use only",
        "max_host_memory",
        "--strategy streaming",
    ] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
}

#[test]
fn a_file_modified_in_place_is_named_on_the_disk_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = model(dir.path());
    let mut m = LemaModel::new(config(&path, WeightSource::Disk, None)).unwrap();
    m.initialize_lora().unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(1e-3)).unwrap();
    let b = batch();
    t.train_step(&b).unwrap();
    // append in place: same inode, new size
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(&[0; 4096])
        .unwrap();
    let msg = t
        .train_step(&b)
        .expect_err("a modified file must stop the step")
        .to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("modified") || msg.contains("changed"), "{msg}");
}

/// The losses of a run folder's metrics.jsonl.
fn run_losses(t: &Tiny, run: &str) -> Vec<f64> {
    std::fs::read_to_string(t.path(run).join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect()
}

#[test]
fn lema_train_prints_the_plan_and_takes_the_settings() {
    let t = Tiny::new(None);
    let line = "{\"text\": \"the quick brown fox jumps over the lazy dog\"}\n";
    t.write("data.jsonl", &line.repeat(16));
    let common = ["--max-steps", "3", "--logging-steps", "1"];
    let mapped = t.train(
        "data.jsonl",
        &[&common[..], &["--weight-source", "mapped"]].concat(),
    );
    expect_ok(&mapped);
    let err = String::from_utf8_lossy(&mapped.stderr);
    assert!(
        err.contains("frozen weights: 2 blocks from the mapped file"),
        "{err}"
    );
    std::fs::rename(t.path("run"), t.path("run-mapped")).unwrap();
    let disk = t.train(
        "data.jsonl",
        &[&common[..], &["--weight-source", "disk"]].concat(),
    );
    expect_ok(&disk);
    let err = String::from_utf8_lossy(&disk.stderr);
    assert!(
        err.contains("2 from disk through a staging ring of 2 ×")
            && err.contains("weight_source = disk"),
        "{err}"
    );
    let (a, b) = (run_losses(&t, "run-mapped"), run_losses(&t, "run"));
    assert_eq!(a.len(), 3, "{a:?}");
    assert_eq!(a, b);
    // RESIDENT under a cap smaller than the process: refused with the numbers
    std::fs::remove_dir_all(t.path("run")).unwrap();
    let o = t.train(
        "data.jsonl",
        &[
            &common[..],
            &["--strategy", "resident", "--max-host-memory", "1000000"],
        ]
        .concat(),
    );
    expect_error(
        &o,
        &[
            "strategy resident",
            "needs",
            "may use only",
            "max_host_memory",
            "--strategy streaming",
        ],
    );
    let o = t.train(
        "data.jsonl",
        &[&common[..], &["--weight-source", "ssd"]].concat(),
    );
    expect_error(&o, &["weight_source", "ssd", "`auto`, `mapped`, `disk`"]);
}
