//! Rebuild Hugging Face tokenizer files from a GGUF file's `tokenizer.*` metadata.
//!
//! * `tokenizer.ggml.model == "gpt2"`: byte-level BPE. The vocabulary, merges and token
//!   types map one to one onto a `tokenizers` BPE model; the pre-tokenizer is chosen by
//!   `tokenizer.ggml.pre` (`gpt2`, `smollm`, `llama-bpe`), matching llama.cpp's regexes.
//! * `tokenizer.ggml.model == "llama"`: SentencePiece, best effort. GGUF keeps only
//!   pieces and scores, so merges are derived the way `transformers`' Llama converter
//!   does (every split of a piece into two pieces, ranked by the score of the whole
//!   piece), with byte fallback through the `<0xNN>` pieces.
//!
//! `tokenizer.chat_template` and the special tokens go into `tokenizer_config.json`.

use super::gguf::{GgufHeader, MetaArray, MetaValue};
use crate::error::{Error, Result};
use crate::model::gguf::SpmFlavor;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// The pre-tokenizers (`tokenizer.ggml.pre`) that [`from_gguf`] knows for byte-level BPE.
pub const SUPPORTED_PRE: &[&str] = &["gpt2", "smollm", "llama-bpe", "qwen2"];

/// Llama 3's split regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`, HF tokenizer.json).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`, transformers'
/// `tokenization_qwen2.PRETOKENIZE_REGEX`): Llama 3's with single digits (`\p{N}`, not
/// `\p{N}{1,3}`).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The HF tokenizer files rebuilt from GGUF metadata, as JSON values.
#[derive(Clone, Debug)]
pub struct TokenizerFiles {
    /// `tokenizer.json`, loadable by the `tokenizers` library.
    pub tokenizer_json: Value,
    /// `tokenizer_config.json` (special token strings, chat template).
    pub tokenizer_config: Value,
    /// `special_tokens_map.json`.
    pub special_tokens_map: Value,
    /// Things a user may want to know (duplicate pieces, …).
    pub notes: Vec<String>,
}

struct Vocab<'a> {
    path: &'a Path,
    tokens: &'a [String],
    types: Vec<i64>,
    bos: Option<usize>,
    eos: Option<usize>,
    unk: Option<usize>,
    pad: Option<usize>,
}

impl Vocab<'_> {
    fn token(&self, id: Option<usize>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i)).map(String::as_str)
    }

    /// Token ids that the tokenizer must treat as whole, never-split units.
    fn added(&self) -> Vec<(usize, bool)> {
        let specials = [self.bos, self.eos, self.unk, self.pad];
        let mut out = Vec::new();
        for (id, ty) in self.types.iter().enumerate() {
            let special = *ty == token_type::CONTROL || specials.contains(&Some(id));
            if special || *ty == token_type::USER_DEFINED {
                out.push((id, special));
            }
        }
        out
    }

    fn vocab_map(&self, notes: &mut Vec<String>) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::with_capacity(self.tokens.len());
        let mut dups = 0usize;
        for (id, t) in self.tokens.iter().enumerate() {
            if m.contains_key(t) {
                dups += 1;
            } else {
                m.insert(t.clone(), json!(id));
            }
        }
        if dups > 0 {
            notes.push(format!(
                "{}: {dups} tokens repeat an earlier piece; the tokenizer maps each such piece to its first id",
                self.path.display()
            ));
        }
        m
    }
}

fn string_array<'a>(h: &'a GgufHeader, path: &Path, key: &str) -> Result<Option<&'a [String]>> {
    match h.get(key) {
        None => Ok(None),
        Some(MetaValue::Array(MetaArray::String(v))) => Ok(Some(v)),
        Some(v) => Err(Error::format(
            path,
            format!(
                "metadata '{key}' must be an array of strings, got {}",
                v.type_name()
            ),
        )),
    }
}

