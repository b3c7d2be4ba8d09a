//! `lema prepare` of GGUF files of every family with a GGUF description, against the
//! tiny HF fixtures they were made from. The GGUFs (`tests/fixtures/<case>/model.gguf`,
//! tools/fixtures/make_gguf_fixtures.py) are written as llama.cpp's convert_hf_to_gguf.py
//! writes them and checked by transformers' own GGUF loader (the fixture's logits, max
//! diff 0), so they are an independent reference, not lema's round trip.
//!
//! Per case: every tensor prepare writes equals the fixture's model.safetensors exactly
//! (names mapped, Mistral's q/k rows un-permuted, Gemma's norms − 1, the tied head
//! materialised), and config.json parses to the fixture config's `ModelConfig`; for
//! Gemma 3, which `config.rs` does not parse yet, the config.json values are compared.
//! Then the bad inputs: an unsupported quant type, an unknown architecture, and metadata
//! that disagrees with a tensor's shape, each named.

mod common;
use lema::config::ModelConfig;
use lema::import::gguf::{GgmlType, GgufHeader, MetaValue};
use lema::import::gguf_write::GgufBuilder;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

type TestResult = Result<(), Box<dyn std::error::Error>>;
/// Name → (shape, F32 bytes) of a safetensors file.
type Tensors = HashMap<String, (Vec<usize>, Vec<u8>)>;

fn tensors(path: &Path) -> Result<Tensors, Box<dyn std::error::Error>> {
    let bytes = std::fs::read(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
            (n, (v.shape().to_vec(), v.data().to_vec()))
        })
        .collect())
}

fn prepare(
    case: &str,
) -> Result<(tempfile::TempDir, lema::import::PrepareReport), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let report = lema::import::prepare(
        &common::fixture(case).join("model.gguf"),
        &dir.path().join("out"),
        Some(lema::types::DType::F32),
        false,
    )?;
    Ok((dir, report))
}

/// Gemma's norms go through the file as f32 (w + 1) and come back as f32 ((w + 1) − 1),
/// what transformers' loader also computes: equal to w within one rounding near 1.
fn through_offset(bytes: &[u8]) -> Vec<u8> {
    bytes
        .chunks_exact(4)
        .flat_map(|c| ((f32::from_le_bytes([c[0], c[1], c[2], c[3]]) + 1.0) - 1.0).to_le_bytes())
        .collect()
}

fn same_tensors(case: &str, model_type: &str) -> TestResult {
    let (dir, report) = prepare(case)?;
    assert_eq!(report.model_type, model_type, "{case}");
    let got = tensors(&report.output)?;
    let want = tensors(&common::fixture(case).join("model.safetensors"))?;
    let mut names: Vec<&String> = got.keys().collect();
    names.sort();
    let mut want_names: Vec<&String> = want.keys().collect();
    want_names.sort();
    assert_eq!(names, want_names, "{case}: tensor names");
    for (name, (shape, bytes)) in &want {
        let (gshape, gbytes) = &got[name];
        assert_eq!(gshape, shape, "{case} {name}");
        let want = if model_type == "gemma3_text" && name.ends_with("norm.weight") {
            through_offset(bytes)
        } else {
            bytes.clone()
        };
        assert!(*gbytes == want, "{case} {name}: values differ");
    }
    let _ = dir;
    Ok(())
}

/// `ModelConfig` without the raw JSON (the written file has other keys and order).
fn config_of(path: &Path) -> Result<String, Box<dyn std::error::Error>> {
    let mut c = ModelConfig::from_file(path)?;
    c.raw = Value::Null;
    Ok(format!("{c:?}"))
}

fn same_config(case: &str) -> TestResult {
    let (dir, _) = prepare(case)?;
    assert_eq!(
        config_of(&dir.path().join("out/config.json"))?,
        config_of(&common::fixture(case).join("config.json"))?,
        "{case}"
    );
    Ok(())
}

#[test]
fn mistral_as_llama_file() -> TestResult {
    same_tensors("mistral_sw", "mistral")?;
    same_config("mistral_sw")
}

#[test]
fn qwen2_tied() -> TestResult {
    same_tensors("qwen2_tied", "qwen2")?;
    same_config("qwen2_tied")
}

#[test]
fn qwen3() -> TestResult {
    same_tensors("qwen3", "qwen3")?;
    same_config("qwen3")
}

#[test]
fn phi3_fused() -> TestResult {
    same_tensors("phi3", "phi3")?;
    same_config("phi3")
}

#[test]
fn gemma3_tensors_and_config_values() -> TestResult {
    same_tensors("gemma3", "gemma3_text")?;
    let (dir, _) = prepare("gemma3")?;
    let got: Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("out/config.json"),
    )?)?;
    let want: Value = serde_json::from_str(&std::fs::read_to_string(
        common::fixture("gemma3").join("config.json"),
    )?)?;
    for k in [
        "model_type",
        "architectures",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_activation",
        "query_pre_attn_scalar",
        "sliding_window",
        "layer_types",
        "rope_parameters",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "attention_bias",
        "tie_word_embeddings",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "use_bidirectional_attention",
    ] {
        assert_eq!(
            num(&got[k]),
            num(&want[k]),
            "config.json {k}: {} vs {}",
            got[k],
            want[k]
        );
    }
    assert_eq!(got["rms_norm_eps"].as_f64().map(|x| x as f32), Some(1e-6));
    Ok(())
}

