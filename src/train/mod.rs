//! A whole training run, as `lema train` drives it: data → batches, the schedule, the
//! step loop with gradient accumulation and clipping, evaluation, metrics, checkpoints
//! and an exact resume.
//!
//! The data position is a function of the optimizer step alone: epoch e visits the
//! batches in a permutation drawn from (seed, e), and step s takes the micro-batches
//! `(s mod steps_per_epoch) · accum ..` of epoch `s / steps_per_epoch`. Dropout seeds
//! derive from the step too, so a run resumed from checkpoint k computes exactly what
//! the uninterrupted run computed after step k.

pub mod config;
pub mod eval;
pub mod plot;
pub mod run_dir;

pub use config::TrainConfig;

use crate::api::{LemaConfig, LemaModel, Trainer};
use crate::dataset::{self, BatchPlan, DataOptions, Example, Layout, LoadReport};
use crate::error::{Error, Result};
use crate::optim::OptimizerConfig;
use crate::schedule::Schedule;
use crate::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The evaluation of one step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean cross-entropy per counted token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Counted tokens.
    pub tokens: usize,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Optimizer steps done, this one included.
    pub step: u64,
    /// Steps in the whole run.
    pub total_steps: u64,
    /// Fractional epochs done.
    pub epoch: f64,
    /// Mean training loss of this step's counted tokens.
    pub loss: f64,
    /// Learning rate of this step's update.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) input tokens of this step.
    pub tokens: usize,
    /// `tokens` over this step's wall time.
    pub tokens_per_s: f64,
    /// Seconds of training so far, across resumes.
    pub elapsed_s: f64,
    /// Peak resident memory of the process so far.
    pub peak_rss_bytes: Option<u64>,
    /// With `gradient_checkpointing = "auto"`: the blocks whose activations this step
    /// kept (the others were re-run in the backward).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub kept_blocks: Option<usize>,
    /// Validation loss, on the steps that evaluated.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// Validation perplexity, `exp(eval_loss)`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_ppl: Option<f64>,
}

/// What the data looked like, for the user.
#[derive(Clone, Debug)]
pub struct DataSummary {
    /// What reading the training file left out.
    pub train: LoadReport,
    /// The same for `eval_data`, when given.
    pub eval: Option<LoadReport>,
    /// Examples trained on (after any held-out split).
    pub train_examples: usize,
    /// Examples evaluated.
    pub eval_examples: usize,
    /// Rows (sequences) per epoch after packing.
    pub rows_per_epoch: usize,
    /// Optimizer steps per epoch.
    pub steps_per_epoch: u64,
    /// Optimizer steps in the whole run.
    pub total_steps: u64,
    /// The step the run starts from (non-zero on resume).
    pub start_step: u64,
    /// LoRA scalars trained.
    pub trainable_parameters: usize,
    /// The run's `max_seq_length`.
    pub max_seq_length: usize,
    /// Where the frozen layers come from (the tier plan), for printing once.
    pub weights_plan: Option<String>,
    /// The model's blocks (for reports of how many kept their activations).
    pub blocks: usize,
    /// What the model's config asks that lema does not do ([`crate::config::ModelConfig::notes`]).
    pub model_notes: Vec<String>,
}

/// Hooks through which a caller follows (and may steer) a run.
pub trait Observer {
    /// The data is loaded and the model built; training starts.
    fn on_start(&mut self, _summary: &DataSummary) {}
    /// A step finished (and was evaluated, when due).
    fn on_step(&mut self, _record: &StepRecord) {}
    /// A checkpoint folder was written.
    fn on_checkpoint(&mut self, _dir: &Path) {}
    /// Something the user should know that is not an error (a stale temporary file
    /// removed, a file left alone).
    fn on_notice(&mut self, _message: &str) {}
    /// Something that may be wrong but does not stop the run (an old checkpoint without
    /// a model fingerprint, the model file replaced under the run).
    fn on_warning(&mut self, _message: &str) {}
    /// Whether the user asked to stop (checked after each step).
    fn stop_requested(&self) -> bool {
        false
    }
    /// Write a checkpoint; a hook so tests can make it fail as a full disk would.
    fn save_checkpoint(&mut self, trainer: &Trainer, dir: &Path) -> Result<()> {
        trainer.save_checkpoint(dir)
    }
}

