//! `lema eval`: loss and perplexity of a model (+ adapter) on a JSONL or text file.

use anyhow::Result;
use lema::dataset::BadLinePolicy;
use lema::train::eval::{EvalOptions, evaluate_file};
use lema::{Device, Strategy};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Prepared .safetensors file (or its folder), or a Hub id org/name[@revision].
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder (e.g. a run's adapter/ or checkpoint-N/); default: the base model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL records (scored as in training) or a .txt file (cut into windows).
    #[arg(long)]
    data: PathBuf,
    /// Tokenizer folder [default: the model's folder].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    max_seq_length: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Bad data records: skip or error.
    #[arg(long, default_value = "error")]
    on_bad_line: String,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// streaming or resident.
    #[arg(long, default_value = "streaming")]
    strategy: String,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let on_bad_line = match a.on_bad_line.as_str() {
        "skip" => BadLinePolicy::Skip,
        "error" => BadLinePolicy::Error,
        other => anyhow::bail!("--on-bad-line '{other}': use skip or error"),
    };
    let model = super::model_path(&a.model)?;
    super::model_file(&model)?;
    let opts = EvalOptions {
        model,
        adapter: a.adapter,
        data: a.data,
        tokenizer: a.tokenizer,
        max_seq_length: a.max_seq_length,
        batch_size: a.batch_size,
        on_bad_line,
        device: a.device.parse::<Device>()?,
        strategy: a.strategy.parse::<Strategy>()?,
    };
    let (r, report, n) = evaluate_file(&opts)?;
    eprintln!("{}", report.summary(opts.max_seq_length));
    if a.json {
        println!(
            "{}",
            serde_json::json!({"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens, "examples": n})
        );
    } else {
        println!(
            "loss {:.4}  perplexity {:.3}  ({} scored tokens, {n} examples)",
            r.loss, r.perplexity, r.tokens
        );
    }
    Ok(())
}
