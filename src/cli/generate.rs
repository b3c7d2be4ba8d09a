//! `lema generate`: text from a prepared model, alone or with a LoRA adapter, streamed to
//! stdout as the tokens arrive.

use anyhow::{Context, Result, bail};
use lema::generate::{PromptFormat, TextStream, encode_prompt};
use lema::tokenizer::Tokenizer;
use lema::{Device, GenerateOptions, LemaConfig, LemaModel, SamplingParams, Strategy};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The prepared model: a monolithic .safetensors with config.json and the tokenizer
    /// files beside it (see `lema prepare`), or the folder that holds them, or a Hub id
    /// (org/name[@revision], prepared once into lema's cache).
    #[arg(short, long)]
    model: PathBuf,
    /// A PEFT adapter folder to apply (adapter_config.json + adapter_model.safetensors).
    #[arg(short, long)]
    adapter: Option<PathBuf>,
    /// The prompt; read from stdin when absent.
    prompt: Option<String>,
    /// A system message (chat format only).
    #[arg(long)]
    system: Option<String>,
    /// Apply the model's chat template (the default when the model has one).
    #[arg(long, conflicts_with = "raw")]
    chat: bool,
    /// Feed the prompt as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Most tokens to generate.
    #[arg(short = 'n', long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding.
    #[arg(short, long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens whose probability adds up to p.
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Folder with tokenizer.json (default: the model's folder).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// streaming (layers read from the file at every step; for models that do not fit)
    /// or resident (decoded once; faster when the model fits in memory).
    #[arg(long, default_value = "streaming")]
    strategy: Strategy,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: Device,
    /// Print the prompt's token count and the speed on stderr.
    #[arg(short, long)]
    verbose: bool,
}

/// The folder holding a model file's side files.
pub fn model_dir(model: &Path) -> PathBuf {
    match model.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let prompt = match a.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from stdin")?;
            s
        }
    };
    if prompt.trim().is_empty() {
        bail!("the prompt is empty; pass it as an argument or on stdin");
    }
    let model_path = super::model_file(&a.model)?;
    let mut cfg = LemaConfig::new(&model_path);
    cfg.adapter_path = a.adapter.clone();
    cfg.strategy = a.strategy;
    cfg.device = a.device;
    let mut model =
        LemaModel::new(cfg).with_context(|| format!("opening {}", model_path.display()))?;
    let tok_dir = a.tokenizer.unwrap_or_else(|| model_dir(&model_path));
    let tok = Tokenizer::from_dir(&tok_dir)?;
    let format = match (a.chat, a.raw) {
        (true, _) => PromptFormat::Chat,
        (_, true) => PromptFormat::Raw,
        _ => PromptFormat::Auto,
    };
    let ids = encode_prompt(&tok, &prompt, a.system.as_deref(), format)?;

    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop_ids: if a.ignore_eos {
            Vec::new()
        } else {
            tok.eos_ids.clone()
        },
    };
    let start = std::time::Instant::now();
    let mut stream = TextStream::new();
    let mut stdout = std::io::stdout().lock();
    let out = model.generate(std::slice::from_ref(&ids), &opts, &mut |_, id| {
        let piece = stream.push(&tok, id)?;
        // a closed stdout (e.g. `| head`) ends generation quietly
        if stdout
            .write_all(piece.as_bytes())
            .and_then(|_| stdout.flush())
            .is_err()
        {
            return Err(lema::Error::config("stdout closed"));
        }
        Ok(())
    });
    let out = match out {
        Err(lema::Error::Config(m)) if m == "stdout closed" => return Ok(()),
        r => r?,
    };
    let _ = writeln!(stdout);
    if a.verbose {
        let n = out[0].tokens.len();
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "[{} prompt tokens, {n} new tokens in {secs:.2} s ({:.1} tokens/s), {}]",
            ids.len(),
            n as f64 / secs.max(1e-9),
            if out[0].stopped {
                "stopped at end of sequence"
            } else {
                "reached --max-new-tokens"
            }
        );
    }
    Ok(())
}
