//! Tokenization and chat templates: a HF `tokenizer.json` (through the `tokenizers`
//! crate) and the `chat_template` of `tokenizer_config.json` rendered with minijinja,
//! with the Python-compatible methods HF templates use.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A token's byte range `[start, end)` in the encoded text.
pub type ByteRange = (usize, usize);

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Text longer than this is encoded in pieces of about this many bytes, cut where
/// [`piece_end`] says: encoding costs about a hundred bytes of memory per byte of text,
/// so whole-text encoding of a 50 MB record would need gigabytes.
pub const PIECE_BYTES: usize = 64 << 10;

/// Token ids of a text (or of its beginning) with each token's byte range in the text.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<ByteRange>,
    /// False when encoding stopped early: `ids` are then more than the limit asked for,
    /// and exactly the first tokens of the whole text's encoding.
    pub complete: bool,
}

/// Whether `text` may be cut at byte `p`: before an ASCII space that follows a printable
/// ASCII character. Pre-tokenizers split there (GPT-2's byte-level regex starts a word
/// with its space, Metaspace splits before `▁`), so encoding the two sides apart gives
/// the tokens of the whole; [`Tokenizer::from_dir`] checks this of each tokenizer.
fn is_cut(bytes: &[u8], p: usize) -> bool {
    p > 0 && p < bytes.len() && bytes[p] == b' ' && bytes[p - 1].is_ascii_graphic()
}

/// The end of the piece of `text` that starts at `start`: the last cut point within
/// [`PIECE_BYTES`] of it, else the next one after, else the end of the text.
pub fn piece_end(text: &str, start: usize) -> usize {
    let b = text.as_bytes();
    if b.len() - start <= PIECE_BYTES {
        return b.len();
    }
    let target = start + PIECE_BYTES;
    (start + 1..=target)
        .rev()
        .find(|&p| is_cut(b, p))
        .or_else(|| (target + 1..b.len()).find(|&p| is_cut(b, p)))
        .unwrap_or(b.len())
}

/// The last cut point of `text` after `start`, if any (for cutting off a streamed
/// buffer's tail, which may continue in the next read).
pub fn last_cut(text: &str, start: usize) -> Option<usize> {
    let b = text.as_bytes();
    (start + 1..b.len()).rev().find(|&p| is_cut(b, p))
}

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Whether text cut at [`is_cut`] points encodes to the tokens of the whole.
    piecewise: bool,
    /// What the post-processor adds before and after a text (e.g. a BOS token).
    affixes: (Vec<u32>, Vec<u32>),
    dir: PathBuf,
    chat_template: Option<ChatTemplate>,
    /// The file the chat template comes from (for messages).
    template_file: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Ids that end generation (the eos token and, for chat models, the end-of-turn token).
    pub eos_ids: Vec<u32>,
}

/// Files that hold a chat template apart from tokenizer_config.json, as newer
/// transformers saves it: `chat_template.jinja` (the template itself), or
/// `chat_template.json` (`{"chat_template": "..."}`).
pub const TEMPLATE_FILES: &[&str] = &["chat_template.jinja", "chat_template.json"];

/// The template of `dir`'s template file and that file, or (None, tokenizer_config.json)
/// when it has none.
fn template_file_of(dir: &Path) -> Result<(Option<String>, PathBuf)> {
    let jinja = dir.join(TEMPLATE_FILES[0]);
    if jinja.is_file() {
        return Ok((Some(crate::fsutil::read_text(&jinja)?), jinja));
    }
    let json = dir.join(TEMPLATE_FILES[1]);
    if json.is_file() {
        let v: serde_json::Value = serde_json::from_str(&crate::fsutil::read_text(&json)?)
            .map_err(|e| Error::format(&json, format!("not valid JSON: {e}")))?;
        let t = v
            .get("chat_template")
            .and_then(|t| t.as_str())
            .ok_or_else(|| Error::format(&json, "has no string field 'chat_template'"))?;
        return Ok((Some(t.to_string()), json));
    }
    Ok((None, dir.join("tokenizer_config.json")))
}

