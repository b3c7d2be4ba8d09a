//! A minimal GGUF (v3) writer, for building small files in tests and fixtures. It writes
//! whatever it is given, so tests can also build files that are wrong on purpose.

use super::gguf::{GgmlType, MetaArray, MetaValue};

/// Builds a GGUF file in memory: metadata, then tensors with their raw data.
#[derive(Clone, Debug)]
pub struct GgufBuilder {
    version: u32,
    alignment: u64,
    kvs: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Default for GgufBuilder {
    fn default() -> Self {
        Self::new()
    }
}

fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

/// The ggml numeric id of a type (inverse of [`GgmlType::from_id`]).
pub fn ggml_type_id(ty: GgmlType) -> u32 {
    (0..64u32)
        .find(|&id| GgmlType::from_id(id) == Some(ty))
        .unwrap_or(u32::MAX)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => {
            macro_rules! arr {
                ($id:expr, $v:expr, $f:expr) => {{
                    out.extend(($id as u32).to_le_bytes());
                    out.extend(($v.len() as u64).to_le_bytes());
                    for x in $v {
                        $f(&mut *out, x);
                    }
                }};
            }
            match a {
                MetaArray::U8(v) => arr!(0, v, |o: &mut Vec<u8>, x: &u8| o.push(*x)),
                MetaArray::I8(v) => arr!(1, v, |o: &mut Vec<u8>, x: &i8| o.push(*x as u8)),
                MetaArray::U16(v) => {
                    arr!(2, v, |o: &mut Vec<u8>, x: &u16| o.extend(x.to_le_bytes()))
                }
                MetaArray::I16(v) => {
                    arr!(3, v, |o: &mut Vec<u8>, x: &i16| o.extend(x.to_le_bytes()))
                }
                MetaArray::U32(v) => {
                    arr!(4, v, |o: &mut Vec<u8>, x: &u32| o.extend(x.to_le_bytes()))
                }
                MetaArray::I32(v) => {
                    arr!(5, v, |o: &mut Vec<u8>, x: &i32| o.extend(x.to_le_bytes()))
                }
                MetaArray::F32(v) => {
                    arr!(6, v, |o: &mut Vec<u8>, x: &f32| o.extend(x.to_le_bytes()))
                }
                MetaArray::Bool(v) => arr!(7, v, |o: &mut Vec<u8>, x: &bool| o.push(u8::from(*x))),
                MetaArray::String(v) => arr!(8, v, |o: &mut Vec<u8>, x: &String| put_str(o, x)),
                MetaArray::U64(v) => {
                    arr!(10, v, |o: &mut Vec<u8>, x: &u64| o.extend(x.to_le_bytes()))
                }
                MetaArray::I64(v) => {
                    arr!(11, v, |o: &mut Vec<u8>, x: &i64| o.extend(x.to_le_bytes()))
                }
                MetaArray::F64(v) => {
                    arr!(12, v, |o: &mut Vec<u8>, x: &f64| o.extend(x.to_le_bytes()))
                }
            }
        }
    }
}

impl GgufBuilder {
    /// An empty version-3 file with the default alignment (32).
    pub fn new() -> Self {
        Self {
            version: 3,
            alignment: 32,
            kvs: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Set the version number written in the header.
    pub fn version(mut self, v: u32) -> Self {
        self.version = v;
        self
    }

    /// Add a metadata entry (`general.alignment` also sets the alignment used).
    pub fn kv(mut self, key: &str, value: MetaValue) -> Self {
        if key == "general.alignment"
            && let MetaValue::U32(a) = value
            && a.is_power_of_two()
        {
            self.alignment = u64::from(a);
        }
        self.kvs.push((key.to_string(), value));
        self
    }

    /// Add a tensor with ggml dims (fastest-varying first) and its raw bytes.
    pub fn tensor(self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        self.tensor_raw(name, dims, ggml_type_id(ty), data)
    }

    /// Add a tensor with a raw ggml type id (for testing unknown types).
    pub fn tensor_raw(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), type_id, data));
        self
    }

    /// Add an F32 tensor from values.
    pub fn tensor_f32(self, name: &str, dims: &[u64], values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, data)
    }

    /// The file's bytes.
    pub fn build(&self) -> Vec<u8> {
        let align = |n: u64| n.next_multiple_of(self.alignment);
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend(type_id(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset = align(offset + data.len() as u64);
        }
        out.resize(align(out.len() as u64) as usize, 0);
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            out.resize(align(out.len() as u64) as usize, 0);
        }
        out
    }
}
