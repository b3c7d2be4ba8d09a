//! The Llama family (Llama 2/3, SmolLM, TinyLlama, Mistral-style GQA): pre-norm blocks
//! of RMSNorm → attention with RoPE → residual, RMSNorm → SwiGLU MLP → residual, as
//! the generic block ([`super::decoder`]) runs them; tensors under `model.layers.N.`.

use super::decoder::{
    Activation, AttnDesc, BlockDesc, GateUp, Mlp, NormDesc, NormKind, QkNorm, Qkv,
};
use super::gguf::{self as g, GgufArch, GgufMeta};
use super::linear::Layout;
use super::{ArchDef, LinearSpec, Model, TensorSpec, gather_rows_into};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::gbi::Gbi;
use serde_json::{Map, Value, json};

/// What lema asks of the Llama family outside the model ([`super::family`]).
pub static FAMILY: super::family::Family = super::family::Family {
    conv1d_weights: false,
    learned_positions: false,
    mlp_matrices: 3,
    default_lora_targets: &["q_proj", "v_proj"],
    describe_sizes,
    model_types: &["llama"],
    ties_by_default: false,
    embed_name: "model.embed_tokens.weight",
    root_prefix: None,
    parse_config: crate::config::parse_llama,
    sliding: super::family::Sliding::Never,
    rope_type_aliases: &[],
    default_max_positions: 2048,
    gguf: Some(&GGUF),
};

/// llama.cpp's `llama` files (Llama, SmolLM, TinyLlama, and Mistral, which llama.cpp
/// writes as `llama`): Llama's names, q/k rows permuted by `convert_hf_to_gguf.py`,
/// optional attention biases (q, k, v and o, as `attention_bias` has them).
pub static GGUF: GgufArch = GgufArch {
    arch: "llama",
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
        g::Q_BIAS,
        g::K_BIAS,
        g::V_BIAS,
        g::O_BIAS,
    ],
    permute_qk: true,
    norm_offset: 0.0,
    spm: g::SpmFlavor::Llama,
    fallback_chat_template: None,
    refused: &[(
        "rope_freqs.weight",
        "Llama 3.1-style RoPE frequency factors are not supported yet",
    )],
    config: gguf_config,
};

/// config.json's Llama keys. A `llama` file is Mistral when its `general.name` says so
/// (what transformers' GGUF loader also goes by) or when it sets a sliding window.
fn gguf_config(m: &GgufMeta) -> std::result::Result<Map<String, Value>, String> {
    let mistral = m.sliding_window.is_some()
        || m.name
            .as_deref()
            .is_some_and(|n| n.to_lowercase().contains("mistral"));
    let (model_type, class) = if mistral {
        ("mistral", "MistralForCausalLM")
    } else {
        ("llama", "LlamaForCausalLM")
    };
    let mut c = g::swiglu_config(
        model_type,
        class,
        m,
        vec![
            ("attention_bias", json!(m.attention_bias)),
            ("mlp_bias", json!(false)),
        ],
    );
    if mistral {
        c.insert("sliding_window".into(), json!(m.sliding_window));
    }
    Ok(c)
}

/// Llama-shaped sizes under their config.json names, for messages.
pub(crate) fn describe_sizes(c: &ModelConfig) -> String {
    format!(
        "vocab_size = {}, hidden_size = {}, intermediate_size = {}, \
             num_hidden_layers = {}, num_attention_heads = {}, num_key_value_heads = {}, \
             head_dim = {}",
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    )
}

/// The Llama family's definition.
pub static DEF: ArchDef = ArchDef {
    family: &FAMILY,
    block_prefix: |i| format!("model.layers.{i}."),
    head_names: &["model.norm.weight", "lm_head.weight"],
    linears,
    tensor_specs,
    embed,
    block,
    final_norm,
};

pub(crate) fn final_norm(c: &ModelConfig) -> NormDesc {
    NormDesc {
        kind: NormKind::Rms,
        name: "model.norm",
        eps: c.norm_eps,
    }
}

