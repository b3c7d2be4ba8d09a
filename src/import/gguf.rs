//! Reader for GGUF files (llama.cpp's model format), versions 2 and 3, little-endian.
//!
//! Layout: magic `GGUF`, version (u32), tensor count (u64), metadata count (u64), the
//! metadata key/value pairs, the tensor infos, padding to `general.alignment` (default
//! 32), then the tensor data; each tensor's offset is relative to the start of the data.
//!
//! The file is treated as hostile: every count and length is checked against the bytes
//! that remain before anything is allocated, sizes use checked arithmetic, and every
//! tensor's byte range is checked against the file size. Parsing never panics.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor can have.
pub const MAX_DIMS: usize = 4;

/// A ggml tensor element type, as numbered in `ggml.h`.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

impl GgmlType {
    /// The type with ggml's numeric id, or `None` for ids that ggml does not (or no
    /// longer) define.
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            _ => return None,
        })
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | F16 | BF16 | I8 | I16 | I32 | I64 | F64 => 1,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 | IQ4_NL | MXFP4 => 32,
            NVFP4 => 64,
            Q1_0 => 128,
            Q2_K | Q3_K | Q4_K | Q5_K | Q6_K | Q8_K | IQ2_XXS | IQ2_XS | IQ3_XXS | IQ1_S
            | IQ3_S | IQ2_S | IQ4_XS | IQ1_M | TQ1_0 | TQ2_0 => 256,
        }
    }

    /// Bytes per block (`ggml_type_size`).
    pub fn block_bytes(self) -> u64 {
        use GgmlType::*;
        match self {
            F32 | I32 => 4,
            F16 | BF16 | I16 => 2,
            I8 => 1,
            I64 | F64 => 8,
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            Q8_0 => 34,
            Q8_1 => 36,
            Q2_K => 84,
            Q3_K => 110,
            Q4_K => 144,
            Q5_K => 176,
            Q6_K => 210,
            Q8_K => 292,
            IQ2_XXS => 66,
            IQ2_XS => 74,
            IQ3_XXS => 98,
            IQ1_S => 50,
            IQ4_NL => 18,
            IQ3_S => 110,
            IQ2_S => 82,
            IQ4_XS => 136,
            IQ1_M => 56,
            TQ1_0 => 54,
            TQ2_0 => 66,
            MXFP4 => 17,
            NVFP4 => 36,
            Q1_0 => 18,
        }
    }

    /// Whether the type stores blocks of quantized values (anything but plain numbers).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// ggml's name for the type (`"Q4_K"`, `"F16"`, …).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A typed array from the metadata. Elements are stored unboxed so that an array costs
/// no more memory than its encoding in the file (strings excepted: 24 bytes each).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
}

impl MetaArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::F64(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The GGUF name of the element type.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaArray::U8(_) => "u8",
            MetaArray::I8(_) => "i8",
            MetaArray::U16(_) => "u16",
            MetaArray::I16(_) => "i16",
            MetaArray::U32(_) => "u32",
            MetaArray::I32(_) => "i32",
            MetaArray::U64(_) => "u64",
            MetaArray::I64(_) => "i64",
            MetaArray::F32(_) => "f32",
            MetaArray::F64(_) => "f64",
            MetaArray::Bool(_) => "bool",
            MetaArray::String(_) => "string",
        }
    }

    /// The elements as i64 when the array holds integers (of any width).
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        Some(match self {
            MetaArray::U8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            MetaArray::I8(v) => v.iter().map(|&x| i64::from(x)).collect(),
            MetaArray::U16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            MetaArray::I16(v) => v.iter().map(|&x| i64::from(x)).collect(),
            MetaArray::U32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            MetaArray::I32(v) => v.iter().map(|&x| i64::from(x)).collect(),
            MetaArray::I64(v) => v.clone(),
            MetaArray::U64(v) => {
                let mut out = Vec::with_capacity(v.len());
                for &x in v {
                    out.push(i64::try_from(x).ok()?);
                }
                out
            }
            _ => return None,
        })
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(MetaArray),
}

