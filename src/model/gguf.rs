//! What a llama.cpp GGUF file of an architecture looks like, as data: one [`GgufArch`] per
//! `general.architecture`, defined beside the architecture's model definition (a `GGUF`
//! const in `llama.rs`, `qwen2.rs`, …) and found through [`for_architecture`]. The generic
//! converter (`import::gguf_convert`) reads a file by its description: the tensor name map
//! (llama.cpp's `gguf-py/gguf/constants.py` names), whether q/k rows are permuted, the norm
//! offset, the tokenizer's flavour and the config.json the family needs.
//!
//! The model layer does not read GGUF files: the converter fills a [`GgufMeta`] from the
//! `{arch}.*` keys and the description turns it into config.json.

use serde_json::{Map, Value};

/// A size a tensor dimension must have, from the metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    /// `embedding_length`.
    Hidden,
    /// The token list's length.
    Vocab,
    /// `feed_forward_length`.
    Ffn,
    /// 2 · `feed_forward_length` (a fused gate|up projection).
    Ffn2,
    /// heads · head_dim.
    Q,
    /// kv heads · head_dim.
    Kv,
    /// (heads + 2 · kv heads) · head_dim (a fused q|k|v projection).
    Qkv,
    /// head_dim (per-head q/k norms).
    HeadDim,
}

/// Whether a block tensor must be present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// In every block.
    Required,
    /// In every block or in none (biases some checkpoints of the family have).
    Optional,
}

/// Which q/k rows a tensor has, for the files whose q/k rows are permuted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Rows in HF order.
    Plain,
    /// Query heads (`attn_q`), permuted when the description says so.
    QueryHeads,
    /// Key heads (`attn_k`), permuted when the description says so.
    KeyHeads,
}

/// One tensor of a block: `blk.N.<gguf>.<suffix>` is `<block prefix><hf>.<suffix>`.
#[derive(Clone, Copy, Debug)]
pub struct GgufTensor {
    /// llama.cpp's name inside the block (`attn_q`), without `.weight` / `.bias`.
    pub gguf: &'static str,
    /// HF's name inside the block (`self_attn.q_proj`).
    pub hf: &'static str,
    /// `weight` or `bias`.
    pub suffix: &'static str,
    /// The HF shape (rows first).
    pub shape: &'static [Dim],
    pub need: Need,
    pub rows: Rows,
}

/// How a SentencePiece (`tokenizer.ggml.model = llama`) vocabulary becomes BPE merges:
/// the file lists no merges, so they are derived from the vocabulary as transformers'
/// GGUF tokenizer builder does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpmFlavor {
    /// Llama / Phi-3: merges ranked by the score of the merged piece, pieces of normal and
    /// user-defined tokens only (`SentencePieceExtractor`).
    Llama,
    /// Gemma: tokens of whitespace with a space are respelled as that many `▁`, merges
    /// ranked by the merged piece's position in the file (Gemma's scores do not follow its
    /// merge order) over every token, a later duplicate wins (transformers'
    /// `gemma_tokenizer` + `generate_merges`).
    Gemma,
}

/// The metadata a description needs, read by the converter from `{arch}.*` and
/// `tokenizer.*` keys and already checked (heads divide, head_dim even, …).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufMeta {
    /// `general.name`, when present.
    pub name: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// `attention.key_length`, else hidden / heads.
    pub head_dim: usize,
    /// `context_length`.
    pub max_position_embeddings: usize,
    /// `attention.layer_norm_rms_epsilon`.
    pub rms_norm_eps: f32,
    /// `rope.freq_base` (10000 when absent).
    pub rope_theta: f32,
    /// `rope.scaling.factor` when `rope.scaling.type` is `linear` (other types are refused
    /// when read).
    pub rope_linear_factor: Option<f32>,
    /// `rope.scaling.original_context_length`.
    pub rope_original_context: Option<usize>,
    /// `attention.sliding_window` (0 counts as absent).
    pub sliding_window: Option<usize>,
    /// `attention.sliding_window_pattern`: which layers slide, when the file says.
    pub sliding_layers: Option<Vec<bool>>,
    /// `final_logit_softcapping`.
    pub final_logit_softcapping: Option<f32>,
    /// `attn_logit_softcapping`.
    pub attn_logit_softcapping: Option<f32>,
    /// `attention.scale` (the factor on q·k), when the file sets one.
    pub attention_scale: Option<f32>,
    /// Whether the file has q/k/v biases (`blk.0.attn_q.bias`).
    pub attention_bias: bool,
}

