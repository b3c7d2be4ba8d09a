//! `lema eval`'s library side: loss and perplexity of a model (with or without an
//! adapter) over a JSONL or plain-text file.

use super::{EvalResult, evaluate_plan, model_file, tokenizer_dir};
use crate::api::{Device, LemaConfig, LemaModel};
use crate::dataset::{self, BadLinePolicy, BatchPlan, DataOptions, Layout, LoadReport};
use crate::error::{Error, Result};
use crate::stream::Strategy;
use crate::tokenizer::Tokenizer;
use std::path::PathBuf;

/// What to evaluate and how.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// The prepared `.safetensors` file (or its folder).
    pub model: PathBuf,
    /// A PEFT adapter folder; None evaluates the base model.
    pub adapter: Option<PathBuf>,
    /// JSONL records (scored as in training) or `.txt` (cut into windows).
    pub data: PathBuf,
    /// Tokenizer folder; default: the model's folder.
    pub tokenizer: Option<PathBuf>,
    /// Longest sequence (window for `.txt`) in tokens.
    pub max_seq_length: usize,
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Skip or stop at unusable JSONL records.
    pub on_bad_line: BadLinePolicy,
    /// Where to compute.
    pub device: Device,
    /// How frozen weights are kept.
    pub strategy: Strategy,
}

/// Loss and perplexity over the whole file, and what reading it left out.
pub fn evaluate_file(o: &EvalOptions) -> Result<(EvalResult, LoadReport, usize)> {
    // a GGUF, a pickle, a folder to prepare: say so before the tokenizer is looked for
    crate::modelfile::weights_file(&o.model)?;
    let tok = Tokenizer::from_dir(&tokenizer_dir(o.tokenizer.as_deref(), &o.model))?;
    let opts = DataOptions {
        max_seq_length: o.max_seq_length,
        on_bad_line: o.on_bad_line,
    };
    let (examples, report) = dataset::load_file(&o.data, &tok, &opts)?;
    let mut lcfg = LemaConfig::new(model_file(&o.model));
    lcfg.device = o.device;
    lcfg.strategy = o.strategy;
    lcfg.adapter_path = o.adapter.clone();
    let mut model = LemaModel::new(lcfg)?;
    if o.adapter.is_none() {
        // B = 0: the adapters add nothing, so this is the base model
        model.initialize_lora()?;
    }
    let pad = tok.eos_token_id().unwrap_or(0);
    let mut plan = BatchPlan::new(
        &examples,
        Layout::Packed,
        o.max_seq_length,
        o.batch_size,
        pad,
        0,
        false,
    )?;
    let r = evaluate_plan(&mut model, &mut plan).map_err(|e| match e {
        Error::NonFinite(msg) => {
            let with = o
                .adapter
                .as_ref()
                .map_or(String::new(), |a| format!(" with adapter {}", a.display()));
            Error::NonFinite(format!(
                "{}{with} on {}: {msg}. An adapter is checked for them when it loads, so the base model's weights likely hold NaN or infinity (re-run `lema prepare` from the original files), or the forward pass overflows",
                model_file(&o.model).display(),
                o.data.display()
            ))
        }
        other => other,
    })?;
    Ok((r, report, examples.len()))
}
