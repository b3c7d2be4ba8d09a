//! Tokenization and chat templates: a HF `tokenizer.json` (through the `tokenizers`
//! crate) and the `chat_template` of `tokenizer_config.json` rendered with minijinja,
//! with the Python-compatible methods HF templates use.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Ids that end generation (the eos token and, for chat models, the end-of-turn token).
    pub eos_ids: Vec<u32>,
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
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::format(&path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(Error::io(&cfg_path, e)),
        };
        let chat_template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let bos_token = token_string(cfg.get("bos_token"));
        let eos_token = token_string(cfg.get("eos_token"));
        let mut eos_ids = Vec::new();
        for t in [
            eos_token.as_deref(),
            Some("<|im_end|>"),
            Some("<|eot_id|>"),
            Some("<|endoftext|>"),
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
        Ok(Tokenizer {
            inner,
            dir: dir.to_path_buf(),
            chat_template,
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
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let cfg_path = self.dir.join("tokenizer_config.json");
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::format(
                &cfg_path,
                "this model has no chat_template, so chat-format data cannot be rendered; use {\"prompt\", \"completion\"} or {\"text\"} records",
            )
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref(),
            self.eos_token.as_deref(),
        )
        .map_err(|e| Error::format(&cfg_path, format!("chat template failed to render: {e}")))
    }
}

/// Render a HF chat template (Jinja) with minijinja and Python-compatible string methods.
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> std::result::Result<String, String> {
    let mut env = minijinja::Environment::new();
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
    env.add_template("chat", template)
        .map_err(|e| format!("{e:#}"))?;
    let tmpl = env.get_template("chat").map_err(|e| format!("{e:#}"))?;
    tmpl.render(minijinja::context! {
        messages => messages
            .iter()
            .map(|m| minijinja::Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
            .collect::<Vec<_>>(),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    })
    .map_err(|e| format!("{e:#}"))
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
    fn template_errors_are_reported() {
        let t = "{{ raise_exception('only user messages') }}";
        let e = render_chat_template(t, &[msg("user", "x")], false, None, None).unwrap_err();
        assert!(e.contains("only user messages"), "{e}");
        let e = render_chat_template("{% for %}", &[], false, None, None).unwrap_err();
        assert!(!e.is_empty());
    }
}