impl MetaValue {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(x) => Some(u64::from(x)),
            MetaValue::U16(x) => Some(u64::from(x)),
            MetaValue::U32(x) => Some(u64::from(x)),
            MetaValue::U64(x) => Some(x),
            MetaValue::I8(x) => u64::try_from(x).ok(),
            MetaValue::I16(x) => u64::try_from(x).ok(),
            MetaValue::I32(x) => u64::try_from(x).ok(),
            MetaValue::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    /// The value as f64, when it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(x) => Some(f64::from(x)),
            MetaValue::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    /// The value as a string slice, when it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, when it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The array, when the value is one.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short description of the type, for messages.
    pub fn type_name(&self) -> String {
        match self {
            MetaValue::U8(_) => "u8".into(),
            MetaValue::I8(_) => "i8".into(),
            MetaValue::U16(_) => "u16".into(),
            MetaValue::I16(_) => "i16".into(),
            MetaValue::U32(_) => "u32".into(),
            MetaValue::I32(_) => "i32".into(),
            MetaValue::U64(_) => "u64".into(),
            MetaValue::I64(_) => "i64".into(),
            MetaValue::F32(_) => "f32".into(),
            MetaValue::F64(_) => "f64".into(),
            MetaValue::Bool(_) => "bool".into(),
            MetaValue::String(_) => "string".into(),
            MetaValue::Array(a) => format!("array of {} {}", a.len(), a.type_name()),
        }
    }
}

/// Where one tensor lives and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The tensor's GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml dimensions, `dims[0]` varying fastest (the reverse of the HF shape).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Offset of the first byte relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        // Checked at parse time not to overflow.
        self.dims.iter().product()
    }

    /// The shape in HF / row-major order (slowest-varying first).
    pub fn hf_shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// The parsed header of a GGUF file: everything except the tensor data.
#[derive(Clone, Debug)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Data alignment in bytes.
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

