//! lema: LoRA fine-tuning of language models larger than the accelerator's memory.
//! The frozen base weights stay in one memory-mapped `.safetensors` file and pass through
//! the device one layer at a time; see DESIGN.md for the picture.

pub mod backend;
pub mod config;
pub mod error;
pub mod import;

pub use error::{Error, Result};
