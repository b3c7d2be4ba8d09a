//! The training configuration (`train.toml`): one flat table whose every field is also
//! a command-line flag. Unknown fields are rejected with the closest valid name.

use crate::api::Device;
use crate::dataset::BadLinePolicy;
use crate::error::{Error, Result};
use crate::schedule::ScheduleKind;
use crate::stream::Strategy;
use crate::tiers::WeightSource;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything a training run is made from. Field names follow HF `TrainingArguments`
/// and TRL `SFTConfig` where they have an equivalent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// The prepared `.safetensors` file (or the folder holding `model.safetensors`).
    pub model: Option<PathBuf>,
    /// Folder with tokenizer.json and tokenizer_config.json; default: the model's folder.
    pub tokenizer: Option<PathBuf>,
    /// Training data: JSONL (`text`, `prompt`/`completion` or `messages`) or `.txt`.
    pub data: Option<PathBuf>,
    /// Validation data file; alternatively `eval_fraction` of `data` is held out.
    pub eval_data: Option<PathBuf>,
    /// Fraction of `data` held out for validation (when `eval_data` is not set).
    pub eval_fraction: f64,
    /// Evaluate every N steps (and at the end); 0: only at the end.
    pub eval_steps: u64,
    /// The run folder: config.toml, metrics.jsonl, loss.svg, checkpoints, adapter.
    pub output_dir: PathBuf,
    /// Longest sequence in tokens; longer examples are cut.
    pub max_seq_length: usize,
    /// Pack several short examples into one sequence (attention stays within each).
    pub packing: bool,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Passes over the training data.
    pub epochs: u64,
    /// Total optimizer steps; overrides `epochs` when set.
    pub max_steps: Option<u64>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Schedule after warm-up: constant, linear or cosine.
    pub lr_scheduler: ScheduleKind,
    /// Steps of linear warm-up from 0 to the peak.
    pub warmup_steps: u64,
    /// Warm-up as a fraction of the total steps (used when `warmup_steps` is 0).
    pub warmup_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β1.
    pub adam_beta1: f64,
    /// AdamW β2.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Global gradient-norm clipping; 0 disables it.
    pub max_grad_norm: f64,
    /// LoRA rank r.
    pub lora_rank: usize,
    /// LoRA α (the update is scaled by α/r, or α/√r with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout on the LoRA input during training.
    pub lora_dropout: f64,
    /// Module names to adapt; default: PEFT's for the architecture.
    pub lora_target_modules: Option<Vec<String>>,
    /// Scale by α/√r (rsLoRA) instead of α/r.
    pub use_rslora: bool,
    /// Seed of the LoRA initialisation, the split, the shuffles and dropout.
    pub seed: u64,
    /// Visit the data in a new random order each epoch.
    pub shuffle: bool,
    /// Save a checkpoint every N steps; 0: only at the end (and on Ctrl-C).
    pub save_steps: u64,
    /// Keep at most this many checkpoints (oldest removed first); 0 keeps all.
    pub save_total_limit: usize,
    /// Print a progress line every N steps when stderr is not a terminal.
    pub logging_steps: u64,
    /// What to do with unusable data records: skip (and count) or error.
    pub on_bad_line: BadLinePolicy,
    /// How frozen weights are kept: streaming or resident.
    pub strategy: Strategy,
    /// auto, cpu or cuda.
    pub device: Device,
    /// Re-run each block's forward in backward instead of keeping activations (true),
    /// keep them all (false), or keep those of as many blocks as the free memory holds
    /// and re-run the rest (auto).
    pub gradient_checkpointing: crate::GradientCheckpointing,
    /// Keep the optimizer state in host memory that the GPU reads over the bus (saves
    /// GPU memory; same numbers).
    pub offload_optimizer: bool,
    /// CUDA: keep each block's saved input in host memory between the forward and the
    /// backward (saves GPU memory at long sequences; same numbers).
    pub offload_activations: bool,
    /// With offload_activations: park them in bf16/f16 when the weights are (half the
    /// host memory; the backward re-runs from the rounded inputs).
    pub offload_activations_half: bool,
    /// CUDA: blocks copied ahead of the one in use (1 saves a layer's worth of GPU memory).
    pub prefetch_depth: usize,
    /// CUDA, strategy budget: bytes of GPU memory for blocks kept resident.
    pub max_vram: Option<u64>,
    /// The most host memory the process may use (its cgroup limit and what the system
    /// has available always count too).
    pub max_host_memory: Option<u64>,
    /// Where streamed layers come from on the host: auto, mapped or disk.
    pub weight_source: WeightSource,
    /// Tokens per sequence tile of a block's per-token parts (attention stays whole);
    /// unset: on a GPU 8192, fewer when the free GPU memory asks; 0: never tiled.
    pub seq_tile: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            tokenizer: None,
            data: None,
            eval_data: None,
            eval_fraction: 0.0,
            eval_steps: 0,
            output_dir: PathBuf::from("lema-run"),
            max_seq_length: 512,
            packing: true,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            epochs: 1,
            max_steps: None,
            learning_rate: 2e-4,
            lr_scheduler: ScheduleKind::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            lora_target_modules: None,
            use_rslora: false,
            seed: 42,
            shuffle: true,
            save_steps: 0,
            save_total_limit: 0,
            logging_steps: 10,
            on_bad_line: BadLinePolicy::Error,
            strategy: Strategy::Streaming,
            device: Device::Auto,
            gradient_checkpointing: crate::GradientCheckpointing::Every,
            offload_optimizer: false,
            offload_activations: false,
            offload_activations_half: false,
            prefetch_depth: 2,
            max_vram: None,
            max_host_memory: None,
            weight_source: WeightSource::Auto,
            seq_tile: None,
        }
    }
}

