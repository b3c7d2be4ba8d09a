//! `lema merge`: fold a LoRA adapter into the base weights, `W += scale·B·A`
//! (GPT-2's Conv1D stores `W` as `[in, out]`, so there `W += scale·(B·A)ᵀ`), and write a
//! new monolithic `.safetensors` in the base file's dtypes, with config.json and the
//! tokenizer files beside it, so that any HF-compatible tool loads the result without
//! PEFT.
//!
//! It streams: tensors go from the memory-mapped base file to the output one at a time,
//! untouched ones as raw bytes and adapted ones through one f32 copy, so peak memory is
//! about the largest adapted weight in f32, not the model. The output is written under a
//! temporary name and renamed into place when complete.

use crate::api::{LemaConfig, open_model};
use crate::backend::cpu::{CpuBackend, CpuBuf};
use crate::backend::{Accumulate, Backend, DType, Gemm};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::fsutil::{SafetensorsWriter, TensorSpec, write_file_atomic};
use crate::import::hf::side_file_names;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// What [`merge_adapter`] did.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// The merged `.safetensors` file.
    pub output: PathBuf,
    /// Weights that received an adapter's update.
    pub merged: Vec<String>,
    /// Tensors written in all.
    pub tensors: usize,
    /// config.json and tokenizer files written beside the output.
    pub side_files: Vec<PathBuf>,
}

/// Encode f32 values as little-endian bytes of `dtype` (round to nearest even).
pub fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::new();
    dtype.encode_into(values, &mut out);
    out
}

/// Merge the PEFT adapter in `adapter_dir` into the model at `model_path` (config.json
/// beside it) and write the result to `out` (a `.safetensors` path), with config.json and
/// the tokenizer files copied beside it.
pub fn merge_adapter(model_path: &Path, adapter_dir: &Path, out: &Path) -> Result<MergeReport> {
    if out.extension().is_none_or(|e| e != "safetensors") {
        return Err(Error::config(format!(
            "the output {} must be a .safetensors file path",
            out.display()
        )));
    }
    if let (Ok(a), Ok(b)) = (model_path.canonicalize(), out.canonicalize())
        && a == b
    {
        return Err(Error::config(format!(
            "the output {} is the base model itself; write the merged model to another path",
            out.display()
        )));
    }
    let cfg = LemaConfig::new(model_path);
    let config_json = cfg.config_json();
    let (gbi, model) = open_model(&cfg)?;
    let be = CpuBackend::<f32>::new();
    let lora = checkpoint::load_adapter(&be, &model, adapter_dir)?;
    let scale = lora.cfg.scale();
    let conv1d = crate::model::family::family(model.config().arch).conv1d_weights;
    // weight name → (A [R, in], B [out, R], in, out)
    let updates: HashMap<String, _> = lora
        .modules
        .iter()
        .map(|m| {
            (
                format!("{}.weight", m.path),
                (&m.a, &m.b, m.in_features, m.out_features),
            )
        })
        .collect();
    let r = lora.cfg.r;

    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    // a quantized weight is written dense, in the dtype its reference expands it to
    // (never requantized), and its other parts (quant state, block scales) are dropped
    let quant = model.quant();
    let dense = |name: &str| quant.and_then(|q| q.get(name));
    let is_part =
        |name: &str| crate::model::quantized::part_of(name).is_some_and(|w| dense(w).is_some());
    let specs: Vec<TensorSpec> = gbi
        .tensors()
        .filter(|t| !is_part(&t.name))
        .map(|t| match dense(&t.name) {
            Some(q) => TensorSpec {
                name: t.name.clone(),
                dtype: q.dtype(),
                shape: q.shape().to_vec(),
            },
            None => TensorSpec {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
            },
        })
        .collect();
    let mut meta: BTreeMap<String, String> = gbi.metadata().clone();
    meta.insert("format".into(), "pt".into());
    meta.insert(
        "lema_merged_adapter".into(),
        adapter_dir.display().to_string(),
    );
    // our own map of the base file, whose pages are handed back after each tensor so
    // that resident memory stays near one tensor (the index's ranges were validated)
    let map = crate::import::map_readonly(model_path)?;
    let mut writer = SafetensorsWriter::create(out, specs, &meta)?;
    let mut merged = Vec::new();
    let mut tensors = 0;
    for t in gbi.tensors() {
        if is_part(&t.name) {
            continue;
        }
        tensors += 1;
        let bytes = map.get(t.offset..t.offset + t.len).ok_or_else(|| {
            Error::tensor(gbi.path(), &t.name, "changed on disk during the merge")
        })?;
        let (shape, dtype) = match dense(&t.name) {
            Some(q) => (q.shape().to_vec(), q.dtype()),
            None => (t.shape.clone(), t.dtype),
        };
        let update = updates.get(&t.name);
        if update.is_none() && dense(&t.name).is_none() {
            writer.write(&t.name, bytes)?;
            crate::import::release_pages(&map, bytes);
            continue;
        }
        let mut w: CpuBuf<f32> = match dense(&t.name) {
            Some(q) => CpuBuf(expand(&gbi, &t.name, q)?),
            None => be.upload_weight(bytes, t.dtype)?,
        };
        crate::import::release_pages(&map, bytes);
        let Some(&(a, b, fin, fout)) = update else {
            writer.write(&t.name, &encode(w.as_slice(), dtype))?;
            continue;
        };
        let want = if conv1d { [fin, fout] } else { [fout, fin] };
        if shape != want {
            return Err(Error::tensor(
                gbi.path(),
                &t.name,
                format!("has shape {shape:?}, the adapter expects {want:?}"),
            ));
        }
        let g = |m, n, trans_a, trans_b| Gemm {
            m,
            n,
            k: r,
            trans_a,
            trans_b,
            alpha: scale,
            accumulate: Accumulate::Add,
        };
        if conv1d {
            // W[in, out] += scale · Aᵀ[in, R] · Bᵀ[R, out]  (= scale·(B·A)ᵀ)
            be.matmul(&mut w, a, b, g(fin, fout, true, true))?;
        } else {
            // W[out, in] += scale · B[out, R] · A[R, in]
            be.matmul(&mut w, b, a, g(fout, fin, false, false))?;
        }
        if let Some(i) = w.as_slice().iter().position(|x| !x.is_finite()) {
            return Err(Error::tensor(
                adapter_dir,
                &t.name,
                format!("merging gives a non-finite weight at element {i}; the adapter is broken"),
            ));
        }
        writer.write(&t.name, &encode(w.as_slice(), dtype))?;
        merged.push(t.name.clone());
    }
    let output = writer.finish()?;

    // config.json and the tokenizer files beside the output
    let src_dir = config_json
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut side_files = Vec::new();
    let names = std::iter::once("config.json").chain(side_file_names());
    for name in names {
        let from = if name == "config.json" {
            config_json.clone()
        } else {
            src_dir.join(name)
        };
        if !from.is_file() {
            continue;
        }
        let to = out_dir.join(name);
        let same = matches!((from.canonicalize(), to.canonicalize()), (Ok(a), Ok(b)) if a == b);
        if !same {
            let mut bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
            if name == "config.json" {
                bytes = without_hub_id(&from, &bytes)?;
            }
            write_file_atomic(&to, &bytes)?;
        }
        side_files.push(to);
    }
    Ok(MergeReport {
        output,
        merged,
        tensors,
        side_files,
    })
}

