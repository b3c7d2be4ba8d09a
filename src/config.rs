//! Model configuration read from the Hugging Face `config.json` beside the weights.

use crate::error::{Error, Result};
use crate::model::family::Sliding;
use serde_json::{Map, Value};
use std::path::Path;

/// Supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama family (Llama 2/3, SmolLM, TinyLlama).
    Llama,
    /// Mistral: Llama with sliding-window attention.
    Mistral,
    /// Qwen2 / Qwen2.5: Llama with biases on q, k and v.
    Qwen2,
    /// Qwen3 (dense): Llama with a per-head RMSNorm on q and k, head_dim set apart.
    Qwen3,
    /// Phi-3: Llama with fused `qkv_proj` and `gate_up_proj`.
    Phi3,
    /// Gemma 3 (text): (1 + w) norms around attention and the MLP, GeGLU, scaled
    /// embedding, local and global layers.
    Gemma3,
    /// GPT-2.
    Gpt2,
}

/// RoPE frequency scaling (`rope_scaling` in config.json).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// LongRoPE (Phi-3 128k, Phi-3.5): each frequency divided by its factor, the short
    /// ones while a call's positions stay within `original_max_position_embeddings`, the
    /// long ones past it; q and k are scaled by `attention_factor` (scores by its square).
    LongRope {
        short_factor: Vec<f32>,
        long_factor: Vec<f32>,
        original_max_position_embeddings: usize,
        attention_factor: f32,
    },
    /// YaRN (Qwen2.5 / Qwen3 long context; transformers' `_compute_yarn_parameters`):
    /// frequency i is `θ^(−2i/D)` blended with it divided by `factor` — kept where the
    /// frequency turns more than `beta_fast` times over `original_max_position_embeddings`
    /// positions, divided where it turns fewer than `beta_slow` times, linearly between (over
    /// the dimension index, the band ends floored / ceiled when `truncate`); q and k are
    /// scaled by `attention_factor` (scores by its square).
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        truncate: bool,
        attention_factor: f32,
    },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// A validated model configuration. Field names follow HF where one exists.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// MLP width (GPT-2: `n_inner`, default 4·hidden).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Equals `num_attention_heads` without GQA (and always for GPT-2).
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    /// `rms_norm_eps` (Llama) or `layer_norm_epsilon` (GPT-2).
    pub norm_eps: f32,
    /// Llama only (GPT-2 uses learned positions).
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Sliding-window attention: a query at position t sees keys t − w + 1 ..= t (w keys,
    /// its own included), on the layers `sliding_layers` marks.
    pub sliding_window: Option<usize>,
    /// Which layers slide (one entry per layer; all false without a window).
    pub sliding_layers: Vec<bool>,
    /// RoPE base of the sliding layers when it differs from `rope_theta` (Gemma 3's
    /// `rope_local_base_freq`; no scaling applies to them).
    pub local_rope_theta: Option<f32>,
    /// Attention scores are scaled by `query_pre_attn_scalar^−½` instead of `head_dim^−½`
    /// (Gemma).
    pub query_pre_attn_scalar: Option<f32>,
    /// Logits are `c · tanh(logits / c)` (Gemma's `final_logit_softcapping`).
    pub final_logit_softcapping: Option<f32>,
    /// What the config asks that lema does not do, for the caller to show (lema prints
    /// nothing itself): e.g. GPT-2's dropouts, which transformers applies in training.
    pub notes: Vec<String>,
    /// The parsed config.json, kept so it can be written back unchanged.
    pub raw: serde_json::Value,
}

/// Most weights a config.json may imply: 2^48 (2.8e14), over a hundred times the largest
/// models, half a petabyte in bf16.
const MAX_PARAMETERS: u64 = 1 << 48;
/// The `rope_scaling` types lema understands, for messages.
const SUPPORTED_ROPE_TYPES: &str = "default, linear, llama3, longrope (Phi-3), yarn";

impl ModelConfig {
    /// Read and validate a config.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::format(
                path,
                "missing: a model's config.json sits beside its weights (`lema prepare` writes it)",
            ));
        }
        let text = crate::fsutil::read_text(path)?;
        Self::from_json_str(&text, path)
    }

    /// Parse and validate config.json text; `path` is used in messages only.
    /// Unsupported architectures and options are refused here, with the value quoted,
    /// rather than silently computing something else than the reference model.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("config.json is not valid JSON: {e}")))?;
        let mut cfg = {
            let Some(obj) = raw.as_object() else {
                return Err(Error::format(
                    path,
                    format!("config.json must be a JSON object, found {}", quote(&raw)),
                ));
            };
            let f = Fields {
                obj,
                path,
                prefix: "",
            };
            let supported = crate::model::family::supported_model_types();
            match obj.get("model_type") {
                Some(Value::String(t)) => match crate::model::family::for_model_type(t) {
                    Some(arch) => (crate::model::family::family(arch).parse_config)(&f, t, arch)?,
                    None => {
                        return Err(f.err(format!(
                            "unsupported model_type '{t}' (read from 'model_type'); supported: {supported}"
                        )));
                    }
                },
                None | Some(Value::Null) => {
                    return Err(f.err(format!("missing 'model_type'; supported: {supported}")));
                }
                Some(v) => {
                    return Err(f.err(format!(
                        "field 'model_type' must be a string, found {}; supported: \
                         {supported}",
                        quote(v)
                    )));
                }
            }
        };
        cfg.raw = raw;
        cfg.check_size(path)?;
        Ok(cfg)
    }

    /// The number of weights these sizes imply (embedding, blocks, an untied head, GPT-2's
    /// position table), or None when the count overflows 64 bits.
    pub fn implied_parameters(&self) -> Option<u64> {
        let n = |x: usize| x as u64;
        let h = n(self.hidden_size);
        let q = n(self.num_attention_heads).checked_mul(n(self.head_dim))?;
        let kv = n(self.num_key_value_heads).checked_mul(n(self.head_dim))?;
        // q and o, k and v
        let attention = h.checked_mul(q.checked_add(kv)?.checked_mul(2)?)?;
        let family = crate::model::family::family(self.arch);
        let mlp = h
            .checked_mul(n(self.intermediate_size))?
            .checked_mul(family.mlp_matrices)?;
        let blocks = n(self.num_hidden_layers).checked_mul(attention.checked_add(mlp)?)?;
        let embedding = n(self.vocab_size).checked_mul(h)?;
        let head = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        let positions = if family.learned_positions {
            n(self.max_position_embeddings).checked_mul(h)?
        } else {
            0
        };
        blocks
            .checked_add(embedding)?
            .checked_add(head)?
            .checked_add(positions)
    }

    /// Refuse sizes that no model has (a typo, or a file made to exhaust memory): every
    /// buffer lema sizes from them is then far from overflowing.
    fn check_size(&self, path: &Path) -> Result<()> {
        let count = self.implied_parameters();
        if count.is_some_and(|c| c <= MAX_PARAMETERS) {
            return Ok(());
        }
        let sizes = (crate::model::family::family(self.arch).describe_sizes)(self);
        let count = count.map_or_else(|| "more than 2^64".to_string(), |c| c.to_string());
        Err(Error::config(format!(
            "{}: {sizes} imply {count} weights, more than the 2^48 lema accepts (the largest \
             models have about 2^41); check these sizes",
            path.display()
        )))
    }

    /// The sliding window of layer `layer`, if it slides.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.sliding_layers.get(layer) == Some(&true))
    }

    /// Attention's score scale: `query_pre_attn_scalar^−½`, else `head_dim^−½`; times
    /// LongRoPE's or YaRN's attention factor squared (transformers multiplies cos and sin
    /// by it, so it scales both q and k).
    pub fn attention_scale(&self) -> f32 {
        let d = self.query_pre_attn_scalar.unwrap_or(self.head_dim as f32);
        let rope = match self.rope_scaling {
            RopeScaling::LongRope {
                attention_factor, ..
            }
            | RopeScaling::Yarn {
                attention_factor, ..
            } => attention_factor * attention_factor,
            _ => 1.0,
        };
        rope / d.sqrt()
    }

    /// RoPE inverse frequencies, `head_dim / 2` of them: HF's default `1/θ^(2i/D)`, then the
    /// configured scaling exactly as transformers computes it. Computed in f64.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        rope_inv_freq(self.head_dim, self.rope_theta, &self.rope_scaling)
    }

    /// LongRoPE's inverse frequencies past the original context, and that context.
    pub fn long_rope_inv_freq(&self) -> Option<(Vec<f32>, usize)> {
        match &self.rope_scaling {
            RopeScaling::LongRope {
                long_factor,
                original_max_position_embeddings,
                ..
            } => Some((
                divided(
                    &rope_inv_freq(self.head_dim, self.rope_theta, &RopeScaling::None),
                    long_factor,
                ),
                *original_max_position_embeddings,
            )),
            _ => None,
        }
    }

    /// The sliding layers' inverse frequencies, when their base differs (unscaled).
    pub fn local_rope_inv_freq(&self) -> Option<Vec<f32>> {
        self.local_rope_theta
            .map(|theta| rope_inv_freq(self.head_dim, theta, &RopeScaling::None))
    }

    /// The original config.json, pretty-printed, to write beside checkpoints and prepared
    /// models so that they load in transformers unchanged.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.raw).unwrap_or_else(|_| self.raw.to_string())
    }
}

