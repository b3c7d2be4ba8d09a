//! Qwen3 (dense): the Llama block with an RMSNorm over each head of q and k after their
//! projections and before RoPE (`self_attn.q_norm`, `self_attn.k_norm`, weights `[D]`),
//! and `head_dim` set apart from hidden / heads. `attention_bias` puts biases on q, k, v
//! and o, as Llama's does.

use super::decoder::{BlockDesc, NormKind, QkNorm};
use super::family::{Family, Sliding};
use super::gguf::{self as g, GgufArch, GgufMeta};
use super::{ArchDef, Model, TensorSpec, llama};
use serde_json::{Map, Value, json};

/// What lema asks of Qwen3 outside the model.
pub static FAMILY: Family = Family {
    model_types: &["qwen3"],
    sliding: Sliding::OptIn,
    default_max_positions: 32768,
    gguf: Some(&GGUF),
    ..llama::FAMILY
};

/// Qwen3's definition: Llama's, with per-head q/k norms.
pub static DEF: ArchDef = ArchDef {
    family: &FAMILY,
    tensor_specs,
    block,
    ..llama::DEF
};

const Q_NORM: &str = "self_attn.q_norm";
const K_NORM: &str = "self_attn.k_norm";

fn tensor_specs(m: &Model) -> Vec<TensorSpec> {
    let d = m.config().head_dim;
    llama::tensor_specs_with(
        m,
        &[
            ("self_attn.q_norm.weight", vec![d]),
            ("self_attn.k_norm.weight", vec![d]),
        ],
    )
}

fn block(m: &Model, layer: usize) -> BlockDesc<'_> {
    llama::block_with(
        m,
        layer,
        Some(QkNorm {
            q: Q_NORM,
            k: K_NORM,
            kind: NormKind::Rms,
            eps: m.config().norm_eps,
        }),
    )
}

/// llama.cpp's `qwen3` files: Llama's names plus `attn_q_norm` / `attn_k_norm` (`[D]`), rows
/// as HF has them, `attention.key_length` the head_dim.
pub static GGUF: GgufArch = GgufArch {
    arch: "qwen3",
    tensors: &[
        g::ATTN_NORM,
        g::ATTN_Q,
        g::ATTN_K,
        g::ATTN_V,
        g::ATTN_OUT,
        g::Q_NORM,
        g::K_NORM,
        g::FFN_GATE,
        g::FFN_UP,
        g::FFN_DOWN,
        g::FFN_NORM,
        g::Q_BIAS,
        g::K_BIAS,
        g::V_BIAS,
        g::O_BIAS,
    ],
    permute_qk: false,
    norm_offset: 0.0,
    spm: g::SpmFlavor::Llama,
    fallback_chat_template: None,
    refused: &[],
    config: gguf_config,
};

fn gguf_config(m: &GgufMeta) -> std::result::Result<Map<String, Value>, String> {
    let mut extra = vec![("attention_bias", json!(m.attention_bias))];
    extra.extend(g::qwen_no_window(m));
    Ok(g::swiglu_config("qwen3", "Qwen3ForCausalLM", m, extra))
}