/// How a field's value is written on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// A path or a name: taken as a string.
    Text,
    /// A number or a boolean: parsed as a TOML value.
    Scalar,
    /// A comma-separated list of strings.
    List,
}

/// Every field: name, kind, value placeholder and help, in the order of the struct.
pub const FIELDS: &[(&str, FieldKind, &str, &str)] = {
    use FieldKind::*;
    &[
        (
            "model",
            Text,
            "PATH",
            "prepared .safetensors file (or its folder), or a Hub id org/name[@revision]",
        ),
        (
            "tokenizer",
            Text,
            "DIR",
            "tokenizer folder [default: the model's folder]",
        ),
        ("data", Text, "FILE", "training data (.jsonl or .txt)"),
        ("eval_data", Text, "FILE", "validation data file"),
        (
            "eval_fraction",
            Scalar,
            "F",
            "hold out this fraction of the data for validation [0]",
        ),
        (
            "eval_steps",
            Scalar,
            "N",
            "evaluate every N steps; 0: at the end only [0]",
        ),
        ("output_dir", Text, "DIR", "run folder [lema-run]"),
        (
            "max_seq_length",
            Scalar,
            "N",
            "longest sequence in tokens [512]",
        ),
        (
            "packing",
            Scalar,
            "BOOL",
            "pack short examples into one sequence [true]",
        ),
        ("batch_size", Scalar, "N", "sequences per micro-batch [4]"),
        (
            "gradient_accumulation_steps",
            Scalar,
            "N",
            "micro-batches per optimizer step [1]",
        ),
        ("epochs", Scalar, "N", "passes over the data [1]"),
        (
            "max_steps",
            Scalar,
            "N",
            "optimizer steps (overrides epochs)",
        ),
        ("learning_rate", Scalar, "F", "peak learning rate [2e-4]"),
        (
            "lr_scheduler",
            Text,
            "NAME",
            "constant, linear or cosine [linear]",
        ),
        ("warmup_steps", Scalar, "N", "linear warm-up steps [0]"),
        (
            "warmup_ratio",
            Scalar,
            "F",
            "warm-up as a fraction of all steps, if warmup_steps is 0 [0]",
        ),
        ("weight_decay", Scalar, "F", "AdamW weight decay [0]"),
        ("adam_beta1", Scalar, "F", "AdamW beta1 [0.9]"),
        ("adam_beta2", Scalar, "F", "AdamW beta2 [0.999]"),
        ("adam_epsilon", Scalar, "F", "AdamW epsilon [1e-8]"),
        (
            "max_grad_norm",
            Scalar,
            "F",
            "clip the global gradient norm; 0: off [1.0]",
        ),
        ("lora_rank", Scalar, "N", "LoRA rank r [16]"),
        ("lora_alpha", Scalar, "F", "LoRA alpha [32]"),
        ("lora_dropout", Scalar, "F", "dropout on the LoRA input [0]"),
        (
            "lora_target_modules",
            List,
            "A,B",
            "modules to adapt [PEFT's default]",
        ),
        (
            "use_rslora",
            Scalar,
            "BOOL",
            "scale by alpha/sqrt(r) [false]",
        ),
        (
            "seed",
            Scalar,
            "N",
            "seed of LoRA init, shuffling, split and dropout [42]",
        ),
        (
            "shuffle",
            Scalar,
            "BOOL",
            "shuffle the data every epoch [true]",
        ),
        (
            "save_steps",
            Scalar,
            "N",
            "checkpoint every N steps; 0: at the end only [0]",
        ),
        (
            "save_total_limit",
            Scalar,
            "N",
            "keep at most N checkpoints; 0: all [0]",
        ),
        (
            "logging_steps",
            Scalar,
            "N",
            "log line every N steps when not on a terminal [10]",
        ),
        (
            "on_bad_line",
            Text,
            "POLICY",
            "bad data records: skip or error [error]",
        ),
        (
            "strategy",
            Text,
            "NAME",
            "frozen weights: streaming, resident or budget [streaming]",
        ),
        ("device", Text, "NAME", "auto, cpu or cuda [auto]"),
        (
            "gradient_checkpointing",
            Scalar,
            "BOOL|auto",
            "re-run each block's forward in backward; auto: only the blocks whose activations do not fit [true]",
        ),
        (
            "offload_optimizer",
            Scalar,
            "BOOL",
            "keep the optimizer state in host memory, read over PCIe [false]",
        ),
        (
            "offload_activations",
            Scalar,
            "BOOL",
            "CUDA: keep saved block inputs in host memory [false]",
        ),
        (
            "offload_activations_half",
            Scalar,
            "BOOL",
            "CUDA, half weights: park them in bf16/f16 (half the host memory) [false]",
        ),
        (
            "prefetch_depth",
            Scalar,
            "N",
            "CUDA: blocks copied ahead of the one in use [2]",
        ),
        (
            "max_vram",
            Scalar,
            "BYTES",
            "CUDA, strategy budget: GPU bytes for resident blocks [free − 4 GiB]",
        ),
        (
            "max_host_memory",
            Scalar,
            "BYTES",
            "most host memory the process may use [cgroup limit, MemAvailable]",
        ),
        (
            "weight_source",
            Text,
            "NAME",
            "streamed layers from: auto, mapped or disk (staging ring) [auto]",
        ),
        (
            "seq_tile",
            Scalar,
            "N",
            "tokens per sequence tile of the per-token work; 0: untiled [GPU: ≤ 8192, by free memory]",
        ),
    ]
};

