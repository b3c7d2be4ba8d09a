//! `lema bench`.

use anyhow::{Context, Result};
use lema::bench::{BenchOptions, preset, run_bench};
use lema::{Device, GradientCheckpointing, Strategy};

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
    /// Store the block linears quantized: nf4 (bitsandbytes' layout, double
    /// quantization) or fp8 (E4M3, 128 × 128 block scales); the rest in bf16.
    #[arg(long)]
    quant: Option<String>,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Recompute each layer in the backward (gradient checkpointing): true, false (keep
    /// every layer's activations) or auto (keep those that fit in the free memory).
    #[arg(long, default_value = "true")]
    checkpointing: GradientCheckpointing,
    /// CUDA: layers copied ahead of the one in use.
    #[arg(long, default_value_t = 2)]
    prefetch: usize,
    /// CUDA, strategy budget: GPU bytes for resident layers (default: what is free − 4 GiB).
    #[arg(long)]
    max_vram: Option<u64>,
    /// Also time the steps with every layer resident on the GPU, to tell the share of a
    /// streamed step spent waiting for weights.
    #[arg(long)]
    compare_resident: bool,
    /// Keep each layer's saved input in host memory between forward and backward.
    #[arg(long)]
    offload_activations: bool,
    /// With --offload-activations: park them in bf16/f16 when the weights are (half the
    /// host memory; the backward re-runs each block from its rounded input).
    #[arg(long)]
    offload_activations_half: bool,
    /// Keep the AdamW moments in page-locked host memory that the GPU reads and writes
    /// over PCIe (once per step) instead of in GPU memory.
    #[arg(long)]
    offload_optimizer: bool,
    /// CUDA: time every kernel of the timed steps and print where the GPU time goes.
    #[arg(long)]
    profile: bool,
    /// The most host memory the process may use, in bytes (the cgroup limit and
    /// MemAvailable always count too).
    #[arg(long)]
    max_host_memory: Option<u64>,
    /// Where streamed layers come from on the host: auto, mapped or disk.
    #[arg(long, default_value = "auto")]
    weight_source: String,
    /// Tokens per sequence tile of a block's per-token work (attention stays whole);
    /// default: 8192, fewer when the free GPU memory asks (none up to 8192 tokens); 0:
    /// never tiled.
    #[arg(long)]
    seq_tile: Option<usize>,
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
        quant: match a.quant.as_deref().map(str::parse::<lema::quant::Format>) {
            None => None,
            Some(Ok(f)) if a.dtype == "bf16" => Some(f),
            Some(Ok(f)) => anyhow::bail!(
                "--quant {} stores the linears in {} and the rest in bf16; leave --dtype at bf16",
                f.name(),
                f.describe()
            ),
            Some(Err(e)) => anyhow::bail!("--quant: {e}"),
        },
        lora_rank: a.rank,
        device: a.device.parse::<Device>()?,
        gradient_checkpointing: a.checkpointing,
        prefetch_depth: a.prefetch,
        max_vram: a.max_vram,
        compare_resident: a.compare_resident,
        offload_activations: a.offload_activations,
        offload_activations_half: a.offload_activations_half,
        offload_optimizer: a.offload_optimizer,
        profile: a.profile,
        max_host_memory: a.max_host_memory,
        weight_source: a.weight_source.parse()?,
        seq_tile: a.seq_tile,
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
    let gb = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.2} GB", b as f64 / 1e9));
    eprintln!(
        "{}: median step {:.3} s | {:.1} tokens/s | {:.2} TFLOP/s | weights {:.2} GB/step at {:.1} GB/s | peak VRAM {} | peak RSS {}",
        r.device,
        r.step_seconds_median,
        r.tokens_per_second,
        r.achieved_tflops,
        r.weight_bytes_per_step / 1e9,
        r.h2d_gb_per_s,
        gb(r.peak_vram_bytes),
        gb(r.peak_rss_bytes),
    );
    if let (Some(m), Some(f)) = (&r.machine_gemm, r.fraction_of_gemm) {
        let blas = match (&m.blas_library, m.blas_gflops) {
            (Some(l), Some(g)) => format!("{l}: {g:.1}"),
            (Some(l), None) => l.clone(),
            (None, _) => match std::env::var("LEMA_BLAS") {
                Ok(p) if !p.is_empty() => {
                    format!("LEMA_BLAS={p} did not load or has no cblas_sgemm")
                }
                _ => "no BLAS found (LEMA_BLAS names one)".to_string(),
            },
        };
        eprintln!(
            "  {:.0}% of this machine's f32 GEMM rate, {:.1} GFLOP/s ({n}³: lema {:.1}, {blas}; {} threads)",
            100.0 * f,
            m.gflops,
            m.lema_gflops,
            r.threads,
            n = m.n,
        );
    }
    if let (Some(t), Some(w)) = (r.resident_step_seconds, r.weight_wait_share) {
        eprintln!(
            "  all layers resident: {t:.3} s/step, so {:.0}% of a streamed step waits for weights",
            100.0 * w
        );
    }
    let layers = opts.shape.layers;
    match opts.gradient_checkpointing {
        GradientCheckpointing::Auto => eprintln!(
            "  activations (checkpointing auto): kept for {} of {layers} blocks, the other {} re-run in the backward",
            r.kept_blocks,
            layers - r.kept_blocks.min(layers)
        ),
        GradientCheckpointing::Off => {
            eprintln!("  activations: kept for every block (checkpointing off)")
        }
        GradientCheckpointing::Every => {}
    }
    match (r.graph_replays, &r.graph_note) {
        (Some(n), _) if n > 0 => eprintln!(
            "  step graph: {n} of {} timed steps replayed from one capture (LEMA_CUDA_GRAPHS=0: none)",
            opts.steps
        ),
        (Some(_), Some(why)) => eprintln!("  step graph: not replayed ({why})"),
        _ => {}
    }
    if let Some(t) = r.seq_tile {
        eprintln!(
            "  sequence tiles of {t} tokens ({} per block call)",
            (opts.batch * opts.seq).div_ceil(t)
        );
    }
    if let Some(p) = &r.weights_plan {
        eprintln!("  {p}");
    }
    if r.disk_bytes_per_step > 0.0 {
        eprintln!(
            "  read from disk: {:.2} GB/step, {:.2} GB/s over the step",
            r.disk_bytes_per_step / 1e9,
            r.disk_bytes_per_step / r.step_seconds_median / 1e9
        );
    }
    if let Some(n) = &r.stream_note {
        eprintln!("  note: {n}");
    }
    if let Some(p) = &r.profile {
        let phase = |l: &&lema::backend::ProfileLine| {
            l.label.starts_with("busy: ") || l.label.starts_with("idle: ")
        };
        let total: f64 = p.iter().filter(phase).map(|l| l.ms).sum();
        let line = |l: &lema::backend::ProfileLine| {
            eprintln!(
                "  {:>9.2} ms {:>5.1}% {:>7} calls  {}",
                l.ms,
                100.0 * l.ms / total.max(1e-9),
                l.calls,
                l.label
            )
        };
        eprintln!(
            "  GPU time per step ({total:.1} ms profiled), by phase (idle: the compute stream waiting):"
        );
        p.iter().filter(phase).for_each(line);
        let sum = |f: &dyn Fn(&str) -> bool| -> f64 {
            p.iter().filter(|l| f(&l.label)).map(|l| l.ms).sum()
        };
        let busy = sum(&|l| l.starts_with("busy: "));
        let idle = sum(&|l| l.starts_with("idle: "));
        let gemm = sum(&|l| l.starts_with("gemm"));
        eprintln!(
            "  GEMMs {gemm:.2} ms = {:.1}% of the {busy:.1} ms busy; the GPU waited {idle:.2} ms ({:.1}% of the step)",
            100.0 * gemm / busy.max(1e-9),
            100.0 * idle / total.max(1e-9)
        );
        eprintln!("  by kernel:");
        p.iter().filter(|l| !phase(l)).take(24).for_each(line);
    }
    Ok(())
}