/// A special-token entry of tokenizer_config.json: a string or `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Load `tokenizer.json` and (if present) `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::format(
                &path,
                "missing; `lema prepare` writes it beside the model (for a GGUF source it is rebuilt from the GGUF metadata)",
            ));
        }
        let mut inner = tokenizers::Tokenizer::from_bytes(crate::fsutil::read_text(&path)?)
            .map_err(|e| Error::format(&path, format!("cannot load tokenizer: {e}")))?;
        // lema cuts examples to max_seq_length itself; a truncation or padding saved in
        // tokenizer.json would silently cut or pad the text (transformers disables them
        // too unless asked)
        inner
            .with_truncation(None)
            .map_err(|e| Error::format(&path, format!("cannot load tokenizer: {e}")))?;
        inner.with_padding(None);
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read(&cfg_path) {
            Ok(t) => serde_json::from_slice(crate::fsutil::strip_bom(&t))
                .map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(Error::io(&cfg_path, e)),
        };
        // transformers' order: a template file of its own wins over tokenizer_config.json's
        let (file_template, template_file) = template_file_of(dir)?;
        let chat_template = file_template
            .or_else(|| match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                _ => None,
            })
            .map(|t| ChatTemplate::new(&t));
        let bos_token = token_string(cfg.get("bos_token"));
        let eos_token = token_string(cfg.get("eos_token"));
        let mut eos_ids = Vec::new();
        for t in [
            eos_token.as_deref(),
            Some("<|im_end|>"),
            Some("<|eot_id|>"),
            Some("<|endoftext|>"),
            Some("<end_of_turn>"),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(id) = inner.token_to_id(t)
                && !eos_ids.contains(&id)
            {
                eos_ids.push(id);
            }
        }
        let affixes = special_affixes(&inner);
        let piecewise = affixes.is_some() && cuts_are_exact(&inner);
        Ok(Tokenizer {
            inner,
            piecewise,
            affixes: affixes.unwrap_or_default(),
            dir: dir.to_path_buf(),
            chat_template,
            template_file,
            bos_token,
            eos_token,
            eos_ids,
        })
    }

    /// Token ids of `text`; `add_special` adds what the tokenizer's post-processor adds
    /// (e.g. a BOS token).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| {
                Error::format(
                    self.dir.join("tokenizer.json"),
                    format!("cannot encode text: {e}"),
                )
            })
    }

    /// Token ids of `text` with each token's byte range in `text` (added special tokens
    /// such as a BOS get an empty range).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special: bool,
    ) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        self.inner
            .encode(text, add_special)
            .map(|e| (e.get_ids().to_vec(), e.get_offsets().to_vec()))
            .map_err(|e| {
                Error::format(
                    self.dir.join("tokenizer.json"),
                    format!("cannot encode text: {e}"),
                )
            })
    }

    /// The tokens of `text` as [`encode_with_offsets`](Self::encode_with_offsets) gives
    /// them, encoded in pieces of about [`PIECE_BYTES`] so that memory stays bounded, and
    /// stopping once more than `limit` tokens are known (the caller keeps at most
    /// `limit`). The tokens returned are exactly the first ones of the whole text's
    /// encoding; a tokenizer for which cutting text changes its tokens is run on the
    /// whole text instead.
    pub fn encode_bounded(
        &self,
        text: &str,
        add_special: bool,
        limit: Option<usize>,
    ) -> Result<Encoded> {
        if !self.piecewise || text.len() <= PIECE_BYTES {
            let (ids, offsets) = self.encode_with_offsets(text, add_special)?;
            return Ok(Encoded {
                ids,
                offsets,
                complete: true,
            });
        }
        let (prefix, suffix) = self.special_affixes(add_special);
        let mut ids = prefix.to_vec();
        let mut offsets = vec![(0, 0); ids.len()];
        let mut pos = 0;
        while pos < text.len() {
            if limit.is_some_and(|l| ids.len() > l) {
                return Ok(Encoded {
                    ids,
                    offsets,
                    complete: false,
                });
            }
            let end = piece_end(text, pos);
            let (i, o) = self.encode_with_offsets(&text[pos..end], false)?;
            ids.extend_from_slice(&i);
            offsets.extend(o.iter().map(|&(a, b)| (a + pos, b + pos)));
            pos = end;
        }
        ids.extend_from_slice(suffix);
        offsets.resize(ids.len(), (0, 0));
        Ok(Encoded {
            ids,
            offsets,
            complete: true,
        })
    }

    /// Whether text may be encoded piece by piece (cut where [`piece_end`] cuts) with the
    /// tokens of the whole: checked when the tokenizer is loaded.
    pub fn encodes_in_pieces(&self) -> bool {
        self.piecewise
    }

    /// The special tokens that encoding with `add_special` puts before and after a text.
    pub fn special_affixes(&self, add_special: bool) -> (&[u32], &[u32]) {
        if add_special {
            (&self.affixes.0, &self.affixes.1)
        } else {
            (&[], &[])
        }
    }

    /// Id of the `eos_token` of tokenizer_config.json, if it names one in the vocabulary.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.token_to_id(self.eos_token.as_deref()?)
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| {
            Error::format(
                self.dir.join("tokenizer.json"),
                format!("cannot decode ids: {e}"),
            )
        })
    }

    /// Size of the vocabulary including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Render `messages` with the model's chat template, as HF's
    /// `apply_chat_template(..., tokenize=False)` does. A template at fault (it does not
    /// parse, or it exceeded its [`TemplateBudget`]) is an [`Error::Template`]; one that
    /// refuses this conversation is an [`Error::Format`] on tokenizer_config.json.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let cfg_path = self.template_file.clone();
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::format(
                &cfg_path,
                "this model has no chat_template, so chat-format data cannot be rendered; use {\"prompt\", \"completion\"} or {\"text\"} records",
            )
        })?;
        template
            .render(
                messages,
                add_generation_prompt,
                self.bos_token.as_deref(),
                self.eos_token.as_deref(),
            )
            .map_err(|e| match e {
                TemplateError::Template(msg) => Error::Template {
                    path: cfg_path,
                    msg: format!("{msg}; fix or replace the chat_template in this file"),
                },
                TemplateError::Conversation(msg) => {
                    Error::format(&cfg_path, format!("chat template failed to render: {msg}"))
                }
            })
    }
}