/// Fields that may change when a run is resumed (they do not change what is computed).
const RESUMABLE: &[&str] = &[
    "model",
    "tokenizer",
    "data",
    "eval_data",
    "output_dir",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "on_bad_line",
    "strategy",
    "device",
    "gradient_checkpointing",
    "offload_optimizer",
    "offload_activations",
    "prefetch_depth",
    "max_vram",
    "max_host_memory",
    "weight_source",
    "seq_tile",
];

/// Levenshtein distance between two strings.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != cb) as usize)
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The valid field name closest to `name`, when it is close enough to be a typo.
pub fn suggest(name: &str) -> Option<&'static str> {
    let name = name.replace('-', "_").to_ascii_lowercase();
    FIELDS
        .iter()
        .map(|f| (edit_distance(&name, f.0), f.0))
        .filter(|&(d, f)| d <= (f.len() / 3).max(2))
        .min_by_key(|&(d, _)| d)
        .map(|(_, f)| f)
}

fn unknown_field(name: &str, origin: &str) -> Error {
    let hint = match suggest(name) {
        Some(s) => format!("did you mean `{s}`?"),
        None => format!(
            "valid fields: {}",
            FIELDS.iter().map(|f| f.0).collect::<Vec<_>>().join(", ")
        ),
    };
    Error::config(format!("unknown field `{name}` in {origin}; {hint}"))
}