/// How to read a GGUF file of one architecture.
#[derive(Debug)]
pub struct GgufArch {
    /// `general.architecture`.
    pub arch: &'static str,
    /// The block tensors (`blk.N.…` is `model.layers.N.…`); the embedding, final norm and
    /// head are [`GLOBALS`].
    pub tensors: &'static [GgufTensor],
    /// q/k rows reordered by `convert_hf_to_gguf.py`'s `permute` (only llama-arch files).
    pub permute_qk: bool,
    /// Stored `*norm.weight` = HF weight + this (Gemma: 1); the converter subtracts it.
    pub norm_offset: f32,
    /// How a SentencePiece vocabulary is rebuilt.
    pub spm: SpmFlavor,
    /// The chat template written when the file has none, with why, for the note.
    pub fallback_chat_template: Option<(&'static str, &'static str)>,
    /// Tensors llama.cpp writes that this converter refuses, with why (`rope_freqs`).
    pub refused: &'static [(&'static str, &'static str)],
    /// config.json's architecture-specific keys (`model_type`, `architectures`, the RoPE,
    /// window and activation keys); the converter adds the sizes, tokens, tie and dtype.
    pub config: fn(&GgufMeta) -> Result<Map<String, Value>, String>,
}

/// The tensors outside the blocks, shared by these architectures: GGUF name, HF name,
/// shape. `output.weight` is absent from tied files.
pub const GLOBALS: &[(&str, &str, &[Dim])] = &[
    (
        "token_embd.weight",
        "model.embed_tokens.weight",
        &[Dim::Vocab, Dim::Hidden],
    ),
    ("output_norm.weight", "model.norm.weight", &[Dim::Hidden]),
    (
        "output.weight",
        "lm_head.weight",
        &[Dim::Vocab, Dim::Hidden],
    ),
];

/// A required, unpermuted weight.
pub const fn weight(gguf: &'static str, hf: &'static str, shape: &'static [Dim]) -> GgufTensor {
    GgufTensor {
        gguf,
        hf,
        suffix: "weight",
        shape,
        need: Need::Required,
        rows: Rows::Plain,
    }
}

const fn bias(gguf: &'static str, hf: &'static str, shape: &'static [Dim]) -> GgufTensor {
    GgufTensor {
        gguf,
        hf,
        suffix: "bias",
        shape,
        need: Need::Optional,
        rows: Rows::Plain,
    }
}

const fn rows(t: GgufTensor, rows: Rows) -> GgufTensor {
    GgufTensor { rows, ..t }
}

/// `t` in every block.
pub const fn required(t: GgufTensor) -> GgufTensor {
    GgufTensor {
        need: Need::Required,
        ..t
    }
}