/// What one rendering of a chat template may spend, scaled by the conversation: real
/// templates (SmolLM2's, Llama-3's, Qwen's with tools) do a few dozen template
/// instructions per message and write their input once plus a few hundred bytes a turn,
/// far inside this; one that loops or writes without end is stopped at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TemplateBudget {
    /// minijinja fuel: about one unit per instruction and one per 64 bytes of data the
    /// template makes or walks (so it also bounds the memory a rendering can allocate,
    /// about 64 bytes a unit).
    pub fuel: u64,
    /// Longest output, in bytes.
    pub output_bytes: usize,
}

impl TemplateBudget {
    /// Fuel any conversation gets.
    pub const BASE_FUEL: u64 = 1_000_000;
    /// Fuel added per message.
    pub const FUEL_PER_MESSAGE: u64 = 1_000;
    /// Fuel added per byte of the conversation (one unit a byte: each byte may be copied
    /// 64 times).
    pub const FUEL_PER_BYTE: u64 = 1;
    /// Output any conversation may have.
    pub const BASE_OUTPUT: usize = 1 << 20;
    /// Output added per message.
    pub const OUTPUT_PER_MESSAGE: usize = 1024;
    /// Output added per byte of the conversation.
    pub const OUTPUT_PER_BYTE: usize = 8;

    /// The budget of rendering `messages` (with `extra_bytes` of other input, such as
    /// the special tokens).
    pub fn for_conversation(messages: &[Message], extra_bytes: usize) -> Self {
        let bytes = messages
            .iter()
            .map(|m| m.role.len() + m.content.len())
            .fold(extra_bytes, usize::saturating_add);
        let n = messages.len();
        TemplateBudget {
            fuel: Self::BASE_FUEL
                .saturating_add(Self::FUEL_PER_MESSAGE.saturating_mul(n as u64))
                .saturating_add(Self::FUEL_PER_BYTE.saturating_mul(bytes as u64)),
            output_bytes: Self::BASE_OUTPUT
                .saturating_add(Self::OUTPUT_PER_MESSAGE.saturating_mul(n))
                .saturating_add(Self::OUTPUT_PER_BYTE.saturating_mul(bytes)),
        }
    }
}

/// Why a chat template gave no text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateError {
    /// The template itself is at fault: it does not parse, or it exceeded its
    /// [`TemplateBudget`]. No conversation should be blamed for it.
    Template(String),
    /// This conversation cannot be rendered: the template raised an exception on it
    /// (e.g. roles that do not alternate) or failed on its contents.
    Conversation(String),
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplateError::Template(m) | TemplateError::Conversation(m) => f.write_str(m),
        }
    }
}

