//! Phi-3: the Llama block with q, k, v fused into one `self_attn.qkv_proj` (output
//! columns `[q | k | v]`) and gate and up into one `mlp.gate_up_proj` (`[gate | up]`);
//! LoRA adapts the fused linears as PEFT does (one A/B pair on the whole module).
//! Sliding-window attention on every layer when the config sets `sliding_window`.

use super::decoder::{Activation, AttnDesc, BlockDesc, GateUp, Mlp, Qkv};
use super::family::{Family, Sliding};
use super::gguf::{self as g, GgufArch, GgufMeta};
use super::linear::Layout;
use super::{ArchDef, LinearSpec, Model, llama};
use crate::config::ModelConfig;
use serde_json::{Map, Value, json};

/// What lema asks of Phi-3 outside the model. PEFT has no default targets for it; lema
/// adapts the fused attention projection, as for GPT-2's `c_attn`.
pub static FAMILY: Family = Family {
    model_types: &["phi3"],
    default_lora_targets: &["qkv_proj"],
    sliding: Sliding::EveryLayer,
    // Phi3Config renames a legacy "yarn" (like "su") to "longrope"
    rope_type_aliases: &[("yarn", "longrope")],
    default_max_positions: 4096,
    gguf: Some(&GGUF),
    ..llama::FAMILY
};

/// llama.cpp's `phi3` files: `attn_qkv` (`[q | k | v]` rows) and `ffn_up` holding the fused
/// `[gate | up]` (2·I rows), nothing permuted; `attention.sliding_window` 0 means none.
pub static GGUF: GgufArch = GgufArch {
    arch: "phi3",
    tensors: &[
        g::ATTN_NORM,
        g::ATTN_QKV,
        g::ATTN_OUT,
        g::FFN_GATE_UP,
        g::FFN_DOWN,
        g::FFN_NORM,
    ],
    permute_qk: false,
    norm_offset: 0.0,
    spm: g::SpmFlavor::Llama,
    fallback_chat_template: None,
    refused: &[
        (
            "rope_factors_long.weight",
            "Phi-3 LongRoPE factors are not supported for GGUF files yet",
        ),
        (
            "rope_factors_short.weight",
            "Phi-3 LongRoPE factors are not supported for GGUF files yet",
        ),
    ],
    config: gguf_config,
};

fn gguf_config(m: &GgufMeta) -> std::result::Result<Map<String, Value>, String> {
    Ok(g::swiglu_config(
        "phi3",
        "Phi3ForCausalLM",
        m,
        vec![
            (
                "original_max_position_embeddings",
                json!(m.rope_original_context.unwrap_or(m.max_position_embeddings)),
            ),
            ("sliding_window", json!(m.sliding_window)),
            ("attention_dropout", json!(0.0)),
            ("embd_pdrop", json!(0.0)),
            ("resid_pdrop", json!(0.0)),
        ],
    ))
}

/// Phi-3's definition: Llama's names and norms, fused linears.
pub static DEF: ArchDef = ArchDef {
    family: &FAMILY,
    linears,
    block,
    ..llama::DEF
};

const QKV: &str = "self_attn.qkv_proj";
const O: &str = "self_attn.o_proj";
const GATE_UP: &str = "mlp.gate_up_proj";
const DOWN: &str = "mlp.down_proj";

fn linears(c: &ModelConfig) -> Vec<LinearSpec> {
    let (h, qd, kvd, i) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let l = |name, in_features, out_features| LinearSpec {
        name,
        in_features,
        out_features,
        layout: Layout::OutIn,
        bias: false,
    };
    vec![
        l(QKV, h, qd + 2 * kvd),
        l(O, qd, h),
        l(GATE_UP, h, 2 * i),
        l(DOWN, i, h),
    ]
}

fn block(m: &Model, layer: usize) -> BlockDesc<'_> {
    let base = llama::block_with(m, layer, None);
    BlockDesc {
        attn: AttnDesc {
            qkv: Qkv::Fused(QKV),
            o: O,
            ..base.attn
        },
        mlp: Mlp::Gated {
            gate_up: GateUp::Fused(GATE_UP),
            down: DOWN,
            act: Activation::Silu,
        },
        ..base
    }
}
