//! Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections (not on o
//! or the MLP), under Llama's tensor names. Sliding-window attention when the config
//! turns it on (`use_sliding_window`, from layer `max_window_layers` on).

use super::family::{Family, Sliding};
use super::gguf::{self as g, GgufArch, GgufMeta};
use super::{ArchDef, llama};
use serde_json::{Map, Value};

/// What lema asks of Qwen2 outside the model.
pub static FAMILY: Family = Family {
    model_types: &["qwen2"],
    sliding: Sliding::OptIn,
    default_max_positions: 32768,
    gguf: Some(&GGUF),
    ..llama::FAMILY
};

/// Qwen2's definition: Llama's, with q/k/v biases.
pub static DEF: ArchDef = ArchDef {
    family: &FAMILY,
    linears: |c| llama::linears_with(c, true, false),
    ..llama::DEF
};

/// llama.cpp's `qwen2` files: Llama's names with q/k/v biases in every block, rows as HF
/// has them (only `llama` files are permuted).
pub static GGUF: GgufArch = GgufArch {
    arch: "qwen2",
    tensors: &[
        g::ATTN_NORM,
        g::ATTN_Q,
        g::ATTN_K,
        g::ATTN_V,
        g::ATTN_OUT,
        g::FFN_GATE,
        g::FFN_UP,
        g::FFN_DOWN,
        g::FFN_NORM,
        g::required(g::Q_BIAS),
        g::required(g::K_BIAS),
        g::required(g::V_BIAS),
    ],
    permute_qk: false,
    norm_offset: 0.0,
    spm: g::SpmFlavor::Llama,
    fallback_chat_template: None,
    refused: &[],
    config: gguf_config,
};

fn gguf_config(m: &GgufMeta) -> std::result::Result<Map<String, Value>, String> {
    Ok(g::swiglu_config(
        "qwen2",
        "Qwen2ForCausalLM",
        m,
        g::qwen_no_window(m),
    ))
}
