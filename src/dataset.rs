//! Training data: JSONL records (`{"text"}`, `{"prompt","completion"}` or
//! `{"messages": [...]}`) or plain text turned into token ids and labels, truncated to
//! the context, split for validation, and laid out into [`Batch`]es (packed or padded),
//! shuffled once per epoch by a permutation derived from (seed, epoch) alone, so that a
//! resumed run sees exactly the batches it would have seen.
//!
//! Labels follow the HF convention (`-100` = not scored; the shift happens in the
//! model): plain text is scored everywhere, prompt/completion records on the completion
//! only, and chat records on the assistant turns only. The assistant turns are found as
//! TRL does, by rendering prefixes of the conversation with the chat template: the text
//! between `render(messages[..i], add_generation_prompt)` and `render(messages[..=i])`
//! is turn i's answer.

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::rng::{Rng, mix_seed};
use crate::tokenizer::{Message, Tokenizer};
use crate::types::IGNORE_INDEX;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What to do with a record that cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadLinePolicy {
    /// Report it, count it and go on.
    Skip,
    /// Stop with the error.
    Error,
}

/// How examples are laid out in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Several examples share a row; attention and positions restart at each one.
    Packed,
    /// One example per row, right-padded to the longest row of the batch.
    Padded,
}

/// Options for reading a data file.
#[derive(Clone, Debug)]
pub struct DataOptions {
    /// Longest example in tokens; longer ones are cut at the end.
    pub max_seq_length: usize,
    /// Skip (and count) or stop at an unusable record.
    pub on_bad_line: BadLinePolicy,
}

/// One tokenized example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; `-100` where not scored.
    pub labels: Vec<i32>,
    /// 1-based line of the source file (for plain text: the window number).
    pub line: usize,
}

impl Example {
    /// Tokens scored after the model's shift (label at t predicted from t-1).
    pub fn counted_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// What reading a data file left out, for the user to see.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// The file read.
    pub path: PathBuf,
    /// Non-blank lines (records) read.
    pub records: usize,
    /// `file:line: what` of each unusable record skipped.
    pub skipped: Vec<String>,
    /// Examples cut to `max_seq_length`.
    pub truncated: usize,
    /// Of the skipped, those whose prompt alone fills the context.
    pub prompt_too_long: usize,
}

impl LoadReport {
    /// One paragraph for the user: counts and the first few skipped lines.
    pub fn summary(&self, max_seq_length: usize) -> String {
        let mut s = format!(
            "{}: {} records, {} used",
            self.path.display(),
            self.records,
            self.records - self.skipped.len()
        );
        if self.truncated > 0 {
            s += &format!(
                ", {} truncated to max_seq_length = {max_seq_length}",
                self.truncated
            );
        }
        if !self.skipped.is_empty() {
            s += &format!(", {} skipped", self.skipped.len());
            if self.prompt_too_long > 0 {
                s += &format!(
                    " ({} because the prompt alone fills max_seq_length)",
                    self.prompt_too_long
                );
            }
            for line in self.skipped.iter().take(5) {
                s += &format!("\n  skipped {line}");
            }
            if self.skipped.len() > 5 {
                s += &format!("\n  … and {} more", self.skipped.len() - 5);
            }
        }
        s
    }
}

/// A record's problem: `Bad` lines follow the policy, `Fatal` ones stop the run, and
/// `Template` is the model's chat template at fault (reported as such, not as the line's).
enum RecordError {
    Bad(String),
    PromptTooLong(String),
    Fatal(String),
    Template(Error),
}

/// One record of a JSONL file.
enum Record {
    Text(String),
    PromptCompletion(String, String),
    Messages(Vec<Message>),
}

