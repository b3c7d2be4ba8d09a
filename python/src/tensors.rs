//! safetensors files of named tensors given as raw bytes (a torch optimizer's state, in a
//! checkpoint, without pickle).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use safetensors::tensor::{Dtype, TensorView};
use std::path::PathBuf;

/// (name, dtype, shape, little-endian bytes)
type RawTensor = (String, String, Vec<usize>, Vec<u8>);

fn dtype_of(name: &str) -> PyResult<Dtype> {
    Ok(match name {
        "F32" => Dtype::F32,
        "F64" => Dtype::F64,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "I64" => Dtype::I64,
        "I32" => Dtype::I32,
        "U8" => Dtype::U8,
        "BOOL" => Dtype::BOOL,
        other => {
            return Err(PyValueError::new_err(format!(
                "dtype {other} is not one lema stores (F32, F64, F16, BF16, I64, I32, U8, BOOL)"
            )));
        }
    })
}

/// The bytes of a safetensors file holding `tensors` (and string `metadata`).
#[pyfunction]
#[pyo3(signature = (tensors, metadata=None))]
pub fn save_safetensors<'py>(
    py: Python<'py>,
    tensors: Vec<RawTensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> PyResult<Bound<'py, PyBytes>> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let view = TensorView::new(dtype_of(dtype)?, shape.clone(), bytes)
                .map_err(|e| PyValueError::new_err(format!("tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<PyResult<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(PyBytes::new(py, &bytes))
}

/// Every tensor of a safetensors file as (name, dtype, shape, bytes), and its metadata.
#[pyfunction]
pub fn load_safetensors(
    path: PathBuf,
) -> PyResult<(Vec<RawTensor>, std::collections::HashMap<String, String>)> {
    let data = std::fs::read(&path).map_err(|e| crate::errors::to_py(lema::Error::io(&path, e)))?;
    let bad = |e: safetensors::SafeTensorError| {
        PyValueError::new_err(format!(
            "{}: not a readable safetensors file: {e}",
            path.display()
        ))
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(&data).map_err(bad)?;
    let st = safetensors::SafeTensors::deserialize(&data).map_err(bad)?;
    let mut out: Vec<RawTensor> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            (
                name,
                format!("{:?}", t.dtype()),
                t.shape().to_vec(),
                t.data().to_vec(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}