/// A command-line value as the TOML value of field `name`.
pub fn cli_value(name: &str, raw: &str) -> Result<toml::Value> {
    let kind = FIELDS
        .iter()
        .find(|f| f.0 == name)
        .map(|f| f.1)
        .ok_or_else(|| unknown_field(name, "the command line"))?;
    Ok(match kind {
        FieldKind::Text => toml::Value::String(raw.to_string()),
        FieldKind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        FieldKind::Scalar => toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
    })
}

/// Whether the config-file field `name = s` is a Hub model id rather than a path
/// relative to the file's folder `base`.
fn is_hub_model(name: &str, s: &str, base: &Path) -> bool {
    name == "model"
        && std::fs::symlink_metadata(base.join(s)).is_err()
        && crate::hub::HubId::parse(s).is_some()
}

impl TrainConfig {
    /// Parse a config file's text (`origin` names it in messages), then apply `overrides`
    /// (field, command-line value) on top. Relative paths in the file are taken relative
    /// to the file's folder (`base`), those on the command line to the working folder.
    pub fn from_toml(
        text: &str,
        origin: &str,
        base: Option<&Path>,
        overrides: &[(String, String)],
    ) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| Error::config(format!("{origin} is not valid TOML: {e}")))?;
        for key in table.keys() {
            if !FIELDS.iter().any(|f| f.0 == key) {
                return Err(unknown_field(key, origin));
            }
        }
        if let Some(base) = base {
            for (name, kind, _, _) in FIELDS {
                if *kind == FieldKind::Text
                    && ["model", "tokenizer", "data", "eval_data", "output_dir"].contains(name)
                    && let Some(toml::Value::String(s)) = table.get_mut(*name)
                    && Path::new(s.as_str()).is_relative()
                    && !is_hub_model(name, s, base)
                {
                    *s = base.join(&*s).to_string_lossy().to_string();
                }
            }
        }
        for (name, raw) in overrides {
            table.insert(name.clone(), cli_value(name, raw)?);
        }
        match table.clone().try_into::<TrainConfig>() {
            Ok(cfg) => Ok(cfg),
            Err(e) => {
                // name the field: the first that fails on its own
                let culprit = table.into_iter().find(|(k, v)| {
                    let mut one = toml::Table::new();
                    one.insert(k.clone(), v.clone());
                    one.try_into::<TrainConfig>().is_err()
                });
                Err(Error::config(match culprit {
                    Some((k, _)) => format!("{origin}: field `{k}`: {}", e.message()),
                    None => format!("{origin}: {}", e.message()),
                }))
            }
        }
    }

    /// Read `path` (if given) and apply command-line overrides.
    /// (A config file's `model` may be a Hub id, `org/name[@revision]`: it is kept as it
    /// is unless a path of that name exists beside the file.)
    pub fn load(path: Option<&Path>, overrides: &[(String, String)]) -> Result<Self> {
        match path {
            Some(p) => {
                let text = crate::fsutil::read_text(p)?;
                let base = p.parent().filter(|b| !b.as_os_str().is_empty());
                Self::from_toml(&text, &p.display().to_string(), base, overrides)
            }
            None => Self::from_toml("", "the command line", None, overrides),
        }
    }

    /// The config as TOML, as echoed into the run folder.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::config(format!("cannot write config: {e}")))
    }

    /// Reject missing or out-of-range values, naming the field.
    /// Make every path absolute (relative ones are taken from the working folder), so
    /// that the configuration saved with a run's checkpoints still names the same files
    /// when the run is resumed from another folder.
    pub fn make_paths_absolute(&mut self) -> Result<()> {
        let abs = |p: &Path| {
            std::path::absolute(p).map_err(|e| {
                Error::config(format!(
                    "cannot make the path {} absolute: {e}",
                    p.display()
                ))
            })
        };
        for p in [
            &mut self.model,
            &mut self.tokenizer,
            &mut self.data,
            &mut self.eval_data,
        ]
        .into_iter()
        .flatten()
        {
            *p = abs(p)?;
        }
        self.output_dir = abs(&self.output_dir)?;
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| Err(Error::config(format!("{field}: {why}")));
        if self.model.is_none() {
            return bad(
                "model",
                "required (set it in the config file or pass --model)".into(),
            );
        }
        if self.data.is_none() {
            return bad(
                "data",
                "required (set it in the config file or pass --data)".into(),
            );
        }
        if self.prefetch_depth == 0 {
            return bad(
                "prefetch_depth",
                "0 would leave no block to compute on (at least 1)".into(),
            );
        }
        if self.max_seq_length < 2 {
            return bad(
                "max_seq_length",
                format!("{} is too short (at least 2)", self.max_seq_length),
            );
        }
        for (f, v) in [
            ("batch_size", self.batch_size),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("lora_rank", self.lora_rank),
        ] {
            if v == 0 {
                return bad(f, "must be at least 1".into());
            }
        }
        if self.max_steps.is_none() && self.epochs == 0 {
            return bad("epochs", "must be at least 1 (or set max_steps)".into());
        }
        if self.max_steps == Some(0) {
            return bad("max_steps", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad(
                "eval_fraction",
                format!("{} must be in [0, 1)", self.eval_fraction),
            );
        }
        if self.eval_fraction > 0.0 && self.eval_data.is_some() {
            return bad(
                "eval_fraction",
                "set either eval_data or eval_fraction, not both".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("{} must be in [0, 1]", self.warmup_ratio),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("{} must be in [0, 1)", self.lora_dropout),
            );
        }
        for (f, v) in [
            ("learning_rate", self.learning_rate),
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
            ("adam_epsilon", self.adam_epsilon),
            ("lora_alpha", self.lora_alpha),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(f, format!("{v} must be a finite number ≥ 0"));
            }
        }
        for (f, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return bad(f, format!("{v} must be in [0, 1)"));
            }
        }
        Ok(())
    }

    /// Fields that differ from `saved` and would change what a resumed run computes, as
    /// `field: checkpoint X, now Y` lines.
    pub fn resume_differences(&self, saved: &TrainConfig) -> Result<Vec<String>> {
        let to_map = |c: &TrainConfig| -> Result<serde_json::Map<String, serde_json::Value>> {
            match serde_json::to_value(c).map_err(|e| Error::config(e.to_string()))? {
                serde_json::Value::Object(m) => Ok(m),
                _ => Err(Error::internal("config is not a table")),
            }
        };
        let (now, then) = (to_map(self)?, to_map(saved)?);
        let mut out = Vec::new();
        for (name, _, _, _) in FIELDS {
            if RESUMABLE.contains(name) {
                continue;
            }
            let (a, b) = (&then[*name], &now[*name]);
            if a != b {
                out.push(format!("{name}: checkpoint {a}, now {b}"));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_table_matches_the_struct() {
        let v = serde_json::to_value(TrainConfig::default()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut fields: Vec<&str> = FIELDS.iter().map(|f| f.0).collect();
        let mut k = keys.clone();
        k.sort();
        fields.sort();
        assert_eq!(k, fields);
        for r in RESUMABLE {
            assert!(fields.contains(r), "{r}");
        }
    }

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
        assert_eq!(suggest("lerning_rate"), Some("learning_rate"));
        assert_eq!(suggest("batchsize"), Some("batch_size"));
        assert_eq!(suggest("max-seq-len"), Some("max_seq_length"));
        assert_eq!(suggest("completely_unrelated_thing"), None);
    }

    #[test]
    fn file_and_overrides() {
        let text = "model = \"m/model.safetensors\"\ndata = \"/abs/d.jsonl\"\nlearning_rate = 1e-3\npacking = false\nlr_scheduler = \"cosine\"\n";
        let over = vec![
            ("learning_rate".to_string(), "5e-4".to_string()),
            (
                "lora_target_modules".to_string(),
                "q_proj, v_proj,o_proj".to_string(),
            ),
            ("max_steps".to_string(), "7".to_string()),
            ("output_dir".to_string(), "123".to_string()),
            ("offload_activations".to_string(), "true".to_string()),
            ("prefetch_depth".to_string(), "1".to_string()),
            ("max_vram".to_string(), "3000000000".to_string()),
            ("seq_tile".to_string(), "4096".to_string()),
            ("gradient_checkpointing".to_string(), "auto".to_string()),
        ];
        let c = TrainConfig::from_toml(text, "t.toml", Some(Path::new("/base")), &over).unwrap();
        assert_eq!(
            c.model.as_deref(),
            Some(Path::new("/base/m/model.safetensors"))
        );
        assert_eq!(c.data.as_deref(), Some(Path::new("/abs/d.jsonl")));
        assert_eq!(c.learning_rate, 5e-4);
        assert!(!c.packing);
        assert_eq!(c.lr_scheduler, ScheduleKind::Cosine);
        assert_eq!(c.max_steps, Some(7));
        assert_eq!(c.output_dir, PathBuf::from("123"));
        assert_eq!(
            c.lora_target_modules,
            Some(vec!["q_proj".into(), "v_proj".into(), "o_proj".into()])
        );
        assert_eq!(c.batch_size, TrainConfig::default().batch_size);
        assert!(c.offload_activations && !c.offload_optimizer);
        assert_eq!((c.prefetch_depth, c.max_vram), (1, Some(3_000_000_000)));
        assert_eq!(c.seq_tile, Some(4096));
        assert_eq!(c.gradient_checkpointing, crate::GradientCheckpointing::Auto);
        c.validate().unwrap();
        // the echo reads back to the same config
        let back = TrainConfig::from_toml(&c.to_toml().unwrap(), "echo", None, &[]).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_and_ill_typed_fields_are_named() {
        let e = TrainConfig::from_toml("lerning_rate = 1e-3", "t.toml", None, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration: unknown field `lerning_rate` in t.toml; did you mean `learning_rate`?"
        );
        let e = TrainConfig::from_toml("zzz = 1", "t.toml", None, &[]).unwrap_err();
        assert!(
            e.to_string().contains("valid fields: model, tokenizer"),
            "{e}"
        );
        let e = TrainConfig::from_toml("batch_size = \"four\"", "t.toml", None, &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("t.toml: field `batch_size`: invalid type"),
            "{e}"
        );
        let e =
            TrainConfig::from_toml("lr_scheduler = \"cosin\"", "t.toml", None, &[]).unwrap_err();
        assert!(e.to_string().contains("cosine"), "{e}");
        let over = vec![("packing".to_string(), "maybe".to_string())];
        assert!(TrainConfig::from_toml("", "x", None, &over).is_err());
        let e = TrainConfig::from_toml("[lora]\nrank = 8", "t.toml", None, &[]).unwrap_err();
        assert!(e.to_string().contains("unknown field `lora`"), "{e}");
    }

    #[test]
    fn validation_names_the_field() {
        let ok = TrainConfig {
            model: Some("m".into()),
            data: Some("d".into()),
            ..Default::default()
        };
        ok.validate().unwrap();
        let cases: Vec<(TrainConfig, &str)> = vec![
            (
                TrainConfig {
                    model: None,
                    ..ok.clone()
                },
                "model: required",
            ),
            (
                TrainConfig {
                    batch_size: 0,
                    ..ok.clone()
                },
                "batch_size",
            ),
            (
                TrainConfig {
                    eval_fraction: 1.5,
                    ..ok.clone()
                },
                "eval_fraction",
            ),
            (
                TrainConfig {
                    learning_rate: f64::NAN,
                    ..ok.clone()
                },
                "learning_rate",
            ),
            (
                TrainConfig {
                    max_seq_length: 1,
                    ..ok.clone()
                },
                "max_seq_length",
            ),
            (
                TrainConfig {
                    eval_fraction: 0.1,
                    eval_data: Some("e".into()),
                    ..ok.clone()
                },
                "not both",
            ),
        ];
        for (c, what) in cases {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(what), "expected '{what}' in: {e}");
        }
    }

    #[test]
    fn resume_differences_list_what_changed() {
        let a = TrainConfig::default();
        let b = TrainConfig {
            max_seq_length: 128,
            batch_size: 2,
            output_dir: "elsewhere".into(),
            save_steps: 3,
            ..a.clone()
        };
        let d = b.resume_differences(&a).unwrap();
        assert_eq!(
            d,
            vec![
                "max_seq_length: checkpoint 512, now 128".to_string(),
                "batch_size: checkpoint 4, now 2".to_string()
            ]
        );
        assert!(a.resume_differences(&a).unwrap().is_empty());
    }
}