/// `inv_freq[i] / factors[i]` (LongRoPE's `1 / (ext · θ^(2i/D))`), in f64.
fn divided(inv_freq: &[f32], factors: &[f32]) -> Vec<f32> {
    inv_freq
        .iter()
        .zip(factors)
        .map(|(&f, &e)| (f64::from(f) / f64::from(e)) as f32)
        .collect()
}

/// RoPE inverse frequencies for head dimension `head_dim`, base `theta` and `scaling`, as
/// transformers computes them (in f64); LongRoPE's short ones.
fn rope_inv_freq(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Vec<f32> {
    if let RopeScaling::LongRope { short_factor, .. } = scaling {
        return divided(
            &rope_inv_freq(head_dim, theta, &RopeScaling::None),
            short_factor,
        );
    }
    {
        let d = head_dim as f64;
        let theta = f64::from(theta);
        let yarn_band = match *scaling {
            RopeScaling::Yarn {
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => yarn_band(
                head_dim,
                theta,
                original_max_position_embeddings as f64,
                f64::from(beta_fast),
                f64::from(beta_slow),
                truncate,
            ),
            _ => (0.0, 0.0),
        };
        (0..head_dim / 2)
            .map(|i| {
                let base = 1.0 / theta.powf((2 * i) as f64 / d);
                let scaled = match *scaling {
                    RopeScaling::None | RopeScaling::LongRope { .. } => base,
                    RopeScaling::Linear { factor } => base / f64::from(factor),
                    RopeScaling::Yarn { factor, .. } => {
                        // 0 below the band (kept), 1 above it (divided by the factor)
                        let (low, high) = yarn_band;
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        base / f64::from(factor) * ramp + base * (1.0 - ramp)
                    }
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => llama3_scale(
                        base,
                        f64::from(factor),
                        f64::from(low_freq_factor),
                        f64::from(high_freq_factor),
                        original_max_position_embeddings as f64,
                    ),
                };
                scaled as f32
            })
            .collect()
    }
}

/// YaRN's band of dimension indices `(low, high)` (transformers' `find_correction_range`):
/// the index at which a frequency turns `beta_fast` times, and `beta_slow` times, over
/// `old_context` positions, floored / ceiled when `truncate`, clamped to `0 ..= dim − 1`,
/// and 0.001 apart when they meet.
fn yarn_band(
    dim: usize,
    theta: f64,
    old_context: f64,
    beta_fast: f64,
    beta_slow: f64,
    truncate: bool,
) -> (f64, f64) {
    let d = dim as f64;
    let index = |turns: f64| {
        d * (old_context / (turns * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (index(beta_fast), index(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001;
    }
    (low, high)
}

/// transformers' `_compute_llama3_parameters` for one frequency: long wavelengths are
/// divided by `factor`, short ones kept, and the band between is interpolated smoothly.
fn llama3_scale(inv_freq: f64, factor: f64, low: f64, high: f64, old_context: f64) -> f64 {
    let low_freq_wavelen = old_context / low;
    let high_freq_wavelen = old_context / high;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    let inv_freq_llama = if wavelen > low_freq_wavelen {
        inv_freq / factor
    } else {
        inv_freq
    };
    let smooth = (old_context / wavelen - low) / (high - low);
    let smoothed = (1.0 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama;
    // transformers: `~(wavelen < high) * ~(wavelen > low)`; the same for finite wavelengths.
    let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
    if is_medium { smoothed } else { inv_freq_llama }
}

/// A JSON value as it would appear in the file, shortened for messages.
fn quote(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let head: String = s.chars().take(57).collect();
        format!("{head}...")
    } else {
        s
    }
}

/// Typed access to the fields of one JSON object, with messages that name the file and
/// the field. `null` counts as absent, as it does for transformers.
pub(crate) struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
    /// Prepended to field names in messages ("rope_scaling.").
    prefix: &'a str,
}

/// An architecture's config.json parser: the fields, the `model_type` read, and the
/// architecture it names.
pub(crate) type ParseConfig = fn(&Fields, &str, Arch) -> Result<ModelConfig>;

impl<'a> Fields<'a> {
    /// The fields of the object under `key`, for messages prefixed `key.`.
    pub(crate) fn sub(&self, key: &str, prefix: &'a str) -> Result<Option<Fields<'a>>> {
        Ok(self.opt_object(key)?.map(|obj| Fields {
            obj,
            path: self.path,
            prefix,
        }))
    }

    pub(crate) fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::config(format!("{}: {msg}", self.path.display()))
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn type_err(&self, key: &str, want: &str, v: &Value) -> Error {
        self.err(format!(
            "field '{}{key}' must be {want}, found {}",
            self.prefix,
            quote(v)
        ))
    }

    pub(crate) fn missing(&self, key: &str) -> Error {
        self.err(format!("missing required field '{}{key}'", self.prefix))
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.type_err(key, "a non-negative integer", v)),
        }
    }

    /// An optional size, which must be positive when present.
    pub(crate) fn opt_size(&self, key: &str) -> Result<Option<usize>> {
        match self.opt_usize(key)? {
            Some(0) => Err(self.err(format!("field '{}{key}' must be > 0, found 0", self.prefix))),
            n => Ok(n),
        }
    }

    /// A required positive size.
    pub(crate) fn size(&self, key: &str) -> Result<usize> {
        self.opt_size(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.type_err(key, "a number", v)),
        }
    }

    /// A positive number that fits an f32, or `default` when absent.
    pub(crate) fn positive_f32(&self, key: &str, default: Option<f32>) -> Result<f32> {
        let Some(x) = self.opt_f64(key)? else {
            return default.ok_or_else(|| self.missing(key));
        };
        let y = x as f32;
        if x > 0.0 && y > 0.0 && y.is_finite() {
            Ok(y)
        } else {
            Err(self.err(format!(
                "field '{}{key}' must be a positive number that fits in f32, found {x}",
                self.prefix
            )))
        }
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.type_err(key, "true or false", v)),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.type_err(key, "a string", v)),
        }
    }

    pub(crate) fn opt_object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => Err(self.type_err(key, "an object", v)),
        }
    }

    pub(crate) fn token(&self, key: &str, v: &Value) -> Result<u32> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.type_err(key, "a token id (integer below 2^32)", v))
    }

    pub(crate) fn opt_token(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|v| self.token(key, v)).transpose()
    }

    /// A token id or a list of them (`eos_token_id`).
    pub(crate) fn tokens(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| self.token(key, v)).collect(),
            Some(v) => Ok(vec![self.token(key, v)?]),
        }
    }

    /// The activation named by `key` (`default` when absent) must be `want`.
    pub(crate) fn require_activation(
        &self,
        key: &str,
        model_type: &str,
        want: &str,
        default: Option<&str>,
    ) -> Result<()> {
        match self.opt_str(key)?.or(default) {
            Some(act) if act != want => Err(self.err(format!(
                "{key} '{act}' is not supported for {model_type}; supported: {want}"
            ))),
            _ => Ok(()),
        }
    }

    /// Dropout probabilities (`keys`) must be absent or 0: transformers applies them in
    /// training mode, and lema would compute something else.
    pub(crate) fn refuse_dropouts(&self, keys: &[&str]) -> Result<()> {
        for key in keys {
            if let Some(p) = self.opt_f64(key)?
                && p != 0.0
            {
                return Err(self.err(format!(
                    "{key} = {p} is not supported (lema applies no dropout besides LoRA's); set it to 0.0"
                )));
            }
        }
        Ok(())
    }

    /// `hidden / heads` as the head dimension, refused when it does not divide evenly.
    pub(crate) fn derive_head_dim(
        &self,
        hidden: (&str, usize),
        heads: (&str, usize),
    ) -> Result<usize> {
        if !hidden.1.is_multiple_of(heads.1) {
            return Err(self.err(format!(
                "{} = {} is not divisible by {} = {}",
                hidden.0, hidden.1, heads.0, heads.1
            )));
        }
        Ok(hidden.1 / heads.1)
    }
}

