//! Frozen linears stored quantized, in one of two formats:
//!
//! * bitsandbytes' NF4 layout as transformers saves a 4-bit model. For a linear weight
//!   `X.weight` the file holds `X.weight` (the packed codes, U8), `X.weight.absmax` (a
//!   scale per block: F32, or U8 codes with double quantization), `X.weight.quant_map`
//!   (the 16 NF4 values), with double quantization `X.weight.nested_absmax` and
//!   `X.weight.nested_quant_map`, and `X.weight.quant_state.bitsandbytes__nf4`: U8 bytes of
//!   a JSON object with the weight's shape, block sizes, dtype and the nested offset.
//! * FP8 E4M3 with 128 × 128 block scales, as DeepSeek-V3 / Qwen3-FP8 checkpoints store
//!   it (config.json `quantization_config.quant_method` "fp8"): `X.weight` (F8_E4M3) and
//!   `X.weight_scale_inv` (F32, `[⌈out/128⌉, ⌈in/128⌉]`), expanded into the model's dtype.
//!
//! The stream carries these bytes as they are; a block's weights are expanded right
//! before its forward or backward runs ([`expand`]) into the dtype the reference expands
//! them to, and dropped after it.

use super::LayerWeights;
use crate::backend::{Backend, Fp8Parts, Nf4Nested, Nf4Parts};
use crate::error::{Error, Result};
use crate::gbi::Gbi;
use crate::types::DType;
use std::collections::HashMap;

/// How one weight is stored in NF4 (checked against its parts when the file opens).
pub type Nf4Weight = crate::quant::bnb_layout::Nf4Layout;

/// How one weight is stored in FP8 (`X.weight` E4M3, `X.weight_scale_inv` its block
/// scales), and the dtype it expands to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp8Weight {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// How one quantized weight is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantWeight {
    Nf4(Nf4Weight),
    Fp8(Fp8Weight),
}

impl QuantWeight {
    /// The dense weight's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            QuantWeight::Nf4(w) => &w.shape,
            QuantWeight::Fp8(w) => &w.shape,
        }
    }

    /// The dtype it expands to.
    pub fn dtype(&self) -> DType {
        match self {
            QuantWeight::Nf4(w) => w.dtype,
            QuantWeight::Fp8(w) => w.dtype,
        }
    }

    /// The format's name, for messages.
    pub fn format(&self) -> &'static str {
        match self {
            QuantWeight::Nf4(_) => "NF4",
            QuantWeight::Fp8(_) => "FP8",
        }
    }

    /// How the format stores a weight, for `lema info`.
    pub fn layout(&self) -> &'static str {
        match self {
            QuantWeight::Nf4(_) => "NF4 (bitsandbytes' layout)",
            QuantWeight::Fp8(_) => "FP8 E4M3 (128 × 128 block scales)",
        }
    }
}

/// If `name` is a part of a quantized weight other than the weight itself (`X.weight.absmax`,
/// `X.weight_scale_inv`, …), the weight's name.
pub fn part_of(name: &str) -> Option<&str> {
    crate::quant::bnb_layout::companion_of(name)
        .or_else(|| name.strip_suffix(crate::quant::fp8::SCALE_SUFFIX))
}

/// The quantized weights of a model file, by full tensor name
/// (`model.layers.3.self_attn.q_proj.weight`).
#[derive(Clone, Debug, Default)]
pub struct QuantTable {
    by_name: HashMap<String, QuantWeight>,
}

impl QuantTable {
    /// The quantized weights of `gbi`, each checked against its parts and against the
    /// shape the architecture expects (`weights`: every linear weight's name and
    /// `[out, in]`); none when the file holds no quantized weight. `config` is the model's
    /// config.json: its `quantization_config` (FP8: `weight_block_size` must be 128 × 128)
    /// and its dtype (the one FP8 weights expand to; bf16 when it names none, as
    /// transformers). A quantized tensor that is not one of the model's linears, an FP4 or
    /// 8-bit bitsandbytes layout, packed NF4 weights stored in another type than U8, and an
    /// FP8 weight without its scales or with scales of another shape are refused by name.
    pub fn read(
        gbi: &Gbi,
        weights: &[(String, Vec<usize>)],
        config: &serde_json::Value,
    ) -> Result<Option<Self>> {
        let expected: HashMap<&str, &Vec<usize>> =
            weights.iter().map(|(n, s)| (n.as_str(), s)).collect();
        let linear_shape = |name: &str| {
            expected.get(name).copied().ok_or_else(|| {
                Error::tensor(
                    gbi.path(),
                    name,
                    "is stored quantized, but it is not a linear weight of this model's \
                     blocks (lema keeps embeddings, norms and the head unquantized, as \
                     bitsandbytes does)",
                )
            })
        };
        let mut by_name = HashMap::new();
        for (name, w) in read_nf4(gbi)? {
            let shape = linear_shape(&name)?;
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
            by_name.insert(name, QuantWeight::Nf4(w));
        }
        let fp8: Vec<&crate::gbi::TensorInfo> =
            gbi.tensors().filter(|t| t.dtype == DType::F8E4M3).collect();
        if let Some(first) = fp8.first() {
            let dtype = fp8_config(gbi, &first.name, config)?;
            for t in fp8 {
                let shape = linear_shape(&t.name)?;
                check_fp8(gbi, t, shape)?;
                by_name.insert(
                    t.name.clone(),
                    QuantWeight::Fp8(Fp8Weight {
                        shape: shape.clone(),
                        dtype,
                    }),
                );
            }
        }
        // a scale without its FP8 weight
        for t in gbi.tensors() {
            if let Some(w) = t.name.strip_suffix(crate::quant::fp8::SCALE_SUFFIX)
                && !matches!(by_name.get(w), Some(QuantWeight::Fp8(_)))
            {
                return Err(Error::tensor(
                    gbi.path(),
                    &t.name,
                    format!("block scales without an F8_E4M3 weight '{w}'"),
                ));
            }
        }
        if by_name.is_empty() {
            return Ok(None);
        }
        Ok(Some(QuantTable { by_name }))
    }

