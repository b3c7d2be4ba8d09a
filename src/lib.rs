//! lema: LoRA fine-tuning of language models larger than the accelerator's memory.
//! The frozen base weights stay in one memory-mapped `.safetensors` file and pass through
//! the device one layer at a time; see ARCHITECTURE.md for the picture.

pub mod api;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod dataset;
pub mod demo;
pub mod diskread;
pub mod error;
pub mod fsutil;
pub mod gbi;
pub mod generate;
pub mod host_tiers;
pub mod hostmem;
pub mod hub;
pub mod import;
pub mod linears;
pub mod lora;
pub mod merge;
pub mod model;
pub mod modelfile;
pub mod optim;
pub mod quant;
pub mod recompute;
pub mod rng;
pub mod schedule;
pub mod staging;
pub mod stream;
pub mod tiers;
pub mod tokenizer;
pub mod train;
pub mod trainer;
pub mod types;

pub use api::{Device, LemaConfig, LemaModel, Trainer};
pub use data::Batch;
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Generated, SamplingParams};
pub use optim::OptimizerConfig;
pub use recompute::GradientCheckpointing;
pub use stream::Strategy;
pub use trainer::StepOutput;

/// The README's code blocks, compiled as doc tests so its example keeps working.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