/// A Llama-shaped config (Llama, Mistral, Qwen2, Qwen3, Phi-3): the keys they share, and
/// what differs by architecture (biases, sliding windows).
pub(crate) fn parse_llama(f: &Fields, model_type: &str, arch: Arch) -> Result<ModelConfig> {
    f.require_activation("hidden_act", model_type, "silu", Some("silu"))?;
    let mut cfg = parse_decoder_sizes(f, arch, None)?;
    (cfg.rope_theta, cfg.rope_scaling) = parse_rope(f, &RopeContext::top_level(f, &cfg)?)?;
    finish_long_rope(f, &mut cfg)?;
    let sliding = crate::model::family::family(arch).sliding;
    (cfg.sliding_window, cfg.sliding_layers) = parse_windows(f, sliding, cfg.num_hidden_layers)?;
    // Phi-3's dropouts apply in transformers' training mode; lema would compute something
    // else, so a non-zero one is refused rather than ignored
    f.refuse_dropouts(&["resid_pdrop", "embd_pdrop", "attention_dropout"])?;
    Ok(cfg)
}

/// The sizes, norm ε, token ids and biases every RoPE decoder's config.json shares, with
/// no window, the default RoPE and nothing architecture-specific; `default_head_dim` is
/// the config class's `head_dim` default (else hidden / heads).
pub(crate) fn parse_decoder_sizes(
    f: &Fields,
    arch: Arch,
    default_head_dim: Option<usize>,
) -> Result<ModelConfig> {
    let family = crate::model::family::family(arch);
    let vocab_size = f.size("vocab_size")?;
    let hidden_size = f.size("hidden_size")?;
    let intermediate_size = f.size("intermediate_size")?;
    let num_hidden_layers = f.size("num_hidden_layers")?;
    let num_attention_heads = f.size("num_attention_heads")?;
    let num_key_value_heads = f
        .opt_size("num_key_value_heads")?
        .unwrap_or(num_attention_heads);
    if !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(f.err(format!(
            "num_attention_heads = {num_attention_heads} is not divisible by \
             num_key_value_heads = {num_key_value_heads}"
        )));
    }
    let head_dim = match (f.opt_size("head_dim")?, default_head_dim) {
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) => f.derive_head_dim(
            ("hidden_size", hidden_size),
            ("num_attention_heads", num_attention_heads),
        )?,
    };
    if !head_dim.is_multiple_of(2) {
        return Err(f.err(format!(
            "head_dim = {head_dim} is odd; rotary embeddings need an even head dimension"
        )));
    }
    if let Some(p) = f.opt_f64("partial_rotary_factor")?
        && p != 1.0
    {
        return Err(f.err(format!(
            "partial_rotary_factor = {p} is not supported; only 1.0 (rotate the whole head)"
        )));
    }
    let max_position_embeddings = f
        .opt_size("max_position_embeddings")?
        .unwrap_or(family.default_max_positions);
    Ok(ModelConfig {
        arch,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings,
        norm_eps: f.positive_f32("rms_norm_eps", Some(1e-6))?,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        tie_word_embeddings: f
            .opt_bool("tie_word_embeddings")?
            .unwrap_or(family.ties_by_default),
        // Qwen2 has biases on q, k, v (only; no key says so); Qwen3's `attention_bias`
        // covers q, k, v and o, as Llama's does
        attention_bias: f.opt_bool("attention_bias")?.unwrap_or(false),
        mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
        bos_token_id: f.opt_token("bos_token_id")?,
        eos_token_ids: f.tokens("eos_token_id")?,
        sliding_window: None,
        sliding_layers: vec![false; num_hidden_layers],
        local_rope_theta: None,
        query_pre_attn_scalar: None,
        final_logit_softcapping: None,
        notes: Vec::new(),
        raw: Value::Null,
    })
}

/// The sliding window and which of `layers` layers slide, by the architecture's rule.
/// Mistral and Phi-3 slide on every layer when `sliding_window` is set; Qwen2/Qwen3 only
/// with `use_sliding_window` (their Hub configs keep a `sliding_window` value otherwise
/// ignored), and then only from layer `max_window_layers` on; Gemma by `layer_types`, or
/// in older configs every layer but each `sliding_window_pattern`-th. A `layer_types`
/// list (transformers 5 writes one) must agree with the rule.
pub(crate) fn parse_windows(
    f: &Fields,
    sliding: Sliding,
    layers: usize,
) -> Result<(Option<usize>, Vec<bool>)> {
    let layer_types = match f.get("layer_types") {
        None => None,
        Some(Value::Array(items)) => {
            let kinds = items
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(f.err(format!(
                        "layer_types[{i}] is {}; supported: \"sliding_attention\", \"full_attention\"",
                        quote(t)
                    ))),
                })
                .collect::<Result<Vec<bool>>>()?;
            if kinds.len() != layers {
                return Err(f.err(format!(
                    "layer_types has {} entries but num_hidden_layers = {layers}",
                    kinds.len()
                )));
            }
            Some(kinds)
        }
        Some(v) => return Err(f.type_err("layer_types", "a list", v)),
    };
    let (window, by_rule) = match sliding {
        Sliding::EveryLayer => (f.opt_size("sliding_window")?, vec![true; layers]),
        Sliding::OptIn if f.opt_bool("use_sliding_window")? == Some(true) => {
            let first = f.opt_size("max_window_layers")?.unwrap_or(0);
            (
                f.opt_size("sliding_window")?,
                (0..layers).map(|i| i >= first).collect(),
            )
        }
        Sliding::OptIn | Sliding::Never => (None, vec![false; layers]),
        Sliding::ByLayerType { default_window } => {
            let window = f.opt_size("sliding_window")?.unwrap_or(default_window);
            if let Some(kinds) = layer_types {
                return Ok((Some(window), kinds));
            }
            let pattern = f.opt_size("sliding_window_pattern")?.unwrap_or(6);
            (
                Some(window),
                (0..layers).map(|i| (i + 1) % pattern != 0).collect(),
            )
        }
    };
    let by_rule = if window.is_some() {
        by_rule
    } else {
        vec![false; layers]
    };
    if let Some(kinds) = layer_types
        && let Some(i) = (0..layers).find(|&i| kinds[i] != by_rule[i])
    {
        let name = |b: bool| {
            if b {
                "sliding_attention"
            } else {
                "full_attention"
            }
        };
        return Err(f.err(format!(
            "layer_types[{i}] is \"{}\", but sliding_window, use_sliding_window and \
             max_window_layers make layer {i} {}",
            name(kinds[i]),
            name(by_rule[i])
        )));
    }
    Ok((window, by_rule))
}

/// What a RoPE scaling object is read with, besides its own fields: the architecture
/// (its family's `rope_type_aliases`), the config's context length, and a top-level
/// `original_max_position_embeddings` (which wins over the one inside the object, as in
/// transformers' `standardize_rope_params`; per-layer-type entries see none).
pub(crate) struct RopeContext {
    pub(crate) arch: Arch,
    pub(crate) max_position_embeddings: usize,
    pub(crate) top_original: Option<usize>,
}

impl RopeContext {
    /// The context of a config's top-level (not per-layer-type) RoPE settings.
    pub(crate) fn top_level(f: &Fields, cfg: &ModelConfig) -> Result<RopeContext> {
        Ok(RopeContext {
            arch: cfg.arch,
            max_position_embeddings: cfg.max_position_embeddings,
            top_original: f.opt_size("original_max_position_embeddings")?,
        })
    }
}

