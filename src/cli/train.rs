//! `lema train`: a config file plus one flag per config field, a progress bar, Ctrl-C
//! and SIGTERM handling (finish the step, save, exit 130 or 143) and `--resume` (into
//! the checkpoint's own folder unless `--output-dir` says otherwise).

use super::signals;
use anyhow::{Context, Result};
use clap::{Arg, ArgMatches, Command};
use indicatif::{ProgressBar, ProgressStyle};
use lema::train::config::{FIELDS, FieldKind};
use lema::train::{self, DataSummary, Observer, Outcome, StepRecord, TrainConfig};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// `lema train` arguments: `--config`, `--resume`, and every config field as a flag.
pub struct TrainArgs {
    config: Option<PathBuf>,
    resume: Option<PathBuf>,
    overrides: Vec<(String, String)>,
}

impl clap::FromArgMatches for TrainArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let overrides = FIELDS
            .iter()
            .filter_map(|f| Some((f.0.to_string(), m.get_one::<String>(f.0)?.clone())))
            .collect();
        Ok(TrainArgs {
            config: m.get_one::<PathBuf>("config").cloned(),
            resume: m.get_one::<PathBuf>("resume").cloned(),
            overrides,
        })
    }
    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for TrainArgs {
    fn augment_args(cmd: Command) -> Command {
        let mut cmd = cmd
            .arg(
                Arg::new("config")
                    .long("config")
                    .short('c')
                    .value_name("FILE")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("TOML config file; the flags below override its fields"),
            )
            .arg(
                Arg::new("resume")
                    .long("resume")
                    .value_name("CHECKPOINT")
                    .value_parser(clap::value_parser!(PathBuf))
                    .help("continue exactly from a checkpoint folder (its config is used when --config is not given)"),
            );
        for (name, kind, value, help) in FIELDS {
            cmd = cmd.arg(
                Arg::new(*name)
                    .long(name.replace('_', "-"))
                    // `--learning-rate -1e-3`: the value, refused by name in validation
                    .allow_hyphen_values(matches!(kind, FieldKind::Scalar))
                    .value_name(*value)
                    .help(*help)
                    .help_heading("Config fields (train.toml)"),
            );
        }
        cmd
    }
    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// The progress bar and log lines.
struct CliObserver {
    bar: ProgressBar,
    tty: bool,
    logging_steps: u64,
    tokens_per_s: Option<f64>,
    /// The kept blocks last reported (`gradient_checkpointing = "auto"`), of `blocks`.
    kept_blocks: Option<usize>,
    blocks: usize,
}

impl CliObserver {
    /// A line for the user, above the progress bar on a terminal.
    fn say(&self, m: String) {
        if self.tty {
            self.bar.println(m);
        } else {
            eprintln!("{m}");
        }
    }
}

fn gb(bytes: Option<u64>) -> String {
    bytes.map_or("?".into(), |b| format!("{:.2} GB", b as f64 / 1e9))
}

impl Observer for CliObserver {
    fn on_start(&mut self, s: &DataSummary) {
        self.blocks = s.blocks;
        let say = |m: String| eprintln!("{m}");
        for n in &s.model_notes {
            say(n.clone());
        }
        if let Some(p) = &s.weights_plan {
            say(p.clone());
        }
        say(s.train.summary(s.max_seq_length));
        if let Some(e) = &s.eval {
            say(e.summary(s.max_seq_length));
        }
        say(format!(
            "{} training examples in {} sequences per epoch, {} held out for evaluation; {} steps per epoch, {} steps in all{}; {} trainable parameters",
            s.train_examples,
            s.rows_per_epoch,
            s.eval_examples,
            s.steps_per_epoch,
            s.total_steps,
            if s.start_step > 0 {
                format!(" (resuming after step {})", s.start_step)
            } else {
                String::new()
            },
            s.trainable_parameters
        ));
        self.bar.set_length(s.total_steps);
        self.bar.set_position(s.start_step);
        self.bar.reset_eta();
    }

    fn on_step(&mut self, r: &StepRecord) {
        if let Some(k) = r.kept_blocks
            && self.kept_blocks != Some(k)
        {
            self.say(format!(
                "gradient checkpointing auto: step {} kept the activations of {k} of {} blocks in memory{}",
                r.step,
                self.blocks,
                if k < self.blocks {
                    " and re-ran the others in the backward"
                } else {
                    ""
                }
            ));
            self.kept_blocks = Some(k);
        }
        let tps = match self.tokens_per_s {
            Some(prev) => 0.8 * prev + 0.2 * r.tokens_per_s,
            None => r.tokens_per_s,
        };
        self.tokens_per_s = Some(tps);
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s mem {}",
            r.loss,
            r.lr,
            tps,
            gb(r.peak_rss_bytes)
        ));
        self.bar.set_position(r.step);
        let eval = match (r.eval_loss, r.eval_ppl) {
            (Some(l), Some(p)) => format!(" | eval loss {l:.4} ppl {p:.2}"),
            _ => String::new(),
        };
        if self.tty {
            if !eval.is_empty() {
                self.bar.println(format!("step {}{eval}", r.step));
            }
        } else if r.step.is_multiple_of(self.logging_steps.max(1))
            || r.step == r.total_steps
            || !eval.is_empty()
        {
            eprintln!(
                "step {}/{} loss {:.4} lr {:.3e} grad_norm {:.3} {:.0} tok/s elapsed {:.1}s mem {}{eval}",
                r.step,
                r.total_steps,
                r.loss,
                r.lr,
                r.grad_norm,
                tps,
                r.elapsed_s,
                gb(r.peak_rss_bytes)
            );
        }
    }

    fn on_checkpoint(&mut self, dir: &Path) {
        self.say(format!("saved {}", dir.display()));
    }

    fn on_notice(&mut self, message: &str) {
        self.say(format!("note: {message}"));
    }

    fn on_warning(&mut self, message: &str) {
        let m = format!("warning: {message}");
        if self.tty {
            self.bar.println(m);
        } else {
            eprintln!("{m}");
        }
    }

    fn stop_requested(&self) -> bool {
        signals::received().is_some()
    }
}

