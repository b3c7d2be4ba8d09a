//! Checkpoints: the adapter in PEFT's own format (`adapter_model.safetensors` +
//! `adapter_config.json`, loadable by `peft.PeftModel.from_pretrained`), plus optimizer
//! state (`optimizer.safetensors`) and `trainer_state.json`. A folder is written under a
//! temporary name and renamed into place, so a crash never leaves a folder that loads.

use crate::backend::{Backend, DType};
use crate::config::Arch;
use crate::error::{Error, Result};
use crate::fsutil::{TensorOut, atomic_write, f32_bytes, write_safetensors};
use crate::gbi::Gbi;
use crate::lora::{LoraConfig, LoraParams};
use crate::optim::Optimizer;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's adapter config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// Optimizer moments, keyed `<peft key>.<state name>`.
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";
/// Step, RNG, data position and configuration of a run; written last.
pub const TRAINER_STATE: &str = "trainer_state.json";

/// PEFT's `adapter_config.json` for `lora` on a model of `arch`, adapting
/// `target_modules` (resolved as PEFT saves them: [`LoraParams::peft_target_modules`]) of
/// the base `base_model` ([`base_model_id`]).
pub fn adapter_config_json(
    lora: &LoraConfig,
    target_modules: &[String],
    arch: Arch,
    base_model: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        "use_rslora": lora.use_rslora,
        // Conv1D weights are stored [in, out]; PEFT needs to know to transpose.
        "fan_in_fan_out": crate::model::family::family(arch).conv1d_weights,
        "bias": "none",
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
        "revision": null,
    })
}

/// What an adapter names as its base (`base_model_name_or_path`) for the model file
/// `model_path` described by `config_json`: the Hugging Face Hub id in its `_name_or_path`
/// when that is one (`owner/name`; `lema prepare` writes it when the GGUF records its
/// source repository), else the model's folder as an absolute path (what PEFT writes for a
/// model loaded from a folder, and where `AutoPeftModel` finds config.json and weights).
pub fn base_model_id(model_path: &Path, config_json: &Path) -> String {
    let folder = model_path.parent().filter(|p| !p.as_os_str().is_empty());
    let folder = folder.unwrap_or(Path::new("."));
    let hub_id = std::fs::read_to_string(config_json)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("_name_or_path")?.as_str().map(str::to_string))
        .filter(|n| is_hub_repo_id(n));
    hub_id.unwrap_or_else(|| {
        std::path::absolute(folder)
            .map(|p| p.canonicalize().unwrap_or(p))
            .unwrap_or_else(|_| folder.to_path_buf())
            .to_string_lossy()
            .into_owned()
    })
}

/// Whether `s` has the form of a Hub repository id, `owner/name` (the Hub's rules:
/// [`crate::hub::id::is_repo_id`]), and so cannot be mistaken for a file path or a display
/// name such as GGUF's `general.name`.
pub fn is_hub_repo_id(s: &str) -> bool {
    crate::hub::id::is_repo_id(s)
}

/// Read the LoRA settings from a PEFT `adapter_config.json`, refusing what lema does not
/// implement (DoRA, per-module ranks, regex targets, bias training).
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = crate::fsutil::read_text(&path)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    let bad = |msg: String| Error::format(&path, msg);
    if let Some(t) = v.get("peft_type").and_then(|t| t.as_str())
        && t != "LORA"
    {
        return Err(bad(format!(
            "peft_type is '{t}'; lema loads LORA adapters only"
        )));
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .ok_or_else(|| bad("missing integer field 'r'".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(|x| x.as_f64())
        .ok_or_else(|| bad("missing number field 'lora_alpha'".into()))? as f32;
    let dropout = v
        .get("lora_dropout")
        .and_then(|x| x.as_f64())
        .unwrap_or(0.0) as f32;
    let use_rslora = v
        .get("use_rslora")
        .and_then(|x| x.as_bool())
        .unwrap_or(false);
    let target_modules = match v.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("target_modules holds a non-string".into()))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(serde_json::Value::String(s)) if s == "all-linear" => vec![s.clone()],
        Some(serde_json::Value::String(s)) => {
            return Err(bad(format!(
                "target_modules is the regular expression '{s}'; lema supports a list of module names"
            )));
        }
        _ => return Err(bad("missing field 'target_modules'".into())),
    };
    if v.get("use_dora").and_then(|x| x.as_bool()) == Some(true) {
        return Err(bad("use_dora is true; lema does not implement DoRA".into()));
    }
    for field in ["rank_pattern", "alpha_pattern"] {
        if v.get(field)
            .and_then(|x| x.as_object())
            .is_some_and(|o| !o.is_empty())
        {
            return Err(bad(format!(
                "{field} is set; lema supports one rank and alpha for all modules"
            )));
        }
    }
    for field in [
        "exclude_modules",
        "layers_to_transform",
        "modules_to_save",
        "trainable_token_indices",
    ] {
        if v.get(field).is_some_and(|x| !x.is_null()) {
            return Err(bad(format!("{field} is set; lema does not support it yet")));
        }
    }
    if v.get("lora_bias").and_then(|x| x.as_bool()) == Some(true) {
        return Err(bad("lora_bias is true; lema trains no biases".into()));
    }
    if let Some(b) = v.get("bias").and_then(|x| x.as_str())
        && b != "none"
    {
        return Err(bad(format!(
            "bias is '{b}'; lema trains no biases (use \"none\")"
        )));
    }
    let cfg = LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
        use_rslora,
    };
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok(cfg)
}

