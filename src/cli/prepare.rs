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
    /// Store every block linear quantized: nf4 (bitsandbytes' NF4 layout with double
    /// quantization, as transformers saves a 4-bit model) or fp8 (E4M3 with 128 × 128
    /// block scales, as DeepSeek-V3 / Qwen3-FP8 checkpoints); embeddings, norms and the
    /// head stay as they are.
    #[arg(long)]
    quantize: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn prepare(a: PrepareArgs) -> Result<()> {
    let dtype = a.dtype.as_deref().map(str::parse::<DType>).transpose()?;
    let format = a
        .quantize
        .as_deref()
        .map(str::parse::<lema::quant::Format>)
        .transpose()?;
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
    if let Some(format) = format {
        let names = lema::import::quantize::quantize_prepared(&report, format)
            .with_context(|| format!("quantizing {}", report.output.display()))?;
        let bytes = std::fs::metadata(&report.output)
            .map(|m| m.len())
            .unwrap_or(0);
        println!(
            "quantized {} linears to {}: {} now {:.2} GB",
            names.len(),
            format.describe(),
            report.output.display(),
            bytes as f64 / 1e9
        );
    }
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

/// The quantized weights of the prepared file `path` (read and checked as training reads
/// them, against the config.json beside it); none without a config.json.
fn quant_table(
    path: &std::path::Path,
    gbi: &Gbi,
) -> Result<Option<lema::model::quantized::QuantTable>> {
    let cfg_path = path.with_file_name("config.json");
    if !cfg_path.is_file() {
        return Ok(None); // nothing to check the linears against (info says what it can)
    }
    let cfg = lema::config::ModelConfig::from_file(&cfg_path)?;
    let raw: serde_json::Value = serde_json::from_str(&lema::fsutil::read_text(&cfg_path)?)
        .with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    let model = lema::model::Model::new(cfg);
    Ok(lema::model::quantized::QuantTable::read(
        gbi,
        &model.linear_weights(),
        &raw,
    )?)
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
    // quantized linears: the format, and the dense copy of one block while it runs
    let mut expanded = vec![0usize; layers];
    let mut formats: std::collections::BTreeMap<&str, usize> = Default::default();
    let table = quant_table(&a.path, &gbi)?;
    for (name, w) in table.iter().flat_map(|t| t.iter()) {
        *formats.entry(w.layout()).or_default() += 1;
        if let Group::Layer(i) = Gbi::group_of(name)
            && let Some(e) = expanded.get_mut(i)
        {
            *e += w.shape().iter().product::<usize>() * w.dtype().size();
        }
    }
    let expanded = expanded.into_iter().max().unwrap_or(0);
    for (layout, n) in &formats {
        println!(
            "quantized: {n} block linears in {layout}, expanded one block at a time right \
             before use ({} for the largest block)",
            gb(expanded)
        );
    }
    println!(
        "memory for frozen weights by strategy (activations, LoRA and optimizer state come on top):"
    );
    println!(
        "  streaming: about {} on the device (two layer slots + head{}); the file stays in the page cache",
        gb(2 * largest + head + expanded),
        if expanded > 0 {
            " + one expanded block"
        } else {
            ""
        }
    );
    // the CPU backend holds every stored element as an f32
    let elements: usize = gbi
        .tensors()
        .filter(|t| Gbi::group_of(&t.name) != Group::Embed)
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    println!(
        "  resident:  {} of host RAM as stored ({} on the CPU backend, which decodes to f32)",
        gb(total - embed),
        gb(elements * 4)
    );
    Ok(())
}
