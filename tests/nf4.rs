//! lema's NF4 codec against bitsandbytes 0.50.2 itself (tools/reference/nf4_reference.py):
//! quantization byte for byte (packed codes, absmax bits, the nested parts), dequantization
//! bit for bit, the saved layout byte for byte, and a tiny Llama that transformers quantized
//! and saved (tests/fixtures/bnb4_tiny/).

mod common;

use lema::quant::{
    self, Absmax, Nf4Tensor, TensorRef, bnb_layout, dequantize_nf4, dequantize_nf4_into_bf16,
    dequantize_nf4_into_f16, dynamic, nf4, quantize_nf4,
};
use lema::types::DType;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

/// A committed test file, under the working directory first (a copy of the tree elsewhere).
fn committed(rel: &str) -> PathBuf {
    let local = Path::new(rel);
    if local.exists() {
        return local.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read_or_skip(rel: &str) -> Option<Vec<u8>> {
    let path = committed(rel);
    match std::fs::read(&path) {
        Ok(b) => Some(b),
        Err(e) => {
            common::skip(&format!(
                "{}: {e} (written by tools/reference/nf4_reference.py)",
                path.display()
            ));
            None
        }
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn dtype_of(d: Dtype) -> DType {
    match d {
        Dtype::F32 => DType::F32,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        other => panic!("input dtype {other:?}"),
    }
}

/// A tensor's values widened to f32 (as bitsandbytes does with `.float()`).
fn widen(st: &SafeTensors, name: &str) -> (Vec<f32>, Vec<usize>, DType) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let dtype = dtype_of(t.dtype());
    let mut out = vec![0.0; t.shape().iter().product()];
    dtype.decode_into(t.data(), &mut out);
    (out, t.shape().to_vec(), dtype)
}

/// Our dequantization in `dtype`, as little-endian bytes (what bitsandbytes returns).
fn dequantize_bytes(t: &Nf4Tensor, dtype: DType) -> Vec<u8> {
    let n = t.numel();
    match dtype {
        DType::F32 => {
            let mut out = vec![0.0f32; n];
            dequantize_nf4(t, &mut out);
            out.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        DType::BF16 => {
            let mut out = vec![half::bf16::ZERO; n];
            dequantize_nf4_into_bf16(t, &mut out);
            out.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        DType::F16 => {
            let mut out = vec![half::f16::ZERO; n];
            dequantize_nf4_into_f16(t, &mut out);
            out.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        DType::U8 | DType::F8E4M3 => panic!("NF4 does not dequantize into bytes"),
    }
}

fn cases(st: &SafeTensors) -> Vec<String> {
    let mut c: Vec<String> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".dq0.packed").map(str::to_string))
        .collect();
    c.sort();
    c
}

#[test]
fn tables_are_bitsandbytes() {
    let Some(bytes) = read_or_skip("tests/data/nf4_reference.safetensors") else {
        return;
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        bits(&f32s(st.tensor("quant_map").unwrap().data())),
        bits(&nf4::NF4_CODE)
    );
    assert_eq!(
        bits(&f32s(st.tensor("nested_quant_map").unwrap().data())),
        bits(dynamic::dynamic_map()),
        "create_dynamic_map(signed=True)"
    );
}

#[test]
fn quantization_is_byte_identical_to_quantize_4bit() {
    let Some(bytes) = read_or_skip("tests/data/nf4_reference.safetensors") else {
        return;
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let cases = cases(&st);
    assert!(cases.len() >= 7, "{cases:?}");
    for case in &cases {
        let (x, shape, dtype) = widen(&st, &format!("{case}.input"));
        for dq in [false, true] {
            let mode = format!("{case}.dq{}", dq as u8);
            let ours = quantize_nf4(&x, &shape, dtype, dq).unwrap();
            let get = |k: &str| st.tensor(&format!("{mode}.{k}")).unwrap();
            let packed = get("packed");
            assert_eq!(packed.shape(), [x.len().div_ceil(2), 1], "{mode}");
            assert!(ours.packed == packed.data(), "{mode}: packed bytes differ");
            match &ours.absmax {
                Absmax::F32(a) => {
                    assert!(!dq);
                    assert_eq!(bits(a), bits(&f32s(get("absmax").data())), "{mode}: absmax");
                }
                Absmax::Nested(n) => {
                    assert!(dq);
                    assert_eq!(get("absmax").dtype(), Dtype::U8);
                    assert_eq!(n.codes, get("absmax").data(), "{mode}: absmax codes");
                    let nested = f32s(get("nested_absmax").data());
                    assert_eq!(bits(&n.absmax), bits(&nested), "{mode}: nested absmax");
                    let offset = f32s(get("offset").data());
                    assert_eq!(
                        n.offset.to_bits(),
                        offset[0].to_bits(),
                        "{mode}: offset {} vs {}",
                        n.offset,
                        offset[0]
                    );
                }
            }
        }
    }
}

#[test]
fn dequantization_is_bit_identical_to_dequantize_4bit() {
    let Some(bytes) = read_or_skip("tests/data/nf4_reference.safetensors") else {
        return;
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for case in cases(&st) {
        let (_, shape, dtype) = widen(&st, &format!("{case}.input"));
        for dq in [false, true] {
            let mode = format!("{case}.dq{}", dq as u8);
            // decoded from bitsandbytes' own saved layout (`<mode>.layout.*`, the packed weight
            // `<mode>.packed`), so this does not lean on our quantizer
            let weight = format!("{mode}.layout");
            let packed = format!("{mode}.packed");
            let t = bnb_layout::decode_bnb4(Path::new("reference"), &weight, |name| {
                let name = if name == weight {
                    packed.as_str()
                } else {
                    name
                };
                st.tensor(name).ok().map(TensorRef::from)
            })
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
            assert_eq!(
                (t.shape.as_slice(), t.dtype),
                (shape.as_slice(), dtype),
                "{mode}"
            );
            let out = st.tensor(&format!("{mode}.out")).unwrap();
            assert!(
                dequantize_bytes(&t, dtype) == out.data(),
                "{mode}: dequantized ({dtype:?}) differs"
            );
            let out32 = st.tensor(&format!("{mode}.out_f32")).unwrap();
            assert!(
                dequantize_bytes(&t, DType::F32) == out32.data(),
                "{mode}: dequantized (f32) differs"
            );
        }
    }
}

#[test]
fn the_saved_layout_is_byte_identical_to_quant_state_as_dict() {
    let Some(bytes) = read_or_skip("tests/data/nf4_reference.safetensors") else {
        return;
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for case in cases(&st) {
        let (x, shape, dtype) = widen(&st, &format!("{case}.input"));
        for dq in [false, true] {
            let mode = format!("{case}.dq{}", dq as u8);
            let ours = quantize_nf4(&x, &shape, dtype, dq).unwrap();
            let weight = format!("{mode}.layout");
            let stored = bnb_layout::encode_bnb4(&weight, &ours);
            let mut theirs: Vec<String> = st
                .names()
                .into_iter()
                .filter(|n| n.starts_with(&format!("{weight}.")))
                .map(str::to_string)
                .collect();
            theirs.sort();
            let mut names: Vec<String> = stored.iter().skip(1).map(|s| s.name.clone()).collect();
            names.sort();
            assert_eq!(names, theirs, "{mode}: keys");
            for s in stored.iter().skip(1) {
                let t = st.tensor(&s.name).unwrap();
                assert_eq!(
                    (s.dtype, s.shape.as_slice()),
                    (t.dtype(), t.shape()),
                    "{}",
                    s.name
                );
                assert!(
                    s.data == t.data(),
                    "{}: bytes differ\n ours   {}\n theirs {}",
                    s.name,
                    String::from_utf8_lossy(&s.data),
                    String::from_utf8_lossy(t.data())
                );
            }
        }
    }
}

#[test]
fn torch_mean_order() {
    let Some(bytes) = read_or_skip("tests/data/nf4_reference.safetensors") else {
        return;
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut seen = 0;
    for name in st.names() {
        let Some(case) = name.strip_suffix(".mean") else {
            continue;
        };
        let x = f32s(st.tensor(&format!("{case}.input")).unwrap().data());
        let want = f32s(st.tensor(name).unwrap().data())[0];
        let got = quant::torch_sum::torch_mean(&x);
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{case}: {got} vs torch {want}"
        );
        seen += 1;
    }
    assert!(seen >= 9);
}

#[test]
fn blockwise_8bit_is_quantize_blockwise() {
    let Some(bytes) = read_or_skip("tests/data/nf4_reference.safetensors") else {
        return;
    };
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let x = f32s(st.tensor("blockwise.input").unwrap().data());
    let q = dynamic::quantize_blockwise(&x, dynamic::dynamic_map(), 256);
    assert_eq!(
        bits(&q.absmax),
        bits(&f32s(st.tensor("blockwise.absmax").unwrap().data()))
    );
    let want = st.tensor("blockwise.codes").unwrap();
    let differ = q
        .codes
        .iter()
        .zip(want.data())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differ, 0, "{differ} of {} codes differ", x.len());
    let mut out = vec![0.0; x.len()];
    dynamic::dequantize_blockwise(&q.codes, &q.absmax, dynamic::dynamic_map(), 256, &mut out);
    assert_eq!(
        bits(&out),
        bits(&f32s(st.tensor("blockwise.out").unwrap().data()))
    );
}

/// transformers' own `save_pretrained` of a bitsandbytes-quantized tiny Llama.
#[test]
fn a_transformers_bnb4_checkpoint_decodes_to_bitsandbytes_values() {
    let dir = common::fixture("bnb4_tiny");
    let Some(model) = read_or_skip("tests/fixtures/bnb4_tiny/model.safetensors") else {
        return;
    };
    let Some(reference) = read_or_skip("tests/fixtures/bnb4_tiny/reference.safetensors") else {
        return;
    };
    let st = SafeTensors::deserialize(&model).unwrap();
    let rf = SafeTensors::deserialize(&reference).unwrap();
    let path = dir.join("model.safetensors");

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let c = bnb_layout::read_quantization_config(&path, &config)
        .unwrap()
        .expect("a quantization_config");
    assert_eq!(
        c,
        quant::Bnb4Config {
            double_quant: true,
            compute_dtype: DType::BF16
        }
    );
    assert_eq!(
        bnb_layout::quantization_config(c),
        config["quantization_config"],
        "the config we would write"
    );

    let names = st.names();
    let weights = bnb_layout::bnb4_weights(&path, names.iter().copied()).unwrap();
    let mut expected: Vec<String> = rf
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".dequantized").map(str::to_string))
        .collect();
    expected.sort();
    assert_eq!(weights, expected);
    assert_eq!(weights.len(), 7, "q, k, v, o, gate, up, down");
    // everything else (embeddings, norms, lm_head) is a plain tensor
    for n in &names {
        let quantized = weights
            .iter()
            .any(|w| *n == w || quant::companion_of(n) == Some(w));
        assert!(
            quantized || st.tensor(n).unwrap().dtype() == Dtype::BF16,
            "{n}"
        );
    }

    for w in &weights {
        let t = bnb_layout::decode_bnb4(&path, w, |name| st.tensor(name).ok().map(TensorRef::from))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.dtype, DType::BF16);
        assert!(matches!(t.absmax, Absmax::Nested(_)), "{w}: double quant");
        let deq = rf.tensor(&format!("{w}.dequantized")).unwrap();
        assert_eq!(deq.shape(), t.shape.as_slice());
        assert!(
            dequantize_bytes(&t, DType::BF16) == deq.data(),
            "{w}: dequantized differs"
        );

        // and quantizing the bf16 original ourselves writes the same tensors, byte for byte
        let (x, shape, dtype) = widen(&rf, &format!("{w}.original"));
        let ours = quantize_nf4(&x, &shape, dtype, true).unwrap();
        assert_eq!(ours, t, "{w}: our quantization of the original");
        for s in bnb_layout::encode_bnb4(w, &ours) {
            let theirs = st.tensor(&s.name).unwrap();
            assert_eq!(
                (s.dtype, s.shape.as_slice()),
                (theirs.dtype(), theirs.shape()),
                "{}",
                s.name
            );
            assert!(s.data == theirs.data(), "{}: bytes differ", s.name);
        }
    }
}