/// Tensors by name: shape and f32 values.
pub type TensorMap = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// The tensors of a safetensors file as f32, by name, with shapes. Every header entry's
/// size was checked against the file when it was opened; memory for the f32 values is
/// reserved fallibly, so a file too large for memory is an error, not an abort.
pub fn read_f32_tensors(path: &Path) -> Result<TensorMap> {
    let gbi = Gbi::open(path)?;
    let mut out = HashMap::new();
    for t in gbi.tensors() {
        out.insert(t.name.clone(), (t.shape.clone(), decode_f32(&gbi, t)?));
    }
    Ok(out)
}

/// A tensor's values as f32, in memory reserved fallibly.
fn decode_f32(gbi: &Gbi, t: &crate::gbi::TensorInfo) -> Result<Vec<f32>> {
    let n = t.len / t.dtype.size().max(1);
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::tensor(
            gbi.path(),
            &t.name,
            format!("{n} values ({:?}) do not fit in memory", t.shape),
        )
    })?;
    v.resize(n, 0.0f32);
    t.dtype.decode_into(gbi.bytes(t), &mut v);
    Ok(v)
}

/// The tensors of a safetensors file handed out one by one as f32, each decoded only
/// after its shape is found to be the one expected: a header's claim never sizes an
/// allocation.
struct ExpectedTensors {
    gbi: Gbi,
    /// Names not yet taken.
    left: std::collections::BTreeSet<String>,
}

impl ExpectedTensors {
    fn open(path: &Path) -> Result<Self> {
        let gbi = Gbi::open(path)?;
        let left = gbi.tensors().map(|t| t.name.clone()).collect();
        Ok(ExpectedTensors { gbi, left })
    }

    fn path(&self) -> &Path {
        self.gbi.path()
    }

    /// The first of `keys` present, which must have `shape`; `missing` and `wrong` say
    /// what is wrong otherwise.
    fn take(
        &mut self,
        keys: &[String],
        shape: &[usize],
        missing: &str,
        wrong: impl Fn(&[usize]) -> String,
    ) -> Result<Vec<f32>> {
        let key = keys
            .iter()
            .find(|k| self.left.contains(k.as_str()))
            .ok_or_else(|| Error::tensor(self.path(), &keys[0], missing))?;
        self.left.remove(key.as_str());
        let t = self.gbi.tensor(key)?;
        if t.shape != shape {
            return Err(Error::tensor(self.path(), key, wrong(&t.shape)));
        }
        decode_f32(&self.gbi, t)
    }

    /// An error for the first tensor no one took, if any.
    fn check_all_taken(&self, what: &str) -> Result<()> {
        match self.left.iter().next() {
            Some(extra) => Err(Error::tensor(
                self.path(),
                extra,
                format!("{what} ({} unexpected keys)", self.left.len()),
            )),
            None => Ok(()),
        }
    }
}

