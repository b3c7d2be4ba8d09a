//! Argument parsing and the subcommands.

mod bench;
mod demo;
mod eval;
mod generate;
mod merge;
mod prepare;
mod signals;
mod train;

use clap::{Parser, Subcommand};

/// LoRA fine-tuning of language models larger than your GPU's memory.
#[derive(Parser)]
#[command(name = "lema", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The demo: fetch SmolLM2-135M-Instruct, fine-tune it to write dates as YYYY-MM-DD,
    /// and show held-out accuracy before and after.
    Demo(demo::DemoArgs),
    /// Benchmark a training step on a random-init model of a named shape.
    Bench(bench::BenchArgs),
    /// Fine-tune a LoRA adapter: `lema train --config train.toml` (every field is also a flag).
    Train(train::TrainArgs),
    /// Loss and perplexity of a model (+ adapter) on a JSONL or text file.
    Eval(eval::EvalArgs),
    /// Convert an HF folder or a GGUF file into one monolithic safetensors file.
    Prepare(prepare::PrepareArgs),
    /// What is in a model file and what each memory strategy would need.
    Info(prepare::InfoArgs),
    /// Generate text from a prepared model, alone or with a LoRA adapter.
    Generate(generate::GenerateArgs),
    /// Fold a LoRA adapter into the base weights and write a new model file.
    Merge(merge::MergeArgs),
}

/// The prepared model file that `--model` names: the path itself, or `model.safetensors`
/// in the folder it names (as `lema train` and `lema eval` take it), or a Hub id's
/// ([`model_path`]). A GGUF, a pickle, a folder still to prepare or a FIFO is refused
/// with what to do.
fn model_file(model: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    Ok(lema::modelfile::weights_file(&model_path(model)?)?)
}

/// A model argument as a local path: the path itself when it exists or is not shaped like
/// a Hub id; a Hub id (`org/name[@revision]`) downloaded and prepared once into lema's
/// cache (`$LEMA_CACHE/prepared/`, reused afterwards), as its `model.safetensors`. Every
/// command that takes a model passes it through here.
fn model_path(model: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let Some(id) = lema::hub::hub_id(model) else {
        return Ok(model.to_path_buf());
    };
    let dir = lema::hub::prepared(&id, &lema::hub::HubOptions::from_env()?)?;
    eprintln!("model {}: prepared in {}", id.display(), dir.display());
    Ok(dir.join("model.safetensors"))
}

/// Let every numeric argument take a value that starts with '-' (`--temperature -1e-3`,
/// which clap would otherwise read as an unknown flag): the value then reaches the
/// parser or the validation that names what is wrong with it. (`lema train`'s config
/// fields, plain strings to clap, do the same in train.rs.)
fn negative_numbers_allowed(cmd: clap::Command) -> clap::Command {
    use std::any::TypeId;
    let numeric = [
        TypeId::of::<f32>(),
        TypeId::of::<f64>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
    ];
    cmd.mut_subcommands(|sub| {
        sub.mut_args(|a| {
            let t = a.get_value_parser().type_id();
            let is_number = a.get_action().takes_values() && numeric.iter().any(|n| t == *n);
            if is_number {
                a.allow_hyphen_values(true)
            } else {
                a
            }
        })
    })
}

/// Parse arguments, run, print any error chain on one line; returns the exit code.
pub fn main() -> i32 {
    // a model file truncated under a running command: a message naming it, not a bare
    // "Bus error"
    lema::modelfile::install_fault_handler();
    use clap::{CommandFactory, FromArgMatches};
    let parsed = negative_numbers_allowed(Cli::command())
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = match cli.command {
        Command::Demo(a) => demo::run(a).map(|()| 0),
        Command::Bench(a) => bench::run(a).map(|()| 0),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a).map(|()| 0),
        Command::Prepare(a) => prepare::prepare(a).map(|()| 0),
        Command::Info(a) => prepare::info(a).map(|()| 0),
        Command::Generate(a) => generate::run(a).map(|()| 0),
        Command::Merge(a) => merge::run(a).map(|()| 0),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    }
}

/// An error and its causes on one line, each cause once: errors that quote their source
/// in their own message (`path: reason`) are not followed by it again.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg = format!("{msg}: {c}");
        }
    }
    msg
}