/// `rope_theta` and `rope_scaling`. Newer transformers write both inside
/// `rope_parameters`; that is read when the older keys are absent.
pub(crate) fn parse_rope(f: &Fields, ctx: &RopeContext) -> Result<(f32, RopeScaling)> {
    let params = f.opt_object("rope_parameters")?.map(|obj| Fields {
        obj,
        path: f.path,
        prefix: "rope_parameters.",
    });
    let rope_theta = match (f.get("rope_theta"), &params) {
        (None, Some(p)) => p.positive_f32("rope_theta", Some(10000.0))?,
        _ => f.positive_f32("rope_theta", Some(10000.0))?,
    };
    let scaling = match (f.opt_object("rope_scaling")?, params) {
        (Some(obj), _) => Fields {
            obj,
            path: f.path,
            prefix: "rope_scaling.",
        },
        (None, Some(p)) => p,
        (None, None) => return Ok((rope_theta, RopeScaling::None)),
    };
    let rope_scaling = parse_scaling(&scaling, scaling.prefix == "rope_parameters.", ctx)?;
    if matches!(rope_scaling, RopeScaling::Yarn { .. }) && rope_theta <= 1.0 {
        return Err(scaling.err(format!(
            "YaRN needs rope_theta > 1 (its band is measured in log rope_theta), found \
             {rope_theta}"
        )));
    }
    Ok((rope_theta, rope_scaling))
}

/// The RoPE scaling an object of RoPE settings (`rope_scaling`, `rope_parameters` or one
/// of its per-layer-type entries) describes; with `type_optional` a missing `rope_type`
/// means none.
pub(crate) fn parse_scaling(
    s: &Fields,
    type_optional: bool,
    ctx: &RopeContext,
) -> Result<RopeScaling> {
    let kind = match s.opt_str("rope_type")? {
        Some(t) => Some(t),
        None => s.opt_str("type")?,
    };
    // a legacy name the architecture's config class reads as another type
    let aliases = crate::model::family::family(ctx.arch).rope_type_aliases;
    let kind = kind.map(|k| {
        aliases
            .iter()
            .find(|(legacy, _)| *legacy == k)
            .map_or(k, |(_, meant)| meant)
    });
    Ok(match kind {
        // `rope_parameters` may carry only `rope_theta`.
        None if type_optional => RopeScaling::None,
        None => {
            return Err(s.err(format!(
                "'{}' has no 'rope_type' (or 'type'); supported: {SUPPORTED_ROPE_TYPES}",
                s.prefix.trim_end_matches('.')
            )));
        }
        Some("default") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: s.positive_f32("factor", None)?,
        },
        Some("llama3") => {
            let low_freq_factor = s.positive_f32("low_freq_factor", None)?;
            let high_freq_factor = s.positive_f32("high_freq_factor", None)?;
            if high_freq_factor <= low_freq_factor {
                return Err(s.err(format!(
                    "llama3 rope scaling needs high_freq_factor > low_freq_factor, found \
                     {high_freq_factor} and {low_freq_factor}"
                )));
            }
            RopeScaling::Llama3 {
                factor: s.positive_f32("factor", None)?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: s.size("original_max_position_embeddings")?,
            }
        }
        // "su" is LongRoPE's name in Phi-3's first configs
        Some("longrope" | "su") => {
            let factors = |key: &str| -> Result<Vec<f32>> {
                let v = s.get(key).ok_or_else(|| s.missing(key))?;
                v.as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_f64().map(|x| x as f32).filter(|x| *x > 0.0))
                            .collect::<Option<Vec<f32>>>()
                    })
                    .ok_or_else(|| s.type_err(key, "a list of positive numbers", v))
            };
            RopeScaling::LongRope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                // completed by `finish_long_rope`, which sees the whole config
                original_max_position_embeddings: s
                    .opt_size("original_max_position_embeddings")?
                    .unwrap_or(0),
                attention_factor: s.opt_f64("attention_factor")?.map_or(0.0, |a| a as f32),
            }
        }
        Some("yarn") => parse_yarn(s, ctx)?,
        Some(other) => {
            return Err(s.err(format!(
                "rope scaling type '{other}' is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )));
        }
    })
}

/// YaRN's settings as transformers 5.24 reads them (`_compute_yarn_parameters`,
/// `_validate_yarn_rope_parameters`, `standardize_rope_params`):
/// * `factor` is required; `null` means `max_position_embeddings / original`;
/// * `original_max_position_embeddings`: a top-level one wins, then the one inside, then
///   `max_position_embeddings`;
/// * `attention_factor`, unless given: `m(factor, mscale) / m(factor, mscale_all_dim)` when
///   both are set (non-zero), else `m(factor, 1)`, with `m(f, s) = 0.1 · s · ln f + 1` (1 for
///   f ≤ 1);
/// * `beta_fast`, `beta_slow`: 32 and 1 when absent or 0; `truncate`: true when absent
///   (false when null).
///
/// Refused where transformers warns that a value is invalid (and then computes something
/// no checkpoint meant): `factor` < 1, `attention_factor` ≤ 0, `beta_fast` < `beta_slow`;
/// and negative betas, where its logarithm fails.
fn parse_yarn(s: &Fields, ctx: &RopeContext) -> Result<RopeScaling> {
    let original_max_position_embeddings = match ctx.top_original {
        Some(top) => top,
        None => s
            .opt_size("original_max_position_embeddings")?
            .unwrap_or(ctx.max_position_embeddings),
    };
    let factor = match s.obj.get("factor") {
        None => return Err(s.missing("factor")),
        Some(Value::Null) => {
            ctx.max_position_embeddings as f64 / original_max_position_embeddings as f64
        }
        Some(_) => s.opt_f64("factor")?.unwrap_or(1.0),
    };
    if !(factor >= 1.0 && (factor as f32).is_finite()) {
        return Err(s.err(format!(
            "field '{}factor' must be a number >= 1 for yarn (the context is stretched by it), \
             found {factor}",
            s.prefix
        )));
    }
    let beta = |key: &str, default: f64| -> Result<f64> {
        match s.opt_f64(key)? {
            // transformers: `beta_fast or 32`
            None | Some(0.0) => Ok(default),
            Some(b) if b > 0.0 && (b as f32).is_finite() => Ok(b),
            Some(b) => Err(s.err(format!(
                "field '{}{key}' must be a positive number, found {b}",
                s.prefix
            ))),
        }
    };
    let (beta_fast, beta_slow) = (beta("beta_fast", 32.0)?, beta("beta_slow", 1.0)?);
    if beta_fast < beta_slow {
        return Err(s.err(format!(
            "yarn rope scaling needs beta_fast >= beta_slow, found {beta_fast} and {beta_slow}"
        )));
    }
    let m = |scale: f64| {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * scale * factor.ln() + 1.0
        }
    };
    let attention_factor = match s.opt_f64("attention_factor")? {
        Some(a) if a > 0.0 && (a as f32).is_finite() => a,
        Some(a) => {
            return Err(s.err(format!(
                "field '{}attention_factor' must be a positive number, found {a}",
                s.prefix
            )));
        }
        None => match (s.opt_f64("mscale")?, s.opt_f64("mscale_all_dim")?) {
            (Some(ms), Some(all)) if ms != 0.0 && all != 0.0 => m(ms) / m(all),
            _ => m(1.0),
        },
    };
    Ok(RopeScaling::Yarn {
        factor: factor as f32,
        original_max_position_embeddings,
        beta_fast: beta_fast as f32,
        beta_slow: beta_slow as f32,
        // transformers reads `rope_parameters.get("truncate", True)`: a null is false
        truncate: match s.obj.get("truncate") {
            Some(Value::Null) => false,
            _ => s.opt_bool("truncate")?.unwrap_or(true),
        },
        attention_factor: attention_factor as f32,
    })
}