// The block tensors by llama.cpp name (gguf-py `MODEL_TENSOR` → `TENSOR_NAMES`), with the
// HF module each is in `tensor_mapping.py`.
pub const ATTN_NORM: GgufTensor = weight("attn_norm", "input_layernorm", &[Dim::Hidden]);
pub const ATTN_Q: GgufTensor = rows(
    weight("attn_q", "self_attn.q_proj", &[Dim::Q, Dim::Hidden]),
    Rows::QueryHeads,
);
pub const ATTN_K: GgufTensor = rows(
    weight("attn_k", "self_attn.k_proj", &[Dim::Kv, Dim::Hidden]),
    Rows::KeyHeads,
);
pub const ATTN_V: GgufTensor = weight("attn_v", "self_attn.v_proj", &[Dim::Kv, Dim::Hidden]);
pub const ATTN_OUT: GgufTensor = weight("attn_output", "self_attn.o_proj", &[Dim::Hidden, Dim::Q]);
pub const Q_BIAS: GgufTensor = rows(
    bias("attn_q", "self_attn.q_proj", &[Dim::Q]),
    Rows::QueryHeads,
);
pub const K_BIAS: GgufTensor = rows(
    bias("attn_k", "self_attn.k_proj", &[Dim::Kv]),
    Rows::KeyHeads,
);
pub const V_BIAS: GgufTensor = bias("attn_v", "self_attn.v_proj", &[Dim::Kv]);
pub const O_BIAS: GgufTensor = bias("attn_output", "self_attn.o_proj", &[Dim::Hidden]);
/// Per-head q/k RMSNorm (Qwen3, Gemma 3).
pub const Q_NORM: GgufTensor = weight("attn_q_norm", "self_attn.q_norm", &[Dim::HeadDim]);
pub const K_NORM: GgufTensor = weight("attn_k_norm", "self_attn.k_norm", &[Dim::HeadDim]);
/// Phi-3's fused `[q | k | v]` rows (never permuted).
pub const ATTN_QKV: GgufTensor = weight("attn_qkv", "self_attn.qkv_proj", &[Dim::Qkv, Dim::Hidden]);
pub const FFN_GATE: GgufTensor = weight("ffn_gate", "mlp.gate_proj", &[Dim::Ffn, Dim::Hidden]);
pub const FFN_UP: GgufTensor = weight("ffn_up", "mlp.up_proj", &[Dim::Ffn, Dim::Hidden]);
/// Phi-3's `ffn_up` is the fused `[gate | up]`, 2·I rows.
pub const FFN_GATE_UP: GgufTensor = weight("ffn_up", "mlp.gate_up_proj", &[Dim::Ffn2, Dim::Hidden]);
pub const FFN_DOWN: GgufTensor = weight("ffn_down", "mlp.down_proj", &[Dim::Hidden, Dim::Ffn]);
/// The norm before the MLP: HF's `post_attention_layernorm` in Llama-style blocks.
pub const FFN_NORM: GgufTensor = weight("ffn_norm", "post_attention_layernorm", &[Dim::Hidden]);

/// Every description, in the order messages list them.
pub fn all() -> Vec<&'static GgufArch> {
    let mut v: Vec<&'static GgufArch> = Vec::new();
    // Mistral shares Llama's description (llama.cpp writes Mistral as `llama`).
    for d in super::family::ARCHS
        .iter()
        .filter_map(|&a| super::family::family(a).gguf)
    {
        if !v.iter().any(|x| x.arch == d.arch) {
            v.push(d);
        }
    }
    v
}

/// The description of `general.architecture == arch`.
pub fn for_architecture(arch: &str) -> Option<&'static GgufArch> {
    all().into_iter().find(|d| d.arch == arch)
}

/// The `general.architecture` values that can be converted, for messages.
pub fn supported_architectures() -> String {
    all().iter().map(|d| d.arch).collect::<Vec<_>>().join(", ")
}

/// A float as JSON, printed at f32 precision (1e-5, not 9.99999974e-6).
pub fn json_f32(x: f32) -> Value {
    format!("{x}")
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// config.json's `rope_scaling` for [`GgufMeta::rope_linear_factor`] (`null`: none).
pub fn linear_rope_scaling(m: &GgufMeta) -> Value {
    match m.rope_linear_factor {
        Some(f) => serde_json::json!({"rope_type": "linear", "factor": json_f32(f)}),
        None => Value::Null,
    }
}

/// The keys of a Qwen2/Qwen3 config.json that turn the sliding window off: llama.cpp
/// writes no window for them (and applies none).
pub fn qwen_no_window(m: &GgufMeta) -> Vec<(&'static str, Value)> {
    vec![
        ("use_sliding_window", Value::Bool(false)),
        ("sliding_window", Value::Null),
        ("max_window_layers", serde_json::json!(m.num_hidden_layers)),
    ]
}

/// An object of `pairs`.
pub fn object(pairs: Vec<(&str, Value)>) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The config.json keys a SwiGLU RoPE decoder written from a GGUF always has: its
/// `model_type` and class, SiLU, the RoPE base and a linear scaling if any, then `extra`.
pub fn swiglu_config(
    model_type: &str,
    class: &str,
    m: &GgufMeta,
    extra: Vec<(&str, Value)>,
) -> Map<String, Value> {
    let mut c = object(vec![
        ("model_type", serde_json::json!(model_type)),
        ("architectures", serde_json::json!([class])),
        ("hidden_act", serde_json::json!("silu")),
        ("rope_theta", json_f32(m.rope_theta)),
        ("rope_scaling", linear_rope_scaling(m)),
    ]);
    c.extend(object(extra));
    c
}
