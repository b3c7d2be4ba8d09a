//! `lema prepare` and `lema info`.

use anyhow::{Context, Result};
use lema::backend::DType;
use lema::gbi::{Gbi, Group};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// A Hugging Face model folder (safetensors, sharded or not), a .gguf file, or a
    /// Hub id (org/name or org/name@revision), downloaded into the Hugging Face cache.
    src: PathBuf,
    /// The branch, tag or commit of a Hub id [default: main].
    #[arg(long)]
    revision: Option<String>,
    /// Output folder (gets model.safetensors, config.json, tokenizer files) or a
    /// path ending in .safetensors.
    #[arg(short, long)]
    out: PathBuf,
    /// Convert the weights to bf16, f16 or f32 (default: keep; bf16 for quantized GGUF).
    #[arg(long)]
    dtype: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn prepare(a: PrepareArgs) -> Result<()> {
    let dtype = a.dtype.as_deref().map(str::parse::<DType>).transpose()?;
    // what an earlier `lema prepare` killed mid-write left there (a multi-GB partial file)
    let dir = lema::import::OutputPaths::of(&a.out).dir;
    for line in lema::fsutil::clean_stale_temporaries(&dir)? {
        eprintln!("note: {line}");
    }
    let src = match lema::hub::hub_id(&a.src) {
        Some(id) => {
            let id = id.with_revision(a.revision.as_deref())?;
            let opts = lema::hub::HubOptions::from_env()?;
            let opts = opts.clone().with_progress(opts.progress && !a.quiet);
            lema::hub::download(&id, &opts)?.dir
        }
        None if a.revision.is_some() => anyhow::bail!(
            "--revision is for a Hub id (org/name); {} is a local path",
            a.src.display()
        ),
        None => a.src.clone(),
    };
    let report = lema::import::prepare(&src, &a.out, dtype, !a.quiet)
        .with_context(|| format!("preparing {}", a.src.display()))?;
    println!("{report}");
    Ok(())
}

#[derive(clap::Args)]
pub struct InfoArgs {
    /// A prepared .safetensors file, an HF folder, a .gguf file or a Hub id (prepared
    /// once into lema's cache).
    path: PathBuf,
}

/// The config.json beside a safetensors file or in an HF folder, validated as training
/// reads it: what the file holds is shown above, and a config no model can have ends the
/// command with an error, so that scripts see a non-zero exit.
fn check_config(path: &std::path::Path) -> Result<()> {
    let cfg = if path.is_dir() {
        path.join("config.json")
    } else if path.extension().is_some_and(|e| e == "safetensors") {
        path.with_file_name("config.json")
    } else {
        return Ok(()); // a GGUF carries its sizes in its header, checked by prepare
    };
    if !cfg.is_file() {
        return Ok(());
    }
    lema::config::ModelConfig::from_file(&cfg)
        .map(drop)
        .context("train, eval and generate will refuse this model")
}

fn gb(bytes: usize) -> String {
    format!("{:.3} GB", bytes as f64 / 1e9)
}

pub fn info(mut a: InfoArgs) -> Result<()> {
    a.path = super::model_path(&a.path)?;
    let summary = lema::import::inspect(&a.path)?;
    print!("{summary}");
    check_config(&a.path)?;
    let is_safetensors = a.path.extension().is_some_and(|e| e == "safetensors");
    if !is_safetensors {
        println!("(run `lema prepare` to get the monolithic file that training reads)");
        return Ok(());
    }
    let gbi = Gbi::open(&a.path)?;
    let layers = gbi.num_layers();
    let per_layer: Vec<usize> = (0..layers)
        .map(|i| gbi.group_bytes(Group::Layer(i)))
        .collect();
    let (embed, head) = (gbi.group_bytes(Group::Embed), gbi.group_bytes(Group::Head));
    let total: usize = gbi.tensors().map(|t| t.len).sum();
    let largest = per_layer.iter().copied().max().unwrap_or(0);
    println!("layers: {layers}, per layer: {} (largest)", gb(largest));
    println!(
        "embedding: {}, head (final norm + lm_head): {}",
        gb(embed),
        gb(head)
    );
    println!("weights in the file: {}", gb(total));
    println!(
        "memory for frozen weights by strategy (activations, LoRA and optimizer state come on top):"
    );
    println!(
        "  streaming: about {} on the device (two layer slots + head); the file stays in the page cache",
        gb(2 * largest + head)
    );
    println!(
        "  resident:  {} of host RAM as stored ({} on the CPU backend, which decodes to f32)",
        gb(total - embed),
        gb((total - embed) / gbi.tensors().next().map_or(4, |t| t.dtype.size()) * 4)
    );
    Ok(())
}
