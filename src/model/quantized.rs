//! Frozen linears stored quantized: bitsandbytes' NF4 layout as transformers saves a 4-bit
//! model. For a linear weight `X.weight` the file holds `X.weight` (the packed codes, U8),
//! `X.weight.absmax` (a scale per block: F32, or U8 codes with double quantization),
//! `X.weight.quant_map` (the 16 NF4 values), with double quantization
//! `X.weight.nested_absmax` and `X.weight.nested_quant_map`, and
//! `X.weight.quant_state.bitsandbytes__nf4`: U8 bytes of a JSON object with the
//! weight's shape, block sizes, dtype and the nested offset.
//!
//! The stream carries these bytes as they are; a block's weights are expanded right
//! before its forward or backward runs ([`expand`]) into the dtype bitsandbytes expands
//! them to, and dropped after it.

use super::LayerWeights;
use crate::backend::{Backend, Nf4Nested, Nf4Parts};
use crate::error::{Error, Result};
use crate::gbi::Gbi;
use std::collections::HashMap;

/// How one weight is stored in NF4 (checked against its parts when the file opens).
pub type Nf4Weight = crate::quant::bnb_layout::Nf4Layout;

/// The NF4-stored weights of a model file, by full tensor name
/// (`model.layers.3.self_attn.q_proj.weight`).
#[derive(Clone, Debug, Default)]
pub struct QuantTable {
    by_name: HashMap<String, Nf4Weight>,
}

impl QuantTable {
    /// The NF4 weights of `gbi`, each checked against its parts and against the shape the
    /// architecture expects (`weights`: every linear weight's name and `[out, in]`); none
    /// when the file holds no quantized weight. A quantized tensor that is not one of the
    /// model's linears, an FP4 or 8-bit layout, and packed weights stored in another
    /// type than U8 are refused by name.
    pub fn read(gbi: &Gbi, weights: &[(String, Vec<usize>)]) -> Result<Option<Self>> {
        use crate::quant::bnb_layout::{TensorRef, bnb4_layout, bnb4_weights};
        let names = bnb4_weights(gbi.path(), gbi.tensors().map(|t| t.name.as_str()))?;
        if names.is_empty() {
            return Ok(None);
        }
        let expected: HashMap<&str, &Vec<usize>> =
            weights.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let get = |name: &str| {
            gbi.get(name).map(|t| TensorRef {
                dtype: t.dtype.into(),
                shape: t.shape.clone(),
                data: gbi.bytes(t),
            })
        };
        let mut by_name = HashMap::new();
        for name in names {
            let Some(&shape) = expected.get(name.as_str()) else {
                return Err(Error::tensor(
                    gbi.path(),
                    &name,
                    "is stored quantized, but it is not a linear weight of this model's \
                     blocks (lema keeps embeddings, norms and the head unquantized, as \
                     bitsandbytes does)",
                ));
            };
            let w = bnb4_layout(gbi.path(), &name, get)?;
            if w.storage != safetensors::Dtype::U8 {
                return Err(Error::tensor(
                    gbi.path(),
                    &name,
                    format!(
                        "packs its 4-bit codes in {:?} (bnb_4bit_quant_storage); lema streams them \
                         as U8 only: save the model with the default quant storage (uint8)",
                        w.storage
                    ),
                ));
            }
            if &w.shape != shape {
                return Err(Error::tensor(
                    gbi.path(),
                    &name,
                    format!(
                        "its quant_state says shape {:?}, but the model's config.json makes it {shape:?}",
                        w.shape
                    ),
                ));
            }
            by_name.insert(name, w);
        }
        Ok(Some(QuantTable { by_name }))
    }

    /// How `name` is stored, when it is quantized.
    pub fn get(&self, name: &str) -> Option<&Nf4Weight> {
        self.by_name.get(name)
    }

    /// Number of quantized weights.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether no weight is quantized.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The dense weights of the NF4-stored linears of block weights `w` (tensor names
/// relative to the block, `prefix` the block's), expanded by the backend; empty when
/// nothing in the block is quantized.
pub fn expand<B: Backend>(
    be: &B,
    table: &QuantTable,
    prefix: &str,
    linear_weights: impl Iterator<Item = String>,
    w: &LayerWeights<B>,
) -> Result<HashMap<String, B::Buf>> {
    let mut dense = HashMap::new();
    for rel in linear_weights {
        let Some(q) = table.get(&format!("{prefix}{rel}")) else {
            continue;
        };
        let part = |s: &str| w.get(&format!("{rel}{s}"));
        let nested = match q.nested {
            None => None,
            Some((blocksize, offset)) => Some(Nf4Nested {
                absmax: part(".nested_absmax")?,
                code: part(".nested_quant_map")?,
                blocksize,
                offset,
            }),
        };
        let parts = Nf4Parts {
            packed: part("")?,
            absmax: part(".absmax")?,
            code: part(".quant_map")?,
            nested,
            numel: q.shape.iter().product(),
            blocksize: q.blocksize,
        };
        dense.insert(rel, be.dequantize_nf4(&parts, q.dtype)?);
    }
    Ok(dense)
}

/// A block's weights as the generic block reads them: the stored tensors, with the
/// expanded dense weights in place of NF4-stored ones.
pub struct Weights<'a, B: Backend> {
    stored: &'a LayerWeights<B>,
    dense: HashMap<String, B::Buf>,
}

impl<'a, B: Backend> Weights<'a, B> {
    /// Weights with nothing quantized.
    pub fn plain(stored: &'a LayerWeights<B>) -> Self {
        Weights {
            stored,
            dense: HashMap::new(),
        }
    }

    /// `stored` with `dense` in place of the tensors of the same names.
    pub fn with_dense(stored: &'a LayerWeights<B>, dense: HashMap<String, B::Buf>) -> Self {
        Weights { stored, dense }
    }

    /// The tensor called `name` (relative to the block).
    pub fn get(&self, name: &str) -> Result<&B::Buf> {
        match self.dense.get(name) {
            Some(b) => Ok(b),
            None => self.stored.get(name),
        }
    }
}