/// Load an adapter's A and B matrices from a PEFT folder into fresh parameters for
/// `model`; every expected key must be present with the right shape and no key may be
/// left over.
pub fn load_adapter<B: Backend>(
    be: &B,
    model: &crate::model::Model,
    dir: &Path,
) -> Result<LoraParams<B>> {
    let cfg = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let mut tensors = ExpectedTensors::open(&path)?;
    let mut take = |key: String, shape: [usize; 2]| -> Result<Vec<f32>> {
        // PEFT also writes keys with the adapter name when saving non-default adapters
        let alt = key.replace(".weight", ".default.weight");
        let v = tensors.take(
            &[key.clone(), alt],
            &shape,
            "missing from the adapter (was it trained for another model or target_modules?)",
            |s| {
                format!(
                    "has shape {s:?}, the model needs {shape:?} (different base model or rank?)"
                )
            },
        )?;
        check_values(&v, false).map_err(|bad| {
            Error::tensor(
                &path,
                &key,
                format!(
                    "{bad}; the adapter is corrupt or was saved by a run that diverged: use an earlier checkpoint"
                ),
            )
        })?;
        Ok(v)
    };
    let params = LoraParams::build(be, model.block_linears(), &cfg, |spec| {
        let a = take(
            crate::lora::peft_key(&spec.path, 'A'),
            [spec.r, spec.linear.in_features],
        )?;
        let b = take(
            crate::lora::peft_key(&spec.path, 'B'),
            [spec.linear.out_features, spec.r],
        )?;
        Ok((a, b))
    })
    .map_err(|e| match e {
        // e.g. target_modules that name no module of this model
        Error::Config(msg) => Error::format(
            dir.join(ADAPTER_CONFIG),
            format!("{msg} (was the adapter trained for another model?)"),
        ),
        other => other,
    })?;
    tensors.check_all_taken("is not a LoRA matrix of this model")?;
    Ok(params)
}

/// Write the adapter (weights + config) into `dir`.
pub fn write_adapter<B: Backend>(
    be: &B,
    lora: &LoraParams<B>,
    arch: Arch,
    base_model: Option<&str>,
    dir: &Path,
) -> Result<()> {
    let mut tensors = Vec::new();
    for (key, shape, p, _) in lora.named_params() {
        let v = be.download(p)?;
        refuse_to_save("the LoRA parameter", &key, &v, false)?;
        tensors.push(TensorOut {
            name: key,
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: Cow::Owned(f32_bytes(&v)),
        });
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors, &meta)?;
    let cfg = adapter_config_json(&lora.cfg, &lora.peft_target_modules(), arch, base_model);
    write_json(&dir.join(ADAPTER_CONFIG), &cfg)
}

/// Write the optimizer's state tensors into `dir`.
pub fn write_optimizer<B: Backend>(
    be: &B,
    lora: &LoraParams<B>,
    opt: &Optimizer<B>,
    dir: &Path,
) -> Result<()> {
    let names = opt.cfg.state_names();
    let mut tensors = Vec::new();
    for ((key, shape, _, _), st) in lora.named_params().into_iter().zip(&opt.state) {
        for (name, buf) in names.iter().zip(st) {
            let k = format!("{key}.{name}");
            let v = be.download(buf)?;
            refuse_to_save("the optimizer state", &k, &v, is_second_moment(name))?;
            tensors.push(TensorOut {
                name: k,
                dtype: DType::F32,
                shape: shape.to_vec(),
                data: Cow::Owned(f32_bytes(&v)),
            });
        }
    }
    write_safetensors(&dir.join(OPTIMIZER_STATE), &tensors, &BTreeMap::new())
}

/// Fill the optimizer's state from `dir`, checking that every tensor is there.
pub fn read_optimizer<B: Backend>(
    be: &B,
    lora: &LoraParams<B>,
    opt: &mut Optimizer<B>,
    dir: &Path,
) -> Result<()> {
    let path = dir.join(OPTIMIZER_STATE);
    let mut tensors = ExpectedTensors::open(&path)?;
    let names = opt.cfg.state_names();
    let params = lora.named_params();
    if params.len() != opt.state.len() {
        return Err(Error::internal(
            "the optimizer state does not match the adapters",
        ));
    }
    // One tensor at a time, so that old and new state never coexist in full; each new
    // buffer is placed where the optimizer keeps its state (device or host memory).
    for (i, (key, shape, _, _)) in params.into_iter().enumerate() {
        for (j, name) in names.iter().enumerate() {
            let k = format!("{key}.{name}");
            let v = tensors.take(
                std::slice::from_ref(&k),
                &shape,
                "missing from the optimizer state",
                |s| format!("has shape {s:?}, expected {shape:?}"),
            )?;
            check_values(&v, is_second_moment(name)).map_err(|bad| {
                Error::tensor(
                    &path,
                    &k,
                    format!(
                        "{bad}; the optimizer state is corrupt: resume from an earlier checkpoint"
                    ),
                )
            })?;
            let buf = opt.state_buf(be, &v)?;
            let slot = opt
                .state
                .get_mut(i)
                .and_then(|st| st.get_mut(j))
                .ok_or_else(|| Error::internal("the optimizer state does not match its kind"))?;
            *slot = buf;
        }
    }
    Ok(())
}