/// The quantized weight `name` of `gbi` (stored as `q` says) as its reference expands it:
/// NF4 as bitsandbytes' `dequantize_4bit` (in its quant-state dtype), FP8 as transformers'
/// `Fp8Dequantize` (in the model's dtype); widened to f32.
fn expand(
    gbi: &crate::gbi::Gbi,
    name: &str,
    q: &crate::model::quantized::QuantWeight,
) -> Result<Vec<f32>> {
    use crate::model::quantized::QuantWeight;
    use crate::quant::bnb_layout::{TensorRef, decode_bnb4};
    if let QuantWeight::Fp8(w) = q {
        let bytes = |n: &str| {
            gbi.get(n)
                .map(|t| gbi.bytes(t))
                .ok_or_else(|| Error::tensor(gbi.path(), n, "is missing"))
        };
        let scales = bytes(&format!("{name}{}", crate::quant::fp8::SCALE_SUFFIX))?;
        let t = crate::quant::fp8::Fp8Tensor {
            shape: [w.shape[0], w.shape[1]],
            codes: bytes(name)?.to_vec(),
            scale_inv: scales
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        };
        let mut out = vec![0.0f32; w.shape.iter().product()];
        crate::quant::fp8::dequantize_fp8(&t, w.dtype, &mut out);
        return Ok(out);
    }
    let get = |n: &str| {
        gbi.get(n).map(|t| TensorRef {
            dtype: t.dtype.into(),
            shape: t.shape.clone(),
            data: gbi.bytes(t),
        })
    };
    let q = decode_bnb4(gbi.path(), name, get)?;
    let mut out = vec![0.0f32; q.numel()];
    crate::quant::nf4::dequantize_nf4(&q, &mut out);
    for x in &mut out {
        *x = q.dtype.round(*x);
    }
    Ok(out)
}

/// config.json without `_name_or_path`: the merged weights are no longer the Hub model it
/// may name, and adapters trained on them name their base by that field
/// (checkpoint::base_model_id); and without `quantization_config`, since the merged
/// weights are dense.
fn without_hub_id(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    // and without `quantization_config`: the merged weights are written dense
    let removed = v.as_object_mut().is_some_and(|obj| {
        let hub = obj.remove("_name_or_path").is_some();
        obj.remove("quantization_config").is_some() || hub
    });
    if !removed {
        return Ok(bytes.to_vec());
    }
    let text = serde_json::to_string_pretty(&v)
        .map_err(|e| Error::format(path, format!("cannot re-encode: {e}")))?;
    Ok(text.into_bytes())
}
