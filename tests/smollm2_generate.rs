//! Generation with the KV cache on the real model, SmolLM2-135M-Instruct (prepared afresh
//! from the cached GGUF by `common::smollm2`; a visible skip when it is absent): greedy decoding of the reference
//! chat prompt gives transformers' tokens (tests/data/smollm2_reference.json), alone and
//! batched with a longer prompt (left padding), and the cached logits agree with the
//! full forward on bf16 weights.

mod common;
use common::*;
use lema::generate::{PromptFormat, encode_prompt};
use lema::tokenizer::Tokenizer;
use lema::{Device, GenerateOptions, LemaConfig, LemaModel, SamplingParams, Strategy};
use std::path::Path;

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn kv_cache_greedy_decoding_matches_transformers() {
    let Some(dir) = common::smollm2::prepared_or_skip() else {
        return;
    };
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2_reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let mut c = LemaConfig::new(dir.join("model.safetensors"));
    c.device = Device::Cpu;
    c.strategy = Strategy::Resident;
    let mut m = LemaModel::new(c).unwrap();
    let prompt = ids_of(&r["chat_prompt_ids"]);
    let want = ids_of(&r["greedy_new_ids"]);
    // the reference includes the end-of-turn token; we stop at it and leave it out
    let opts = GenerateOptions {
        max_new_tokens: want.len() + 4,
        sampling: SamplingParams::default(),
        stop_ids: tok.eos_ids.clone(),
    };
    let out = m
        .generate(std::slice::from_ref(&prompt), &opts, &mut |_, _| Ok(()))
        .unwrap();
    let text = tok.decode(&out[0].tokens, false).unwrap();
    println!("greedy with the KV cache: {text:?}");
    let mut got = out[0].tokens.clone();
    if out[0].stopped {
        got.push(want[want.len() - 1]);
    }
    assert_eq!(got, want, "{text:?} vs {:?}", r["greedy_text"]);

    // batched with a longer prompt: the reference row is unchanged by left padding
    let other = encode_prompt(
        &tok,
        "Write one sentence about the history of the bicycle, please.",
        None,
        PromptFormat::Chat,
    )
    .unwrap();
    assert!(other.len() > prompt.len());
    let both = m
        .generate(&[other.clone(), prompt.clone()], &opts, &mut |_, _| Ok(()))
        .unwrap();
    assert_eq!(both[1], out[0]);
    println!(
        "batched neighbour: {:?}",
        tok.decode(&both[0].tokens, false).unwrap()
    );

    // cached logits (prefill + 1-token steps) against one full forward, bf16 weights
    let mut seq = prompt.clone();
    seq.extend_from_slice(&want[..want.len() - 1]);
    let t = seq.len();
    let full = m
        .evaluate(
            &lema::Batch::language_modeling(seq.clone(), 1, t).unwrap(),
            true,
        )
        .unwrap()
        .2
        .unwrap();
    let mut pieces = vec![prompt.len()];
    pieces.extend(std::iter::repeat_n(1, t - prompt.len()));
    let cached = m.logits_through_cache(&seq, 1, &pieces).unwrap();
    assert_close(
        "SmolLM2 cached vs full logits",
        &f64s(&cached),
        &f64s(&full),
        1e-5,
    );
}
