//! Mistral: the Llama block and names, with sliding-window attention on every layer
//! when the config sets `sliding_window`.

use super::family::{Family, Sliding};
use super::{ArchDef, llama};

/// What lema asks of Mistral outside the model.
pub static FAMILY: Family = Family {
    model_types: &["mistral"],
    sliding: Sliding::EveryLayer,
    default_max_positions: 4096 * 32,
    ..llama::FAMILY
};

/// Mistral's definition: Llama's.
pub static DEF: ArchDef = ArchDef {
    family: &FAMILY,
    ..llama::DEF
};