fn parse_record(line: &str) -> std::result::Result<Record, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(mut obj) = v else {
        return Err(format!("expected a JSON object, found {}", kind_of(&v)));
    };
    let has = |obj: &serde_json::Map<String, serde_json::Value>, k: &str| obj.contains_key(k);
    let formats = [
        has(&obj, "text"),
        has(&obj, "prompt") || has(&obj, "completion"),
        has(&obj, "messages"),
    ];
    match formats.iter().filter(|&&f| f).count() {
        0 => {
            let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            return Err(format!(
                "no \"text\", \"prompt\"/\"completion\" or \"messages\" field (found: {})",
                if keys.is_empty() {
                    "none".to_string()
                } else {
                    keys.join(", ")
                }
            ));
        }
        1 => {}
        _ => {
            return Err(
                "mixes formats: use one of \"text\", \"prompt\"/\"completion\" or \"messages\""
                    .into(),
            );
        }
    }
    // the strings are moved out of the parsed record, not copied: a record may be large
    let mut string = |key: &str| -> std::result::Result<String, String> {
        match obj.remove(key) {
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(other) => Err(format!(
                "\"{key}\" must be a string, found {}",
                kind_of(&other)
            )),
            None => Err(format!("missing \"{key}\"")),
        }
    };
    if formats[0] {
        return Ok(Record::Text(string("text")?));
    }
    if formats[1] {
        let prompt = string("prompt")?;
        return Ok(Record::PromptCompletion(prompt, string("completion")?));
    }
    let list = match obj.remove("messages") {
        Some(serde_json::Value::Array(a)) => a,
        other => {
            return Err(format!(
                "\"messages\" must be a list, found {}",
                other.as_ref().map_or("nothing", kind_of)
            ));
        }
    };
    if list.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, mut m) in list.into_iter().enumerate() {
        let mut get = |k: &str| match m.get_mut(k).map(serde_json::Value::take) {
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(other) => Err(format!(
                "messages[{i}].{k} must be a string, found {}",
                kind_of(&other)
            )),
            None => Err(format!("messages[{i}] has no \"{k}\"")),
        };
        let role = get("role")?;
        out.push(Message {
            role,
            content: get("content")?,
        });
    }
    Ok(Record::Messages(out))
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Ids and labels of `text`, scoring the tokens whose first byte lies in one of `spans`;
/// encoding stops once more than `limit` tokens are known (see
/// [`Tokenizer::encode_bounded`]).
fn label_spans(
    tok: &Tokenizer,
    text: &str,
    add_special: bool,
    spans: &[(usize, usize)],
    limit: usize,
) -> std::result::Result<Tokens, String> {
    let enc = tok
        .encode_bounded(text, add_special, Some(limit))
        .map_err(|e| e.to_string())?;
    let (ids, offsets) = (enc.ids, enc.offsets);
    let labels = ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(start, _))| {
            let inside = spans.iter().any(|&(a, b)| start >= a && start < b);
            if inside { id as i32 } else { IGNORE_INDEX }
        })
        .collect();
    Ok(Tokens {
        ids,
        labels,
        complete: enc.complete,
    })
}

/// A record's tokens (or their beginning, when `complete` is false: then more than
/// `max_seq_length` of them, of which only the first are kept).
struct Tokens {
    ids: Vec<u32>,
    labels: Vec<i32>,
    complete: bool,
}

/// Append the EOS token (scored) unless the sequence already ends with it (or is only
/// the beginning of the text: then its end is cut off anyway).
fn push_eos(tok: &Tokenizer, t: &mut Tokens) {
    if let Some(eos) = tok.eos_token_id()
        && t.complete
        && t.ids.last() != Some(&eos)
    {
        t.ids.push(eos);
        t.labels.push(eos as i32);
    }
}

