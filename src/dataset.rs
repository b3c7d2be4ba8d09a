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

use crate::backend::IGNORE_INDEX;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::rng::{Rng, mix_seed};
use crate::tokenizer::{Message, Tokenizer};
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
    let obj = v
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, found {}", kind_of(&v)))?;
    let string = |key: &str| -> std::result::Result<String, String> {
        match obj.get(key) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!(
                "\"{key}\" must be a string, found {}",
                kind_of(other)
            )),
            None => Err(format!("missing \"{key}\"")),
        }
    };
    let has = |k: &str| obj.contains_key(k);
    let formats = [
        has("text"),
        has("prompt") || has("completion"),
        has("messages"),
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
    if formats[0] {
        return Ok(Record::Text(string("text")?));
    }
    if formats[1] {
        return Ok(Record::PromptCompletion(
            string("prompt")?,
            string("completion")?,
        ));
    }
    let list = match obj.get("messages") {
        Some(serde_json::Value::Array(a)) => a,
        other => {
            return Err(format!(
                "\"messages\" must be a list, found {}",
                other.map_or("nothing", kind_of)
            ));
        }
    };
    if list.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let get = |k: &str| match m.get(k) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!(
                "messages[{i}].{k} must be a string, found {}",
                kind_of(other)
            )),
            None => Err(format!("messages[{i}] has no \"{k}\"")),
        };
        out.push(Message {
            role: get("role")?,
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

/// Ids and labels of `text`, scoring the tokens whose first byte lies in one of `spans`.
fn label_spans(
    tok: &Tokenizer,
    text: &str,
    add_special: bool,
    spans: &[(usize, usize)],
) -> std::result::Result<(Vec<u32>, Vec<i32>), String> {
    let (ids, offsets) = tok
        .encode_with_offsets(text, add_special)
        .map_err(|e| e.to_string())?;
    let labels = ids
        .iter()
        .zip(&offsets)
        .map(|(&id, &(start, _))| {
            let inside = spans.iter().any(|&(a, b)| start >= a && start < b);
            if inside { id as i32 } else { IGNORE_INDEX }
        })
        .collect();
    Ok((ids, labels))
}

/// Append the EOS token (scored) unless the sequence already ends with it.
fn push_eos(tok: &Tokenizer, ids: &mut Vec<u32>, labels: &mut Vec<i32>) {
    if let Some(eos) = tok.eos_token_id()
        && ids.last() != Some(&eos)
    {
        ids.push(eos);
        labels.push(eos as i32);
    }
}

fn tokenize_record(
    tok: &Tokenizer,
    rec: Record,
) -> std::result::Result<(Vec<u32>, Vec<i32>), RecordError> {
    let bad = RecordError::Bad;
    match rec {
        Record::Text(t) => {
            let (mut ids, mut labels) = label_spans(tok, &t, true, &[(0, t.len())]).map_err(bad)?;
            push_eos(tok, &mut ids, &mut labels);
            Ok((ids, labels))
        }
        Record::PromptCompletion(p, c) => {
            let full = format!("{p}{c}");
            let (mut ids, mut labels) =
                label_spans(tok, &full, true, &[(p.len(), full.len())]).map_err(bad)?;
            push_eos(tok, &mut ids, &mut labels);
            Ok((ids, labels))
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
            label_spans(tok, &full, false, &spans).map_err(bad)
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

/// Read JSONL records into examples, applying the bad-line policy and truncation.
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
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut report = LoadReport {
        path: path.to_path_buf(),
        ..Default::default()
    };
    // tokenizing (and rendering templates) is the slow part: do it on every core, then
    // apply the policy in line order
    let lines: Vec<(usize, &[u8])> = crate::fsutil::strip_bom(&text)
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, raw)| (i + 1, raw))
        .filter(|(_, raw)| !raw.trim_ascii().is_empty())
        .collect();
    let results: Vec<(usize, std::result::Result<Truncated, RecordError>)> = lines
        .par_iter()
        .map(|&(line, raw)| {
            let r = std::str::from_utf8(raw)
                .map_err(|_| RecordError::Bad("not valid UTF-8".into()))
                .and_then(|s| parse_record(s.trim()).map_err(RecordError::Bad))
                .and_then(|r| tokenize_record(tok, r))
                .and_then(|(ids, labels)| truncate(ids, labels, opts.max_seq_length));
            (line, r)
        })
        .collect();
    let mut out = Vec::with_capacity(results.len());
    for (line, result) in results {
        report.records += 1;
        match result {
            Ok(t) => {
                report.truncated += t.cut as usize;
                out.push(Example {
                    input_ids: t.ids,
                    labels: t.labels,
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

/// Cut an example to `max` tokens; refuse one with nothing scored left.
fn truncate(
    mut ids: Vec<u32>,
    mut labels: Vec<i32>,
    max: usize,
) -> std::result::Result<Truncated, RecordError> {
    let first_scored = labels
        .iter()
        .skip(1)
        .position(|&l| l != IGNORE_INDEX)
        .map(|p| p + 1);
    let Some(first) = first_scored else {
        return Err(RecordError::Bad(
            "no tokens to learn from (empty text or completion)".into(),
        ));
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
    Ok(Truncated { ids, labels, cut })
}

/// Read a plain text file as one token stream cut into windows of `max_seq_length`.
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
    let text = crate::fsutil::read_text(path)?;
    let ids = tok.encode(&text, true)?;
    let examples: Vec<Example> = ids
        .chunks(max_seq_length)
        .filter(|w| w.len() >= 2)
        .enumerate()
        .map(|(i, w)| Example {
            input_ids: w.to_vec(),
            labels: w.iter().map(|&t| t as i32).collect(),
            line: i + 1,
        })
        .collect();
    let report = LoadReport {
        path: path.to_path_buf(),
        records: examples.len(),
        ..Default::default()
    };
    Ok((examples, report))
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

/// One row of a batch: one example, or several packed ones with their segment ids.
#[derive(Clone, Debug)]
struct Row {
    ids: Vec<u32>,
    labels: Vec<i32>,
    segments: Vec<u32>,
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
            let e = &examples[i];
            let fits = rows.last().is_some_and(|r| {
                layout == Layout::Packed && r.ids.len() + e.input_ids.len() <= max_seq_length
            });
            if !fits {
                rows.push(Row {
                    ids: Vec::new(),
                    labels: Vec::new(),
                    segments: Vec::new(),
                });
            }
            let row = rows
                .last_mut()
                .ok_or_else(|| Error::config("internal: rows"))?;
            let seg = row.segments.last().map_or(0, |&s| s + 1);
            row.ids.extend_from_slice(&e.input_ids);
            row.labels.extend_from_slice(&e.labels);
            row.segments
                .extend(std::iter::repeat_n(seg, e.input_ids.len()));
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
            return Err(Error::config(format!(
                "internal: batch {index} of an epoch of {}",
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
            .ok_or_else(|| Error::config("internal: order"))?
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
            let pad_seg = r.segments.last().map_or(0, |&s| s + 1);
            segs.extend_from_slice(&r.segments);
            segs.extend(std::iter::repeat_n(pad_seg, pad));
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
