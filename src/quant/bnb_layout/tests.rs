//! The layout's round trip and every refusal, on tensors built by our own encoder.

use super::*;
use crate::quant::nf4::quantize_nf4;
use std::collections::BTreeMap;

const W: &str = "model.layers.0.mlp.down_proj.weight";

fn file(double_quant: bool) -> BTreeMap<String, StoredTensor> {
    let x: Vec<f32> = (0..13 * 99)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
        .collect();
    let t = quantize_nf4(&x, &[13, 99], DType::BF16, double_quant).unwrap();
    encode_bnb4(W, &t)
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect()
}

fn decode(f: &BTreeMap<String, StoredTensor>) -> Result<Nf4Tensor> {
    decode_bnb4(Path::new("m.safetensors"), W, |name| {
        f.get(name).map(|s| TensorRef {
            dtype: s.dtype,
            shape: s.shape.clone(),
            data: &s.data,
        })
    })
}

fn weights(f: &BTreeMap<String, StoredTensor>) -> Result<Vec<String>> {
    bnb4_weights(Path::new("m.safetensors"), f.keys().map(String::as_str))
}

fn set_state(f: &mut BTreeMap<String, StoredTensor>, edit: impl Fn(&mut serde_json::Value)) {
    let s = f.get_mut(&format!("{W}.{NF4_STATE}")).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&s.data).unwrap();
    edit(&mut v);
    s.data = v.to_string().into_bytes();
    s.shape = vec![s.data.len()];
}

fn err(r: Result<impl std::fmt::Debug>) -> String {
    r.expect_err("refused").to_string()
}

#[test]
fn round_trips_with_and_without_double_quant() {
    for dq in [false, true] {
        let f = file(dq);
        assert_eq!(weights(&f).unwrap(), [W]);
        let t = decode(&f).unwrap();
        let x: Vec<f32> = (0..13 * 99)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        assert_eq!(t, quantize_nf4(&x, &[13, 99], DType::BF16, dq).unwrap());
        assert_eq!(f[W].shape, [644, 1], "ceil(1287 / 2) bytes");
    }
}

#[test]
fn the_json_is_pythons() {
    let f = file(true);
    let json = String::from_utf8(f[&format!("{W}.{NF4_STATE}")].data.clone()).unwrap();
    assert!(json.starts_with(
        r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [13, 99], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0"#
    ), "{json}");
    let cases = [
        (0.050548553466796875, "0.050548553466796875"),
        (1e-5, "1e-05"),
        (1.5e-7, "1.5e-07"),
        (0.0001, "0.0001"),
        (123.0, "123.0"),
        (1e16, "1e+16"),
        (-2.5, "-2.5"),
        (0.0, "0.0"),
    ];
    for (x, want) in cases {
        assert_eq!(python_float_repr(x), want, "{x}");
    }
}

#[test]
fn refuses_fp4_naming_the_tensor() {
    let mut f = file(false);
    let s = f.remove(&format!("{W}.{NF4_STATE}")).unwrap();
    f.insert(format!("{W}.{FP4_STATE}"), s);
    let e = err(weights(&f));
    assert!(
        e.contains(&format!("{W}.quant_state.bitsandbytes__fp4")) && e.contains("FP4"),
        "{e}"
    );
    // and an NF4-named state whose JSON says fp4
    let mut f = file(false);
    set_state(&mut f, |v| v["quant_type"] = "fp4".into());
    let e = err(decode(&f));
    assert!(e.contains(NF4_STATE) && e.contains("\"fp4\""), "{e}");
}

#[test]
fn refuses_a_shape_that_disagrees_with_the_packed_bytes() {
    let mut f = file(true);
    set_state(&mut f, |v| v["shape"] = serde_json::json!([13, 100]));
    let e = err(decode(&f));
    // 13 * 99 = 1287 elements are 644 bytes; [13, 100] needs 650
    assert!(
        e.contains(&format!("'{W}'")) && e.contains("644") && e.contains("650"),
        "{e}"
    );
}

#[test]
fn refuses_a_blocksize_that_disagrees_with_the_absmax() {
    let mut f = file(false);
    set_state(&mut f, |v| v["blocksize"] = 128.into());
    let e = err(decode(&f));
    // 1287 elements: 21 blocks of 64 stored, 11 of 128 expected
    assert!(
        e.contains(&format!("{W}.absmax")) && e.contains("21") && e.contains("11"),
        "{e}"
    );
    let mut f = file(true);
    set_state(&mut f, |v| v["nested_blocksize"] = 8.into());
    let e = err(decode(&f));
    assert!(
        e.contains(&format!("{W}.nested_absmax")) && e.contains("holds 1") && e.contains("needs 3"),
        "{e}"
    );
    let mut f = file(false);
    set_state(&mut f, |v| v["blocksize"] = 48.into());
    let e = err(decode(&f));
    assert!(e.contains("blocksize 48"), "{e}");
}

