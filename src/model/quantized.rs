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
use crate::backend::{Backend, DType, Nf4Nested, Nf4Parts};
use crate::error::{Error, Result};
use crate::gbi::Gbi;
use std::collections::HashMap;

/// The quant_state key of an NF4 weight, after the weight's name.
const NF4_STATE: &str = ".quant_state.bitsandbytes__nf4";
/// ... and of an FP4 one (refused).
const FP4_STATE: &str = ".quant_state.bitsandbytes__fp4";

/// How one weight is stored in NF4.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Weight {
    /// The shape of the weight it stands for (`[out, in]`).
    pub shape: Vec<usize>,
    pub blocksize: usize,
    /// What bitsandbytes expands it to (quant_state `dtype`).
    pub dtype: DType,
    /// Double quantization: the second level's block size and the offset added back.
    pub nested: Option<(usize, f32)>,
}

impl Nf4Weight {
    /// Elements of the weight it stands for.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The NF4-stored weights of a model file, by full tensor name
/// (`model.layers.3.self_attn.q_proj.weight`).
#[derive(Clone, Debug, Default)]
pub struct QuantTable {
    by_name: HashMap<String, Nf4Weight>,
}

impl QuantTable {
    /// The NF4 weights among `weights` (each a linear weight's name and the `[out, in]`
    /// shape the architecture expects) in `gbi`, each checked against its parts; none
    /// when the file holds no quantized weight.
    pub fn read(gbi: &Gbi, weights: &[(String, Vec<usize>)]) -> Result<Option<Self>> {
        let mut by_name = HashMap::new();
        for (name, shape) in weights {
            if gbi.get(&format!("{name}{FP4_STATE}")).is_some() {
                return Err(Error::tensor(
                    gbi.path(),
                    name,
                    "is stored in bitsandbytes' FP4; lema reads NF4 only: quantize the model \
                     with bnb_4bit_quant_type=\"nf4\", or give the unquantized model",
                ));
            }
            let Some(state) = gbi.get(&format!("{name}{NF4_STATE}")) else {
                continue;
            };
            let w = parse_state(gbi, name, gbi.bytes(state))?;
            if &w.shape != shape {
                return Err(Error::tensor(
                    gbi.path(),
                    name,
                    format!(
                        "its quant_state says shape {:?}, but the model's config.json makes it {shape:?}",
                        w.shape
                    ),
                ));
            }
            check_parts(gbi, name, &w)?;
            by_name.insert(name.clone(), w);
        }
        Ok((!by_name.is_empty()).then_some(QuantTable { by_name }))
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

/// The weight's quant_state JSON, read and checked.
fn parse_state(gbi: &Gbi, name: &str, bytes: &[u8]) -> Result<Nf4Weight> {
    let bad = |msg: String| Error::tensor(gbi.path(), format!("{name}{NF4_STATE}"), msg);
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| bad(format!("is not the JSON bitsandbytes writes ({e})")))?;
    let field = |k: &str| v.get(k).ok_or_else(|| bad(format!("has no '{k}'")));
    let size = |k: &str| -> Result<usize> {
        field(k)?
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(format!("'{k}' is not a positive integer")))
    };
    if let Some(t) = v.get("quant_type").and_then(|t| t.as_str())
        && t != "nf4"
    {
        return Err(bad(format!("quant_type is '{t}'; lema reads nf4 only")));
    }
    let shape = field("shape")?
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect::<Option<Vec<usize>>>()
        })
        .ok_or_else(|| bad("'shape' is not a list of sizes".into()))?;
    let dtype = match field("dtype")?.as_str() {
        Some("bfloat16") => DType::BF16,
        Some("float16") => DType::F16,
        Some("float32") => DType::F32,
        _ => {
            return Err(bad(format!(
                "dtype {} is not bfloat16, float16 or float32",
                v["dtype"]
            )));
        }
    };
    let nested = match v.get("nested_blocksize") {
        None => None,
        Some(_) => {
            let offset = field("nested_offset")?
                .as_f64()
                .ok_or_else(|| bad("'nested_offset' is not a number".into()))?;
            Some((size("nested_blocksize")?, offset as f32))
        }
    };
    Ok(Nf4Weight {
        shape,
        blocksize: size("blocksize")?,
        dtype,
        nested,
    })
}

/// The parts of `name` in the file agree with its quant_state: dtypes and sizes.
fn check_parts(gbi: &Gbi, name: &str, w: &Nf4Weight) -> Result<()> {
    let blocks = w.numel().div_ceil(w.blocksize);
    let mut parts = vec![
        (String::new(), DType::U8, w.numel().div_ceil(2)),
        (
            ".absmax".into(),
            if w.nested.is_some() {
                DType::U8
            } else {
                DType::F32
            },
            blocks,
        ),
        (".quant_map".into(), DType::F32, 16),
    ];
    if let Some((nbs, _)) = w.nested {
        parts.push((".nested_absmax".into(), DType::F32, blocks.div_ceil(nbs)));
        parts.push((".nested_quant_map".into(), DType::F32, 256));
    }
    for (suffix, dtype, numel) in parts {
        let key = format!("{name}{suffix}");
        let t = gbi.get(&key).ok_or_else(|| {
            Error::tensor(
                gbi.path(),
                &key,
                "is missing: an NF4 weight needs its packed codes, absmax, quant_map (and \
                 with double quantization nested_absmax and nested_quant_map)",
            )
        })?;
        let n: usize = t.shape.iter().product();
        if t.dtype != dtype || n != numel {
            return Err(Error::tensor(
                gbi.path(),
                &key,
                format!(
                    "is {} with {n} elements, but its quant_state (shape {:?}, block size {}) needs {dtype} with {numel}",
                    t.dtype, w.shape, w.blocksize
                ),
            ));
        }
    }
    Ok(())
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
            numel: q.numel(),
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
