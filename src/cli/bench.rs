//! `lema bench`.

use anyhow::{Context, Result};
use lema::bench::{BenchOptions, preset, run_bench};
use lema::{Device, Strategy};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Model shape: llama2-7b, llama3-8b, tinyllama-1.1b, smollm2-135m, gpt2, gpt2-xl, tiny.
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// streaming or resident.
    #[arg(long, default_value = "streaming")]
    strategy: String,
    /// Stored weight type of the random model: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Folder for the random model (default: a temporary folder, removed afterwards).
    #[arg(long)]
    workdir: Option<std::path::PathBuf>,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let opts = BenchOptions {
        shape: preset(&a.shape)?,
        batch: a.batch,
        seq: a.seq,
        steps: a.steps,
        warmup: a.warmup,
        strategy: a.strategy.parse::<Strategy>()?,
        dtype: a.dtype.parse()?,
        lora_rank: a.rank,
        device: a.device.parse::<Device>()?,
    };
    let tmp;
    let dir = match &a.workdir {
        Some(d) => d.clone(),
        None => {
            tmp =
                tempfile::tempdir().context("creating a temporary folder for the random model")?;
            tmp.path().to_path_buf()
        }
    };
    eprintln!(
        "lema bench: {} ({} layers, hidden {}), batch {} × seq {}, {} timed steps after {} warm-up",
        a.shape, opts.shape.layers, opts.shape.hidden, a.batch, a.seq, a.steps, a.warmup
    );
    let r = run_bench(&opts, &dir)?;
    let json = serde_json::to_string_pretty(&r)?;
    if let Some(p) = &a.json {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    println!("{json}");
    eprintln!(
        "median step {:.3} s | {:.1} tokens/s | {:.1} GFLOP/s = {:.0}% of this machine's GEMM ({:.1} GFLOP/s, {} threads) | peak RSS {:.2} GB",
        r.step_seconds_median,
        r.tokens_per_second,
        r.achieved_gflops,
        100.0 * r.fraction_of_gemm,
        r.gemm_gflops,
        r.threads,
        r.peak_rss_bytes.unwrap_or(0) as f64 / 1e9
    );
    Ok(())
}
