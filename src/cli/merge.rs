//! `lema merge`: fold a LoRA adapter into the base weights.

use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The base model: a monolithic .safetensors with config.json beside it, or the
    /// folder that holds them, or a Hub id (org/name[@revision]).
    #[arg(short, long)]
    model: PathBuf,
    /// The PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(short, long)]
    adapter: PathBuf,
    /// The merged model to write (a .safetensors path); config.json and the tokenizer
    /// files are written beside it.
    #[arg(short, long)]
    out: PathBuf,
}

pub fn run(a: MergeArgs) -> Result<()> {
    let model = super::model_file(&a.model)?;
    let start = std::time::Instant::now();
    let report = lema::merge::merge_adapter(&model, &a.adapter, &a.out)
        .with_context(|| format!("merging {} into {}", a.adapter.display(), model.display()))?;
    println!(
        "wrote {} ({} tensors, {} with the adapter folded in) in {:.1} s",
        report.output.display(),
        report.tensors,
        report.merged.len(),
        start.elapsed().as_secs_f64()
    );
    for f in &report.side_files {
        println!("wrote {}", f.display());
    }
    Ok(())
}