fn token_id(h: &GgufHeader, path: &Path, key: &str, n: usize) -> Result<Option<usize>> {
    match h.get(key) {
        None => Ok(None),
        // Some converters write -1 for "no such token".
        Some(MetaValue::I32(-1) | MetaValue::I64(-1)) => Ok(None),
        Some(v) => match v.as_u64().and_then(|x| usize::try_from(x).ok()) {
            Some(id) if id < n => Ok(Some(id)),
            // llama.cpp writes -1 (as u32::MAX) for "none" in some files.
            Some(id) if id == u32::MAX as usize => Ok(None),
            Some(id) => Err(Error::format(
                path,
                format!("metadata '{key}' = {id} is not below the vocabulary size {n}"),
            )),
            None => Err(Error::format(
                path,
                format!("metadata '{key}' must be a token id, got {}", v.type_name()),
            )),
        },
    }
}

fn bool_key(h: &GgufHeader, key: &str) -> Option<bool> {
    h.get(key).and_then(MetaValue::as_bool)
}

fn added_token_json(id: usize, content: &str, special: bool) -> Value {
    json!({
        "id": id,
        "content": content,
        "single_word": false,
        "lstrip": false,
        "rstrip": false,
        "normalized": false,
        "special": special,
    })
}

/// A post-processor adding BOS and/or EOS, or `None` when neither is added.
fn template_processor(v: &Vocab, add_bos: bool, add_eos: bool) -> Option<Value> {
    let bos = if add_bos {
        v.bos.zip(v.token(v.bos))
    } else {
        None
    };
    let eos = if add_eos {
        v.eos.zip(v.token(v.eos))
    } else {
        None
    };
    if bos.is_none() && eos.is_none() {
        return None;
    }
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut special_tokens = serde_json::Map::new();
    for (part, type_id) in [("A", 0u32), ("B", 1u32)] {
        let target = if part == "A" { &mut single } else { &mut pair };
        if let Some((_, t)) = bos {
            target.push(special(t, type_id));
        }
        target.push(seq(part, type_id));
        if let Some((_, t)) = eos {
            target.push(special(t, type_id));
        }
    }
    let mut full_pair = single.clone();
    full_pair.extend(pair);
    for (id, t) in [bos, eos].into_iter().flatten() {
        special_tokens.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    Some(json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": full_pair,
        "special_tokens": special_tokens,
    }))
}

