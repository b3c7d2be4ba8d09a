//! Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections (not on o
//! or the MLP), under Llama's tensor names. Sliding-window attention when the config
//! turns it on (`use_sliding_window`, from layer `max_window_layers` on).

use super::family::{Family, Sliding};
use super::{ArchDef, llama};

/// What lema asks of Qwen2 outside the model.
pub static FAMILY: Family = Family {
    model_types: &["qwen2"],
    sliding: Sliding::OptIn,
    default_max_positions: 32768,
    ..llama::FAMILY
};

/// Qwen2's definition: Llama's, with q/k/v biases.
pub static DEF: ArchDef = ArchDef {
    family: &FAMILY,
    linears: |c| llama::linears_with(c, true, false),
    ..llama::DEF
};