/// A compiled HF chat template (Jinja, rendered with minijinja and Python-compatible
/// string methods), run under a [`TemplateBudget`].
pub struct ChatTemplate {
    /// The environment holding the compiled template, or why it does not compile.
    env: std::result::Result<minijinja::Environment<'static>, String>,
    /// The first failure that was the template's own fault: every later rendering
    /// returns it at once, so a broken template costs one budget, not one per record.
    failed: std::sync::OnceLock<String>,
}

/// The template's name inside its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// A writer that keeps at most `cap` bytes and fails past them.
struct CappedOutput {
    buf: Vec<u8>,
    cap: usize,
    exceeded: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.cap {
            self.exceeded = true;
            return Err(std::io::Error::other("output budget exceeded"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// Compile `source`; a template that does not parse fails when it is rendered.
    pub fn new(source: &str) -> Self {
        let mut env = minijinja::Environment::new();
        // as transformers compiles chat templates: a block tag's newline is dropped and
        // the spaces before it on its line too, so templates written one tag a line
        // render as they do in HF
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
        {
            env.set_syntax(syntax);
        }
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        let env = env
            .add_template_owned(TEMPLATE_NAME, source.to_string())
            .map(|()| env)
            .map_err(|e| format!("does not parse: {e:#}"));
        ChatTemplate {
            env,
            failed: std::sync::OnceLock::new(),
        }
    }

    /// Render `messages` as HF's `apply_chat_template(..., tokenize=False)` does, within
    /// [`TemplateBudget::for_conversation`].
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> std::result::Result<String, TemplateError> {
        let extra = bos_token.map_or(0, str::len) + eos_token.map_or(0, str::len);
        let budget = TemplateBudget::for_conversation(messages, extra);
        self.render_within(
            messages,
            add_generation_prompt,
            bos_token,
            eos_token,
            budget,
        )
    }

    /// [`render`](Self::render) with an explicit budget.
    pub fn render_within(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
        budget: TemplateBudget,
    ) -> std::result::Result<String, TemplateError> {
        if let Some(why) = self.failed.get() {
            return Err(TemplateError::Template(why.clone()));
        }
        let fail = |why: String| {
            let why = self.failed.get_or_init(|| why);
            TemplateError::Template(why.clone())
        };
        let env = self.env.as_ref().map_err(|e| fail(e.clone()))?;
        let mut env = env.clone();
        env.set_fuel(Some(budget.fuel));
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| fail(format!("{e:#}")))?;
        let ctx = minijinja::context! {
            messages => messages
                .iter()
                .map(|m| minijinja::Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
                .collect::<Vec<_>>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.unwrap_or(""),
            eos_token => eos_token.unwrap_or(""),
        };
        let mut out = CappedOutput {
            buf: Vec::new(),
            cap: budget.output_bytes,
            exceeded: false,
        };
        let size = format!(
            "a conversation of {} messages ({} bytes)",
            messages.len(),
            messages
                .iter()
                .map(|m| m.content.len())
                .fold(0usize, usize::saturating_add)
        );
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.buf)
                .map_err(|_| fail("wrote output that is not UTF-8".into())),
            Err(_) if out.exceeded => Err(fail(format!(
                "exceeded its output budget of {} bytes rendering {size}; a chat template writes the conversation once plus a few hundred bytes a turn, so this one writes far more text than it should",
                budget.output_bytes
            ))),
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(fail(format!(
                "exceeded its work budget of {} fuel (about one unit per template instruction, one per 64 bytes it makes) rendering {size}; a chat template needs a few dozen units a message, so this one loops far more than it should",
                budget.fuel
            ))),
            Err(e) => Err(TemplateError::Conversation(format!("{e:#}"))),
        }
    }
}

/// What the post-processor adds around a text: the tokens before and after those of a
/// one-letter text. None when they cannot be told apart from it.
fn special_affixes(inner: &tokenizers::Tokenizer) -> Option<(Vec<u32>, Vec<u32>)> {
    let plain = inner.encode("a", false).ok()?;
    let body = plain.get_ids().to_vec();
    let full = inner.post_process(plain, None, true).ok()?;
    let full = full.get_ids();
    if body.is_empty() || full.len() < body.len() {
        return None;
    }
    let k = (0..=full.len() - body.len()).find(|&k| full[k..k + body.len()] == body[..])?;
    Some((full[..k].to_vec(), full[k + body.len()..].to_vec()))
}

/// Whether encoding text cut at every cut point gives the tokens (and offsets) of the
/// whole, on a probe of words, numbers, punctuation, runs of spaces, newlines, non-ASCII
/// letters and each added token (whose stripping of neighbouring spaces could differ).
fn cuts_are_exact(inner: &tokenizers::Tokenizer) -> bool {
    let mut probes = vec![
        "Hello world, it's 2024: 3.14 apples cost $5.99!\nNew  line\t tab   three   spaces. café naïve über 日本語 end".to_string(),
        " lead space, trailing space ".to_string(),
        "a.b c!d e-f (g) [h] {i} \"j\" 'k' x1 y22 z333 -- ... ?? ok".to_string(),
    ];
    let mut added: Vec<String> = inner
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    added.sort();
    for t in added.iter().take(256) {
        probes.push(format!("x{t} y {t}z. {t} w {t}"));
    }
    let encode = |s: &str| -> Option<(Vec<u32>, Vec<ByteRange>)> {
        let e = inner.encode(s, false).ok()?;
        Some((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    };
    probes.iter().all(|p| {
        let Some(whole) = encode(p) else {
            return false;
        };
        (0..p.len()).filter(|&c| is_cut(p.as_bytes(), c)).all(|c| {
            let (Some((mut ids, mut offs)), Some((i2, o2))) = (encode(&p[..c]), encode(&p[c..]))
            else {
                return false;
            };
            ids.extend(i2);
            offs.extend(o2.into_iter().map(|(a, b)| (a + c, b + c)));
            (ids, offs) == whole
        })
    })
}

/// Render a HF chat template (Jinja) once, within its [`TemplateBudget`].
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> std::result::Result<String, TemplateError> {
    ChatTemplate::new(template).render(messages, add_generation_prompt, bos_token, eos_token)
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`).
fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return b as char;
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('?')
}

/// Write a byte-level tokenizer without merges (every byte is one token, ids 0..256,
/// then `special_tokens`) as `dir/tokenizer.json`, and a `tokenizer_config.json` with
/// `eos_token` and `chat_template` when given. Small and exact: for tests and examples
/// that need a real tokenizer without downloading one.
pub fn write_byte_level_tokenizer(
    dir: &Path,
    special_tokens: &[&str],
    eos_token: Option<&str>,
    chat_template: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
        .map(|b| (byte_to_char(b).to_string(), serde_json::json!(b as u32)))
        .collect();
    let added: Vec<serde_json::Value> = special_tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    crate::checkpoint::write_json(&dir.join("tokenizer.json"), &tok)?;
    let mut cfg = serde_json::Map::new();
    if let Some(e) = eos_token {
        cfg.insert("eos_token".into(), e.into());
    }
    if let Some(t) = chat_template {
        cfg.insert("chat_template".into(), t.into());
    }
    crate::checkpoint::write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::Value::Object(cfg),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chatml_renders_like_hf() {
        let out =
            render_chat_template(CHATML, &[msg("user", "  Hi there ")], true, None, None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn byte_level_tokenizer_round_trips_with_offsets() {
        let dir = tempfile::tempdir().unwrap();
        write_byte_level_tokenizer(
            dir.path(),
            &["<|im_start|>", "<|im_end|>"],
            Some("<|im_end|>"),
            None,
        )
        .unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap();
        let text = "héllo <|im_end|> x\n";
        let (ids, offs) = t.encode_with_offsets(text, false).unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        // one token per byte, except the special token
        assert_eq!(ids.len(), text.len() - "<|im_end|>".len() + 1);
        let special = ids.iter().position(|&i| i == 257).unwrap();
        assert_eq!(&text[offs[special].0..offs[special].1], "<|im_end|>");
        assert_eq!(t.eos_token_id(), Some(257));
        assert_eq!(t.vocab_size(), 258);
        assert!(!t.has_chat_template());
    }

    #[test]
    fn template_errors_are_reported() {
        let t = "{{ raise_exception('only user messages') }}";
        let e = render_chat_template(t, &[msg("user", "x")], false, None, None).unwrap_err();
        assert!(
            matches!(&e, TemplateError::Conversation(m) if m.contains("only user messages")),
            "{e:?}"
        );
        let e = render_chat_template("{% for %}", &[], false, None, None).unwrap_err();
        assert!(
            matches!(&e, TemplateError::Template(m) if m.starts_with("does not parse")),
            "{e:?}"
        );
    }
}