/// Rebuild the tokenizer files from a GGUF header. `model_max_length` (the context
/// length) goes into tokenizer_config.json when given.
pub fn from_gguf(
    h: &GgufHeader,
    path: &Path,
    model_max_length: Option<usize>,
) -> Result<TokenizerFiles> {
    let model = h
        .get("tokenizer.ggml.model")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| {
            Error::format(
                path,
                "metadata 'tokenizer.ggml.model' is missing; the file has no tokenizer",
            )
        })?;
    let tokens = string_array(h, path, "tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::format(path, "metadata 'tokenizer.ggml.tokens' is missing"))?;
    let n = tokens.len();
    let types = match h.get("tokenizer.ggml.token_type") {
        None => vec![token_type::NORMAL; n],
        Some(v) => v
            .as_array()
            .and_then(MetaArray::to_i64_vec)
            .filter(|t| t.len() == n)
            .ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "metadata 'tokenizer.ggml.token_type' must be {n} integers, got {}",
                        v.type_name()
                    ),
                )
            })?,
    };
    let vocab = Vocab {
        path,
        tokens,
        types,
        bos: token_id(h, path, "tokenizer.ggml.bos_token_id", n)?,
        eos: token_id(h, path, "tokenizer.ggml.eos_token_id", n)?,
        unk: token_id(h, path, "tokenizer.ggml.unknown_token_id", n)?,
        pad: token_id(h, path, "tokenizer.ggml.padding_token_id", n)?,
    };
    let mut notes = Vec::new();
    let arch = h
        .architecture()
        .and_then(crate::model::gguf::for_architecture);
    let spm = arch.map_or(SpmFlavor::Llama, |d| d.spm);
    let (tokenizer_json, default_add_bos) = match (model, spm) {
        ("gpt2", _) => (byte_level_bpe(h, path, &vocab, &mut notes)?, false),
        ("llama", SpmFlavor::Llama) => (sentencepiece(h, path, &vocab, &mut notes)?, true),
        ("llama", SpmFlavor::Gemma) => (gemma_sentencepiece(h, path, &vocab, &mut notes)?, true),
        (other, _) => {
            return Err(Error::format(
                path,
                format!(
                    "tokenizer.ggml.model '{other}' is not supported (gpt2 = byte-level BPE, llama = SentencePiece)"
                ),
            ));
        }
    };
    let add_bos = bool_key(h, "tokenizer.ggml.add_bos_token").unwrap_or(default_add_bos);
    let add_eos = bool_key(h, "tokenizer.ggml.add_eos_token").unwrap_or(false);

    let mut special_map = serde_json::Map::new();
    for (key, id) in [
        ("bos_token", vocab.bos),
        ("eos_token", vocab.eos),
        ("unk_token", vocab.unk),
        ("pad_token", vocab.pad),
    ] {
        if let Some(t) = vocab.token(id) {
            special_map.insert(key.into(), json!(t));
        }
    }
    let mut decoder = serde_json::Map::new();
    for (id, special) in vocab.added() {
        if let Some(t) = vocab.token(Some(id)) {
            decoder.insert(
                id.to_string(),
                json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": special}),
            );
        }
    }
    let mut config = json!({
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "added_tokens_decoder": decoder,
        "clean_up_tokenization_spaces": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    if let Some(obj) = config.as_object_mut() {
        for (k, v) in &special_map {
            obj.insert(k.clone(), v.clone());
        }
        match (
            h.get("tokenizer.chat_template").and_then(MetaValue::as_str),
            arch.and_then(|d| d.fallback_chat_template),
        ) {
            (Some(t), _) => {
                obj.insert("chat_template".into(), json!(t));
            }
            (None, Some((t, what))) => {
                obj.insert("chat_template".into(), json!(t));
                notes.push(format!(
                    "{}: the file has no tokenizer.chat_template; tokenizer_config.json gets {what}",
                    path.display()
                ));
            }
            (None, None) => {}
        }
        if let Some(m) = model_max_length {
            obj.insert("model_max_length".into(), json!(m));
        }
    }
    Ok(TokenizerFiles {
        tokenizer_json,
        tokenizer_config: config,
        special_tokens_map: Value::Object(special_map),
        notes,
    })
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn byte_level_bpe(
    h: &GgufHeader,
    path: &Path,
    v: &Vocab,
    notes: &mut Vec<String>,
) -> Result<Value> {
    let pre = h
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("gpt2");
    let (pre_tokenizer, ignore_merges) = match pre {
        "gpt2" => (byte_level(true), false),
        "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            false,
        ),
        "llama-bpe" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
            true,
        ),
        // transformers' GGUF builder: GPT-2's BPE (merges applied) behind Qwen2's split
        "qwen2" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
            false,
        ),
        other => {
            return Err(Error::format(
                path,
                format!(
                    "tokenizer.ggml.pre '{other}' is not supported (supported: {})",
                    SUPPORTED_PRE.join(", ")
                ),
            ));
        }
    };
    let vocab = v.vocab_map(notes);
    let merges_src = string_array(h, path, "tokenizer.ggml.merges")?.ok_or_else(|| {
        Error::format(
            path,
            "metadata 'tokenizer.ggml.merges' is missing (needed for a gpt2 tokenizer)",
        )
    })?;
    let mut merges = Vec::with_capacity(merges_src.len());
    for (i, m) in merges_src.iter().enumerate() {
        let (a, b) = m
            .split_once(' ')
            .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains(' '))
            .ok_or_else(|| Error::format(path, format!("tokenizer.ggml.merges[{i}] = {m:?} is not two pieces separated by one space")))?;
        for piece in [a.to_string(), b.to_string(), format!("{a}{b}")] {
            if !vocab.contains_key(&piece) {
                return Err(Error::format(
                    path,
                    format!(
                        "tokenizer.ggml.merges[{i}] = {m:?}: piece {piece:?} is not in the vocabulary"
                    ),
                ));
            }
        }
        merges.push(json!([a, b]));
    }
    let added: Vec<Value> = v
        .added()
        .into_iter()
        .filter_map(|(id, special)| v.token(Some(id)).map(|t| added_token_json(id, t, special)))
        .collect();
    let post = template_processor(
        v,
        bool_key(h, "tokenizer.ggml.add_bos_token").unwrap_or(false),
        bool_key(h, "tokenizer.ggml.add_eos_token").unwrap_or(false),
    )
    .unwrap_or_else(|| json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}));
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// Merges for a SentencePiece vocabulary, as `transformers`' `SentencePieceExtractor`
/// derives them: every split of a piece into two pieces of the vocabulary is a merge,
/// ranked by the score of the whole piece (highest first), ties in vocabulary order.
pub fn spm_merges(tokens: &[String], scores: &[f32], types: &[i64]) -> Vec<(String, String)> {
    let mergeable = |id: usize| {
        let t = types.get(id).copied().unwrap_or(token_type::NORMAL);
        t == token_type::NORMAL || t == token_type::USER_DEFINED
    };
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        if mergeable(id) {
            ids.entry(t.as_str()).or_insert(id);
        }
    }
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !mergeable(id) || ids.get(piece.as_str()) != Some(&id) {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?))
            })
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (score, id, l, r)));
    }
    // Stable: equal scores keep vocabulary order.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .filter_map(|(_, _, l, r)| Some((tokens.get(l)?.clone(), tokens.get(r)?.clone())))
        .collect()
}