/// An observer that does nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// All steps done; the final adapter is in `adapter`.
    Finished {
        steps: u64,
        adapter: PathBuf,
        checkpoint: PathBuf,
    },
    /// Stopped on request after `step` steps, saved in `checkpoint`.
    Interrupted { step: u64, checkpoint: PathBuf },
}

/// Run state kept in each checkpoint's trainer_state.json (`extra`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RunState {
    config: TrainConfig,
    data_fingerprint: String,
    eval_fingerprint: Option<String>,
    /// The position of the next batch: epoch and micro-batch within it.
    epoch: u64,
    batch_in_epoch: usize,
    schedule: Schedule,
    elapsed_s: f64,
    /// The run that wrote the checkpoint (see [`run_dir`]); absent in older checkpoints.
    #[serde(default)]
    run_id: Option<String>,
}

const EXTRA_KEY: &str = "lema_train";

/// Size and FNV-1a hash of a file, to tell whether the data changed (read in blocks:
/// the file may be larger than memory).
pub fn file_fingerprint(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut h, mut len) = (crate::fsutil::Fnv1a::new(), 0u64);
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok(format!("{len} bytes, fnv1a {:016x}", h.finish()))
}

/// The weights file named by `model` (a file, or a folder holding model.safetensors).
pub fn model_file(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.join("model.safetensors")
    } else {
        model.to_path_buf()
    }
}

fn lema_config(cfg: &TrainConfig, model: &Path) -> LemaConfig {
    let mut l = LemaConfig::new(model_file(model));
    l.lora_rank = cfg.lora_rank;
    l.lora_alpha = cfg.lora_alpha as f32;
    l.lora_dropout = cfg.lora_dropout as f32;
    l.lora_target_modules = cfg.lora_target_modules.clone();
    l.use_rslora = cfg.use_rslora;
    l.strategy = cfg.strategy;
    l.gradient_checkpointing = cfg.gradient_checkpointing;
    l.offload_optimizer = cfg.offload_optimizer;
    l.offload_activations = cfg.offload_activations;
    l.offload_activations_half = cfg.offload_activations_half;
    l.prefetch_depth = cfg.prefetch_depth;
    l.max_vram = cfg.max_vram;
    l.max_host_memory = cfg.max_host_memory;
    l.weight_source = cfg.weight_source;
    l.seq_tile = cfg.seq_tile;
    l.device = cfg.device;
    l.seed = cfg.seed;
    l
}

/// The tokenizer folder in effect.
pub fn tokenizer_dir(cfg_tokenizer: Option<&Path>, model: &Path) -> PathBuf {
    cfg_tokenizer.map(Path::to_path_buf).unwrap_or_else(|| {
        let f = model_file(model);
        f.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    })
}

/// Token-weighted mean loss of a model over every batch of `plan` (epoch 0 order).
pub fn evaluate_plan(model: &mut LemaModel, plan: &mut BatchPlan) -> Result<EvalResult> {
    let (mut sum, mut count) = (0.0, 0usize);
    for i in 0..plan.batches_per_epoch() {
        let (b, _) = plan.batch(0, i)?;
        let (mean, n, _) = model.evaluate(&b, false)?;
        if !mean.is_finite() {
            return Err(non_finite_eval(mean, i, plan.batches_per_epoch()));
        }
        sum += mean * n as f64;
        count += n;
    }
    if count == 0 {
        return Err(Error::config("the evaluation data has no tokens to score"));
    }
    let loss = sum / count as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens: count,
    })
}

/// A non-finite evaluation loss is never a result; callers say where to look.
fn non_finite_eval(loss: f64, batch: usize, batches: usize) -> Error {
    Error::NonFinite(format!(
        "the loss is {loss} on evaluation batch {} of {batches}: the model computes non-finite values",
        batch + 1
    ))
}

