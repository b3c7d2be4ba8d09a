//! Gemma 3 (text; `Gemma3ForCausalLM`, `model_type: gemma3_text`): Llama's names and
//! linears, with every RMSNorm `(1 + w)`, norms both before and after attention and the
//! MLP (`post_attention_layernorm` normalises the attention's *output*, unlike Llama's),
//! q/k norms, a GELU-tanh gated MLP, the embedding scaled by √hidden (the tied head reads
//! it unscaled), scores scaled by `query_pre_attn_scalar^−½`, local sliding-window layers
//! with their own RoPE base between global ones, and an optional final logit soft-cap.

use super::decoder::{Activation, BlockDesc, GateUp, Mlp, NormDesc, NormKind, QkNorm};
use super::family::{Family, Sliding};
use super::gguf::{self as g, Dim, GgufArch, GgufMeta, SpmFlavor};
use super::{ArchDef, Model, TensorSpec, gather_rows_into, llama};
use crate::config::{Arch, Fields, ModelConfig, RopeContext, RopeScaling};
use crate::error::Result;
use crate::gbi::Gbi;
use serde_json::{Map, Value, json};

/// What lema asks of Gemma 3 outside the model.
pub static FAMILY: Family = Family {
    model_types: &["gemma3_text"],
    ties_by_default: true,
    parse_config: parse,
    sliding: Sliding::ByLayerType {
        default_window: 4096,
    },
    default_max_positions: 131072,
    gguf: Some(&GGUF),
    ..llama::FAMILY
};

/// Gemma 3's definition: Llama's names and linears, its own norms, block and embedding.
pub static DEF: ArchDef = ArchDef {
    family: &FAMILY,
    tensor_specs,
    embed,
    block,
    final_norm,
    ..llama::DEF
};

fn norm(name: &'static str, eps: f32) -> NormDesc {
    NormDesc {
        kind: NormKind::RmsUnitOffset,
        name,
        eps,
    }
}

fn final_norm(c: &ModelConfig) -> NormDesc {
    norm("model.norm", c.norm_eps)
}

const PRE_MLP_NORM: &str = "pre_feedforward_layernorm";
const POST_MLP_NORM: &str = "post_feedforward_layernorm";

fn tensor_specs(m: &Model) -> Vec<TensorSpec> {
    let (d, c) = (m.config().head_dim, m.config().hidden_size);
    llama::tensor_specs_with(
        m,
        &[
            ("self_attn.q_norm.weight", vec![d]),
            ("self_attn.k_norm.weight", vec![d]),
            ("pre_feedforward_layernorm.weight", vec![c]),
            ("post_feedforward_layernorm.weight", vec![c]),
        ],
    )
}

/// The embedding times √hidden, the factor and the product rounded to the table's dtype
/// as transformers computes them (`Gemma3TextScaledWordEmbedding`).
fn embed(m: &Model, gbi: &Gbi, ids: &[u32], _positions: &[u32], out: &mut [f32]) -> Result<()> {
    use rayon::prelude::*;
    let name = FAMILY.embed_name;
    let c = m.config().hidden_size;
    let dtype = gbi.tensor(name)?.dtype;
    let scale = dtype.round((c as f32).sqrt());
    gather_rows_into(gbi, name, ids, c, out)?;
    out.par_iter_mut()
        .for_each(|x| *x = dtype.round(*x * scale));
    Ok(())
}

fn block(m: &Model, layer: usize) -> BlockDesc<'_> {
    let eps = m.config().norm_eps;
    let base = llama::block_with(
        m,
        layer,
        Some(QkNorm {
            q: "self_attn.q_norm",
            k: "self_attn.k_norm",
            kind: NormKind::RmsUnitOffset,
            eps,
        }),
    );
    BlockDesc {
        norm1: norm("input_layernorm", eps),
        post_attn_norm: Some(norm("post_attention_layernorm", eps)),
        norm2: norm(PRE_MLP_NORM, eps),
        mlp: Mlp::Gated {
            gate_up: GateUp::Separate {
                gate: llama::GATE,
                up: llama::UP,
            },
            down: llama::DOWN,
            act: Activation::GeluTanh,
        },
        post_mlp_norm: Some(norm(POST_MLP_NORM, eps)),
        ..base
    }
}

