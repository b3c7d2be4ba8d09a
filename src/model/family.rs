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
}

/// The family of `arch`.
pub fn family(arch: Arch) -> &'static Family {
    super::arch_def(arch).family
}