impl GgufHeader {
    /// Parse the header from the whole file's bytes; `path` is used in messages only.
    /// Checks that every tensor's data lies inside `bytes`.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        Parser {
            buf: bytes,
            pos: 0,
            path,
        }
        .header()
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`, when present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(MetaValue::as_str)
    }
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// The parsed header.
    pub header: GgufHeader,
}

impl GgufFile {
    /// Open and memory-map `path`, then parse and validate its header.
    pub fn open(path: &Path) -> Result<Self> {
        let mmap = super::map_readonly(path)?;
        let header = GgufHeader::parse(&mmap, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            header,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw bytes of one tensor (a range checked at parse time).
    pub fn tensor_data(&self, info: &TensorInfo) -> Result<&[u8]> {
        let range = self
            .header
            .data_offset
            .checked_add(info.offset)
            .and_then(|start| Some((start, start.checked_add(info.n_bytes)?)))
            .and_then(|(s, e)| Some(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
        range
            .and_then(|r| self.mmap.get(r))
            .ok_or_else(|| Error::tensor(&self.path, &info.name, "data lies outside the file"))
    }

    /// Let the kernel drop the resident pages of a tensor's data once it has been used
    /// (they are read from the file again if needed), so that converting a large file
    /// does not keep all of it resident.
    pub fn release(&self, info: &TensorInfo) {
        if let Ok(data) = self.tensor_data(info) {
            super::release_pages(&self.mmap, data);
        }
    }
}

/// Minimum encoded size of one metadata value of GGUF type id `ty`, used to bound array
/// lengths before allocating; `None` for unknown ids.
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => 8,  // string: u64 length
        9 => 12, // array: u32 type + u64 count
        _ => return None,
    })
}

struct Parser<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Parser<'a> {
    fn err(&self, msg: impl fmt::Display) -> Error {
        Error::format(
            self.path,
            format!("GGUF header at byte {}: {msg}", self.pos),
        )
    }

    fn remaining(&self) -> u64 {
        self.buf.len().saturating_sub(self.pos) as u64
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                self.err(format!(
                    "file ends inside {what} (needs {n} bytes, {} left)",
                    self.remaining()
                ))
            })?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.err("bad range"))?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_size` bytes long: rejected unless that many
    /// items could fit in the rest of the file.
    fn count(&mut self, min_size: u64, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let need = n.checked_mul(min_size);
        match need {
            Some(need) if need <= self.remaining() => usize::try_from(n)
                .map_err(|_| self.err(format!("{what} {n} does not fit in memory"))),
            _ => Err(self.err(format!(
                "{what} {n} cannot fit in the {} bytes left in the file",
                self.remaining()
            ))),
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(1, &format!("length of {what}"))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.err(format!("{what} is not UTF-8: {e}")))
    }

    fn header(mut self) -> Result<GgufHeader> {
        let magic = self.take(4, "magic")?;
        if magic != GGUF_MAGIC {
            return Err(self.err(format!(
                "not a GGUF file (magic {magic:02x?}, expected \"GGUF\")"
            )));
        }
        let version = self.u32("version")?;
        match version {
            2 | 3 => {}
            1 => return Err(self.err("GGUF version 1 is not supported (only 2 and 3); re-convert the model with a current llama.cpp")),
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(self.err(format!(
                    "big-endian GGUF (version {}) is not supported; use a little-endian file",
                    v.swap_bytes()
                )));
            }
            v => return Err(self.err(format!("unknown GGUF version {v} (supported: 2, 3)"))),
        }
        // Smallest tensor info: name length (8) + n_dims (4) + type (4) + offset (8).
        let n_tensors = self.count(24, "tensor count")?;
        // Smallest key/value: key length (8) + type (4) + a one-byte value.
        let n_kv = self.count(13, "metadata count")?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = self.string(&format!("key of metadata entry {i}"))?;
            let ty = self.u32(&format!("type of metadata '{key}'"))?;
            let value = self.value(ty, &key)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(self.err(format!("duplicate metadata key '{key}'")));
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(MetaValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
            Some(v) => {
                return Err(self.err(format!(
                    "metadata 'general.alignment' must be a power-of-two u32, got {v:?}"
                )));
            }
        };

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
        let mut names = std::collections::HashSet::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let info = self.tensor_info(i, alignment)?;
            if !names.insert(info.name.clone()) {
                return Err(self.err(format!("duplicate tensor name '{}'", info.name)));
            }
            tensors.push(info);
        }

        let end_of_infos = self.pos as u64;
        let data_offset = end_of_infos
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| self.err("data offset overflows"))?;
        let file_len = self.buf.len() as u64;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(Error::tensor(
                        self.path,
                        &t.name,
                        format!(
                            "data at offset {} + {} bytes runs past the end of the file ({} bytes, data section at {})",
                            t.offset, t.n_bytes, file_len, data_offset
                        ),
                    ));
                }
            }
        }
        Ok(GgufHeader {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<MetaValue> {
        let what = format!("value of metadata '{key}'");
        Ok(match ty {
            0 => MetaValue::U8(self.u8(&what)?),
            1 => MetaValue::I8(self.u8(&what)? as i8),
            2 => MetaValue::U16(self.u16(&what)?),
            3 => MetaValue::I16(self.u16(&what)? as i16),
            4 => MetaValue::U32(self.u32(&what)?),
            5 => MetaValue::I32(self.u32(&what)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(&what)?)),
            7 => MetaValue::Bool(self.bool(&what)?),
            8 => MetaValue::String(self.string(&what)?),
            9 => MetaValue::Array(self.meta_array(key)?),
            10 => MetaValue::U64(self.u64(&what)?),
            11 => MetaValue::I64(self.u64(&what)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(&what)?)),
            t => {
                return Err(self.err(format!(
                    "metadata '{key}' has unknown value type {t} (known: 0..=12)"
                )));
            }
        })
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.err(format!("{what}: bool byte {b} is neither 0 nor 1"))),
        }
    }

    fn meta_array(&mut self, key: &str) -> Result<MetaArray> {
        let ty = self.u32(&format!("element type of metadata array '{key}'"))?;
        if ty == 9 {
            return Err(self.err(format!(
                "metadata '{key}' is an array of arrays, which is not supported"
            )));
        }
        let min = min_value_size(ty).ok_or_else(|| {
            self.err(format!(
                "metadata array '{key}' has unknown element type {ty} (known: 0..=12)"
            ))
        })?;
        let n = self.count(min, &format!("length of metadata array '{key}'"))?;
        let what = format!("element of metadata array '{key}'");
        macro_rules! read_vec {
            ($variant:ident, $read:expr) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push($read(&mut *self)?);
                }
                MetaArray::$variant(v)
            }};
        }
        Ok(match ty {
            0 => MetaArray::U8(self.take(n, &what)?.to_vec()),
            1 => MetaArray::I8(self.take(n, &what)?.iter().map(|&b| b as i8).collect()),
            2 => read_vec!(U16, |p: &mut Self| p.u16(&what)),
            3 => read_vec!(I16, |p: &mut Self| p.u16(&what).map(|x| x as i16)),
            4 => read_vec!(U32, |p: &mut Self| p.u32(&what)),
            5 => read_vec!(I32, |p: &mut Self| p.u32(&what).map(|x| x as i32)),
            6 => read_vec!(F32, |p: &mut Self| p.u32(&what).map(f32::from_bits)),
            7 => read_vec!(Bool, |p: &mut Self| p.bool(&what)),
            8 => read_vec!(String, |p: &mut Self| p.string(&what)),
            10 => read_vec!(U64, |p: &mut Self| p.u64(&what)),
            11 => read_vec!(I64, |p: &mut Self| p.u64(&what).map(|x| x as i64)),
            12 => read_vec!(F64, |p: &mut Self| p.u64(&what).map(f64::from_bits)),
            _ => return Err(self.err(format!("metadata array '{key}': bad element type {ty}"))),
        })
    }

    fn tensor_info(&mut self, index: usize, alignment: u64) -> Result<TensorInfo> {
        let name = self.string(&format!("name of tensor {index}"))?;
        let n_dims = self.u32(&format!("dimension count of tensor '{name}'"))?;
        let n_dims = usize::try_from(n_dims)
            .ok()
            .filter(|&n| (1..=MAX_DIMS).contains(&n))
            .ok_or_else(|| {
                self.err(format!(
                    "tensor '{name}' has {n_dims} dimensions (allowed: 1..={MAX_DIMS})"
                ))
            })?;
        let mut dims = Vec::with_capacity(n_dims);
        for d in 0..n_dims {
            dims.push(self.u64(&format!("dimension {d} of tensor '{name}'"))?);
        }
        let type_id = self.u32(&format!("type of tensor '{name}'"))?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| {
            self.err(format!(
                "tensor '{name}' has unknown ggml type id {type_id}"
            ))
        })?;
        let offset = self.u64(&format!("offset of tensor '{name}'"))?;
        if offset % alignment != 0 {
            return Err(self.err(format!(
                "tensor '{name}' offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| i64::try_from(n).is_ok())
            .ok_or_else(|| self.err(format!("tensor '{name}' dimensions {dims:?} overflow")))?;
        let first = dims.first().copied().unwrap_or(1);
        if first % ty.block_size() != 0 {
            return Err(self.err(format!(
                "tensor '{name}' of type {ty}: row length {first} is not a multiple of the block size {}",
                ty.block_size()
            )));
        }
        let n_bytes = (n_elements / ty.block_size())
            .checked_mul(ty.block_bytes())
            .ok_or_else(|| self.err(format!("tensor '{name}' byte size overflows")))?;
        Ok(TensorInfo {
            name,
            dims,
            ty,
            offset,
            n_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::gguf_write::GgufBuilder;

    fn parse(bytes: &[u8]) -> Result<GgufHeader> {
        GgufHeader::parse(bytes, Path::new("test.gguf"))
    }

    fn err_text(bytes: &[u8]) -> String {
        match parse(bytes) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    fn sample() -> GgufBuilder {
        GgufBuilder::new()
            .kv("general.architecture", MetaValue::String("llama".into()))
            .kv("u8", MetaValue::U8(200))
            .kv("i8", MetaValue::I8(-5))
            .kv("u16", MetaValue::U16(65_000))
            .kv("i16", MetaValue::I16(-30_000))
            .kv("u32", MetaValue::U32(4_000_000_000))
            .kv("i32", MetaValue::I32(-2_000_000_000))
            .kv("u64", MetaValue::U64(u64::MAX))
            .kv("i64", MetaValue::I64(i64::MIN))
            .kv("f32", MetaValue::F32(1e-5))
            .kv("f64", MetaValue::F64(-2.5))
            .kv("bool", MetaValue::Bool(true))
            .kv(
                "strs",
                MetaValue::Array(MetaArray::String(vec![
                    "a".into(),
                    "ü €".into(),
                    String::new(),
                ])),
            )
            .kv("ints", MetaValue::Array(MetaArray::I32(vec![1, -2, 3])))
            .kv("empty", MetaValue::Array(MetaArray::F32(vec![])))
            .tensor_f32("a", &[3, 2], &[1., 2., 3., 4., 5., 6.])
            .tensor("q", &[64], GgmlType::Q4_0, vec![7u8; 36])
    }

    #[test]
    fn parses_what_the_writer_wrote() -> Result<()> {
        let bytes = sample().build();
        let h = parse(&bytes)?;
        assert_eq!(h.version, 3);
        assert_eq!(h.alignment, 32);
        assert_eq!(h.data_offset % 32, 0);
        assert_eq!(h.architecture(), Some("llama"));
        assert_eq!(h.get("u8"), Some(&MetaValue::U8(200)));
        assert_eq!(h.get("i8"), Some(&MetaValue::I8(-5)));
        assert_eq!(h.get("u16"), Some(&MetaValue::U16(65_000)));
        assert_eq!(h.get("i16"), Some(&MetaValue::I16(-30_000)));
        assert_eq!(h.get("u32"), Some(&MetaValue::U32(4_000_000_000)));
        assert_eq!(h.get("i32"), Some(&MetaValue::I32(-2_000_000_000)));
        assert_eq!(h.get("u64"), Some(&MetaValue::U64(u64::MAX)));
        assert_eq!(h.get("i64"), Some(&MetaValue::I64(i64::MIN)));
        assert_eq!(h.get("f32"), Some(&MetaValue::F32(1e-5)));
        assert_eq!(h.get("f64"), Some(&MetaValue::F64(-2.5)));
        assert_eq!(h.get("bool"), Some(&MetaValue::Bool(true)));
        assert_eq!(
            h.get("strs").and_then(MetaValue::as_array),
            Some(&MetaArray::String(vec![
                "a".into(),
                "ü €".into(),
                String::new()
            ]))
        );
        assert_eq!(
            h.get("ints")
                .and_then(MetaValue::as_array)
                .and_then(MetaArray::to_i64_vec),
            Some(vec![1, -2, 3])
        );
        assert_eq!(
            h.get("empty")
                .and_then(MetaValue::as_array)
                .map(MetaArray::len),
            Some(0)
        );
        let a = h.tensor("a").ok_or_else(|| Error::config("no a"))?;
        assert_eq!(
            (a.dims.clone(), a.ty, a.offset, a.n_bytes),
            (vec![3, 2], GgmlType::F32, 0, 24)
        );
        assert_eq!(a.hf_shape(), vec![2, 3]);
        let q = h.tensor("q").ok_or_else(|| Error::config("no q"))?;
        assert_eq!(
            (q.ty, q.offset, q.n_bytes, q.n_elements()),
            (GgmlType::Q4_0, 32, 36, 64)
        );

        // Through the file: the data of each tensor is where the header says.
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, &bytes).map_err(|e| Error::io(&path, e))?;
        let f = GgufFile::open(&path)?;
        let a = f
            .header
            .tensor("a")
            .cloned()
            .ok_or_else(|| Error::config("no a"))?;
        let data = f.tensor_data(&a)?;
        assert_eq!(&data[..4], &1f32.to_le_bytes());
        assert_eq!(&data[20..24], &6f32.to_le_bytes());
        let q = f
            .header
            .tensor("q")
            .cloned()
            .ok_or_else(|| Error::config("no q"))?;
        assert_eq!(f.tensor_data(&q)?, &[7u8; 36][..]);
        Ok(())
    }

    #[test]
    fn version_2_and_custom_alignment() -> Result<()> {
        let bytes = sample()
            .version(2)
            .kv("general.alignment", MetaValue::U32(64))
            .tensor_f32("b", &[1], &[9.0])
            .build();
        let h = parse(&bytes)?;
        assert_eq!((h.version, h.alignment), (2, 64));
        assert_eq!(h.data_offset % 64, 0);
        assert_eq!(h.tensor("b").map(|t| t.offset), Some(128));
        let start = (h.data_offset + 128) as usize;
        assert_eq!(&bytes[start..start + 4], &9f32.to_le_bytes());
        Ok(())
    }

    #[test]
    fn rejects_bad_headers_with_clear_messages() {
        let good = sample().build();
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(err_text(&bad_magic).contains("not a GGUF file"));
        assert!(err_text(&sample().version(1).build()).contains("version 1"));
        assert!(err_text(&sample().version(4).build()).contains("unknown GGUF version 4"));
        assert!(err_text(&sample().version(3u32.swap_bytes()).build()).contains("big-endian"));
        // The last tensor's data ends before the file's final padding.
        let end = parse(&good)
            .map(|h| (h.data_offset + 32 + 36) as usize)
            .unwrap_or(good.len());
        for cut in [0, 3, 7, 20, good.len() / 2, end - 1] {
            assert!(parse(&good[..cut]).is_err(), "truncated at {cut}");
        }
        let dup = GgufBuilder::new()
            .kv("k", MetaValue::U8(1))
            .kv("k", MetaValue::U8(2))
            .build();
        assert!(err_text(&dup).contains("duplicate metadata key 'k'"));
        let dup_t = GgufBuilder::new()
            .tensor_f32("t", &[1], &[0.])
            .tensor_f32("t", &[1], &[0.])
            .build();
        assert!(err_text(&dup_t).contains("duplicate tensor name 't'"));
        let bad_align = GgufBuilder::new()
            .kv("general.alignment", MetaValue::U32(3))
            .build();
        assert!(err_text(&bad_align).contains("general.alignment"));
        let unknown_type = GgufBuilder::new()
            .tensor_raw("t", &[32], 5, vec![0; 32])
            .build();
        let msg = err_text(&unknown_type);
        assert!(
            msg.contains("'t'") && msg.contains("unknown ggml type id 5"),
            "{msg}"
        );
        let zero_dims = GgufBuilder::new()
            .tensor("t", &[], GgmlType::F32, vec![])
            .build();
        assert!(err_text(&zero_dims).contains("0 dimensions"));
        let five_dims = GgufBuilder::new()
            .tensor_f32("t", &[1, 1, 1, 1, 1], &[0.])
            .build();
        assert!(err_text(&five_dims).contains("5 dimensions"));
        let ragged = GgufBuilder::new()
            .tensor("t", &[16, 2], GgmlType::Q4_0, vec![0; 18])
            .build();
        assert!(err_text(&ragged).contains("block size 32"));
        let overflow = GgufBuilder::new()
            .tensor("t", &[u64::MAX / 2, 4], GgmlType::F32, vec![])
            .build();
        assert!(err_text(&overflow).contains("overflow"));
    }

    #[test]
    fn rejects_data_outside_the_file() {
        let mut bytes = GgufBuilder::new().tensor_f32("t", &[8], &[1.0; 8]).build();
        bytes.truncate(bytes.len() - 4);
        let msg = err_text(&bytes);
        assert!(
            msg.contains("tensor 't'") && msg.contains("past the end"),
            "{msg}"
        );
    }

    /// Overwrite the little-endian u64 at `at`.
    fn patch_u64(bytes: &mut [u8], at: usize, v: u64) {
        bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn lying_counts_are_rejected_before_allocating() {
        let good = sample().build();
        // Tensor count at byte 8, metadata count at byte 16.
        for (at, what) in [(8, "tensor count"), (16, "metadata count")] {
            let mut b = good.clone();
            patch_u64(&mut b, at, u64::MAX / 3);
            let msg = err_text(&b);
            assert!(msg.contains(what) && msg.contains("cannot fit"), "{msg}");
        }
        // The first key's length at byte 24.
        let mut b = good.clone();
        patch_u64(&mut b, 24, 1 << 60);
        assert!(err_text(&b).contains("cannot fit"));
        // An array length: find the "ints" array (type 5, count 3) and make it huge.
        let key = b"ints";
        let pos = good
            .windows(4)
            .position(|w| w == key)
            .map(|p| p + 4 + 4 + 4);
        let mut b = good.clone();
        if let Some(p) = pos {
            patch_u64(&mut b, p, u64::MAX / 4);
        }
        let msg = err_text(&b);
        assert!(
            msg.contains("metadata array 'ints'") && msg.contains("cannot fit"),
            "{msg}"
        );
    }
}