/// Gemma 3's config.json (`Gemma3TextConfig`; its defaults where a key is absent), in
/// the transformers-5 layout (`rope_parameters` per layer type, `layer_types`) or the
/// older Hub one (`rope_theta`, `rope_local_base_freq`, `rope_scaling` for the global
/// layers, `sliding_window_pattern`).
fn parse(f: &Fields, model_type: &str, arch: Arch) -> Result<ModelConfig> {
    f.require_activation(
        "hidden_activation",
        model_type,
        "gelu_pytorch_tanh",
        Some("gelu_pytorch_tanh"),
    )?;
    let mut cfg = crate::config::parse_decoder_sizes(f, arch, Some(256))?;
    if let Some(cap) = f.opt_f64("attn_logit_softcapping")? {
        return Err(f.err(format!(
            "attn_logit_softcapping = {cap} is not supported (Gemma 2's attention soft-cap; \
             Gemma 3 checkpoints set null)"
        )));
    }
    if f.opt_bool("use_bidirectional_attention")? == Some(true) {
        return Err(f.err(
            "use_bidirectional_attention = true is not supported (lema trains causal models)",
        ));
    }
    f.refuse_dropouts(&["attention_dropout"])?;
    let (theta, scaling, local) = parse_rope(f, &RopeContext::top_level(f, &cfg)?)?;
    (cfg.rope_theta, cfg.rope_scaling, cfg.local_rope_theta) = (theta, scaling, Some(local));
    (cfg.sliding_window, cfg.sliding_layers) =
        crate::config::parse_windows(f, FAMILY.sliding, cfg.num_hidden_layers)?;
    cfg.query_pre_attn_scalar = Some(f.positive_f32("query_pre_attn_scalar", Some(256.0))?);
    cfg.final_logit_softcapping = match f.opt_f64("final_logit_softcapping")? {
        None => None,
        Some(_) => Some(f.positive_f32("final_logit_softcapping", None)?),
    };
    Ok(cfg)
}

/// The global layers' RoPE base and scaling, and the sliding layers' base. LongRoPE and
/// YaRN are refused: transformers would scale the attention of the global layers only by
/// their attention factor, and no Gemma 3 checkpoint uses them.
fn parse_rope(f: &Fields, ctx: &RopeContext) -> Result<(f32, RopeScaling, f32)> {
    let (theta, scaling, local) = parse_rope_layers(f, ctx)?;
    if matches!(
        scaling,
        RopeScaling::LongRope { .. } | RopeScaling::Yarn { .. }
    ) {
        return Err(f.err(
            "longrope and yarn RoPE scaling are not supported for Gemma 3 (its checkpoints \
             use linear)",
        ));
    }
    Ok((theta, scaling, local))
}

fn parse_rope_layers(f: &Fields, ctx: &RopeContext) -> Result<(f32, RopeScaling, f32)> {
    let per_type = f
        .sub("rope_parameters", "rope_parameters.")?
        .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    let Some(p) = per_type else {
        let theta = f.positive_f32("rope_theta", Some(1e6))?;
        let scaling = match f.sub("rope_scaling", "rope_scaling.")? {
            Some(s) => crate::config::parse_scaling(&s, false, ctx)?,
            None => RopeScaling::None,
        };
        return Ok((
            theta,
            scaling,
            f.positive_f32("rope_local_base_freq", Some(1e4))?,
        ));
    };
    let entry = |key: &str, prefix: &'static str| {
        p.sub(key, prefix)?
            .ok_or_else(|| p.err(format!("'rope_parameters' has no '{key}' entry")))
    };
    let full = entry("full_attention", "rope_parameters.full_attention.")?;
    let local = entry("sliding_attention", "rope_parameters.sliding_attention.")?;
    if crate::config::parse_scaling(&local, true, ctx)? != RopeScaling::None {
        return Err(local.err(
            "a RoPE scaling of the sliding layers is not supported (Gemma 3 scales only the \
             global layers)",
        ));
    }
    Ok((
        full.positive_f32("rope_theta", Some(1e6))?,
        crate::config::parse_scaling(&full, true, ctx)?,
        local.positive_f32("rope_theta", Some(1e4))?,
    ))
}

// ---- GGUF ---------------------------------------------------------------------------
//
// llama.cpp's `gemma3` files (Gemma 3 text): the tensor names, the (1 + w) norms stored
// as they compute (the converter subtracts the 1), the SentencePiece flavour, and the
// `gemma3_text` config.json.
//
// What llama.cpp leaves out of the file, and where the config takes it from
// (`llama-model.cpp`, `LLM_ARCH_GEMMA3`):
// * which layers slide: `attention.sliding_window_pattern` when present (a period n —
//   layer i slides when i mod n < n − 1 — or one bool per layer), else llama.cpp's fixed
//   pattern of 6 (five sliding layers, then a global one);
// * the local layers' RoPE: base 10000, no scaling (`rope_freq_base_train_swa`); the
//   global layers use `rope.freq_base` and `rope.scaling.*`;
// * the query scale: `attention.scale` when present, else 1/√head_dim, or 1/√(hidden /
//   heads) for the 62-layer 27B — as `query_pre_attn_scalar` (scale = its −½ power).

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