/// LongRoPE's original context and attention factor as transformers derives them: a
/// top-level `original_max_position_embeddings` (Phi-3) wins over the one inside, and
/// then the factor is `max_position_embeddings / original`; otherwise `factor` (default
/// 1). The attention factor, unless given, is `√(1 + ln f / ln original)`, 1 for f ≤ 1.
/// Both factor lists must hold `head_dim / 2` values.
fn finish_long_rope(f: &Fields, cfg: &mut ModelConfig) -> Result<()> {
    let (head_dim, max_pos) = (cfg.head_dim, cfg.max_position_embeddings);
    let RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings: orig,
        attention_factor,
    } = &mut cfg.rope_scaling
    else {
        return Ok(());
    };
    for (key, v) in [
        ("short_factor", &*short_factor),
        ("long_factor", &*long_factor),
    ] {
        if v.len() != head_dim / 2 {
            return Err(f.err(format!(
                "LongRoPE's {key} has {} values, but head_dim = {head_dim} needs {}",
                v.len(),
                head_dim / 2
            )));
        }
    }
    let factor = match f.opt_size("original_max_position_embeddings")? {
        Some(top) => {
            *orig = top;
            max_pos as f64 / top as f64
        }
        None => {
            if *orig == 0 {
                *orig = max_pos;
            }
            let scaling = f
                .sub("rope_scaling", "rope_scaling.")?
                .or(f.sub("rope_parameters", "rope_parameters.")?);
            match scaling {
                Some(s) => s.opt_f64("factor")?.unwrap_or(1.0),
                None => 1.0,
            }
        }
    };
    if *attention_factor == 0.0 {
        *attention_factor = if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (*orig as f64).ln()).sqrt() as f32
        };
    }
    Ok(())
}

