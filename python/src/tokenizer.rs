//! `lema._lema.Tokenizer`: the model's tokenizer (tokenizer.json and
//! tokenizer_config.json of a folder), as lema's training and generation use it.

use crate::errors::IntoPy;
use pyo3::prelude::*;
use std::path::PathBuf;

#[pyclass(module = "lema._lema", frozen)]
pub struct Tokenizer {
    inner: lema::tokenizer::Tokenizer,
}

#[pymethods]
impl Tokenizer {
    /// The tokenizer of folder `dir`.
    #[new]
    fn new(dir: PathBuf) -> PyResult<Self> {
        Ok(Tokenizer {
            inner: lema::tokenizer::Tokenizer::from_dir(&dir).py_err()?,
        })
    }

    #[pyo3(signature = (text, add_special_tokens=true))]
    fn encode(&self, text: &str, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        self.inner.encode(text, add_special_tokens).py_err()
    }

    #[pyo3(signature = (ids, skip_special_tokens=true))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        self.inner.decode(&ids, skip_special_tokens).py_err()
    }

    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_token_id()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
}