/// Numbers as f64 (8 and 8.0 alike), recursively.
fn num(v: &Value) -> Value {
    match v {
        Value::Number(n) => n.as_f64().map(Value::from).unwrap_or(Value::Null),
        Value::Array(a) => Value::Array(a.iter().map(num).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), num(v))).collect()),
        o => o.clone(),
    }
}

// ---- bad input ----

/// The fixture GGUF's header rebuilt with `edit` applied to its metadata and tensors.
fn rebuilt(
    case: &str,
    meta: impl Fn(&str, &MetaValue) -> Option<MetaValue>,
    tensor: impl Fn(&str) -> Option<(Vec<u64>, GgmlType, Vec<u8>)>,
) -> Result<GgufHeader, Box<dyn std::error::Error>> {
    let path = common::fixture(case).join("model.gguf");
    let bytes = std::fs::read(&path)?;
    let h = GgufHeader::parse(&bytes, &path)?;
    let mut b = GgufBuilder::new();
    for (k, v) in &h.metadata {
        if let Some(v) = meta(k, v) {
            b = b.kv(k, v);
        }
    }
    for t in &h.tensors {
        let start = (h.data_offset + t.offset) as usize;
        let (dims, ty, data) = tensor(&t.name).unwrap_or((
            t.dims.clone(),
            t.ty,
            bytes[start..start + t.n_bytes as usize].to_vec(),
        ));
        b = b.tensor(&t.name, &dims, ty, data);
    }
    Ok(GgufHeader::parse(&b.build(), Path::new("edited.gguf"))?)
}

fn plan_error(h: &GgufHeader) -> String {
    lema::import::gguf_convert::GgufPlan::new(h, Path::new("edited.gguf"), None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

#[test]
fn unsupported_quant_type_names_the_tensor_and_type() -> TestResult {
    // qwen3's attn_output (64 in, 32 out) as Q8_1 (32-value blocks of 36 bytes), a type
    // llama.cpp defines and lema does not dequantize
    let h = rebuilt(
        "qwen3",
        |_, v| Some(v.clone()),
        |n| {
            (n == "blk.1.attn_output.weight")
                .then(|| (vec![64, 32], GgmlType::Q8_1, vec![0; 36 * 2 * 32]))
        },
    )?;
    let m = plan_error(&h);
    assert!(
        m.contains("blk.1.attn_output.weight")
            && m.contains("Q8_1")
            && m.contains("cannot be dequantized"),
        "{m}"
    );
    Ok(())
}

#[test]
fn unknown_architecture_names_the_key_and_the_supported_ones() -> TestResult {
    let h = rebuilt(
        "qwen2_tied",
        |k, v| {
            Some(if k == "general.architecture" {
                MetaValue::String("starcoder2".into())
            } else {
                v.clone()
            })
        },
        |_| None,
    )?;
    let m = plan_error(&h);
    assert!(
        m.contains("'starcoder2'")
            && m.contains("general.architecture")
            && m.contains("llama, qwen2, qwen3, phi3, gemma3"),
        "{m}"
    );
    Ok(())
}

#[test]
fn metadata_that_disagrees_with_a_shape_names_tensor_and_both_shapes() -> TestResult {
    // qwen3 says key_length 16; claim 8: the first tensor checked, attn_k_norm, is [16]
    let h = rebuilt(
        "qwen3",
        |k, v| {
            Some(match k {
                "qwen3.attention.key_length"
                | "qwen3.attention.value_length"
                | "qwen3.rope.dimension_count" => MetaValue::U32(8),
                _ => v.clone(),
            })
        },
        |_| None,
    )?;
    let m = plan_error(&h);
    assert!(
        m.contains("blk.0.attn_k_norm.weight")
            && m.contains("HF shape [16]")
            && m.contains("implies [8] = [head_dim]"),
        "{m}"
    );
    // phi3's fused ffn_up ([gate | up]) must have 2·feed_forward_length rows, not I
    let h = rebuilt(
        "phi3",
        |_, v| Some(v.clone()),
        |n| {
            (n == "blk.0.ffn_up.weight")
                .then(|| (vec![32, 48], GgmlType::F32, vec![0; 48 * 32 * 4]))
        },
    )?;
    let m = plan_error(&h);
    assert!(
        m.contains("blk.0.ffn_up.weight")
            && m.contains("HF shape [48, 32]")
            && m.contains("implies [96, 32] = [2·feed_forward_length, embedding_length]"),
        "{m}"
    );
    Ok(())
}
