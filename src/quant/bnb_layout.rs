//! The safetensors layout transformers writes for a bitsandbytes 4-bit model
//! (`QuantState.as_dict(packed=True)` next to each quantized `X.weight`), and the
//! `quantization_config` of its config.json.
//!
//! For a linear `X.weight` of n elements in blocks of 64:
//!
//! | key | dtype | shape |
//! |---|---|---|
//! | `X.weight` | U8 (or the `bnb_4bit_quant_storage` type, same bytes) | `[ceil(n/2), 1]` |
//! | `X.weight.absmax` | F32, or U8 codes with double quant | `[ceil(n/64)]` |
//! | `X.weight.quant_map` | F32 (the NF4 table) | `[16]` |
//! | `X.weight.nested_absmax` | F32 (double quant) | `[ceil(n/64/256)]` |
//! | `X.weight.nested_quant_map` | F32 (the dynamic map, double quant) | `[256]` |
//! | `X.weight.quant_state.bitsandbytes__nf4` | U8: JSON | `[len]` |
//!
//! The JSON is Python's `json.dumps` of `{"quant_type", "blocksize", "dtype", "shape"}` and,
//! with double quant, `"nested_blocksize", "nested_dtype", "nested_offset"` (in that order).

use super::dynamic::CODE_LEN;
use super::nf4::{Absmax, NF4_CODE, Nested, Nf4Tensor};
use crate::error::{Error, Result};
use crate::types::DType;
use safetensors::Dtype;
use std::path::Path;

/// The suffix of the packed JSON of an NF4 quant state.
pub const NF4_STATE: &str = "quant_state.bitsandbytes__nf4";
/// The suffix of bitsandbytes' FP4 quant state, which lema does not read.
const FP4_STATE: &str = "quant_state.bitsandbytes__fp4";
/// Suffixes of the tensors stored next to a quantized `X.weight`.
const COMPANIONS: [&str; 4] = ["absmax", "quant_map", "nested_absmax", "nested_quant_map"];
/// Suffixes of bitsandbytes' 8-bit (LLM.int8) layout.
const INT8_COMPANIONS: [&str; 2] = ["SCB", "weight_format"];
/// The JSON keys bitsandbytes packs, in its order.
const STATE_KEYS: [&str; 7] = [
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
];
/// Block sizes bitsandbytes' `quantize_4bit` / `dequantize_4bit` accept.
const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// A tensor to write: name, safetensors dtype, shape, little-endian bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// A tensor as read from a file: its bytes borrowed.
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl<'a> From<safetensors::tensor::TensorView<'a>> for TensorRef<'a> {
    fn from(v: safetensors::tensor::TensorView<'a>) -> Self {
        TensorRef {
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data(),
        }
    }
}

