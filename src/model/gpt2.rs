//! GPT-2: pre-norm blocks of LayerNorm → attention (fused `c_attn`, learned positions) →
//! residual, LayerNorm → GELU MLP → residual, as the generic block
//! ([`super::decoder`]) runs them. Linears are `Conv1D` (`[in, out]`), all with biases.

use super::decoder::{Activation, AttnDesc, BlockDesc, Mlp, NormDesc, NormKind, Qkv};
use super::linear::Layout;
use super::{ArchDef, LinearSpec, Model, TensorSpec, gather_rows, gather_rows_into};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::gbi::Gbi;

/// What lema asks of GPT-2 outside the model ([`super::family`]).
pub static FAMILY: super::family::Family = super::family::Family {
    conv1d_weights: true,
    learned_positions: true,
    mlp_matrices: 2,
    default_lora_targets: &["c_attn"],
    describe_sizes: |c| {
        format!(
            "vocab_size = {}, n_embd = {}, n_inner = {}, n_layer = {}, n_head = {}, \
             n_positions = {}",
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.max_position_embeddings
        )
    },
    model_types: &["gpt2"],
    ties_by_default: true,
    embed_name: "transformer.wte.weight",
    root_prefix: Some("transformer."),
    parse_config: crate::config::parse_gpt2,
    sliding: super::family::Sliding::Never,
    rope_type_aliases: &[],
    default_max_positions: 1024,
    gguf: None,
};

/// GPT-2's definition.
pub static DEF: ArchDef = ArchDef {
    family: &FAMILY,
    block_prefix: |i| format!("transformer.h.{i}."),
    head_names: &[
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.weight",
    ],
    linears,
    tensor_specs,
    embed,
    block,
    final_norm: |c| NormDesc {
        kind: NormKind::Layer,
        name: "transformer.ln_f",
        eps: c.norm_eps,
    },
};

const ATTN: &str = "attn.c_attn";
const APROJ: &str = "attn.c_proj";
const FC: &str = "mlp.c_fc";
const MPROJ: &str = "mlp.c_proj";

fn linears(cfg: &ModelConfig) -> Vec<LinearSpec> {
    let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
    let l = |name, in_features, out_features| LinearSpec {
        name,
        in_features,
        out_features,
        layout: Layout::InOut,
        bias: true,
    };
    vec![
        l(ATTN, c, 3 * c),
        l(APROJ, c, c),
        l(FC, c, i),
        l(MPROJ, i, c),
    ]
}

fn tensor_specs(m: &Model) -> Vec<TensorSpec> {
    let cfg = m.config();
    let (c, v) = (cfg.hidden_size, cfg.vocab_size);
    let t = |name: String, shape: Vec<usize>| TensorSpec { name, shape };
    let mut out = vec![
        t("transformer.wte.weight".into(), vec![v, c]),
        t(
            "transformer.wpe.weight".into(),
            vec![cfg.max_position_embeddings, c],
        ),
    ];
    for layer in 0..cfg.num_hidden_layers {
        let p = m.block_prefix(layer);
        for ln in ["ln_1", "ln_2"] {
            out.push(t(format!("{p}{ln}.weight"), vec![c]));
            out.push(t(format!("{p}{ln}.bias"), vec![c]));
        }
        for lin in m.linear_specs() {
            out.push(t(
                format!("{p}{}.weight", lin.name),
                vec![lin.in_features, lin.out_features],
            ));
            out.push(t(format!("{p}{}.bias", lin.name), vec![lin.out_features]));
        }
    }
    out.push(t("transformer.ln_f.weight".into(), vec![c]));
    out.push(t("transformer.ln_f.bias".into(), vec![c]));
    out.push(t("lm_head.weight".into(), vec![v, c]));
    out
}

fn embed(m: &Model, gbi: &Gbi, ids: &[u32], positions: &[u32], out: &mut [f32]) -> Result<()> {
    let c = m.config().hidden_size;
    gather_rows_into(gbi, "transformer.wte.weight", ids, c, out)?;
    let p = gather_rows(gbi, "transformer.wpe.weight", positions, c)?;
    for (a, b) in out.iter_mut().zip(&p) {
        *a += b;
    }
    Ok(())
}

fn block(m: &Model, _layer: usize) -> BlockDesc<'_> {
    let c = m.config();
    let norm = |name| NormDesc {
        kind: NormKind::Layer,
        name,
        eps: c.norm_eps,
    };
    BlockDesc {
        hidden: c.hidden_size,
        linears: m.linear_specs(),
        norm1: norm("ln_1"),
        attn: AttnDesc {
            qkv: Qkv::Fused(ATTN),
            qk_norm: None,
            o: APROJ,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_attention_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            rope: None,
            window: None,
        },
        post_attn_norm: None,
        norm2: norm("ln_2"),
        mlp: Mlp::Plain {
            fc: FC,
            proj: MPROJ,
            act: Activation::GeluTanh,
        },
        post_mlp_norm: None,
    }
}
