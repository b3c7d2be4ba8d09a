//! The newer architectures as users have them: a sharded HF folder through `prepare`, and
//! the refusals that name what is wrong (an unknown `model_type`, a tensor whose shape
//! disagrees with config.json, a missing q/k norm, a RoPE scaling lema does not run).

mod common;
use common::*;
use lema::{Batch, Device, LemaConfig, LemaModel};
use std::path::Path;

fn logits(model: &Path, case: &str) -> Vec<f32> {
    let mut c = LemaConfig::new(model);
    c.adapter_path = Some(fixture(case).join("adapter"));
    c.device = Device::Cpu;
    let mut m = LemaModel::new(c).expect("model");
    let b = Batch::new(
        (0..12).map(|i| (i * 7 % 96) as u32).collect(),
        vec![-100; 12],
        1,
        12,
    )
    .unwrap();
    m.evaluate(&b, true).expect("eval").2.unwrap()
}

fn open_err(dir: &Path) -> String {
    let mut c = LemaConfig::new(dir.join("model.safetensors"));
    c.device = Device::Cpu;
    match LemaModel::new(c) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// A copy of fixture `case` in `dir` with config.json changed by `edit`.
fn copy_with(case: &str, dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let src = fixture(case);
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn a_sharded_qwen2_folder_prepares_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qwen2.safetensors");
    let report = lema::import::prepare(&fixture("qwen2_tied").join("sharded"), &out, None, false)
        .expect("prepare a sharded folder");
    assert!(out.is_file(), "{report:?}");
    let a = logits(&out, "qwen2_tied");
    let b = logits(
        &fixture("qwen2_tied").join("model.safetensors"),
        "qwen2_tied",
    );
    assert_eq!(
        a, b,
        "the prepared shards give other logits than the single file"
    );
}

#[test]
fn an_unknown_architecture_names_the_field_and_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    copy_with("qwen2_tied", dir.path(), |c| {
        c["model_type"] = "falcon".into()
    });
    let msg = open_err(dir.path());
    for part in [
        "'falcon'",
        "model_type",
        "llama, mistral, qwen2, qwen3, phi3, gemma3_text, gpt2",
    ] {
        assert!(msg.contains(part), "{part} missing from: {msg}");
    }
}

#[test]
fn a_head_dim_that_disagrees_with_the_tensors_names_the_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    copy_with("qwen3", dir.path(), |c| c["head_dim"] = 8.into());
    let msg = open_err(dir.path());
    // the first tensor sized by head_dim: q_norm's [D]
    assert!(
        msg.contains("self_attn.q_norm.weight")
            && msg.contains("expected shape [8]")
            && msg.contains("found [16]"),
        "{msg}"
    );
}

#[test]
fn kv_heads_that_disagree_with_the_tensors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    copy_with("mistral_sw", dir.path(), |c| {
        c["num_key_value_heads"] = 4.into()
    });
    let msg = open_err(dir.path());
    assert!(
        msg.contains("k_proj.weight") && msg.contains("expected shape"),
        "{msg}"
    );
}

#[test]
fn a_qwen3_file_without_its_q_norm_names_it() {
    let dir = tempfile::tempdir().unwrap();
    // a Qwen2 file (no q/k norms) declared as Qwen3
    copy_with("qwen2_tied", dir.path(), |c| {
        c["model_type"] = "qwen3".into();
        c["head_dim"] = 8.into();
    });
    let msg = open_err(dir.path());
    assert!(
        msg.contains("self_attn.q_norm.weight") && msg.contains("missing"),
        "{msg}"
    );
}

