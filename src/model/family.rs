//! What the rest of lema asks of an architecture without building a model: one
//! [`Family`] per architecture, defined in that architecture's own file and found through
//! [`family`]. Nothing outside `src/model/` matches on [`Arch`].

use crate::config::{Arch, ModelConfig};

/// The facts of one architecture that code outside the model layer needs.
#[derive(Debug)]
pub struct Family {
    /// Linear weights stored `[in, out]` (HF `Conv1D`): PEFT's `fan_in_fan_out`, and the
    /// transpose a merge applies to `B·A`.
    pub conv1d_weights: bool,
    /// Positions come from a learned table of `max_position_embeddings` rows, so no
    /// sequence may be longer (RoPE models have no such limit).
    pub learned_positions: bool,
    /// Weight matrices of one block's MLP (3 for a gated MLP, 2 for a plain one).
    pub mlp_matrices: u64,
    /// PEFT's default LoRA targets for this architecture.
    pub default_lora_targets: &'static [&'static str],
    /// The model's sizes under their config.json names, for messages.
    pub describe_sizes: fn(&ModelConfig) -> String,
    /// The HF `model_type` values of this architecture.
    pub model_types: &'static [&'static str],
    /// `tie_word_embeddings` when config.json does not say (HF's config class default).
    pub ties_by_default: bool,
    /// The embedding table's tensor name (a tied head reads it).
    pub embed_name: &'static str,
    /// The prefix every non-head tensor name has; checkpoints saved from the bare model
    /// lack it (GPT-2's `h.0.…` for `transformer.h.0.…`), and prepare adds it.
    pub root_prefix: Option<&'static str>,
    /// Reads this architecture's config.json.
    pub(crate) parse_config: crate::config::ParseConfig,
    /// When attention slides.
    pub sliding: Sliding,
    /// Legacy `rope_scaling` type names the config class reads as another type
    /// (`Phi3Config`: "yarn" is LongRoPE), as (legacy, meant) pairs.
    pub rope_type_aliases: &'static [(&'static str, &'static str)],
    /// `max_position_embeddings` when config.json does not say (HF's class default).
    pub default_max_positions: usize,
    /// How llama.cpp's GGUF files of this architecture are read (`None`: not convertible).
    pub gguf: Option<&'static super::gguf::GgufArch>,
}

/// When an architecture's attention slides over a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sliding {
    /// Never (full causal attention).
    Never,
    /// On every layer whenever `sliding_window` is set (Mistral, Phi-3).
    EveryLayer,
    /// Only with `use_sliding_window`, from layer `max_window_layers` on (Qwen2/Qwen3;
    /// their Hub configs keep a `sliding_window` value that is otherwise ignored).
    OptIn,
    /// On the layers `layer_types` calls `sliding_attention`, or (older configs) on every
    /// layer but each `sliding_window_pattern`-th (Gemma), with this window when
    /// `sliding_window` is absent.
    ByLayerType { default_window: usize },
}

/// Every architecture lema runs, in the order messages list them.
pub const ARCHS: &[Arch] = &[
    Arch::Llama,
    Arch::Mistral,
    Arch::Qwen2,
    Arch::Qwen3,
    Arch::Phi3,
    Arch::Gemma3,
    Arch::Gpt2,
];

/// The architecture whose `model_types` include `model_type`.
pub fn for_model_type(model_type: &str) -> Option<Arch> {
    ARCHS
        .iter()
        .copied()
        .find(|&a| family(a).model_types.contains(&model_type))
}

/// The supported `model_type` values, for messages (`llama, mistral, …`).
pub fn supported_model_types() -> String {
    ARCHS
        .iter()
        .flat_map(|&a| family(a).model_types.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The family of `arch`.
pub fn family(arch: Arch) -> &'static Family {
    super::arch_def(arch).family
}