#[test]
fn refuses_unknown_layouts_by_name() {
    // an unknown quant-state kind
    let mut f = file(false);
    let s = f.remove(&format!("{W}.{NF4_STATE}")).unwrap();
    f.insert(format!("{W}.quant_state.bitsandbytes__int4"), s);
    let e = err(weights(&f));
    assert!(
        e.contains("bitsandbytes__int4") && e.contains("unknown"),
        "{e}"
    );
    // bitsandbytes 8-bit
    let mut f = file(false);
    let s = f[W].clone();
    f.insert(
        "model.layers.0.mlp.up_proj.SCB".into(),
        StoredTensor {
            name: "x".into(),
            ..s
        },
    );
    let e = err(weights(&f));
    assert!(e.contains("up_proj.SCB") && e.contains("8-bit"), "{e}");
    // a companion without a quant state
    let mut f = file(false);
    f.remove(&format!("{W}.{NF4_STATE}"));
    let e = err(weights(&f));
    assert!(
        e.contains(&format!("{W}.absmax")) && e.contains("missing"),
        "{e}"
    );
    // a quant state key bitsandbytes does not write
    let mut f = file(false);
    set_state(&mut f, |v| v["zero_point"] = 3.into());
    let e = err(decode(&f));
    assert!(e.contains("zero_point"), "{e}");
    // nested tensors without the nested keys
    let mut f = file(true);
    set_state(&mut f, |v| {
        let o = v.as_object_mut().unwrap();
        o.retain(|k, _| !k.starts_with("nested_"));
    });
    let e = err(decode(&f));
    assert!(
        e.contains(&format!("{W}.nested_absmax")) && e.contains("no nested_"),
        "{e}"
    );
    // a quant_map that is not NF4 (FP4's table under an NF4 name)
    let mut f = file(false);
    let qm = f.get_mut(&format!("{W}.quant_map")).unwrap();
    qm.data[..4].copy_from_slice(&0.0f32.to_le_bytes());
    let e = err(decode(&f));
    assert!(
        e.contains(&format!("{W}.quant_map")) && e.contains("NF4 table"),
        "{e}"
    );
    // a packed weight of a type bitsandbytes does not store into
    let mut f = file(false);
    f.get_mut(W).unwrap().dtype = Dtype::I64;
    let e = err(decode(&f));
    assert!(e.contains(&format!("'{W}'")) && e.contains("I64"), "{e}");
    // absmax of the wrong type for the layout
    let mut f = file(true);
    f.get_mut(&format!("{W}.absmax")).unwrap().dtype = Dtype::I8;
    let e = err(decode(&f));
    assert!(
        e.contains(&format!("{W}.absmax")) && e.contains("expected U8, found I8"),
        "{e}"
    );
    // a missing companion
    let mut f = file(true);
    f.remove(&format!("{W}.nested_quant_map"));
    let e = err(decode(&f));
    assert!(
        e.contains(&format!("{W}.nested_quant_map")) && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn reads_only_bitsandbytes_nf4_configs() {
    let p = Path::new("config.json");
    let c = Bnb4Config {
        double_quant: true,
        compute_dtype: DType::BF16,
    };
    let cfg = serde_json::json!({ "quantization_config": quantization_config(c) });
    assert_eq!(read_quantization_config(p, &cfg).unwrap(), Some(c));
    assert_eq!(
        read_quantization_config(p, &serde_json::json!({})).unwrap(),
        None
    );
    for (key, value, says) in [
        ("bnb_4bit_quant_type", serde_json::json!("fp4"), "fp4"),
        ("quant_method", serde_json::json!("gptq"), "gptq"),
        ("load_in_8bit", serde_json::json!(true), "8-bit"),
    ] {
        let mut bad = cfg.clone();
        bad["quantization_config"][key] = value;
        let e = err(read_quantization_config(p, &bad));
        assert!(e.contains("config.json") && e.contains(says), "{e}");
    }
}

#[test]
fn companions_name_their_weight() {
    assert_eq!(companion_of(&format!("{W}.nested_quant_map")), Some(W));
    assert_eq!(companion_of(&format!("{W}.{NF4_STATE}")), Some(W));
    assert_eq!(companion_of(W), None);
    assert_eq!(companion_of("model.norm.weight"), None);
}