/// What a config.json's `quantization_config` says about a bitsandbytes 4-bit model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bnb4Config {
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`.
    pub compute_dtype: DType,
}

/// The float dtype bitsandbytes (and torch) call `s`.
fn from_torch_name(s: &str) -> Option<DType> {
    [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .find(|&d| d.torch_name() == s)
}

/// If `name` is a tensor of a bitsandbytes quant state (`X.weight.absmax`, …), the name of
/// the weight it belongs to. The packed weight itself (`X.weight`) is not one.
pub fn companion_of(name: &str) -> Option<&str> {
    let state = [NF4_STATE, FP4_STATE];
    COMPANIONS
        .iter()
        .chain(&state)
        .chain(&INT8_COMPANIONS)
        .find_map(|s| name.strip_suffix(s)?.strip_suffix('.'))
}

/// The NF4-quantized weights among a file's tensor names (those with an
/// `X.weight.quant_state.bitsandbytes__nf4`), sorted. Refuses, naming the tensor, an FP4 or
/// other unknown quant state, bitsandbytes' 8-bit layout, and companion tensors (`.absmax`,
/// …) of a weight without a quant state or without the weight.
pub fn bnb4_weights<'n>(
    path: &Path,
    names: impl IntoIterator<Item = &'n str>,
) -> Result<Vec<String>> {
    let names: std::collections::BTreeSet<&str> = names.into_iter().collect();
    let mut weights = Vec::new();
    // the quant states first: an FP4 or unknown one is the thing to name, not its companions
    for &name in &names {
        if let Some(w) = name
            .strip_suffix(NF4_STATE)
            .and_then(|w| w.strip_suffix('.'))
        {
            if !names.contains(w) {
                return Err(Error::tensor(
                    path,
                    name,
                    format!("a quant state without its weight '{w}'"),
                ));
            }
            weights.push(w.to_string());
        } else if name.strip_suffix(FP4_STATE).is_some() {
            return Err(Error::tensor(
                path,
                name,
                "bitsandbytes FP4 (quant_type fp4) is not supported: lema reads NF4 \
                 (bnb_4bit_quant_type=\"nf4\") only; quantize the original model with \
                 `lema prepare --quantize nf4` instead",
            ));
        } else if let Some((_, kind)) = name.split_once(".quant_state.") {
            return Err(Error::tensor(
                path,
                name,
                format!("unknown bitsandbytes quant state '{kind}' (lema reads bitsandbytes__nf4)"),
            ));
        }
    }
    for &name in &names {
        if INT8_COMPANIONS
            .iter()
            .any(|s| name.ends_with(&format!(".{s}")))
        {
            return Err(Error::tensor(
                path,
                name,
                "bitsandbytes 8-bit (LLM.int8, load_in_8bit) layout is not supported: lema \
                 reads bitsandbytes NF4",
            ));
        }
        if let Some(w) = companion_of(name)
            && !names.contains(format!("{w}.{NF4_STATE}").as_str())
        {
            return Err(Error::tensor(
                path,
                name,
                format!("a bitsandbytes quant-state tensor, but '{w}.{NF4_STATE}' is missing"),
            ));
        }
    }
    Ok(weights)
}

/// The tensors transformers saves for `weight` quantized as `t` (the packed weight as U8
/// `[ceil(n/2), 1]`), byte for byte as bitsandbytes 0.50 writes them.
pub fn encode_bnb4(weight: &str, t: &Nf4Tensor) -> Vec<StoredTensor> {
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let tensor = |suffix: &str, dtype, shape: Vec<usize>, data| StoredTensor {
        name: if suffix.is_empty() {
            weight.to_string()
        } else {
            format!("{weight}.{suffix}")
        },
        dtype,
        shape,
        data,
    };
    let mut out = vec![tensor(
        "",
        Dtype::U8,
        vec![t.packed.len(), 1],
        t.packed.clone(),
    )];
    let shape = t
        .shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut json = format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{shape}]",
        t.blocksize,
        t.dtype.torch_name()
    );
    match &t.absmax {
        Absmax::F32(a) => {
            out.push(tensor("absmax", Dtype::F32, vec![a.len()], f32s(a)));
            out.push(tensor("quant_map", Dtype::F32, vec![16], f32s(&NF4_CODE)));
        }
        Absmax::Nested(n) => {
            out.push(tensor(
                "absmax",
                Dtype::U8,
                vec![n.codes.len()],
                n.codes.clone(),
            ));
            out.push(tensor("quant_map", Dtype::F32, vec![16], f32s(&NF4_CODE)));
            out.push(tensor(
                "nested_absmax",
                Dtype::F32,
                vec![n.absmax.len()],
                f32s(&n.absmax),
            ));
            out.push(tensor(
                "nested_quant_map",
                Dtype::F32,
                vec![n.code.len()],
                f32s(&n.code),
            ));
            json += &format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                n.blocksize,
                python_float_repr(n.offset as f64)
            );
        }
    }
    json.push('}');
    out.push(tensor(
        NF4_STATE,
        Dtype::U8,
        vec![json.len()],
        json.into_bytes(),
    ));
    out
}

/// Python's `repr` of a finite float (what `json.dumps` writes): the shortest digits that
/// read back to `x`, positional for decimal exponents -4 to 15 (with at least one digit
/// after the point), else `d.ddde±XX`.
fn python_float_repr(x: f64) -> String {
    let sci = format!("{x:e}"); // shortest round-trip digits: "-1.2345e-5"
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{frac}e{esign}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the point
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

/// The quant state JSON, checked key by key.
struct State {
    blocksize: usize,
    dtype: DType,
    shape: Vec<usize>,
    nested: Option<(usize, f32)>,
}

fn parse_state(path: &Path, name: &str, raw: TensorRef) -> Result<State> {
    let bad = |msg: String| Error::tensor(path, name, msg);
    if raw.dtype != Dtype::U8 {
        return Err(bad(format!(
            "a quant state is U8 (JSON bytes), found {:?}",
            raw.dtype
        )));
    }
    let json: serde_json::Value = serde_json::from_slice(raw.data)
        .map_err(|e| bad(format!("the quant state is not JSON: {e}")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| bad(format!("the quant state is not a JSON object: {json}")))?;
    if let Some(k) = obj.keys().find(|k| !STATE_KEYS.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown quant state key '{k}' (bitsandbytes 0.50 writes {STATE_KEYS:?})"
        )));
    }
    let field = |k: &str| {
        obj.get(k)
            .ok_or_else(|| bad(format!("the quant state has no '{k}'")))
    };
    let uint = |k: &str| {
        field(k)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(format!("quant state '{k}' is not a whole number")))
    };
    let quant_type = field("quant_type")?;
    if quant_type != "nf4" {
        return Err(bad(format!(
            "quant_type {quant_type} is not supported: lema reads nf4 only"
        )));
    }
    let blocksize = uint("blocksize")?;
    if !BLOCKSIZES.contains(&blocksize) {
        return Err(bad(format!(
            "blocksize {blocksize} is not one bitsandbytes uses ({BLOCKSIZES:?})"
        )));
    }
    let dtype = field("dtype")?;
    let dtype = dtype.as_str().and_then(from_torch_name).ok_or_else(|| {
        bad(format!(
            "dtype {dtype} is not one of float32, float16, bfloat16"
        ))
    })?;
    let shape = field("shape")?;
    let shape: Vec<usize> = shape
        .as_array()
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| bad(format!("shape {shape} is not a list of sizes")))?;
    let nested = if obj.contains_key("nested_blocksize") || obj.contains_key("nested_offset") {
        let nested_blocksize = uint("nested_blocksize")?;
        if nested_blocksize == 0 {
            return Err(bad("nested_blocksize 0".into()));
        }
        let nested_dtype = field("nested_dtype")?;
        if nested_dtype != "float32" {
            return Err(bad(format!("nested_dtype {nested_dtype} is not float32")));
        }
        let offset = field("nested_offset")?;
        let offset = offset
            .as_f64()
            .filter(|o| o.is_finite())
            .ok_or_else(|| bad(format!("nested_offset {offset} is not a finite number")))?;
        Some((nested_blocksize, offset as f32))
    } else {
        None
    };
    Ok(State {
        blocksize,
        dtype,
        shape,
        nested,
    })
}

/// Read the NF4 tensor `weight` (a name [`bnb4_weights`] returned) through `get`, the
/// file's tensors by name, validating every size against the quant state: refused, naming
/// the tensor, are a quant state that is not NF4 or has keys or values bitsandbytes does not
/// write, a shape or blocksize that disagrees with a tensor's size (both numbers in the
/// message), a missing or mistyped companion, and a `quant_map` that is not the NF4 table.
pub fn decode_bnb4<'a>(
    path: &Path,
    weight: &str,
    get: impl Fn(&str) -> Option<TensorRef<'a>>,
) -> Result<Nf4Tensor> {
    let (layout, parts) = read_bnb4(path, weight, &get)?;
    let absmax = match (layout.nested, parts.nested) {
        (Some((blocksize, offset)), Some((absmax, code))) => Absmax::Nested(Nested {
            codes: parts.absmax.to_vec(),
            absmax: f32s(absmax),
            code: f32s(code),
            blocksize,
            offset,
        }),
        _ => Absmax::F32(f32s(parts.absmax)),
    };
    Ok(Nf4Tensor {
        shape: layout.shape,
        dtype: layout.dtype,
        blocksize: layout.blocksize,
        packed: parts.packed.to_vec(),
        absmax,
    })
}

/// How an NF4 weight is stored, from its quant state (every part checked against it).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Layout {
    /// The shape of the weight it stands for.
    pub shape: Vec<usize>,
    /// What bitsandbytes dequantizes it to.
    pub dtype: DType,
    pub blocksize: usize,
    /// Double quantization: the second level's block size and the offset added back.
    pub nested: Option<(usize, f32)>,
    /// The packed weight's stored dtype (U8, or a `bnb_4bit_quant_storage` type holding
    /// the same bytes).
    pub storage: Dtype,
}

/// The bytes of an NF4 weight's parts, borrowed from the file.
struct Parts<'a> {
    packed: &'a [u8],
    absmax: &'a [u8],
    /// With double quantization: the nested absmax and the 8-bit code.
    nested: Option<(&'a [u8], &'a [u8])>,
}

/// [`decode_bnb4`]'s checks without copying the data: the layout of `weight`.
pub fn bnb4_layout<'a>(
    path: &Path,
    weight: &str,
    get: impl Fn(&str) -> Option<TensorRef<'a>>,
) -> Result<Nf4Layout> {
    Ok(read_bnb4(path, weight, &get)?.0)
}

fn read_bnb4<'a>(
    path: &Path,
    weight: &str,
    get: &impl Fn(&str) -> Option<TensorRef<'a>>,
) -> Result<(Nf4Layout, Parts<'a>)> {
    let state_name = format!("{weight}.{NF4_STATE}");
    let fetch = |name: &str| {
        get(name).ok_or_else(|| {
            Error::tensor(
                path,
                name,
                "missing (the quant state of the weight needs it)",
            )
        })
    };
    let state = parse_state(path, &state_name, fetch(&state_name)?)?;
    let numel: usize = state.shape.iter().product();
    if numel == 0 {
        return Err(Error::tensor(
            path,
            &state_name,
            format!("shape {:?} holds no elements", state.shape),
        ));
    }
    let blocks = numel.div_ceil(state.blocksize);

    let w = fetch(weight)?;
    if ![Dtype::U8, Dtype::BF16, Dtype::F16, Dtype::F32].contains(&w.dtype) {
        return Err(Error::tensor(
            path,
            weight,
            format!(
                "a packed 4-bit weight is U8 (or a bnb_4bit_quant_storage type), found {:?}",
                w.dtype
            ),
        ));
    }
    let packed_len = numel.div_ceil(2);
    if w.data.len() != packed_len {
        return Err(Error::tensor(
            path,
            weight,
            format!(
                "holds {} bytes of packed 4-bit codes, but the quant state's shape {:?} ({numel} elements) needs {packed_len}",
                w.data.len(),
                state.shape
            ),
        ));
    }
    let sized = |suffix: &str, dtype: Dtype, len: usize, why: &str| -> Result<&'a [u8]> {
        let name = format!("{weight}.{suffix}");
        let t = fetch(&name)?;
        if t.dtype != dtype {
            return Err(Error::tensor(
                path,
                &name,
                format!("expected {dtype:?}, found {:?}", t.dtype),
            ));
        }
        let count = t.data.len() / (dtype.bitsize() / 8);
        if count != len || t.shape.iter().product::<usize>() != len {
            return Err(Error::tensor(
                path,
                &name,
                format!("holds {count} values, but {why} needs {len}"),
            ));
        }
        Ok(t.data)
    };
    let blocks_why = format!(
        "shape {:?} ({numel} elements) in blocks of {}",
        state.shape, state.blocksize
    );
    let qmap = f32s(sized("quant_map", Dtype::F32, 16, "the NF4 table")?);
    if qmap
        .iter()
        .zip(&NF4_CODE)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(Error::tensor(
            path,
            format!("{weight}.quant_map"),
            format!("is not bitsandbytes' NF4 table: {qmap:?}"),
        ));
    }
    let (absmax, nested) = match state.nested {
        None => {
            if let Some(extra) = ["nested_absmax", "nested_quant_map"]
                .iter()
                .find(|s| get(&format!("{weight}.{s}")).is_some())
            {
                return Err(Error::tensor(
                    path,
                    format!("{weight}.{extra}"),
                    "present, but the quant state has no nested_* keys",
                ));
            }
            (sized("absmax", Dtype::F32, blocks, &blocks_why)?, None)
        }
        Some((nested_blocksize, _)) => {
            let codes = sized("absmax", Dtype::U8, blocks, &blocks_why)?;
            let nested_blocks = blocks.div_ceil(nested_blocksize);
            let why = format!("{blocks} absmax codes in nested blocks of {nested_blocksize}");
            let absmax = sized("nested_absmax", Dtype::F32, nested_blocks, &why)?;
            let code = sized("nested_quant_map", Dtype::F32, CODE_LEN, "an 8-bit code")?;
            (codes, Some((absmax, code)))
        }
    };
    let layout = Nf4Layout {
        shape: state.shape,
        dtype: state.dtype,
        blocksize: state.blocksize,
        nested: state.nested,
        storage: w.dtype,
    };
    let parts = Parts {
        packed: w.data,
        absmax,
        nested,
    };
    Ok((layout, parts))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The `quantization_config` transformers writes into config.json for
/// `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...)` (5.x).
pub fn quantization_config(c: Bnb4Config) -> serde_json::Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": c.compute_dtype.torch_name(),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": c.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// Read a config.json's `quantization_config`: None when there is none; a bitsandbytes NF4
/// config as [`Bnb4Config`]; anything else (another method, 8-bit, FP4) refused, naming the
/// key and what was found.
pub fn read_quantization_config(
    path: &Path,
    config: &serde_json::Value,
) -> Result<Option<Bnb4Config>> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    let bad = |msg: String| Error::format(path, format!("quantization_config: {msg}"));
    let get = |k: &str| q.get(k).unwrap_or(&serde_json::Value::Null);
    let method = get("quant_method");
    if method != "bitsandbytes" {
        return Err(bad(format!(
            "quant_method {method} is not supported (lema reads bitsandbytes NF4)"
        )));
    }
    if get("load_in_8bit") == true {
        return Err(bad(
            "load_in_8bit: bitsandbytes 8-bit (LLM.int8) is not supported; lema reads NF4".into(),
        ));
    }
    if get("load_in_4bit") != true {
        return Err(bad(format!(
            "load_in_4bit is {}, not true",
            get("load_in_4bit")
        )));
    }
    let kind = get("bnb_4bit_quant_type");
    if kind != "nf4" {
        return Err(bad(format!(
            "bnb_4bit_quant_type {kind} is not supported: lema reads nf4 only"
        )));
    }
    let compute = get("bnb_4bit_compute_dtype");
    let compute_dtype = match compute {
        serde_json::Value::Null => DType::F32,
        v => v
            .as_str()
            .and_then(|s| from_torch_name(s.strip_prefix("torch.").unwrap_or(s)))
            .ok_or_else(|| {
                bad(format!(
                    "bnb_4bit_compute_dtype {v} is not float32, float16 or bfloat16"
                ))
            })?,
    };
    Ok(Some(Bnb4Config {
        double_quant: get("bnb_4bit_use_double_quant") == true,
        compute_dtype,
    }))
}

#[cfg(test)]
mod tests;
