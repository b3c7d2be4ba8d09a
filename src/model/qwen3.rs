//! Qwen3 (dense): the Llama block with an RMSNorm over each head of q and k after their
//! projections and before RoPE (`self_attn.q_norm`, `self_attn.k_norm`, weights `[D]`),
//! and `head_dim` set apart from hidden / heads. `attention_bias` puts biases on q, k, v
//! and o, as Llama's does.

use super::decoder::{BlockDesc, NormKind, QkNorm};
use super::family::{Family, Sliding};
use super::{ArchDef, Model, TensorSpec, llama};

/// What lema asks of Qwen3 outside the model.
pub static FAMILY: Family = Family {
    model_types: &["qwen3"],
    sliding: Sliding::OptIn,
    default_max_positions: 32768,
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