fn sentencepiece(h: &GgufHeader, path: &Path, v: &Vocab, notes: &mut Vec<String>) -> Result<Value> {
    let n = v.tokens.len();
    let scores: Vec<f32> = match h.get("tokenizer.ggml.scores") {
        Some(MetaValue::Array(MetaArray::F32(s))) if s.len() == n => s.clone(),
        Some(other) => {
            return Err(Error::format(
                path,
                format!(
                    "metadata 'tokenizer.ggml.scores' must be {n} f32 values, got {}",
                    other.type_name()
                ),
            ));
        }
        None => {
            return Err(Error::format(
                path,
                "metadata 'tokenizer.ggml.scores' is missing (needed for a SentencePiece tokenizer)",
            ));
        }
    };
    let pieces: std::collections::HashSet<&str> = v.tokens.iter().map(String::as_str).collect();
    let byte_pieces = (0..=255u8)
        .filter(|b| pieces.contains(format!("<0x{b:02X}>").as_str()))
        .count();
    if byte_pieces < 256 {
        notes.push(format!(
            "{}: SentencePiece vocabulary has {byte_pieces} of 256 <0xNN> byte pieces; characters outside the vocabulary may encode as the unknown token",
            path.display()
        ));
    }
    let add_space_prefix = bool_key(h, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let vocab = v.vocab_map(notes);
    let merges: Vec<Value> = spm_merges(v.tokens, &scores, &v.types)
        .into_iter()
        .map(|(a, b)| json!([a, b]))
        .collect();
    let unk = v.token(v.unk).unwrap_or("<unk>");
    if !vocab.contains_key(unk) {
        return Err(Error::format(
            path,
            format!("SentencePiece unknown token {unk:?} is not in the vocabulary"),
        ));
    }
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let added: Vec<Value> = v
        .added()
        .into_iter()
        .filter_map(|(id, special)| v.token(Some(id)).map(|t| added_token_json(id, t, special)))
        .collect();
    let post = template_processor(
        v,
        bool_key(h, "tokenizer.ggml.add_bos_token").unwrap_or(true),
        bool_key(h, "tokenizer.ggml.add_eos_token").unwrap_or(false),
    );
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// Python's `str.isspace` for one character (Rust's `is_whitespace` lacks U+001C..U+001F).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// transformers' `gemma_tokenizer` respelling: a token of whitespace containing a space is
/// looked up as that many `▁` (Gemma files store such tokens with real spaces).
pub fn gemma_respell(t: &str) -> String {
    if t.contains(' ') && t.chars().all(py_isspace) {
        "\u{2581}".repeat(t.chars().count())
    } else {
        t.to_string()
    }
}

/// Merges for a Gemma vocabulary as transformers' `generate_merges(vocab, positions)`
/// derives them: every split of a token into two tokens is a merge, ranked by the merged
/// token's position in the file (earlier first; Python dicts, so a repeated token counts at
/// its last position and is visited at its first), then by the longer left piece.
pub fn gemma_merges(tokens: &[String]) -> Vec<(String, String)> {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        last.insert(t.as_str(), id);
    }
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    // (position of the merged token, left length in chars, left id, right id, left, right)
    let mut merges: Vec<(usize, usize, usize, usize, &str, &str)> = Vec::new();
    for t in tokens {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let pos = last[t.as_str()];
        let mut local = Vec::new();
        for (n, (i, _)) in t.char_indices().enumerate().skip(1) {
            let (l, r) = t.split_at(i);
            if let (Some(&li), Some(&ri)) = (last.get(l), last.get(r)) {
                local.push((pos, n, li, ri, l, r));
            }
        }
        local.sort_by_key(|m| (m.2, m.3));
        merges.extend(local);
    }
    // sorted(key=(score, len(l), len(r)), reverse=True) with score = −position; stable
    merges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    merges
        .into_iter()
        .map(|m| (m.4.to_string(), m.5.to_string()))
        .collect()
}

/// Gemma's SentencePiece as transformers' GGUF builder makes it (`gemma_tokenizer` →
/// `GemmaTokenizer`): spaces become `▁` (no prefix space), the split on spaces is kept as
/// `GemmaTokenizer` writes it (a no-op after the normalizer), byte fallback, merges from
/// [`gemma_merges`] over the respelled vocabulary; control tokens special, user-defined
/// tokens added when the respelled vocabulary has them.
fn gemma_sentencepiece(
    h: &GgufHeader,
    path: &Path,
    v: &Vocab,
    notes: &mut Vec<String>,
) -> Result<Value> {
    let respelled: Vec<String> = v.tokens.iter().map(|t| gemma_respell(t)).collect();
    let mut vocab = serde_json::Map::with_capacity(respelled.len());
    let mut dups = 0usize;
    for (id, t) in respelled.iter().enumerate() {
        if vocab.insert(t.clone(), json!(id)).is_some() {
            dups += 1;
        }
    }
    if dups > 0 {
        notes.push(format!(
            "{}: {dups} tokens repeat an earlier piece; the tokenizer maps each such piece to its last id (as transformers does)",
            path.display()
        ));
    }
    let merges: Vec<Value> = gemma_merges(&respelled)
        .into_iter()
        .map(|(a, b)| json!([a, b]))
        .collect();
    let unk = v.token(v.unk).unwrap_or("<unk>");
    if !vocab.contains_key(unk) {
        return Err(Error::format(
            path,
            format!("SentencePiece unknown token {unk:?} is not in the vocabulary"),
        ));
    }
    let added: Vec<Value> = v
        .added()
        .into_iter()
        .filter_map(|(id, special)| {
            let t = v.token(Some(id))?;
            (special || vocab.contains_key(t)).then(|| added_token_json(id, t, special))
        })
        .collect();
    let post = template_processor(
        v,
        bool_key(h, "tokenizer.ggml.add_bos_token").unwrap_or(true),
        bool_key(h, "tokenizer.ggml.add_eos_token").unwrap_or(false),
    );
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// Check that `tokenizer.json` text loads in the `tokenizers` library.
pub fn check_loads(json: &str, path: &Path) -> Result<tokenizers::Tokenizer> {
    json.parse::<tokenizers::Tokenizer>().map_err(|e| {
        Error::format(
            path,
            format!("the rebuilt tokenizer.json does not load in the tokenizers library: {e}"),
        )
    })
}

/// Pretty JSON text with a trailing newline, for the files written beside the model.
pub(crate) fn to_json_text(v: &Value, path: &Path) -> Result<String> {
    let mut s =
        serde_json::to_string_pretty(v).map_err(|e| Error::format(path, format!("JSON: {e}")))?;
    s.push('\n');
    Ok(s)
}

/// Map of file name → JSON for [`TokenizerFiles`], in the names HF uses.
pub fn file_map(files: &TokenizerFiles) -> BTreeMap<&'static str, &Value> {
    let mut m = BTreeMap::new();
    m.insert("tokenizer.json", &files.tokenizer_json);
    m.insert("tokenizer_config.json", &files.tokenizer_config);
    m.insert("special_tokens_map.json", &files.special_tokens_map);
    m
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::import::gguf_write::GgufBuilder;

    /// A 16-token byte-level BPE vocabulary (ids in comments) with five merges.
    pub(crate) fn with_tiny_bpe(b: GgufBuilder, pre: &str, add_bos: bool) -> GgufBuilder {
        let tokens = [
            "<|endoftext|>", // 0 control
            "<|im_start|>",  // 1 control
            "<|im_end|>",    // 2 control
            "a",             // 3
            "b",             // 4
            "c",             // 5
            "Ġ",             // 6 (space)
            "Ċ",             // 7 (newline)
            "1",             // 8
            "2",             // 9
            "ab",            // 10
            "Ġa",            // 11
            "Ġab",           // 12
            "12",            // 13
            "bc",            // 14
            "<tool>",        // 15 user-defined
        ];
        let mut types = vec![token_type::NORMAL as i32; 16];
        types[0] = token_type::CONTROL as i32;
        types[1] = token_type::CONTROL as i32;
        types[2] = token_type::CONTROL as i32;
        types[15] = token_type::USER_DEFINED as i32;
        // Rank order matters: with "a b" first, "Ġab" would end as Ġ + ab.
        let merges = ["Ġ a", "a b", "Ġa b", "1 2", "b c"];
        b.kv("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
            .kv("tokenizer.ggml.pre", MetaValue::String(pre.into()))
            .kv(
                "tokenizer.ggml.tokens",
                MetaValue::Array(MetaArray::String(tokens.iter().map(|s| s.to_string()).collect())),
            )
            .kv("tokenizer.ggml.token_type", MetaValue::Array(MetaArray::I32(types)))
            .kv(
                "tokenizer.ggml.merges",
                MetaValue::Array(MetaArray::String(merges.iter().map(|s| s.to_string()).collect())),
            )
            .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
            .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
            .kv("tokenizer.ggml.padding_token_id", MetaValue::U32(0))
            .kv("tokenizer.ggml.add_bos_token", MetaValue::Bool(add_bos))
            .kv(
                "tokenizer.chat_template",
                MetaValue::String("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".into()),
            )
    }

    fn build(b: GgufBuilder) -> Result<(TokenizerFiles, tokenizers::Tokenizer)> {
        let bytes = b.build();
        let path = Path::new("tiny.gguf");
        let h = GgufHeader::parse(&bytes, path)?;
        let files = from_gguf(&h, path, Some(128))?;
        let text = to_json_text(&files.tokenizer_json, path)?;
        let tok = check_loads(&text, path)?;
        Ok((files, tok))
    }

    fn ids(tok: &tokenizers::Tokenizer, s: &str) -> Vec<u32> {
        match tok.encode(s, true) {
            Ok(e) => e.get_ids().to_vec(),
            Err(e) => panic!("encode {s:?}: {e}"),
        }
    }

    fn decode(tok: &tokenizers::Tokenizer, ids: &[u32]) -> String {
        match tok.decode(ids, false) {
            Ok(s) => s,
            Err(e) => panic!("decode {ids:?}: {e}"),
        }
    }

    #[test]
    fn byte_level_bpe_encodes_as_the_merges_say() -> Result<()> {
        let (files, tok) = build(with_tiny_bpe(GgufBuilder::new(), "gpt2", false))?;
        // "ab ab" pre-tokenizes to "ab", "Ġab"; Ġ+a (rank 0) then Ġa+b (rank 2).
        assert_eq!(ids(&tok, "ab ab"), vec![10, 12]);
        // a+b outranks b+c, so "abc" becomes ab + c, not a + bc.
        assert_eq!(ids(&tok, "abc"), vec![10, 5]);
        // GPT-2 pre-tokenization keeps digit runs together: 1+2 merges.
        assert_eq!(ids(&tok, "12"), vec![13]);
        // Control and user-defined tokens are never split.
        assert_eq!(ids(&tok, "<|im_start|>ab\n<|im_end|>"), vec![1, 10, 7, 2]);
        assert_eq!(ids(&tok, "<tool>c"), vec![15, 5]);
        assert_eq!(decode(&tok, &[1, 10, 7, 2]), "<|im_start|>ab\n<|im_end|>");
        assert_eq!(decode(&tok, &[10, 12, 14]), "ab abbc");
        let cfg = &files.tokenizer_config;
        assert_eq!(cfg["bos_token"], "<|im_start|>");
        assert_eq!(cfg["eos_token"], "<|im_end|>");
        assert_eq!(cfg["pad_token"], "<|endoftext|>");
        assert_eq!(cfg["add_bos_token"], false);
        assert_eq!(cfg["model_max_length"], 128);
        assert!(
            cfg["chat_template"]
                .as_str()
                .is_some_and(|t| t.contains("<|im_start|>"))
        );
        assert_eq!(cfg["added_tokens_decoder"]["15"]["special"], false);
        assert_eq!(cfg["added_tokens_decoder"]["2"]["special"], true);
        assert_eq!(files.special_tokens_map["eos_token"], "<|im_end|>");
        Ok(())
    }

    #[test]
    fn smollm_pre_tokenizer_splits_digits() -> Result<()> {
        let (_, tok) = build(with_tiny_bpe(GgufBuilder::new(), "smollm", false))?;
        assert_eq!(ids(&tok, "12"), vec![8, 9]);
        assert_eq!(ids(&tok, "ab ab"), vec![10, 12]);
        Ok(())
    }

    #[test]
    fn add_bos_puts_bos_first() -> Result<()> {
        let (_, tok) = build(with_tiny_bpe(GgufBuilder::new(), "llama-bpe", true))?;
        assert_eq!(ids(&tok, "ab"), vec![1, 10]);
        Ok(())
    }

    #[test]
    fn unknown_models_and_pre_tokenizers_are_refused() {
        let b = with_tiny_bpe(GgufBuilder::new(), "qwen-something", false);
        let msg = build(b).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("tokenizer.ggml.pre 'qwen-something'") && msg.contains("smollm"),
            "{msg}"
        );
        let b = GgufBuilder::new()
            .kv("tokenizer.ggml.model", MetaValue::String("bert".into()))
            .kv(
                "tokenizer.ggml.tokens",
                MetaValue::Array(MetaArray::String(vec!["a".into()])),
            );
        let msg = build(b).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("'bert' is not supported"), "{msg}");
        let b = GgufBuilder::new()
            .kv("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
            .kv(
                "tokenizer.ggml.tokens",
                MetaValue::Array(MetaArray::String(vec!["a".into(), "b".into()])),
            )
            .kv(
                "tokenizer.ggml.merges",
                MetaValue::Array(MetaArray::String(vec!["a b".into()])),
            );
        let msg = build(b).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("merges[0]") && msg.contains("\"ab\""), "{msg}");
    }

    /// A small SentencePiece vocabulary: specials, all 256 byte pieces, then pieces whose
    /// scores make "▁hello" reachable by merges.
    fn tiny_spm() -> GgufBuilder {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![
            token_type::UNKNOWN as i32,
            token_type::CONTROL as i32,
            token_type::CONTROL as i32,
        ];
        let mut scores = vec![0f32; 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(token_type::BYTE as i32);
            scores.push(0.0);
        }
        // Piece and score; merges rank by the score of the merged piece.
        let pieces = [
            ("▁", -10.0),
            ("h", -11.0),
            ("e", -12.0),
            ("l", -13.0),
            ("o", -14.0),
            ("▁hello", -1.0), // = ▁he + llo
            ("ll", -3.0),     // = l + l
            ("llo", -4.0),    // = ll + o
            ("▁h", -5.0),     // = ▁ + h
            ("▁he", -6.0),    // = ▁h + e
        ];
        for (p, s) in pieces {
            tokens.push(p.into());
            types.push(token_type::NORMAL as i32);
            scores.push(s);
        }
        GgufBuilder::new()
            .kv("tokenizer.ggml.model", MetaValue::String("llama".into()))
            .kv(
                "tokenizer.ggml.tokens",
                MetaValue::Array(MetaArray::String(tokens)),
            )
            .kv(
                "tokenizer.ggml.scores",
                MetaValue::Array(MetaArray::F32(scores)),
            )
            .kv(
                "tokenizer.ggml.token_type",
                MetaValue::Array(MetaArray::I32(types)),
            )
            .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
            .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
            .kv("tokenizer.ggml.unknown_token_id", MetaValue::U32(0))
    }

    #[test]
    fn sentencepiece_merges_follow_scores() {
        let tokens: Vec<String> = ["▁", "h", "e", "▁h", "he", "▁he"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [-1.0, -2.0, -3.0, -5.0, -4.0, -6.0];
        let types = [token_type::NORMAL; 6];
        let m = spm_merges(&tokens, &scores, &types);
        let pairs: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        // "he" (-4) first, then "▁h" (-5), then both splits of "▁he" (-6) in id order.
        assert_eq!(
            pairs,
            vec![("h", "e"), ("▁", "h"), ("▁", "he"), ("▁h", "e")]
        );
    }

    #[test]
    fn sentencepiece_tokenizer_encodes_and_falls_back_to_bytes() -> Result<()> {
        let (files, tok) = build(tiny_spm())?;
        let id = |p: &str| -> u32 {
            files.tokenizer_json["model"]["vocab"][p]
                .as_u64()
                .map(|x| x as u32)
                .unwrap_or(u32::MAX)
        };
        // BOS is added; "hello" becomes "▁hello" via l+l, ll+o, ▁+h, ▁h+e, ▁he+llo.
        assert_eq!(ids(&tok, "hello"), vec![1, id("▁hello")]);
        assert_eq!(ids(&tok, "hell"), vec![1, id("▁he"), id("ll")]);
        // "é" is not a piece: its two UTF-8 bytes come out as byte pieces.
        assert_eq!(
            ids(&tok, "hé"),
            vec![1, id("▁h"), id("<0xC3>"), id("<0xA9>")]
        );
        assert_eq!(
            tok.decode(&[1, id("▁h"), id("<0xC3>"), id("<0xA9>")], true)
                .ok()
                .as_deref(),
            Some("hé")
        );
        Ok(())
    }
}