/// Build the effective config from the file, the checkpoint and the flags. A resumed run
/// writes next to its checkpoint unless `--output-dir` is given: the `output_dir` saved
/// in the checkpoint (or set in a config file) never chooses where it writes.
fn effective_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut cfg = config_from_sources(a)?;
    let flag = a.overrides.iter().any(|(name, _)| name == "output_dir");
    if let Some(ckpt) = &a.resume
        && !flag
    {
        let here = ckpt
            .canonicalize()
            .or_else(|_| std::path::absolute(ckpt))
            .with_context(|| format!("--resume {}", ckpt.display()))?;
        let folder = here
            .parent()
            .map_or_else(|| here.clone(), Path::to_path_buf);
        if let Some(file) = &a.config
            && config_sets_output_dir(file)
            && std::path::absolute(&cfg.output_dir).ok().as_ref() != Some(&folder)
        {
            eprintln!(
                "note: resuming in the checkpoint's folder {}; the output_dir of {} ({}) is not used on resume (pass --output-dir to write elsewhere)",
                folder.display(),
                file.display(),
                cfg.output_dir.display()
            );
        }
        cfg.output_dir = folder;
    }
    Ok(cfg)
}

/// Whether a config file (already read without error) sets `output_dir` itself.
fn config_sets_output_dir(file: &Path) -> bool {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
        .is_some_and(|t| t.contains_key("output_dir"))
}

/// The config from the file, or the checkpoint, and the flags.
fn config_from_sources(a: &TrainArgs) -> Result<TrainConfig> {
    Ok(match (&a.config, &a.resume) {
        (Some(p), _) => TrainConfig::load(Some(p), &a.overrides)?,
        (None, Some(r)) => {
            let saved = train::checkpoint_config(r)?;
            TrainConfig::from_toml(
                &saved.to_toml()?,
                &format!("the config saved in {}", r.display()),
                None,
                &a.overrides,
            )?
        }
        (None, None) => TrainConfig::load(None, &a.overrides)?,
    })
}

/// Run `lema train`; returns the exit code (0, or 128 + the signal's number after a
/// Ctrl-C or SIGTERM stopped the run and its checkpoint was saved).
pub fn run(a: TrainArgs) -> Result<i32> {
    let mut cfg = effective_config(&a)?;
    if let Some(m) = &cfg.model {
        cfg.model = Some(super::model_path(m)?);
    }
    signals::install()?;
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} {msg} ETA {eta}",
        )
        .context("progress bar template")?,
    );
    let mut obs = CliObserver {
        bar: bar.clone(),
        tty,
        logging_steps: cfg.logging_steps,
        tokens_per_s: None,
        kept_blocks: None,
        blocks: 0,
    };
    let outcome = train::run(&cfg, a.resume.as_deref(), &mut obs);
    bar.finish_and_clear();
    let out = &cfg.output_dir;
    match outcome? {
        Outcome::Finished {
            steps,
            adapter,
            checkpoint,
        } => {
            eprintln!(
                "done: {steps} steps. Adapter (PEFT format): {}; checkpoint: {}; metrics: {}; loss curve: {}",
                adapter.display(),
                checkpoint.display(),
                out.join("metrics.jsonl").display(),
                out.join("loss.svg").display()
            );
            Ok(0)
        }
        Outcome::Interrupted { step, checkpoint } => {
            eprintln!(
                "interrupted after step {step}; saved {}. Continue with: lema train --resume {}",
                checkpoint.display(),
                checkpoint.display()
            );
            Ok(signals::stop_status())
        }
    }
}