/// LongRoPE: the Hub layout (`rope_scaling` with the legacy `type`) reads as the
/// transformers-5 one, the attention factor is derived as transformers does (√1.5 for
/// 64 / 16 positions), and a call past the original 16 positions switches to the long
/// factors — which the PEFT fixture (12 positions) cannot show.
#[test]
fn longrope_layouts_attention_factor_and_the_switch_to_long_factors() {
    let src = fixture("phi3_longrope");
    let read = |f: &str| lema::config::ModelConfig::from_file(&src.join(f)).unwrap();
    let (new, hub) = (read("config.json"), read("config.hub.json"));
    assert_eq!(new.rope_scaling, hub.rope_scaling);
    let lema::config::RopeScaling::LongRope {
        original_max_position_embeddings,
        attention_factor,
        ..
    } = new.rope_scaling.clone()
    else {
        panic!("not LongRoPE: {:?}", new.rope_scaling)
    };
    assert_eq!(original_max_position_embeddings, 16);
    assert!((attention_factor as f64 - 1.5f64.sqrt()).abs() < 1e-7);
    assert!((new.attention_scale() as f64 - 1.5 / 8f64.sqrt()).abs() < 1e-7);

    let model = lema::model::Model::new(new.clone());
    let rope = model.rope_of(0);
    let (d, theta) = (new.head_dim as f64, new.rope_theta as f64);
    let base = |i: usize| 1.0 / theta.powf(2.0 * i as f64 / d);
    let short = [1.0, 1.3, 2.1, 3.7];
    let long = [1.1, 2.5, 6.0, 13.0];
    let within: Vec<u32> = (0..16).collect();
    let past: Vec<u32> = (0..17).collect();
    for (positions, factors) in [(&within, short), (&past, long)] {
        let got = rope.for_positions(positions);
        for (i, (&g, e)) in got.iter().zip(factors).enumerate() {
            let want = base(i) / e;
            assert!(
                (g as f64 - want).abs() <= 1e-7 * want,
                "{} positions, frequency {i}: {g} vs {want}",
                positions.len()
            );
        }
    }
}

/// YaRN: the Hub layout (`rope_scaling` with the legacy `type`, as Qwen2.5's model card
/// writes it) reads as the transformers-5 one, the attention factor is transformers'
/// `0.1 ln 4 + 1`, and the band keeps frequency 0, blends 1 half-way and divides 2 and 3 by
/// the factor — what the PEFT fixture checks through the logits.
#[test]
fn yarn_layouts_attention_factor_and_band() {
    let src = fixture("qwen2_yarn");
    let read = |f: &str| lema::config::ModelConfig::from_file(&src.join(f)).unwrap();
    let (new, hub) = (read("config.json"), read("config.hub.json"));
    assert_eq!(new.rope_scaling, hub.rope_scaling);
    assert_eq!(new.rope_inv_freq(), hub.rope_inv_freq());
    let lema::config::RopeScaling::Yarn {
        factor,
        original_max_position_embeddings,
        attention_factor,
        ..
    } = new.rope_scaling
    else {
        panic!("not YaRN: {:?}", new.rope_scaling)
    };
    assert_eq!((factor, original_max_position_embeddings), (4.0, 128));
    let af = 0.1 * 4f64.ln() + 1.0;
    assert!((attention_factor as f64 - af).abs() < 1e-7);
    assert!((new.attention_scale() as f64 - af * af / 8f64.sqrt()).abs() < 1e-7);
    let base = |i: i32| 10000f64.powf(-2.0 * i as f64 / 8.0);
    let want = [
        base(0),
        base(1) * (0.5 / 4.0 + 0.5),
        base(2) / 4.0,
        base(3) / 4.0,
    ];
    for (i, (&g, w)) in new.rope_inv_freq().iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 1e-7 * w,
            "frequency {i}: {g} vs {w}"
        );
    }
}

/// Gemma 3 refuses YaRN (and LongRoPE) on its global layers: transformers would scale
/// only those layers' attention by the factor; no checkpoint does it.
#[test]
fn gemma3_refuses_yarn() {
    let dir = tempfile::tempdir().unwrap();
    copy_with("gemma3", dir.path(), |c| {
        c["rope_parameters"]["full_attention"] = serde_json::json!({
            "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
            "original_max_position_embeddings": 16
        });
    });
    let msg = open_err(dir.path());
    assert!(
        msg.contains("yarn RoPE scaling are not supported for Gemma 3"),
        "{msg}"
    );
}

#[test]
fn phi3_dropout_is_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    copy_with("phi3", dir.path(), |c| c["resid_pdrop"] = 0.1.into());
    let msg = open_err(dir.path());
    assert!(
        msg.contains("resid_pdrop = 0.1") && msg.contains("set it to 0.0"),
        "{msg}"
    );
}

#[test]
fn a_tied_checkpoint_without_lm_head_trains_without_a_prepare() {
    // as transformers' save_pretrained writes a tied model: no lm_head.weight
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("qwen2_tied");
    let path = copy_of("qwen2_tied", dir.path(), lema::types::DType::F32, |n| {
        n != "lm_head.weight"
    });
    assert_eq!(
        logits(&path, "qwen2_tied"),
        logits(&src.join("model.safetensors"), "qwen2_tied"),
        "the embedding as the head gives other logits than the materialised head"
    );
}
