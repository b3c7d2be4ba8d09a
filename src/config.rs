//! Model configuration read from the Hugging Face `config.json` beside the weights.

use crate::error::{Error, Result};
use std::path::Path;

/// Supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama family (Llama 2/3, SmolLM, TinyLlama, Mistral-style GQA).
    Llama,
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
    /// The parsed config.json, kept so it can be written back unchanged.
    pub raw: serde_json::Value,
}

impl ModelConfig {
    /// Read and validate a config.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse and validate config.json text; `path` is used in messages only.
    pub fn from_json_str(_text: &str, path: &Path) -> Result<Self> {
        Err(Error::format(path, "config parsing not implemented yet"))
    }
}