/// GPT-2 (LayerNorm, learned positions, `gelu_new` MLP, fused QKV, biases everywhere).
pub(crate) fn parse_gpt2(f: &Fields, _model_type: &str, arch: Arch) -> Result<ModelConfig> {
    if let Some(act) = f.opt_str("activation_function")?
        && act != "gelu_new"
        && act != "gelu_pytorch_tanh"
    {
        return Err(f.err(format!(
            "activation_function '{act}' is not supported for gpt2; supported: gelu_new, \
             gelu_pytorch_tanh"
        )));
    }
    if f.opt_bool("scale_attn_by_inverse_layer_idx")? == Some(true) {
        return Err(f.err(
            "scale_attn_by_inverse_layer_idx = true is not supported (attention scores \
             would be divided by the layer index)",
        ));
    }
    if f.opt_bool("reorder_and_upcast_attn")? == Some(true) {
        return Err(f.err("reorder_and_upcast_attn = true is not supported"));
    }
    if f.opt_bool("scale_attn_weights")? == Some(false) {
        return Err(f.err(
            "scale_attn_weights = false is not supported (attention scores are always \
             scaled by 1/sqrt(head_dim))",
        ));
    }
    // transformers applies these in training mode (PEFT's training runs them); lema has
    // no dropout in the frozen model besides LoRA's own, so it says so instead of
    // refusing every GPT-2 config (they default to 0.1)
    let mut dropped = Vec::new();
    for key in ["attn_pdrop", "resid_pdrop", "embd_pdrop"] {
        let p = f.opt_f64(key)?.unwrap_or(0.1);
        if p != 0.0 {
            dropped.push(format!("{key} = {p}"));
        }
    }
    let notes = if dropped.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "note: GPT-2's dropout ({}) is not applied: lema trains the frozen model without dropout (LoRA's lora_dropout applies); transformers applies it in training mode, so losses differ from a PEFT run with it",
            dropped.join(", ")
        )]
    };
    let vocab_size = f.size("vocab_size")?;
    let n_embd = f.size("n_embd")?;
    let n_layer = f.size("n_layer")?;
    let n_head = f.size("n_head")?;
    let n_positions = f.size("n_positions")?;
    let n_inner = match f.opt_size("n_inner")? {
        Some(n) => n,
        None => n_embd
            .checked_mul(4)
            .ok_or_else(|| f.err(format!("n_embd = {n_embd} is too large")))?,
    };
    let head_dim = f.derive_head_dim(("n_embd", n_embd), ("n_head", n_head))?;
    Ok(ModelConfig {
        arch,
        vocab_size,
        hidden_size: n_embd,
        intermediate_size: n_inner,
        num_hidden_layers: n_layer,
        num_attention_heads: n_head,
        num_key_value_heads: n_head,
        head_dim,
        max_position_embeddings: n_positions,
        norm_eps: f.positive_f32("layer_norm_epsilon", Some(1e-5))?,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        attention_bias: true,
        mlp_bias: true,
        bos_token_id: f.opt_token("bos_token_id")?,
        eos_token_ids: f.tokens("eos_token_id")?,
        sliding_window: None,
        sliding_layers: vec![false; n_layer],
        local_rope_theta: None,
        query_pre_attn_scalar: None,
        final_logit_softcapping: None,
        notes,
        raw: Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::family::family;

    const PATH: &str = "/models/x/config.json";

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(json, Path::new(PATH))
    }

    /// Parse `json`, which must fail; return the message, which must name the file.
    fn err_of(json: &str) -> String {
        match parse(json) {
            Ok(c) => panic!("expected an error for {json}, got {c:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(PATH), "message does not name the file: {msg}");
                msg
            }
        }
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
        }
    }

    /// A Llama config with `extra` fields merged over it (null removes a field).
    fn llama_with(extra: &str) -> String {
        let mut base: Value = serde_json::from_str(TINYLLAMA).unwrap();
        let extra: Value = serde_json::from_str(extra).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        base.to_string()
    }

    fn gpt2_with(extra: &str) -> String {
        let mut base: Value = serde_json::from_str(GPT2).unwrap();
        let extra: Value = serde_json::from_str(extra).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base.to_string()
    }

    const TINYLLAMA: &str = r#"{
      "architectures": ["LlamaForCausalLM"],
      "attention_bias": false,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "hidden_act": "silu",
      "hidden_size": 2048,
      "initializer_range": 0.02,
      "intermediate_size": 5632,
      "max_position_embeddings": 2048,
      "model_type": "llama",
      "num_attention_heads": 32,
      "num_hidden_layers": 22,
      "num_key_value_heads": 4,
      "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_scaling": null,
      "rope_theta": 10000.0,
      "tie_word_embeddings": false,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.35.0",
      "use_cache": true,
      "vocab_size": 32000
    }"#;

    const LLAMA31: &str = r#"{
      "architectures": ["LlamaForCausalLM"],
      "attention_bias": false,
      "attention_dropout": 0.0,
      "bos_token_id": 128000,
      "eos_token_id": [128001, 128008, 128009],
      "hidden_act": "silu",
      "hidden_size": 4096,
      "initializer_range": 0.02,
      "intermediate_size": 14336,
      "max_position_embeddings": 131072,
      "mlp_bias": false,
      "model_type": "llama",
      "num_attention_heads": 32,
      "num_hidden_layers": 32,
      "num_key_value_heads": 8,
      "pretraining_tp": 1,
      "rms_norm_eps": 1e-05,
      "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3"
      },
      "rope_theta": 500000.0,
      "tie_word_embeddings": false,
      "torch_dtype": "bfloat16",
      "vocab_size": 128256
    }"#;

    const GPT2: &str = r#"{
      "activation_function": "gelu_new",
      "architectures": ["GPT2LMHeadModel"],
      "attn_pdrop": 0.1,
      "bos_token_id": 50256,
      "embd_pdrop": 0.1,
      "eos_token_id": 50256,
      "initializer_range": 0.02,
      "layer_norm_epsilon": 1e-05,
      "model_type": "gpt2",
      "n_ctx": 1024,
      "n_embd": 768,
      "n_head": 12,
      "n_layer": 12,
      "n_positions": 1024,
      "resid_pdrop": 0.1,
      "summary_activation": null,
      "vocab_size": 50257
    }"#;

    #[test]
    fn tinyllama() {
        let c = parse(TINYLLAMA).unwrap();
        assert_eq!(family(c.arch).model_types, ["llama"]);
        assert_eq!(c.vocab_size, 32000);
        assert_eq!(c.hidden_size, 2048);
        assert_eq!(c.intermediate_size, 5632);
        assert_eq!(c.num_hidden_layers, 22);
        assert_eq!(c.num_attention_heads, 32);
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.max_position_embeddings, 2048);
        assert_eq!(c.norm_eps, 1e-5);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(!c.tie_word_embeddings && !c.attention_bias && !c.mlp_bias);
        assert_eq!(c.bos_token_id, Some(1));
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.sliding_window, None);

        // Unscaled RoPE: 1/θ^(2i/D), checked against a few values written out by hand.
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0);
        assert!((f[16] - 0.01).abs() < 1e-9, "{}", f[16]); // 10000^(-32/64) = 1/100
        assert!((f[8] - 0.1).abs() < 1e-8, "{}", f[8]); // 10000^(-16/64) = 1/10
    }

    #[test]
    fn llama_defaults() {
        let c = parse(&llama_with(
            r#"{"num_key_value_heads": null, "max_position_embeddings": null,
                "rms_norm_eps": null, "rope_theta": null, "tie_word_embeddings": null,
                "hidden_act": null, "bos_token_id": null, "eos_token_id": null,
                "rope_scaling": null, "attention_bias": null}"#,
        ))
        .unwrap();
        assert_eq!(c.num_key_value_heads, 32);
        assert_eq!(c.max_position_embeddings, 2048);
        assert_eq!(c.norm_eps, 1e-6);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.bos_token_id, None);
        assert!(c.eos_token_ids.is_empty());
    }

    #[test]
    fn llama_explicit_head_dim_and_options() {
        // head_dim given explicitly need not be hidden / heads.
        let c = parse(&llama_with(
            r#"{"head_dim": 128, "tie_word_embeddings": true, "attention_bias": true,
                "mlp_bias": true, "rope_scaling": {"type": "linear", "factor": 2.0}}"#,
        ))
        .unwrap();
        assert_eq!(c.head_dim, 128);
        assert!(c.tie_word_embeddings && c.attention_bias && c.mlp_bias);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 0.5);
        assert!((f[32] - 0.005).abs() < 1e-9, "{}", f[32]);

        let c = parse(&llama_with(r#"{"rope_scaling": {"rope_type": "default"}}"#)).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }

    #[test]
    fn mistral_sliding_window() {
        let c = parse(&llama_with(
            r#"{"model_type": "mistral", "sliding_window": 4096}"#,
        ))
        .unwrap();
        assert_eq!(family(c.arch).model_types, ["mistral"]);
        assert_eq!(c.sliding_window, Some(4096));
        let c = parse(&llama_with(r#"{"model_type": "mistral"}"#)).unwrap();
        assert_eq!(c.sliding_window, None);
        let mut v: Value =
            serde_json::from_str(&llama_with(r#"{"model_type": "mistral"}"#)).unwrap();
        v["sliding_window"] = Value::Null;
        assert_eq!(parse(&v.to_string()).unwrap().sliding_window, None);
        let msg = err_of(&llama_with(
            r#"{"model_type": "mistral", "sliding_window": "4k"}"#,
        ));
        assert_contains(&msg, &["sliding_window", "\"4k\""]);
    }

    #[test]
    fn llama31_rope_scaling() {
        let c = parse(LLAMA31).unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.bos_token_id, Some(128000));
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
        let got = c.rope_inv_freq();
        assert_eq!(got.len(), 64);

        // Meta's reference `apply_scaling` (llama3 repo), written independently as a
        // three-way branch on the wavelength.
        let reference = |i: usize| -> f64 {
            let freq = 500000f64.powf(-(i as f64) / 64.0);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < 8192.0 / 4.0 {
                freq
            } else if wavelen > 8192.0 / 1.0 {
                freq / 8.0
            } else {
                let smooth = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 - smooth) * freq / 8.0 + smooth * freq
            }
        };
        for (i, &g) in got.iter().enumerate() {
            let want = reference(i);
            assert!(
                ((f64::from(g) - want) / want).abs() < 1e-6,
                "inv_freq[{i}] = {g}, reference {want}"
            );
        }
        // Values from Python's float math, one in each band: high (kept), medium
        // (interpolated), low (divided by 8).
        for (i, want) in [
            (28, 0.0032114459947525913),
            (30, 0.0013718935677611381),
            (34, 0.00017850781276799638),
            (35, 9.556212353964683e-05),
            (63, 3.068925988914511e-07),
        ] {
            let g = f64::from(got[i]);
            assert!(
                ((g - want) / want).abs() < 1e-6,
                "inv_freq[{i}] = {g}, want {want}"
            );
        }
        // The medium band really is interpolated: strictly between the two ends.
        let unscaled = 500000f64.powf(-30.0 / 64.0);
        assert!(f64::from(got[30]) < unscaled && f64::from(got[30]) > unscaled / 8.0);
    }

    #[test]
    fn rope_parameters_new_style() {
        let c = parse(&llama_with(
            r#"{"rope_theta": null, "rope_scaling": null, "rope_parameters":
                {"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0}}"#,
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 100.0);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
        let c = parse(&llama_with(
            r#"{"rope_theta": null, "rope_parameters": {"rope_theta": 500000.0}}"#,
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        // YaRN in the new layout, the original context defaulting to max_position_embeddings
        let c = parse(&llama_with(
            r#"{"rope_theta": null, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}"#,
        ))
        .unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 2048,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
                attention_factor: (0.1 * 4f64.ln() + 1.0) as f32,
            }
        );
    }

    #[test]
    fn gpt2_dropouts_are_named_not_silently_ignored() {
        // GPT2 has 0.1 for all three (HF's defaults)
        let c = parse(GPT2).unwrap();
        assert_eq!(c.notes.len(), 1, "{:?}", c.notes);
        assert_contains(
            &c.notes[0],
            &[
                "attn_pdrop = 0.1, resid_pdrop = 0.1, embd_pdrop = 0.1",
                "is not applied",
            ],
        );
        let c = parse(&gpt2_with(
            r#"{"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}"#,
        ))
        .unwrap();
        assert!(c.notes.is_empty(), "{:?}", c.notes);
    }

    #[test]
    fn gpt2() {
        let c = parse(GPT2).unwrap();
        assert_eq!(family(c.arch).model_types, ["gpt2"]);
        assert_eq!(c.vocab_size, 50257);
        assert_eq!(c.hidden_size, 768);
        assert_eq!(c.intermediate_size, 3072);
        assert_eq!(c.num_hidden_layers, 12);
        assert_eq!(c.num_attention_heads, 12);
        assert_eq!(c.num_key_value_heads, 12);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.max_position_embeddings, 1024);
        assert_eq!(c.norm_eps, 1e-5);
        assert!(c.tie_word_embeddings && c.attention_bias && c.mlp_bias);
        assert_eq!(c.eos_token_ids, vec![50256]);

        let c = parse(&gpt2_with(
            r#"{"n_inner": 1000, "activation_function": "gelu_pytorch_tanh",
                "tie_word_embeddings": false, "layer_norm_epsilon": 1e-6}"#,
        ))
        .unwrap();
        assert_eq!(c.intermediate_size, 1000);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.norm_eps, 1e-6);
        let c = parse(&gpt2_with(r#"{"n_inner": null}"#)).unwrap();
        assert_eq!(c.intermediate_size, 3072);
    }

    #[test]
    fn json_round_trip() {
        let c = parse(LLAMA31).unwrap();
        let again = parse(&c.to_json_string()).unwrap();
        assert_eq!(again.raw, c.raw);
        assert!(c.to_json_string().contains("\n  \"rope_theta\": 500000.0"));
    }

    #[test]
    fn bad_model_type() {
        let all = "llama, mistral, qwen2, qwen3, phi3, gemma3_text, gpt2";
        let msg = err_of(&llama_with(r#"{"model_type": "falcon"}"#));
        assert_contains(&msg, &["'falcon'", "read from 'model_type'", all]);
        let msg = err_of(&llama_with(r#"{"model_type": null}"#));
        assert_contains(&msg, &["missing 'model_type'", all]);
        let msg = err_of(&llama_with(r#"{"model_type": 7}"#));
        assert_contains(&msg, &["model_type", "7", all]);
    }

    #[test]
    fn bad_json() {
        for text in [
            "",
            "{",
            "[1, 2]",
            "\"llama\"",
            "{\"model_type\": \"llama\",}",
            "nul",
        ] {
            let msg = err_of(text);
            assert!(
                msg.contains("JSON") || msg.contains("object"),
                "{text:?} gave {msg}"
            );
        }
    }

    #[test]
    fn bad_rope_scaling() {
        for kind in ["dynamic", "proportional", "ntk"] {
            let msg = err_of(&llama_with(&format!(
                r#"{{"rope_scaling": {{"rope_type": "{kind}", "factor": 2.0}}}}"#
            )));
            assert_contains(
                &msg,
                &[
                    kind,
                    "not supported",
                    "default, linear, llama3, longrope",
                    "yarn",
                ],
            );
        }
        // LongRoPE: both factor lists, head_dim / 2 positive numbers each
        let msg = err_of(&llama_with(
            r#"{"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}"#,
        ));
        assert_contains(&msg, &["rope_scaling.short_factor", "missing"]);
        let msg = err_of(&llama_with(
            r#"{"rope_scaling": {"rope_type": "longrope", "short_factor": [1, -2],
                "long_factor": [1, 2]}}"#,
        ));
        assert_contains(&msg, &["rope_scaling.short_factor", "positive numbers"]);
        let msg = err_of(&llama_with(
            r#"{"rope_scaling": {"rope_type": "longrope", "short_factor": [1, 2],
                "long_factor": [1, 2]}}"#,
        ));
        assert_contains(&msg, &["short_factor has 2 values", "needs"]);
        let msg = err_of(&llama_with(r#"{"rope_scaling": {"factor": 2.0}}"#));
        assert_contains(&msg, &["rope_type", "default, linear, llama3"]);
        let msg = err_of(&llama_with(r#"{"rope_scaling": {"type": "linear"}}"#));
        assert_contains(&msg, &["rope_scaling.factor", "missing"]);
        let msg = err_of(&llama_with(
            r#"{"rope_scaling": {"type": "linear", "factor": 0}}"#,
        ));
        assert_contains(&msg, &["rope_scaling.factor", "positive"]);
        let msg = err_of(&llama_with(
            r#"{"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0}}"#,
        ));
        assert_contains(&msg, &["rope_scaling.original_max_position_embeddings"]);
        let msg = err_of(&llama_with(
            r#"{"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#,
        ));
        assert_contains(&msg, &["high_freq_factor > low_freq_factor"]);
        let msg = err_of(&llama_with(r#"{"rope_scaling": "linear"}"#));
        assert_contains(&msg, &["rope_scaling", "an object", "\"linear\""]);
        let msg = err_of(&llama_with(r#"{"rope_theta": "10000"}"#));
        assert_contains(&msg, &["rope_theta", "a number", "\"10000\""]);
        let msg = err_of(&llama_with(r#"{"rope_theta": 1e300}"#));
        assert_contains(&msg, &["rope_theta", "fits in f32"]);
        let msg = err_of(&llama_with(r#"{"partial_rotary_factor": 0.5}"#));
        assert_contains(&msg, &["partial_rotary_factor", "0.5"]);
    }

    /// Qwen2.5-7B-Instruct's config.json with the `rope_scaling` its model card gives for
    /// contexts past 32768 tokens.
    const QWEN25_YARN: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"],
      "attention_dropout": 0.0,
      "bos_token_id": 151643,
      "eos_token_id": 151645,
      "hidden_act": "silu",
      "hidden_size": 3584,
      "initializer_range": 0.02,
      "intermediate_size": 18944,
      "max_position_embeddings": 32768,
      "max_window_layers": 28,
      "model_type": "qwen2",
      "num_attention_heads": 28,
      "num_hidden_layers": 28,
      "num_key_value_heads": 4,
      "rms_norm_eps": 1e-06,
      "rope_theta": 1000000.0,
      "sliding_window": 131072,
      "tie_word_embeddings": false,
      "torch_dtype": "bfloat16",
      "transformers_version": "4.43.1",
      "use_cache": true,
      "use_sliding_window": false,
      "vocab_size": 152064,
      "rope_scaling": {
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
        "type": "yarn"
      }
    }"#;

    /// `QWEN25_YARN` with `extra` merged over its top level and `scaling` over its
    /// `rope_scaling`.
    fn qwen25_yarn_with(extra: &str, scaling: &str) -> String {
        let mut base: Value = serde_json::from_str(QWEN25_YARN).unwrap();
        for (k, v) in serde_json::from_str::<Value>(extra)
            .unwrap()
            .as_object()
            .unwrap()
        {
            base[k] = v.clone();
        }
        for (k, v) in serde_json::from_str::<Value>(scaling)
            .unwrap()
            .as_object()
            .unwrap()
        {
            base["rope_scaling"][k] = v.clone();
        }
        base.to_string()
    }

    /// `got` (lema's inverse frequencies) at `want`'s indices against transformers 5.24's
    /// `_compute_yarn_parameters` (f32, printed by `repr`), to 1e-6 relative.
    fn assert_inv_freq(got: &[f32], want: &[(usize, f64)]) {
        for &(i, w) in want {
            let g = f64::from(got[i]);
            assert!(
                ((g - w) / w).abs() < 1e-6,
                "inv_freq[{i}] = {g}, transformers {w}"
            );
        }
    }

    #[test]
    fn qwen25_yarn_rope_scaling_as_transformers() {
        let c = parse(QWEN25_YARN).unwrap();
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 32768,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
                attention_factor: 1.138_629_4,
            }
        );
        let scale = f64::from(c.attention_scale());
        assert!((scale - 1.138629436111989f64.powi(2) / 128f64.sqrt()).abs() < 1e-7);
        let got = c.rope_inv_freq();
        assert_eq!(got.len(), 64);
        // kept (0 ..= 23), blended (24 ..= 39), divided by 4 (40 ..)
        assert_inv_freq(
            &got,
            &[
                (0, 1.0),
                (20, 0.01333521492779255),
                (21, 0.010746078565716743),
                (22, 0.00865964312106371),
                (25, 0.004131738096475601),
                (28, 0.0018482765881344676),
                (29, 0.0014051124453544617),
                (40, 4.4456985051510856e-05),
                (63, 3.102344408034696e-07),
            ],
        );
        // the same in the transformers-5 layout
        let mut v: Value = serde_json::from_str(QWEN25_YARN).unwrap();
        let mut p = v["rope_scaling"].take();
        p["rope_type"] = p["type"].take();
        p["rope_theta"] = v["rope_theta"].take();
        v["rope_parameters"] = p;
        let new = parse(&v.to_string()).unwrap();
        assert_eq!(new.rope_scaling, c.rope_scaling);
        assert_eq!(new.rope_inv_freq(), got);

        // a top-level original_max_position_embeddings wins over the one inside
        let c = parse(&qwen25_yarn_with(
            r#"{"original_max_position_embeddings": 8192}"#,
            "{}",
        ))
        .unwrap();
        assert_inv_freq(
            &c.rope_inv_freq(),
            &[
                (21, 0.00884971208870411),
                (23, 0.005131107289344072),
                (26, 0.0022017851006239653),
                (27, 0.0016444651409983635),
                (40, 4.4456985051510856e-05),
            ],
        );
        // DeepSeek-style: factor null (max / original), mscale over mscale_all_dim, other
        // betas, no truncation
        let c = parse(&qwen25_yarn_with(
            r#"{"max_position_embeddings": 131072}"#,
            r#"{"factor": null, "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16,
                "beta_slow": 2, "truncate": false}"#,
        ))
        .unwrap();
        let RopeScaling::Yarn {
            factor,
            attention_factor,
            truncate,
            ..
        } = c.rope_scaling
        else {
            panic!("{:?}", c.rope_scaling)
        };
        assert_eq!((factor, truncate), (4.0, false));
        assert!((f64::from(attention_factor) - 0.964326914892074).abs() < 1e-7);
        assert_inv_freq(
            &c.rope_inv_freq(),
            &[
                (21, 0.010746078565716743),
                (23, 0.006978305988013744),
                (25, 0.004531583748757839),
                (27, 0.002898493316024542),
                (29, 0.001584663288667798),
                (40, 4.4456985051510856e-05),
            ],
        );
        // a given attention factor is taken as it is
        let c = parse(&qwen25_yarn_with("{}", r#"{"attention_factor": 0.9}"#)).unwrap();
        assert!((f64::from(c.attention_scale()) - 0.81 / 128f64.sqrt()).abs() < 1e-7);
        // Phi-3 reads a legacy "yarn" as LongRoPE, as Phi3Config does
        let mut v: Value = serde_json::from_str(&qwen25_yarn_with("{}", "{}")).unwrap();
        v["model_type"] = "phi3".into();
        let msg = err_of(&v.to_string());
        assert_contains(&msg, &["rope_scaling.short_factor", "missing"]);
    }

    #[test]
    fn bad_yarn_settings_are_named() {
        let bad = |scaling: &str| err_of(&qwen25_yarn_with("{}", scaling));
        let mut v: Value = serde_json::from_str(QWEN25_YARN).unwrap();
        v["rope_scaling"].as_object_mut().unwrap().remove("factor");
        assert_contains(
            &err_of(&v.to_string()),
            &["missing required field 'rope_scaling.factor'"],
        );
        for factor in ["0", "-2", "0.5"] {
            let msg = bad(&format!(r#"{{"factor": {factor}}}"#));
            assert_contains(&msg, &["'rope_scaling.factor'", ">= 1", factor]);
        }
        assert_contains(
            &bad(r#"{"factor": "4"}"#),
            &["'rope_scaling.factor'", "a number"],
        );
        assert_contains(
            &bad(r#"{"beta_fast": 1, "beta_slow": 2}"#),
            &["beta_fast >= beta_slow", "found 1 and 2"],
        );
        assert_contains(
            &bad(r#"{"beta_slow": -1}"#),
            &["'rope_scaling.beta_slow'", "positive", "-1"],
        );
        for a in ["0", "-1.5"] {
            let msg = bad(&format!(r#"{{"attention_factor": {a}}}"#));
            assert_contains(&msg, &["'rope_scaling.attention_factor'", "positive", a]);
        }
        assert_contains(
            &bad(r#"{"original_max_position_embeddings": 0}"#),
            &["rope_scaling.original_max_position_embeddings", "> 0"],
        );
        assert_contains(
            &bad(r#"{"truncate": "yes"}"#),
            &["rope_scaling.truncate", "true or false"],
        );
        assert_contains(
            &err_of(&qwen25_yarn_with(r#"{"rope_theta": 1.0}"#, "{}")),
            &["YaRN needs rope_theta > 1", "found 1"],
        );
    }

    #[test]
    fn bad_llama_fields() {
        let msg = err_of(&llama_with(r#"{"hidden_act": "gelu"}"#));
        assert_contains(&msg, &["hidden_act 'gelu'", "silu"]);
        let msg = err_of(&llama_with(r#"{"hidden_size": "2048"}"#));
        assert_contains(&msg, &["'hidden_size'", "non-negative integer", "\"2048\""]);
        let msg = err_of(&llama_with(r#"{"hidden_size": 2048.5}"#));
        assert_contains(&msg, &["'hidden_size'", "2048.5"]);
        let msg = err_of(&llama_with(r#"{"num_hidden_layers": -3}"#));
        assert_contains(&msg, &["'num_hidden_layers'", "-3"]);
        let msg = err_of(&llama_with(r#"{"vocab_size": null}"#));
        assert_contains(&msg, &["missing required field 'vocab_size'"]);
        for field in [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "head_dim",
        ] {
            let msg = err_of(&llama_with(&format!(r#"{{"{field}": 0}}"#)));
            assert_contains(&msg, &[field, "must be > 0"]);
        }
        let msg = err_of(&llama_with(r#"{"num_key_value_heads": 5}"#));
        assert_contains(
            &msg,
            &["num_attention_heads = 32", "num_key_value_heads = 5"],
        );
        let msg = err_of(&llama_with(r#"{"hidden_size": 2050}"#));
        assert_contains(
            &msg,
            &[
                "hidden_size = 2050",
                "not divisible",
                "num_attention_heads = 32",
            ],
        );
        let msg = err_of(&llama_with(r#"{"head_dim": 63}"#));
        assert_contains(&msg, &["head_dim = 63", "odd"]);
        let msg = err_of(&llama_with(r#"{"tie_word_embeddings": "yes"}"#));
        assert_contains(&msg, &["tie_word_embeddings", "true or false"]);
        let msg = err_of(&llama_with(r#"{"eos_token_id": [2, "x"]}"#));
        assert_contains(&msg, &["eos_token_id", "\"x\""]);
        let msg = err_of(&llama_with(r#"{"bos_token_id": 5000000000}"#));
        assert_contains(&msg, &["bos_token_id", "5000000000"]);
        let msg = err_of(&llama_with(r#"{"rms_norm_eps": -1e-5}"#));
        assert_contains(&msg, &["rms_norm_eps", "positive"]);
    }

    /// The published parameter counts, less the norms and biases that the count leaves
    /// out: TinyLlama-1.1B has 1,100,048,384 (norms: 45 × 2048), GPT-2 124,439,808
    /// (norms and biases: 121,344).
    #[test]
    fn implied_parameters_match_published_counts() {
        let tiny = parse(TINYLLAMA).unwrap();
        assert_eq!(tiny.implied_parameters(), Some(1_100_048_384 - 45 * 2048));
        let gpt2 = parse(GPT2).unwrap();
        assert_eq!(gpt2.implied_parameters(), Some(124_439_808 - 121_344));
    }

    #[test]
    fn sizes_no_model_has_are_refused() {
        let msg = err_of(&llama_with(r#"{"hidden_size": 4611686018427387904}"#));
        assert_contains(
            &msg,
            &[
                "hidden_size = 4611686018427387904",
                "imply more than 2^64 weights",
                "check these sizes",
            ],
        );
        // 2^47 · 2048 · 2 (untied head): far over 2^48, no overflow
        let msg = err_of(&llama_with(r#"{"vocab_size": 140737488355328}"#));
        assert_contains(
            &msg,
            &["vocab_size = 140737488355328", "more than the 2^48"],
        );
        let msg = err_of(&gpt2_with(r#"{"n_layer": 1000000000}"#));
        assert_contains(&msg, &["n_layer = 1000000000", "more than the 2^48"]);
        // a model far larger than any real one is still a model
        assert!(parse(&llama_with(r#"{"num_hidden_layers": 6000}"#)).is_ok());
    }

    #[test]
    fn bad_gpt2_fields() {
        let msg = err_of(&gpt2_with(r#"{"activation_function": "relu"}"#));
        assert_contains(&msg, &["activation_function 'relu'", "gelu_new"]);
        let msg = err_of(&gpt2_with(r#"{"scale_attn_by_inverse_layer_idx": true}"#));
        assert_contains(&msg, &["scale_attn_by_inverse_layer_idx", "not supported"]);
        let msg = err_of(&gpt2_with(r#"{"reorder_and_upcast_attn": true}"#));
        assert_contains(&msg, &["reorder_and_upcast_attn", "not supported"]);
        let msg = err_of(&gpt2_with(r#"{"scale_attn_weights": false}"#));
        assert_contains(&msg, &["scale_attn_weights", "not supported"]);
        let msg = err_of(&gpt2_with(r#"{"n_embd": 770}"#));
        assert_contains(&msg, &["n_embd = 770", "n_head = 12"]);
        let msg = err_of(&gpt2_with(r#"{"n_head": "12"}"#));
        assert_contains(&msg, &["'n_head'", "\"12\""]);
        let msg = err_of(&gpt2_with(r#"{"n_layer": 0}"#));
        assert_contains(&msg, &["n_layer", "> 0"]);
        let msg = err_of(&gpt2_with(r#"{"n_positions": null}"#));
        assert_contains(&msg, &["missing required field 'n_positions'"]);
        // The disabled options are fine when false.
        parse(&gpt2_with(
            r#"{"scale_attn_by_inverse_layer_idx": false, "reorder_and_upcast_attn": false,
                "scale_attn_weights": true}"#,
        ))
        .unwrap();
    }

    #[test]
    fn any_json_value_does_not_panic() {
        // Every field of both configs replaced by values of every JSON type.
        let values = [
            "null",
            "true",
            "-1",
            "0",
            "1",
            "1.5",
            "1e400",
            "\"s\"",
            "[]",
            "[1]",
            "{}",
            "{\"type\": \"llama3\"}",
        ];
        for base in [TINYLLAMA, LLAMA31, GPT2] {
            let obj: Value = serde_json::from_str(base).unwrap();
            for key in obj.as_object().unwrap().keys() {
                for v in values {
                    let mut o = obj.clone();
                    o[key.as_str()] = match serde_json::from_str(v) {
                        Ok(v) => v,
                        Err(_) => continue, // 1e400 is not representable
                    };
                    let _ = parse(&o.to_string());
                }
            }
        }
    }
}