fn tokenize_record(
    tok: &Tokenizer,
    rec: Record,
    max: usize,
) -> std::result::Result<Tokens, RecordError> {
    let bad = RecordError::Bad;
    match rec {
        Record::Text(t) => {
            let mut out = label_spans(tok, &t, true, &[(0, t.len())], max).map_err(bad)?;
            push_eos(tok, &mut out);
            Ok(out)
        }
        Record::PromptCompletion(p, c) => {
            let prompt_len = p.len();
            let mut full = p;
            full.push_str(&c);
            drop(c);
            let mut out =
                label_spans(tok, &full, true, &[(prompt_len, full.len())], max).map_err(bad)?;
            push_eos(tok, &mut out);
            Ok(out)
        }
        Record::Messages(msgs) => {
            if !tok.has_chat_template() {
                return Err(RecordError::Fatal(
                    "chat-format record, but the model has no chat_template in its tokenizer_config.json; use {\"prompt\", \"completion\"} or {\"text\"} records for this model".into(),
                ));
            }
            let render = |m: &[Message], prompt: bool| {
                tok.apply_chat_template(m, prompt).map_err(|e| match e {
                    Error::Template { .. } => RecordError::Template(e),
                    Error::Format { msg, .. } => RecordError::Bad(format!(
                        "the chat template failed to render this conversation: {msg}"
                    )),
                    other => RecordError::Bad(format!(
                        "the chat template failed to render this conversation: {other}"
                    )),
                })
            };
            let full = render(&msgs, false)?;
            let mut spans = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                if m.role != "assistant" {
                    continue;
                }
                let before = render(&msgs[..i], true)?;
                let through = render(&msgs[..=i], false)?;
                if !through.starts_with(&before) || !full.starts_with(&through) {
                    return Err(RecordError::Bad(format!(
                        "cannot locate assistant turn {i}: the chat template does not render a conversation's beginning as a prefix of the whole (it rewrites earlier turns)"
                    )));
                }
                spans.push((before.len(), through.len()));
            }
            if spans.is_empty() {
                return Err(RecordError::Bad(
                    "no \"assistant\" message, so nothing to learn from".into(),
                ));
            }
            label_spans(tok, &full, false, &spans, max).map_err(bad)
        }
    }
}

