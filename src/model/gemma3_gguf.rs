//! llama.cpp's `gemma3` files (Gemma 3 text): the tensor names, the (1 + w) norms, the
//! SentencePiece flavour, and the `gemma3_text` config.json. Kept apart from the Gemma 3
//! model definition (`gemma3.rs`), which its `Family` points here from.
//!
//! What llama.cpp leaves out of the file, and where the config takes it from
//! (`llama-model.cpp`, `LLM_ARCH_GEMMA3`):
//! * which layers slide: `attention.sliding_window_pattern` when present (a period n —
//!   layer i slides when i mod n < n − 1 — or one bool per layer), else llama.cpp's fixed
//!   pattern of 6 (five sliding layers, then a global one);
//! * the local layers' RoPE: base 10000, no scaling (`rope_freq_base_train_swa`); the
//!   global layers use `rope.freq_base` and `rope.scaling.*`;
//! * the query scale: `attention.scale` when present, else 1/√head_dim, or 1/√(hidden /
//!   heads) for the 62-layer 27B — as `query_pre_attn_scalar` (scale = its −½ power).

use super::gguf::{self as g, Dim, GgufArch, GgufMeta, SpmFlavor};
use serde_json::{Map, Value, json};

/// Gemma 3's instruction template (as `google/gemma-3-*-it` ship it), written when a file
/// has no `tokenizer.chat_template` (the base models' files have none).
pub const CHAT_TEMPLATE: &str = include_str!("gemma3_chat_template.jinja");

/// The description of `gemma3` files.
pub static GGUF: GgufArch = GgufArch {
    arch: "gemma3",
    tensors: &[
        g::ATTN_NORM,
        g::ATTN_Q,
        g::ATTN_K,
        g::ATTN_V,
        g::ATTN_OUT,
        g::Q_NORM,
        g::K_NORM,
        g::weight(
            "post_attention_norm",
            "post_attention_layernorm",
            &[Dim::Hidden],
        ),
        g::weight("ffn_norm", "pre_feedforward_layernorm", &[Dim::Hidden]),
        g::weight(
            "post_ffw_norm",
            "post_feedforward_layernorm",
            &[Dim::Hidden],
        ),
        g::FFN_GATE,
        g::FFN_UP,
        g::FFN_DOWN,
    ],
    permute_qk: false,
    // convert_hf_to_gguf.py's Gemma3Model stores every `*norm.weight` as w + 1
    norm_offset: 1.0,
    spm: SpmFlavor::Gemma,
    fallback_chat_template: Some((
        CHAT_TEMPLATE,
        "Gemma 3's instruction template (google/gemma-3-*-it); a base model was not trained on it",
    )),
    refused: &[],
    config: gguf_config,
};

/// llama.cpp's sliding-window period for Gemma 3 (`hparams.set_swa_pattern(6)`).
const SWA_PERIOD: usize = 6;
/// The local layers' RoPE base (`rope_freq_base_train_swa`).
const LOCAL_ROPE_THETA: f32 = 10_000.0;

fn gguf_config(m: &GgufMeta) -> std::result::Result<Map<String, Value>, String> {
    if let Some(c) = m.attn_logit_softcapping {
        return Err(format!(
            "gemma3.attn_logit_softcapping = {c}: Gemma 3 has no attention soft-cap"
        ));
    }
    let window = m
        .sliding_window
        .ok_or("metadata 'gemma3.attention.sliding_window' is missing (llama.cpp requires it)")?;
    let sliding = match &m.sliding_layers {
        Some(s) if s.len() == m.num_hidden_layers => s.clone(),
        Some(s) => {
            return Err(format!(
                "gemma3.attention.sliding_window_pattern has {} entries for {} layers",
                s.len(),
                m.num_hidden_layers
            ));
        }
        None => (0..m.num_hidden_layers)
            .map(|i| i % SWA_PERIOD < SWA_PERIOD - 1)
            .collect(),
    };
    let layer_types: Vec<&str> = sliding
        .iter()
        .map(|&s| {
            if s {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    let mut full = json!({"rope_type": "default", "rope_theta": g::json_f32(m.rope_theta)});
    if let Some(f) = m.rope_linear_factor {
        full = json!({"rope_type": "linear", "factor": g::json_f32(f), "rope_theta": g::json_f32(m.rope_theta)});
    }
    let query_pre_attn_scalar = match m.attention_scale {
        Some(s) if s > 0.0 => {
            let q = 1.0 / (f64::from(s) * f64::from(s));
            if (q - q.round()).abs() < 1e-3 {
                json!(q.round() as u64)
            } else {
                json!(q)
            }
        }
        Some(s) => return Err(format!("gemma3.attention.scale = {s} is not positive")),
        None if m.num_hidden_layers == 62 => json!(m.hidden_size / m.num_attention_heads),
        None => json!(m.head_dim),
    };
    Ok(g::object(vec![
        ("model_type", json!("gemma3_text")),
        ("architectures", json!(["Gemma3ForCausalLM"])),
        ("hidden_activation", json!("gelu_pytorch_tanh")),
        ("query_pre_attn_scalar", json!(query_pre_attn_scalar)),
        ("sliding_window", json!(window)),
        ("layer_types", json!(layer_types)),
        (
            "rope_parameters",
            json!({
                "sliding_attention": {"rope_type": "default", "rope_theta": g::json_f32(LOCAL_ROPE_THETA)},
                "full_attention": full,
            }),
        ),
        (
            "final_logit_softcapping",
            m.final_logit_softcapping
                .map(g::json_f32)
                .unwrap_or(Value::Null),
        ),
        ("attn_logit_softcapping", Value::Null),
        ("attention_bias", json!(false)),
        ("use_bidirectional_attention", json!(false)),
    ]))
}
