//! The KV-cache inference path against the full forward: logits of a prefill followed by
//! token-by-token decoding equal those of one `evaluate` pass, on the tiny fixture models
//! with their PEFT adapters (and without), for both memory strategies. Both paths compute
//! in f32 with the same kernels but different row groupings, so agreement is to ~1e-6.
//!
//! Also: batched generation with left padding gives each row what it gives alone, greedy
//! generation picks the argmax of the full forward's logits, and stop tokens end a row.

mod common;
use common::*;
use lema::generate::argmax;
use lema::{Batch, Device, GenerateOptions, LemaConfig, LemaModel, SamplingParams, Strategy};

fn model(case: &str, adapter: bool, strategy: Strategy) -> LemaModel {
    let dir = fixture(case);
    let mut c = LemaConfig::new(dir.join("model.safetensors"));
    if adapter {
        c.adapter_path = Some(dir.join("adapter"));
    }
    c.device = Device::Cpu;
    c.strategy = strategy;
    LemaModel::new(c).expect("model")
}

/// Fresh random token ids (a fixed seed per call site, so failures repeat).
fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut r = lema::rng::Rng::new(seed);
    (0..n).map(|_| r.below(vocab as u64) as u32).collect()
}

fn full_logits(m: &mut LemaModel, ids: &[u32], batch: usize, seq: usize) -> Vec<f32> {
    let b = Batch::language_modeling(ids.to_vec(), batch, seq).unwrap();
    m.evaluate(&b, true).unwrap().2.unwrap()
}

#[test]
fn prefill_then_decode_equals_the_full_forward() {
    for case in ["llama_gqa", "llama_tied", "gpt2"] {
        for adapter in [true, false] {
            for strategy in [Strategy::Streaming, Strategy::Resident] {
                let mut m = model(case, adapter, strategy);
                let v = m.model_config().vocab_size;
                let (batch, seq) = (2, 11);
                let ids = random_ids(batch * seq, v, 17);
                let want = full_logits(&mut m, &ids, batch, seq);
                // prefill of 5 tokens, then one token at a time
                let mut pieces = vec![5];
                pieces.extend(std::iter::repeat_n(1, seq - 5));
                let got = m.logits_through_cache(&ids, batch, &pieces).unwrap();
                let tag = format!("{case} adapter={adapter} {strategy:?}");
                assert_close(
                    &format!("{tag} prefill+decode"),
                    &f64s(&got),
                    &f64s(&want),
                    1e-5,
                );
                // the whole sequence at once and uneven pieces agree as well
                let got = m.logits_through_cache(&ids, batch, &[seq]).unwrap();
                assert_close(&format!("{tag} one piece"), &f64s(&got), &f64s(&want), 1e-5);
                let got = m.logits_through_cache(&ids, batch, &[1, 3, 2, 5]).unwrap();
                assert_close(&format!("{tag} 1,3,2,5"), &f64s(&got), &f64s(&want), 1e-5);
            }
        }
    }
}

#[test]
fn the_adapter_changes_the_cached_logits() {
    // guards the test above against an adapter that is silently not applied
    let mut with = model("llama_gqa", true, Strategy::Streaming);
    let mut without = model("llama_gqa", false, Strategy::Streaming);
    let ids = random_ids(8, with.model_config().vocab_size, 3);
    let a = with
        .logits_through_cache(&ids, 1, &[4, 1, 1, 1, 1])
        .unwrap();
    let b = without
        .logits_through_cache(&ids, 1, &[4, 1, 1, 1, 1])
        .unwrap();
    assert!(rel_err(&f64s(&a), &f64s(&b)) > 1e-3);
}