/// Read a data file: `.txt` files as plain text cut into windows, anything else as JSONL.
pub fn load_file(
    path: &Path,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<(Vec<Example>, LoadReport)> {
    let is_txt = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
    let (examples, report) = if is_txt {
        load_text(path, tok, opts.max_seq_length)?
    } else {
        load_jsonl(path, tok, opts)?
    };
    if examples.is_empty() {
        let why = if report.records == 0 {
            "it has no records".to_string()
        } else {
            format!(
                "none of its {} records could be used:\n  {}",
                report.records,
                report
                    .skipped
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  ")
            )
        };
        return Err(Error::format(path, format!("empty data set: {why}")));
    }
    Ok((examples, report))
}

/// Bytes of JSONL lines read (and tokenized in parallel) at a time: with the pieces of
/// [`crate::tokenizer::PIECE_BYTES`] that bounds the memory of reading a file of any
/// size by what it keeps.
const LINE_BATCH_BYTES: usize = 8 << 20;

/// Read JSONL records into examples, applying the bad-line policy and truncation. The
/// file is streamed: memory holds the examples kept, a batch of lines and each record
/// being read, not the file.
pub fn load_jsonl(
    path: &Path,
    tok: &Tokenizer,
    opts: &DataOptions,
) -> Result<(Vec<Example>, LoadReport)> {
    if opts.max_seq_length < 2 {
        return Err(Error::config(format!(
            "max_seq_length = {} is too short: a training example needs at least 2 tokens",
            opts.max_seq_length
        )));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut report = LoadReport {
        path: path.to_path_buf(),
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut line_no = 0;
    let mut eof = false;
    // one buffer for every batch's lines, reused: many short-lived line buffers between
    // the long-lived examples would fragment the heap into memory that is never reused
    let mut batch: Vec<u8> = Vec::new();
    while !eof {
        batch.clear();
        let mut ranges: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        while batch.len() < LINE_BATCH_BYTES {
            let start = batch.len();
            let n = std::io::BufRead::read_until(&mut reader, b'\n', &mut batch)
                .map_err(|e| Error::io(path, e))?;
            if n == 0 {
                eof = true;
                break;
            }
            line_no += 1;
            // a UTF-8 byte order mark (as some editors write) is not part of the record
            if line_no == 1 && batch[start..].starts_with(crate::fsutil::UTF8_BOM) {
                batch.drain(start..start + crate::fsutil::UTF8_BOM.len());
            }
            if batch[start..].trim_ascii().is_empty() {
                batch.truncate(start);
            } else {
                ranges.push((line_no, start..batch.len()));
            }
        }
        let lines: Vec<(usize, &[u8])> = ranges
            .into_iter()
            .map(|(line, r)| (line, &batch[r]))
            .collect();
        // tokenizing (and rendering templates) is the slow part: do it on every core, then
        // apply the policy in line order
        let results: Vec<(usize, std::result::Result<Truncated, RecordError>)> = lines
            .into_par_iter()
            .map(|(line, raw)| {
                let r = std::str::from_utf8(raw)
                    .map_err(|_| RecordError::Bad("not valid UTF-8".into()))
                    .and_then(|s| parse_record(s.trim()).map_err(RecordError::Bad))
                    .and_then(|r| tokenize_record(tok, r, opts.max_seq_length))
                    .and_then(|t| truncate(t, opts.max_seq_length));
                (line, r)
            })
            .collect();
        for (line, result) in results {
            report.records += 1;
            match result {
                Ok(t) => {
                    report.truncated += t.cut as usize;
                    // copied here, so that the kept examples are allocated apart from
                    // the workers' short-lived encoding buffers (which would otherwise
                    // be pinned by them and never reused)
                    out.push(Example {
                        input_ids: t.ids.as_slice().to_vec(),
                        labels: t.labels.as_slice().to_vec(),
                        line,
                    })
                }
                Err(RecordError::Fatal(msg)) => return Err(Error::data(path, line, msg)),
                Err(RecordError::Template(e)) => return Err(template_error_at(e, path, line)),
                Err(RecordError::Bad(msg)) => {
                    skip_or_fail(path, line, msg, false, opts.on_bad_line, &mut report)?
                }
                Err(RecordError::PromptTooLong(msg)) => {
                    skip_or_fail(path, line, msg, true, opts.on_bad_line, &mut report)?
                }
            }
        }
        // the workers' encodings of this batch are freed: hand their pages back. glibc's
        // per-thread arenas otherwise keep them (the binary uses mimalloc, which does not;
        // this is for programs that link the library with glibc's allocator: 400 MB of
        // 4 KB records peaked at 0.83 GB without it, 0.67 GB with it)
        crate::fsutil::release_free_heap();
    }
    out.shrink_to_fit();
    Ok((out, report))
}

/// A chat-template error, with the record that first met it as context.
fn template_error_at(e: Error, data: &Path, line: usize) -> Error {
    match e {
        Error::Template { path, msg } => Error::Template {
            path,
            msg: format!(
                "{msg} (rendering the conversation at {}:{line})",
                data.display()
            ),
        },
        other => other,
    }
}

fn skip_or_fail(
    path: &Path,
    line: usize,
    msg: String,
    too_long: bool,
    policy: BadLinePolicy,
    report: &mut LoadReport,
) -> Result<()> {
    match policy {
        BadLinePolicy::Error => Err(Error::data(
            path,
            line,
            format!("{msg} (set on_bad_line = \"skip\" to skip such records)"),
        )),
        BadLinePolicy::Skip => {
            report
                .skipped
                .push(format!("{}:{line}: {msg}", path.display()));
            report.prompt_too_long += too_long as usize;
            Ok(())
        }
    }
}

/// An example after truncation, and whether it was cut.
struct Truncated {
    ids: Vec<u32>,
    labels: Vec<i32>,
    cut: bool,
}

/// Cut an example to `max` tokens; refuse one with nothing scored left. The kept ids
/// and labels are stored without spare capacity.
fn truncate(t: Tokens, max: usize) -> std::result::Result<Truncated, RecordError> {
    let Tokens {
        mut ids,
        mut labels,
        complete,
    } = t;
    let first_scored = labels
        .iter()
        .skip(1)
        .position(|&l| l != IGNORE_INDEX)
        .map(|p| p + 1);
    let first = match first_scored {
        Some(first) => first,
        // only the beginning was encoded, and all of it is prompt
        None if !complete => {
            return Err(RecordError::PromptTooLong(format!(
                "the prompt alone is more than {} tokens, max_seq_length is {max}: nothing of the answer would remain (raise max_seq_length or shorten the prompt)",
                ids.len()
            )));
        }
        None => {
            return Err(RecordError::Bad(
                "no tokens to learn from (empty text or completion)".into(),
            ));
        }
    };
    if first >= max {
        return Err(RecordError::PromptTooLong(format!(
            "the prompt alone is {first} tokens, max_seq_length is {max}: nothing of the answer would remain (raise max_seq_length or shorten the prompt)"
        )));
    }
    let cut = ids.len() > max;
    if cut {
        ids.truncate(max);
        labels.truncate(max);
    }
    ids.shrink_to_fit();
    labels.shrink_to_fit();
    Ok(Truncated { ids, labels, cut })
}

/// Read a plain text file as one token stream cut into windows of `max_seq_length`. The
/// file is streamed and encoded in pieces (in parallel) when the tokenizer allows it
/// ([`Tokenizer::encodes_in_pieces`]), so memory holds the windows, not the text.
pub fn load_text(
    path: &Path,
    tok: &Tokenizer,
    max_seq_length: usize,
) -> Result<(Vec<Example>, LoadReport)> {
    if max_seq_length < 2 {
        return Err(Error::config(format!(
            "max_seq_length = {max_seq_length} is too short: a window needs at least 2 tokens"
        )));
    }
    let mut windows = Windows {
        max: max_seq_length,
        pending: Vec::new(),
        out: Vec::new(),
    };
    let (prefix, suffix) = tok.special_affixes(true);
    if tok.encodes_in_pieces() {
        windows.push(prefix);
        stream_text(path, tok, &mut windows)?;
        windows.push(suffix);
    } else {
        let text = crate::fsutil::read_text(path)?;
        windows.push(&tok.encode(&text, true)?);
    }
    let examples = windows.finish();
    let report = LoadReport {
        path: path.to_path_buf(),
        records: examples.len(),
        ..Default::default()
    };
    Ok((examples, report))
}

/// A token stream cut into examples of `max` tokens as it arrives.
struct Windows {
    max: usize,
    /// Tokens of the window being filled.
    pending: Vec<u32>,
    out: Vec<Example>,
}

impl Windows {
    fn push(&mut self, ids: &[u32]) {
        let mut rest = ids;
        while !rest.is_empty() {
            let take = (self.max - self.pending.len()).min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == self.max {
                self.emit();
            }
        }
    }

    fn emit(&mut self) {
        // capacity bounded: max_seq_length is the user's number
        let ids = std::mem::replace(&mut self.pending, Vec::with_capacity(self.max.min(1 << 16)));
        self.out.push(Example {
            labels: ids.iter().map(|&t| t as i32).collect(),
            input_ids: ids,
            line: self.out.len() + 1,
        });
    }

    /// The examples, with a last shorter window when it has at least 2 tokens.
    fn finish(mut self) -> Vec<Example> {
        if self.pending.len() >= 2 {
            self.emit();
        }
        self.out.shrink_to_fit();
        self.out
    }
}

/// Read `path` in blocks, encode it in pieces cut at [`crate::tokenizer::piece_end`]
/// (several at once, on every core) and feed the tokens to `windows`. The bytes after a
/// block's last cut point are carried into the next block.
fn stream_text(path: &Path, tok: &Tokenizer, windows: &mut Windows) -> Result<()> {
    use crate::tokenizer::{PIECE_BYTES, last_cut, piece_end};
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let block = PIECE_BYTES * rayon::current_num_threads().max(1);
    let mut buf: Vec<u8> = Vec::new();
    // bytes of the file before `buf`, for messages
    let mut base = 0u64;
    let mut eof = false;
    while !eof || !buf.is_empty() {
        let mut chunk = vec![0u8; block];
        let mut got = 0;
        while !eof && got < block {
            match file.read(&mut chunk[got..]) {
                Ok(0) => eof = true,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        buf.extend_from_slice(&chunk[..got]);
        drop(chunk);
        // a UTF-8 byte order mark at the start of the file is not text
        if base == 0 && buf.starts_with(crate::fsutil::UTF8_BOM) {
            buf.drain(..crate::fsutil::UTF8_BOM.len());
            base = crate::fsutil::UTF8_BOM.len() as u64;
        }
        let valid = match std::str::from_utf8(&buf) {
            Ok(s) => s,
            // a character cut by the block's end is completed by the next read
            Err(e) if e.error_len().is_none() && !eof => {
                std::str::from_utf8(&buf[..e.valid_up_to()]).unwrap_or_default()
            }
            Err(e) => {
                return Err(Error::format(
                    path,
                    format!(
                        "not UTF-8 text (invalid byte at offset {}); a .txt data file must be UTF-8",
                        base + e.valid_up_to() as u64
                    ),
                ));
            }
        };
        // what may be encoded now: up to the last cut point, or everything at the end
        let end = if eof {
            valid.len()
        } else {
            match last_cut(valid, 0) {
                Some(c) => c,
                None => continue, // no cut point yet: read more
            }
        };
        let text = &valid[..end];
        let mut pieces = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            let e = piece_end(text, pos);
            pieces.push(&text[pos..e]);
            pos = e;
        }
        let ids: Vec<Vec<u32>> = pieces
            .par_iter()
            .map(|p| tok.encode(p, false))
            .collect::<Result<_>>()?;
        for i in &ids {
            windows.push(i);
        }
        buf.drain(..end);
        base += end as u64;
        if eof && buf.is_empty() {
            break;
        }
    }
    Ok(())
}

/// A uniformly random permutation of `0..n` drawn from `seed`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

const SPLIT_TAG: u64 = 0x5E1;
const PACK_TAG: u64 = 0x9AC;
const EPOCH_TAG: u64 = 0xE90C;

/// Hold out a random `fraction` of `examples` (at least one) for validation.
pub fn split_validation(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::config(format!(
            "eval_fraction = {fraction} must be in [0, 1)"
        )));
    }
    if fraction == 0.0 {
        return Ok((examples, Vec::new()));
    }
    let n = examples.len();
    let n_eval = ((n as f64 * fraction).round() as usize).max(1);
    if n_eval >= n {
        return Err(Error::config(format!(
            "eval_fraction = {fraction} of {n} examples leaves nothing to train on"
        )));
    }
    let order = permutation(n, mix_seed(&[seed, SPLIT_TAG]));
    let mut is_eval = vec![false; n];
    for &i in &order[..n_eval] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (e, flag) in examples.into_iter().zip(is_eval) {
        if flag { eval.push(e) } else { train.push(e) }
    }
    Ok((train, eval))
}

/// One row of a batch: one example, or several packed ones, with their lengths.
#[derive(Clone, Debug)]
struct Row {
    ids: Vec<u32>,
    labels: Vec<i32>,
    /// Tokens of each example in the row (segment i is the i-th example).
    lens: Vec<u32>,
}

/// The batches of a data set: rows are built once (packing in an order drawn from the
/// seed), then each epoch visits them in a permutation drawn from (seed, epoch).
#[derive(Clone, Debug)]
pub struct BatchPlan {
    rows: Vec<Row>,
    layout: Layout,
    batch_size: usize,
    pad_id: u32,
    seed: u64,
    shuffle: bool,
    /// The epoch whose order is cached, and that order.
    cached: Option<(u64, Vec<usize>)>,
}

impl BatchPlan {
    /// Lay out `examples` (each at most `max_seq_length` tokens) in rows.
    pub fn new(
        examples: &[Example],
        layout: Layout,
        max_seq_length: usize,
        batch_size: usize,
        pad_id: u32,
        seed: u64,
        shuffle: bool,
    ) -> Result<Self> {
        Self::from_examples(
            examples.to_vec(),
            layout,
            max_seq_length,
            batch_size,
            pad_id,
            seed,
            shuffle,
        )
    }

    /// [`new`](Self::new), taking the examples: each one's memory is released as it is
    /// laid out, so that the data is held once.
    pub fn from_examples(
        mut examples: Vec<Example>,
        layout: Layout,
        max_seq_length: usize,
        batch_size: usize,
        pad_id: u32,
        seed: u64,
        shuffle: bool,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::config("batch_size must be at least 1"));
        }
        if examples.is_empty() {
            return Err(Error::config("no examples to make batches from"));
        }
        let order: Vec<usize> = if shuffle {
            permutation(examples.len(), mix_seed(&[seed, PACK_TAG]))
        } else {
            (0..examples.len()).collect()
        };
        let mut rows: Vec<Row> = Vec::new();
        for &i in &order {
            let e = std::mem::replace(
                &mut examples[i],
                Example {
                    input_ids: Vec::new(),
                    labels: Vec::new(),
                    line: 0,
                },
            );
            let fits = rows.last().is_some_and(|r| {
                layout == Layout::Packed && r.ids.len() + e.input_ids.len() <= max_seq_length
            });
            if !fits {
                // a row of one example takes its vectors as they are
                rows.push(Row {
                    lens: vec![e.input_ids.len() as u32],
                    ids: e.input_ids,
                    labels: e.labels,
                });
                continue;
            }
            let row = rows.last_mut().ok_or_else(|| Error::internal("rows"))?;
            row.lens.push(e.input_ids.len() as u32);
            row.ids.extend_from_slice(&e.input_ids);
            row.labels.extend_from_slice(&e.labels);
        }
        drop(examples);
        for r in &mut rows {
            r.ids.shrink_to_fit();
            r.labels.shrink_to_fit();
            r.lens.shrink_to_fit();
        }
        Ok(BatchPlan {
            rows,
            layout,
            batch_size,
            pad_id,
            seed,
            shuffle,
            cached: None,
        })
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.batch_size)
    }

    /// Rows (sequences) in one epoch.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Batch `index` of `epoch`, and the number of real (non-padding) tokens in it.
    pub fn batch(&mut self, epoch: u64, index: usize) -> Result<(Batch, usize)> {
        if index >= self.batches_per_epoch() {
            return Err(Error::internal(format!(
                "batch {index} of an epoch of {}",
                self.batches_per_epoch()
            )));
        }
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let order = if self.shuffle {
                permutation(self.rows.len(), mix_seed(&[self.seed, EPOCH_TAG, epoch]))
            } else {
                (0..self.rows.len()).collect()
            };
            self.cached = Some((epoch, order));
        }
        let order = &self
            .cached
            .as_ref()
            .ok_or_else(|| Error::internal("order"))?
            .1;
        let end = ((index + 1) * self.batch_size).min(order.len());
        let rows: Vec<&Row> = order[index * self.batch_size..end]
            .iter()
            .map(|&i| &self.rows[i])
            .collect();
        let seq = rows.iter().map(|r| r.ids.len()).max().unwrap_or(1);
        let n = rows.len() * seq;
        let (mut ids, mut labels, mut segs) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut real = 0;
        for r in &rows {
            let pad = seq - r.ids.len();
            real += r.ids.len();
            ids.extend_from_slice(&r.ids);
            ids.extend(std::iter::repeat_n(self.pad_id, pad));
            labels.extend_from_slice(&r.labels);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
            for (seg, &len) in r.lens.iter().enumerate() {
                segs.extend(std::iter::repeat_n(seg as u32, len as usize));
            }
            segs.extend(std::iter::repeat_n(r.lens.len() as u32, pad));
        }
        let b = Batch::new(ids, labels, rows.len(), seq)?;
        let b = match self.layout {
            Layout::Packed => b.with_segments(segs)?,
            // right padding is invisible to the real tokens under causal attention
            Layout::Padded => b,
        };
        Ok((b, real))
    }
}

#[cfg(test)]
mod tests;