/// The checkpoint a run stopped by a non-finite value can go back to: the one it resumed
/// from or last saved, each checked for non-finite values when it was loaded or written.
fn last_good(last: &Option<PathBuf>) -> String {
    match last {
        Some(p) => format!("the last good checkpoint is {}", p.display()),
        None => "no checkpoint had been saved yet (set save_steps to keep some)".into(),
    }
}

/// Read the run state of a checkpoint written by [`run`].
fn read_run_state(dir: &Path) -> Result<(crate::api::TrainerState, RunState)> {
    let st = Trainer::read_state(dir)?;
    let extra = st.extra.get(EXTRA_KEY).cloned().ok_or_else(|| {
        Error::format(
            dir.join(crate::checkpoint::TRAINER_STATE),
            "this checkpoint was not written by `lema train` (no training-run state); it can be loaded as an adapter but not resumed",
        )
    })?;
    let rs: RunState = serde_json::from_value(extra).map_err(|e| {
        Error::format(
            dir.join(crate::checkpoint::TRAINER_STATE),
            format!("training-run state unreadable: {e}"),
        )
    })?;
    Ok((st, rs))
}

/// The configuration saved in a checkpoint written by [`run`] (for `--resume` alone).
pub fn checkpoint_config(dir: &Path) -> Result<TrainConfig> {
    Ok(read_run_state(dir)?.1.config)
}