#[test]
fn greedy_generation_follows_the_full_forward() {
    for case in ["llama_gqa", "gpt2"] {
        let mut m = model(case, true, Strategy::Resident);
        let v = m.model_config().vocab_size;
        let prompt = random_ids(6, v, 9);
        let opts = GenerateOptions {
            max_new_tokens: 8,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
        };
        let mut streamed = Vec::new();
        let out = m
            .generate(std::slice::from_ref(&prompt), &opts, &mut |r, t| {
                streamed.push((r, t));
                Ok(())
            })
            .unwrap();
        assert_eq!(out[0].tokens.len(), 8);
        assert!(!out[0].stopped);
        assert_eq!(
            streamed,
            out[0].tokens.iter().map(|&t| (0, t)).collect::<Vec<_>>()
        );
        // each generated token is the argmax of a full forward over everything before it
        let mut seq = prompt.clone();
        for &tok in &out[0].tokens {
            let lg = full_logits(&mut m, &seq, 1, seq.len());
            let last = &lg[(seq.len() - 1) * v..];
            assert_eq!(tok, argmax(last), "{case} after {} tokens", seq.len());
            seq.push(tok);
        }
    }
}

#[test]
fn batched_left_padded_generation_matches_one_by_one() {
    for case in ["llama_gqa", "gpt2"] {
        let mut m = model(case, true, Strategy::Resident);
        let v = m.model_config().vocab_size;
        let prompts = vec![
            random_ids(3, v, 1),
            random_ids(9, v, 2),
            random_ids(6, v, 3),
        ];
        let opts = GenerateOptions {
            max_new_tokens: 6,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
        };
        let together = m.generate(&prompts, &opts, &mut |_, _| Ok(())).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let alone = m
                .generate(std::slice::from_ref(p), &opts, &mut |_, _| Ok(()))
                .unwrap();
            assert_eq!(together[i], alone[0], "{case} prompt {i}");
        }
        // a stop token ends its row and is not part of the output
        let stop = together[1].tokens[2];
        let first = together[1].tokens.iter().position(|&t| t == stop).unwrap();
        let opts = GenerateOptions {
            stop_ids: vec![stop],
            ..opts
        };
        let out = m
            .generate(&prompts[1..2], &opts, &mut |_, _| Ok(()))
            .unwrap();
        assert!(out[0].stopped);
        assert_eq!(out[0].tokens, together[1].tokens[..first]);
    }
}

#[test]
fn sampling_is_seeded() {
    let mut m = model("llama_gqa", true, Strategy::Resident);
    let v = m.model_config().vocab_size;
    let prompt = vec![random_ids(4, v, 5)];
    let run = |m: &mut LemaModel, seed| {
        let opts = GenerateOptions {
            max_new_tokens: 12,
            sampling: SamplingParams {
                temperature: 1.5,
                top_k: Some(20),
                top_p: Some(0.95),
                seed,
            },
            stop_ids: vec![],
        };
        m.generate(&prompt, &opts, &mut |_, _| Ok(())).unwrap()[0]
            .tokens
            .clone()
    };
    assert_eq!(run(&mut m, 1), run(&mut m, 1));
    assert_ne!(run(&mut m, 1), run(&mut m, 2));
}

#[test]
fn bad_generation_requests_are_errors() {
    let mut m = model("gpt2", false, Strategy::Streaming);
    let opts = GenerateOptions {
        max_new_tokens: 4,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
    };
    let e = m
        .generate(&[vec![]], &opts, &mut |_, _| Ok(()))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("prompt 0 is empty; generation needs at least one token"),
        "{e}"
    );
    let e = m
        .generate(&[vec![1_000_000]], &opts, &mut |_, _| Ok(()))
        .unwrap_err();
    for part in [
        "token id 1000000",
        "of 96 rows",
        "tokenized for another model",
    ] {
        assert!(e.to_string().contains(part), "{part:?} not in: {e}");
    }
    // GPT-2's learned positions bound prompt + new tokens
    let max = m.model_config().max_position_embeddings;
    let long = vec![vec![1u32; max]];
    let e = m.generate(&long, &opts, &mut |_, _| Ok(())).unwrap_err();
    for part in ["learned positions", "shorten the prompt or max_new_tokens"] {
        assert!(e.to_string().contains(part), "{part:?} not in: {e}");
    }
}