    /// How `name` is stored, when it is quantized.
    pub fn get(&self, name: &str) -> Option<&QuantWeight> {
        self.by_name.get(name)
    }

    /// Every quantized weight, by name, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &QuantWeight)> {
        self.by_name.iter().map(|(n, w)| (n.as_str(), w))
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

/// The NF4 weights of `gbi` (bitsandbytes' layout), each checked against its parts.
fn read_nf4(gbi: &Gbi) -> Result<Vec<(String, Nf4Weight)>> {
    use crate::quant::bnb_layout::{TensorRef, bnb4_layout, bnb4_weights};
    let names = bnb4_weights(gbi.path(), gbi.tensors().map(|t| t.name.as_str()))?;
    let get = |name: &str| {
        gbi.get(name).map(|t| TensorRef {
            dtype: t.dtype.into(),
            shape: t.shape.clone(),
            data: gbi.bytes(t),
        })
    };
    let mut out = Vec::new();
    for name in names {
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
        out.push((name, w));
    }
    Ok(out)
}

/// The dtype FP8 weights expand to, from config.json (`first`: an FP8 weight, for
/// messages): its `quantization_config` must be FP8 with 128 × 128 blocks when present.
fn fp8_config(gbi: &Gbi, first: &str, config: &serde_json::Value) -> Result<DType> {
    if let Some(q) = config.get("quantization_config") {
        let method = &q["quant_method"];
        if method != "fp8" {
            return Err(Error::tensor(
                gbi.path(),
                first,
                format!(
                    "is stored as F8_E4M3, but config.json's quantization_config.quant_method is {method}, not \"fp8\""
                ),
            ));
        }
        let block = &q["weight_block_size"];
        let b = crate::quant::fp8::BLOCK;
        if !block.is_null() && *block != serde_json::json!([b, b]) {
            return Err(Error::tensor(
                gbi.path(),
                first,
                format!(
                    "config.json's quantization_config.weight_block_size is {block}: lema reads FP8 \
                     weights in {b} × {b} blocks only (DeepSeek-V3's and Qwen3-FP8's)"
                ),
            ));
        }
    }
    let name = config
        .get("dtype")
        .or_else(|| config.get("torch_dtype"))
        .and_then(|v| v.as_str());
    Ok(match name {
        Some(n) => n.parse().map_err(|_| {
            Error::tensor(
                gbi.path(),
                first,
                format!("expands to config.json's dtype '{n}', which is not f32, f16 or bf16"),
            )
        })?,
        None => DType::BF16,
    })
}

/// An F8_E4M3 weight `t` must have the `[out, in]` shape `shape` and F32 scales
/// `X.weight_scale_inv` of one per 128 × 128 block.
fn check_fp8(gbi: &Gbi, t: &crate::gbi::TensorInfo, shape: &[usize]) -> Result<()> {
    use crate::quant::fp8::{SCALE_SUFFIX, scale_shape};
    if t.shape != shape {
        return Err(Error::tensor(
            gbi.path(),
            &t.name,
            format!(
                "has shape {:?}, but the model's config.json makes it {shape:?}",
                t.shape
            ),
        ));
    }
    let scale_name = format!("{}{SCALE_SUFFIX}", t.name);
    let Some(s) = gbi.get(&scale_name) else {
        return Err(Error::tensor(
            gbi.path(),
            &t.name,
            format!("is stored as F8_E4M3 without its block scales '{scale_name}'"),
        ));
    };
    let want = scale_shape(shape[0], shape[1]);
    if s.dtype != DType::F32 || s.shape != want {
        return Err(Error::tensor(
            gbi.path(),
            &scale_name,
            format!(
                "is {} {:?}; the scales of a {shape:?} FP8 weight in 128 × 128 blocks are F32 {want:?} \
                 (lema reads 128 × 128 block scales only)",
                s.dtype.safetensors_name(),
                s.shape
            ),
        ));
    }
    Ok(())
}

/// The dense weights of the quantized linears of block weights `w` (tensor names
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
        let q = match q {
            QuantWeight::Nf4(q) => q,
            QuantWeight::Fp8(q) => {
                let parts = Fp8Parts {
                    codes: part("")?,
                    scale_inv: part(crate::quant::fp8::SCALE_SUFFIX)?,
                    rows: q.shape[0],
                    cols: q.shape[1],
                };
                dense.insert(rel, be.dequantize_fp8(&parts, q.dtype)?);
                continue;
            }
        };
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
/// expanded dense weights in place of quantized ones.
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
