//! Gemma 3 (text; `Gemma3ForCausalLM`, `model_type: gemma3_text`): Llama's names and
//! linears, with every RMSNorm `(1 + w)`, norms both before and after attention and the
//! MLP (`post_attention_layernorm` normalises the attention's *output*, unlike Llama's),
//! q/k norms, a GELU-tanh gated MLP, the embedding scaled by √hidden (the tied head reads
//! it unscaled), scores scaled by `query_pre_attn_scalar^−½`, local sliding-window layers
//! with their own RoPE base between global ones, and an optional final logit soft-cap.

use super::decoder::{Activation, BlockDesc, GateUp, Mlp, NormDesc, NormKind, QkNorm};
use super::family::{Family, Sliding};
use super::{ArchDef, Model, TensorSpec, gather_rows, llama};
use crate::config::{Arch, Fields, ModelConfig, RopeScaling};
use crate::error::Result;
use crate::gbi::Gbi;

/// What lema asks of Gemma 3 outside the model.
pub static FAMILY: Family = Family {
    model_types: &["gemma3_text"],
    ties_by_default: true,
    parse_config: parse,
    sliding: Sliding::ByLayerType {
        default_window: 4096,
    },
    default_max_positions: 131072,
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
fn embed(m: &Model, gbi: &Gbi, ids: &[u32], _positions: &[u32]) -> Result<Vec<f32>> {
    let name = FAMILY.embed_name;
    let c = m.config().hidden_size;
    let dtype = gbi.tensor(name)?.dtype;
    let scale = dtype.round((c as f32).sqrt());
    let mut rows = gather_rows(gbi, name, ids, c)?;
    for x in &mut rows {
        *x = dtype.round(*x * scale);
    }
    Ok(rows)
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
    let (theta, scaling, local) = parse_rope(f)?;
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

/// The global layers' RoPE base and scaling, and the sliding layers' base.
fn parse_rope(f: &Fields) -> Result<(f32, RopeScaling, f32)> {
    let per_type = f
        .sub("rope_parameters", "rope_parameters.")?
        .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    let Some(p) = per_type else {
        let theta = f.positive_f32("rope_theta", Some(1e6))?;
        let scaling = match f.sub("rope_scaling", "rope_scaling.")? {
            Some(s) => crate::config::parse_scaling(&s, false)?,
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
    if crate::config::parse_scaling(&local, true)? != RopeScaling::None {
        return Err(local.err(
            "a RoPE scaling of the sliding layers is not supported (Gemma 3 scales only the \
             global layers)",
        ));
    }
    Ok((
        full.positive_f32("rope_theta", Some(1e6))?,
        crate::config::parse_scaling(&full, true)?,
        local.positive_f32("rope_theta", Some(1e4))?,
    ))
}