/// Whether an optimizer state tensor holds AdamW's second moments, which are never negative.
fn is_second_moment(state_name: &str) -> bool {
    state_name == "exp_avg_sq"
}

/// `Err` with what is wrong when `values` hold a non-finite value (or, with
/// `non_negative`, a negative one): the first such value, where, and how many in all.
pub fn check_values(values: &[f32], non_negative: bool) -> std::result::Result<(), String> {
    let bad = |x: f32| !x.is_finite() || (non_negative && x < 0.0);
    let Some(first) = values.iter().position(|&x| bad(x)) else {
        return Ok(());
    };
    let x = values[first];
    let count = values[first..].iter().filter(|&&x| bad(x)).count();
    let (what, why) = if x.is_finite() {
        ("the negative second moment ", ", which AdamW never makes")
    } else {
        ("", "")
    };
    let plural = if count == 1 { "" } else { "s" };
    Err(format!(
        "holds {what}{x} at value {first} of {} ({count} bad value{plural} in all){why}",
        values.len()
    ))
}

/// Refuse to write a parameter or optimizer tensor that fails [`check_values`]: a
/// checkpoint that is saved is one that can be resumed.
fn refuse_to_save(what: &str, key: &str, values: &[f32], non_negative: bool) -> Result<()> {
    check_values(values, non_negative).map_err(|bad| {
        Error::NonFinite(format!(
            "{what} '{key}' {bad}; non-finite values are never saved (the run diverged: try a lower learning_rate or max_grad_norm)"
        ))
    })
}

/// Write pretty JSON atomically.
pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::format(path, e.to_string()))?;
    atomic_write(path, |w| std::io::Write::write_all(w, text.as_bytes()))
}

/// Create `dir` by filling a temporary sibling folder with `fill` and renaming it into
/// place; an existing `dir` is replaced only after the new one is complete.
pub fn write_dir_atomically(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir
        .file_name()
        .ok_or_else(|| {
            Error::config(format!(
                "checkpoint path {} has no folder name",
                dir.display()
            ))
        })?
        .to_string_lossy()
        .to_string();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old-{pid}"));
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    }
    if let Ok(f) = std::fs::File::open(&parent) {
        let _ = f.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_repo_ids_are_told_from_paths_and_display_names() {
        for id in [
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "openai-community/gpt2",
            "a/b.c_d",
        ] {
            assert!(is_hub_repo_id(id), "{id}");
        }
        for not in [
            "",
            "gpt2",
            "Smollm2 135M 8k Lc100K Mix1 Ep2",
            "/abs/model",
            "./runs/merged",
            "../x/y",
            "a/b/c",
            "a/..b",
            "-a/b",
            "a/",
        ] {
            assert!(!is_hub_repo_id(not), "{not}");
        }
    }

    #[test]
    fn base_model_is_the_hub_id_else_the_absolute_folder() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let model = dir.path().join("model.safetensors");
        let config = dir.path().join("config.json");
        let folder = dir
            .path()
            .canonicalize()
            .map_err(|e| Error::io(dir.path(), e))?;
        let write = |text: &str| std::fs::write(&config, text).map_err(|e| Error::io(&config, e));
        write(r#"{"_name_or_path": "HuggingFaceTB/SmolLM2-135M"}"#)?;
        assert_eq!(base_model_id(&model, &config), "HuggingFaceTB/SmolLM2-135M");
        for other in [
            r#"{"_name_or_path": "Smollm2 135M 8k"}"#,
            r#"{"_name_or_path": ""}"#,
            r#"{}"#,
            "not json",
        ] {
            write(other)?;
            assert_eq!(
                base_model_id(&model, &config),
                folder.to_string_lossy(),
                "{other}"
            );
        }
        Ok(())
    }
}