const Q: &str = "self_attn.q_proj";
const K: &str = "self_attn.k_proj";
const V: &str = "self_attn.v_proj";
const O: &str = "self_attn.o_proj";
pub(crate) const GATE: &str = "mlp.gate_proj";
pub(crate) const UP: &str = "mlp.up_proj";
pub(crate) const DOWN: &str = "mlp.down_proj";

fn linears(c: &ModelConfig) -> Vec<LinearSpec> {
    linears_with(c, c.attention_bias, c.attention_bias)
}

/// Llama's seven linears with biases on q, k, v (`qkv_bias`), on o (`o_bias`) and, per
/// `mlp_bias`, on the MLP.
pub(crate) fn linears_with(c: &ModelConfig, qkv_bias: bool, o_bias: bool) -> Vec<LinearSpec> {
    let (h, qd, kvd, i) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let l = |name, in_features, out_features, bias| LinearSpec {
        name,
        in_features,
        out_features,
        layout: Layout::OutIn,
        bias,
    };
    let mb = c.mlp_bias;
    vec![
        l(Q, h, qd, qkv_bias),
        l(K, h, kvd, qkv_bias),
        l(V, h, kvd, qkv_bias),
        l(O, qd, h, o_bias),
        l(GATE, h, i, mb),
        l(UP, h, i, mb),
        l(DOWN, i, h, mb),
    ]
}

fn tensor_specs(m: &Model) -> Vec<TensorSpec> {
    tensor_specs_with(m, &[])
}

/// Llama's tensors, with `extra` per-block tensors (name under the block, shape).
pub(crate) fn tensor_specs_with(m: &Model, extra: &[(&str, Vec<usize>)]) -> Vec<TensorSpec> {
    let cfg = m.config();
    let (c, v) = (cfg.hidden_size, cfg.vocab_size);
    let t = |name: String, shape: Vec<usize>| TensorSpec { name, shape };
    let mut out = vec![t("model.embed_tokens.weight".into(), vec![v, c])];
    for layer in 0..cfg.num_hidden_layers {
        let p = m.block_prefix(layer);
        out.push(t(format!("{p}input_layernorm.weight"), vec![c]));
        out.push(t(format!("{p}post_attention_layernorm.weight"), vec![c]));
        for (name, shape) in extra {
            out.push(t(format!("{p}{name}"), shape.clone()));
        }
        for lin in m.linear_specs() {
            out.push(t(
                format!("{p}{}.weight", lin.name),
                vec![lin.out_features, lin.in_features],
            ));
            if lin.bias {
                out.push(t(format!("{p}{}.bias", lin.name), vec![lin.out_features]));
            }
        }
    }
    out.push(t("model.norm.weight".into(), vec![c]));
    out.push(t("lm_head.weight".into(), vec![v, c]));
    out
}

pub(crate) fn embed(
    m: &Model,
    gbi: &Gbi,
    ids: &[u32],
    _positions: &[u32],
    out: &mut [f32],
) -> Result<()> {
    gather_rows_into(
        gbi,
        "model.embed_tokens.weight",
        ids,
        m.config().hidden_size,
        out,
    )
}

fn block(m: &Model, layer: usize) -> BlockDesc<'_> {
    block_with(m, layer, None)
}

/// Llama's block, with per-head q/k norms when given.
pub(crate) fn block_with(m: &Model, layer: usize, qk_norm: Option<QkNorm>) -> BlockDesc<'_> {
    let c = m.config();
    let norm = |name| NormDesc {
        kind: NormKind::Rms,
        name,
        eps: c.norm_eps,
    };
    BlockDesc {
        hidden: c.hidden_size,
        linears: m.linear_specs(),
        norm1: norm("input_layernorm"),
        attn: AttnDesc {
            qkv: Qkv::Separate { q: Q, k: K, v: V },
            qk_norm,
            o: O,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            scale: c.attention_scale(),
            rope: Some(m.rope_of(layer)),
            window: c.layer_window(layer),
        },
        post_attn_norm: None,
        norm2: norm("post_attention_layernorm"),
        mlp: Mlp::Gated {
            gate_up: GateUp::Separate { gate: GATE, up: UP },
            down: DOWN,
            act: Activation::Silu,
        },
        post_mlp_norm: None,
    }
}