/// Steps of checkpoint folders `checkpoint-N` in `dir`, sorted.
pub fn list_checkpoints(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path().is_dir().then_some((n, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The loaded data of a run.
struct Data {
    train: BatchPlan,
    eval: Option<BatchPlan>,
    summary: DataSummary,
}

fn load_data(cfg: &TrainConfig, tok: &Tokenizer, data: &Path) -> Result<Data> {
    let opts = DataOptions {
        max_seq_length: cfg.max_seq_length,
        on_bad_line: cfg.on_bad_line,
    };
    let (examples, train_report) = dataset::load_file(data, tok, &opts)?;
    let (train_ex, eval_ex, eval_report): (Vec<Example>, Vec<Example>, Option<LoadReport>) =
        match &cfg.eval_data {
            Some(p) => {
                let (e, r) = dataset::load_file(p, tok, &opts)?;
                (examples, e, Some(r))
            }
            None => {
                let (t, e) = dataset::split_validation(examples, cfg.eval_fraction, cfg.seed)?;
                (t, e, None)
            }
        };
    let layout = if cfg.packing {
        Layout::Packed
    } else {
        Layout::Padded
    };
    let pad = tok.eos_token_id().unwrap_or(0);
    let (train_examples, eval_examples) = (train_ex.len(), eval_ex.len());
    // the plans take the examples over, so that the data is held once
    let train = BatchPlan::from_examples(
        train_ex,
        layout,
        cfg.max_seq_length,
        cfg.batch_size,
        pad,
        cfg.seed,
        cfg.shuffle,
    )?;
    let eval = if eval_ex.is_empty() {
        None
    } else {
        Some(BatchPlan::from_examples(
            eval_ex,
            layout,
            cfg.max_seq_length,
            cfg.batch_size,
            pad,
            cfg.seed,
            false,
        )?)
    };
    let batches = train.batches_per_epoch();
    if cfg.gradient_accumulation_steps > batches {
        return Err(Error::config(format!(
            "gradient_accumulation_steps = {} is more than the {batches} micro-batches of an epoch ({} rows of batch_size {}); set it to at most {batches}",
            cfg.gradient_accumulation_steps,
            train.rows(),
            cfg.batch_size
        )));
    }
    let steps_per_epoch = batches.div_ceil(cfg.gradient_accumulation_steps) as u64;
    let total_steps = match cfg.max_steps {
        Some(n) => n,
        None => cfg.epochs.checked_mul(steps_per_epoch).ok_or_else(|| {
            Error::config(format!(
                "epochs = {} × {steps_per_epoch} steps per epoch is more steps than can be counted (at most {}); lower epochs or set max_steps",
                cfg.epochs,
                u64::MAX
            ))
        })?,
    };
    Ok(Data {
        summary: DataSummary {
            train: train_report,
            eval: eval_report,
            train_examples,
            eval_examples,
            rows_per_epoch: train.rows(),
            steps_per_epoch,
            total_steps,
            start_step: 0,
            trainable_parameters: 0,
            max_seq_length: cfg.max_seq_length,
            weights_plan: None,
            blocks: 0,
            model_notes: Vec::new(),
        },
        train,
        eval,
    })
}

/// Keep the metrics of steps ≤ `step` (a resumed run rewrites what came after).
fn trim_metrics(path: &Path, step: u64) -> Result<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    Ok(text
        .lines()
        .filter(|l| serde_json::from_str::<StepRecord>(l).is_ok_and(|r| r.step <= step))
        .map(str::to_string)
        .collect())
}

/// Read `metrics.jsonl` back (lines that do not parse are ignored).
pub fn read_metrics(path: &Path) -> Result<Vec<StepRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Write `loss.svg` from the run folder's metrics.
pub fn write_loss_curve(out: &Path) -> Result<()> {
    let records = read_metrics(&out.join("metrics.jsonl"))?;
    let train: Vec<(u64, f64)> = records.iter().map(|r| (r.step, r.loss)).collect();
    let eval: Vec<(u64, f64)> = records
        .iter()
        .filter_map(|r| Some((r.step, r.eval_loss?)))
        .collect();
    let title = format!("lema: {}", out.display());
    let svg = plot::loss_curve_svg(&train, &eval, &title);
    crate::fsutil::atomic_write(&out.join("loss.svg"), |w| w.write_all(svg.as_bytes()))
}

/// Train as `cfg` says, from scratch or from the checkpoint `resume`.
pub fn run(cfg: &TrainConfig, resume: Option<&Path>, obs: &mut dyn Observer) -> Result<Outcome> {
    cfg.validate()?;
    run_dir::check_output_path(&cfg.output_dir)?;
    // the configuration saved with the checkpoints must not depend on the working folder
    let mut cfg = cfg.clone();
    cfg.make_paths_absolute()?;
    let cfg = &cfg;
    let (Some(model), Some(data_path)) = (cfg.model.as_deref(), cfg.data.as_deref()) else {
        return Err(Error::internal("validated config lacks model or data"));
    };
    let out = cfg.output_dir.clone();
    // a GGUF, a pickle, a folder to prepare: say so before the tokenizer is looked for
    crate::modelfile::weights_file(model)?;

    // what the data files are: compared on resume, recorded in every checkpoint (each file
    // is read whole once)
    let data_fingerprint = file_fingerprint(data_path)?;
    let eval_fingerprint = cfg.eval_data.as_deref().map(file_fingerprint).transpose()?;

    // a resume must continue the same computation
    let resumed = match resume {
        Some(dir) => {
            let (st, rs) = read_run_state(dir)?;
            let mut diffs = cfg.resume_differences(&rs.config)?;
            diffs.extend(crate::api::base_model_differences(
                &st,
                &lema_config(cfg, model),
            )?);
            if crate::api::predates_content_fingerprint(&st) {
                obs.on_warning(&format!(
                    "checkpoint {} predates model content fingerprints: its base model is checked on file size and config.json only; the checkpoints this run writes record the fingerprint",
                    dir.display()
                ));
            }
            if data_fingerprint != rs.data_fingerprint {
                diffs.push(format!(
                    "data ({}): checkpoint {}, now {data_fingerprint}",
                    data_path.display(),
                    rs.data_fingerprint
                ));
            }
            if eval_fingerprint != rs.eval_fingerprint {
                diffs.push(format!(
                    "eval_data: checkpoint {}, now {}",
                    rs.eval_fingerprint.as_deref().unwrap_or("none"),
                    eval_fingerprint.as_deref().unwrap_or("none")
                ));
            }
            if !diffs.is_empty() {
                return Err(Error::config(format!(
                    "cannot resume from {}: the training configuration differs from the checkpoint's:\n  {}",
                    dir.display(),
                    diffs.join("\n  ")
                )));
            }
            Some(rs)
        }
        None => None,
    };
    // the folder this run writes: locked for the run's lifetime
    let run_dir = run_dir::RunDir::open(
        &out,
        resume.map(|d| (d, resumed.as_ref().and_then(|r| r.run_id.as_deref()))),
        obs,
    )?;

    let tok = Tokenizer::from_dir(&tokenizer_dir(cfg.tokenizer.as_deref(), model))?;
    let mut data = load_data(cfg, &tok, data_path)?;
    let total = data.summary.total_steps;
    let spe = data.summary.steps_per_epoch;
    let warmup = if cfg.warmup_steps > 0 {
        cfg.warmup_steps
    } else {
        (cfg.warmup_ratio * total as f64).ceil() as u64
    };
    let schedule = Schedule::new(cfg.lr_scheduler, cfg.learning_rate, warmup, total)?;

    // the model and optimizer
    let lcfg = lema_config(cfg, model);
    let mut trainer = match resume {
        Some(dir) => Trainer::from_checkpoint(dir, Some(lcfg))?,
        None => {
            let mut m = LemaModel::new(lcfg)?;
            m.initialize_lora()?;
            let opt = OptimizerConfig::AdamW {
                lr: cfg.learning_rate as f32,
                beta1: cfg.adam_beta1 as f32,
                beta2: cfg.adam_beta2 as f32,
                eps: cfg.adam_epsilon as f32,
                weight_decay: cfg.weight_decay as f32,
            };
            opt.validate()?;
            let mut t = Trainer::new(m, opt)?;
            t.max_grad_norm = (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm as f32);
            t
        }
    };
    let start = trainer.step();
    if start > total {
        return Err(Error::config(format!(
            "the checkpoint is at step {start}, past this run's {total} steps"
        )));
    }
    let mut elapsed_base = resumed.as_ref().map_or(0.0, |r| r.elapsed_s);

    run_dir.claim()?;
    run_dir.write_config(&cfg.to_toml()?)?;
    let metrics_path = out.join("metrics.jsonl");
    let kept = if resumed.is_some() {
        trim_metrics(&metrics_path, start)?
    } else {
        Vec::new()
    };
    let mut kept_text = kept.join("\n");
    if !kept_text.is_empty() {
        kept_text.push('\n');
    }
    crate::fsutil::atomic_write(&metrics_path, |w| w.write_all(kept_text.as_bytes()))?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;

    data.summary.start_step = start;
    data.summary.trainable_parameters = trainer.model.trainable_parameters();
    data.summary.weights_plan = trainer.model.weights_plan();
    data.summary.blocks = trainer.model.model_config().num_hidden_layers;
    data.summary.model_notes = trainer.model.model_config().notes.clone();
    obs.on_start(&data.summary);

    let accum = cfg.gradient_accumulation_steps;
    let bpe = data.train.batches_per_epoch();
    let mut last_ckpt: Option<PathBuf> = resume.map(Path::to_path_buf);
    let mut last_saved_step = if resume.is_some() { Some(start) } else { None };
    let t_start = Instant::now();
    let mut replaced_warned = false;

    let save = |trainer: &mut Trainer,
                obs: &mut dyn Observer,
                step: u64,
                elapsed_s: f64,
                last: &Option<PathBuf>|
     -> Result<PathBuf> {
        let epoch = step / spe;
        let batch_in_epoch = ((step % spe) as usize) * accum;
        let rs = RunState {
            config: cfg.clone(),
            data_fingerprint: data_fingerprint.clone(),
            eval_fingerprint: eval_fingerprint.clone(),
            epoch,
            batch_in_epoch,
            schedule: schedule.clone(),
            elapsed_s,
            run_id: Some(run_dir.run_id().to_string()),
        };
        trainer.extra_state = serde_json::json!({
            EXTRA_KEY: serde_json::to_value(&rs).map_err(|e| Error::config(e.to_string()))?
        });
        let dir = out.join(format!("checkpoint-{step}"));
        if let Err(e) = obs.save_checkpoint(trainer, &dir) {
            let prev = match last {
                Some(p) => format!("the previous checkpoint {} is intact", p.display()),
                None => "no earlier checkpoint exists".to_string(),
            };
            return Err(Error::format(
                &dir,
                format!("could not write this checkpoint ({e}); {prev}"),
            ));
        }
        obs.on_checkpoint(&dir);
        if cfg.save_total_limit > 0 {
            let all = list_checkpoints(&out);
            let excess = all.len().saturating_sub(cfg.save_total_limit);
            for (_, p) in all.iter().filter(|(_, p)| *p != dir).take(excess) {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(dir)
    };

    for step in start..total {
        let t0 = Instant::now();
        let epoch = step / spe;
        let first = ((step % spe) as usize) * accum;
        let mut micro = Vec::with_capacity(accum);
        let mut tokens = 0;
        for i in first..(first + accum).min(bpe) {
            let (b, real) = data.train.batch(epoch, i)?;
            tokens += real;
            micro.push(b);
        }
        let lr = schedule.lr_at(step);
        let res = match trainer.train_step_accumulated(&micro, Some(lr as f32), false) {
            Ok(r) => r,
            Err(Error::NonFinite(msg)) => {
                let keep = last_good(&last_ckpt);
                let _ = write_loss_curve(&out);
                return Err(Error::NonFinite(format!(
                    "training stopped: {msg}; {keep}. Try a lower learning_rate or max_grad_norm."
                )));
            }
            Err(e) => return Err(e),
        };
        if !replaced_warned
            && trainer.model.model_file_state()? == crate::modelfile::FileState::Replaced
        {
            replaced_warned = true;
            obs.on_warning(&crate::modelfile::replaced_warning(&model_file(model)));
        }
        let done = step + 1;
        let dt = t0.elapsed().as_secs_f64();
        let elapsed = elapsed_base + t_start.elapsed().as_secs_f64();
        let mut rec = StepRecord {
            step: done,
            total_steps: total,
            epoch: done as f64 / spe as f64,
            loss: res.loss,
            lr,
            grad_norm: res.grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / dt.max(1e-9),
            elapsed_s: elapsed,
            peak_rss_bytes: crate::bench::peak_rss_bytes(),
            kept_blocks: (cfg.gradient_checkpointing == crate::GradientCheckpointing::Auto)
                .then(|| trainer.model.last_kept_blocks()),
            eval_loss: None,
            eval_ppl: None,
        };
        let stop = obs.stop_requested();
        let eval_due = (cfg.eval_steps > 0 && done.is_multiple_of(cfg.eval_steps)) || done == total;
        if let Some(plan) = data.eval.as_mut()
            && eval_due
        {
            let r = evaluate_plan(&mut trainer.model, plan).map_err(|e| match e {
                Error::NonFinite(msg) => Error::NonFinite(format!(
                    "training stopped: evaluating after step {done}, {msg}; the training loss was finite, so the evaluation data meets values the training data does not, or this step's update overflowed; {}",
                    last_good(&last_ckpt)
                )),
                other => other,
            })?;
            rec.eval_loss = Some(r.loss);
            rec.eval_ppl = Some(r.perplexity);
        }
        let line = serde_json::to_string(&rec).map_err(|e| Error::config(e.to_string()))?;
        writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
        obs.on_step(&rec);

        let save_due =
            (cfg.save_steps > 0 && done.is_multiple_of(cfg.save_steps)) || done == total || stop;
        if save_due {
            let dir = save(&mut trainer, obs, done, elapsed, &last_ckpt)?;
            last_ckpt = Some(dir);
            last_saved_step = Some(done);
        }
        if stop && done < total {
            write_loss_curve(&out)?;
            return Ok(Outcome::Interrupted {
                step: done,
                checkpoint: last_ckpt.clone().unwrap_or_default(),
            });
        }
    }
    // a run resumed at its last step has nothing left to do but the final outputs
    if last_saved_step != Some(total) {
        elapsed_base += t_start.elapsed().as_secs_f64();
        let dir = save(&mut trainer, obs, total, elapsed_base, &last_ckpt)?;
        last_ckpt = Some(dir);
    }
    let adapter = out.join("adapter");
    trainer.model.save_adapter(&adapter)?;
    write_loss_curve(&out)?;
    Ok(Outcome::Finished {
        steps: total,
        adapter,
        checkpoint: last_ckpt.unwrap_or_default(),
    })
}
