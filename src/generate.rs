//! Text generation: a forward over new tokens against a [`KvCache`] (prefill, then one
//! token per step), layers still streamed one at a time, and token sampling (greedy,
//! temperature, top-k, top-p) from a seeded [`Rng`].
//!
//! Prompts of different lengths share one batch by left padding: each row's cache
//! records its first real position, positions count from there, and no query attends to
//! padding, so a row's tokens do not depend on the others in its batch.

use crate::backend::{Backend, Gemm};
use crate::error::{Error, Result};
use crate::lora::LoraParams;
use crate::model::StepShape;
use crate::model::kv_cache::KvCache;
use crate::rng::Rng;
use crate::stream::Part;
use crate::tokenizer::{Message, Tokenizer};
use crate::trainer::Engine;
use serde::{Deserialize, Serialize};

/// Which rows of logits a cached forward returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsOf {
    /// Only the last new token of each row: `[B, V]` (generation).
    Last,
    /// Every new token: `[B, Tq, V]` (scoring, tests).
    All,
}

/// How the next token is chosen from the logits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (the most likely token, ties to the lowest id).
    pub temperature: f32,
    /// Keep only the k most likely tokens (None or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (nucleus
    /// sampling; None or 1: all).
    pub top_p: Option<f32>,
    /// Seed of the sampler's random numbers.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy decoding.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Reject values that make no sense.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::config(format!(
                "temperature must be ≥ 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(Error::config(format!("top_p must be in (0, 1], got {p}")));
        }
        Ok(())
    }
}

/// Draws tokens from logits according to [`SamplingParams`].
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = Rng::new(params.seed);
        Ok(Sampler { params, rng })
    }

    /// The next token for one row of logits `[V]`. NaN logits are an error (a broken
    /// model or weights), never a silent pick.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::config("cannot sample from an empty vocabulary"));
        }
        if let Some(i) = logits.iter().position(|x| x.is_nan()) {
            return Err(Error::NonFinite(format!(
                "logit {i} is NaN; the model's weights or the adapter are broken"
            )));
        }
        let greedy = self.params.temperature == 0.0 || self.params.top_k == Some(1);
        if greedy {
            return Ok(argmax(logits));
        }
        // candidates sorted by logit, descending (ties: lower id first)
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if let Some(k) = self.params.top_k.filter(|&k| k > 0) {
            idx.truncate(k);
        }
        let t = self.params.temperature;
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| (((logits[i as usize] - max) / t) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        for p in &mut probs {
            *p /= total;
        }
        if let Some(top_p) = self.params.top_p.filter(|&p| p < 1.0) {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    acc += p;
                    acc >= top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            idx.truncate(keep);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            for p in &mut probs {
                *p /= total;
            }
        }
        let u = self.rng.next_f64();
        let mut acc = 0.0;
        for (&i, &p) in idx.iter().zip(&probs) {
            acc += p;
            if u < acc {
                return Ok(i);
            }
        }
        Ok(*idx.last().unwrap_or(&0))
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// What to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateOptions {
    /// Tokens to generate at most per prompt.
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Tokens that end a row's generation (not included in its output).
    pub stop_ids: Vec<u32>,
}

/// One prompt's continuation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// The new tokens, without the stop token.
    pub tokens: Vec<u32>,
    /// Whether generation ended at a stop token (rather than at `max_new_tokens`).
    pub stopped: bool,
}

/// How a text prompt becomes token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// The chat template when the model has one, else the raw text.
    Auto,
    /// The model's chat template (a user turn, an optional system turn, and the
    /// assistant's generation prompt); an error when the model has none.
    Chat,
    /// The text as it is, with the tokenizer's own special tokens (e.g. BOS).
    Raw,
}

/// Token ids of a text prompt in `format`. Chat prompts are rendered by the model's
/// template, which already holds its special tokens, so they are encoded without adding
/// more (as HF's `apply_chat_template(tokenize=True)` does).
pub fn encode_prompt(
    tok: &Tokenizer,
    text: &str,
    system: Option<&str>,
    format: PromptFormat,
) -> Result<Vec<u32>> {
    let chat = match format {
        PromptFormat::Auto => tok.has_chat_template(),
        PromptFormat::Chat => true,
        PromptFormat::Raw => false,
    };
    if !chat {
        if system.is_some() {
            return Err(Error::config(
                "a system prompt needs the chat format; drop --raw or the system prompt",
            ));
        }
        return tok.encode(text, true);
    }
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(Message {
            role: "system".into(),
            content: s.into(),
        });
    }
    messages.push(Message {
        role: "user".into(),
        content: text.into(),
    });
    let rendered = tok.apply_chat_template(&messages, true)?;
    tok.encode(&rendered, false)
}

/// Turns generated tokens into text piece by piece, for streaming output: each push
/// returns the text that the new token completes. A token that ends inside a multi-byte
/// character (byte-level BPE) is held back until the character is whole.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `id` and return the newly completed text (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = tok.decode(&self.ids, true)?;
        if text.ends_with('\u{FFFD}') || !text.is_char_boundary(self.emitted.min(text.len())) {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or("").to_string();
        self.emitted = text.len().max(self.emitted);
        Ok(new)
    }

    /// All text so far.
    pub fn text(&self, tok: &Tokenizer) -> Result<String> {
        tok.decode(&self.ids, true)
    }
}

impl<B: Backend> Engine<B> {
    /// A cache for `batch` rows of `cap` positions on this engine's backend; the start of
    /// a generation (LoRA's GEMM copies are made afresh).
    pub fn new_cache(
        &mut self,
        batch: usize,
        cap: usize,
        key_start: Option<Vec<u32>>,
    ) -> Result<KvCache<B>> {
        // a generation starts from the parameters as they are now (a host optimizer may
        // have written them since the last pass)
        if let Some(l) = self.lora.as_mut() {
            l.drop_gemm_copies();
        }
        KvCache::new(&self.be, &self.model, batch, cap, key_start)
    }

    /// Run `ids` (`[B, Tq]`, row-major) through every block against `cache`, which they
    /// join, and the head; returns the logits of `which` tokens. LoRA (if loaded) applies
    /// without dropout.
    pub fn forward_cached(
        &mut self,
        cache: &mut KvCache<B>,
        ids: &[u32],
        which: LogitsOf,
    ) -> Result<Vec<f32>> {
        let b = cache.batch();
        if ids.is_empty() || !ids.len().is_multiple_of(b) {
            return Err(Error::config(format!(
                "{} token ids do not fill {b} rows of at least one token",
                ids.len()
            )));
        }
        let tq = ids.len() / b;
        cache.check_room(tq)?;
        // a long prompt's per-token work runs in sequence tiles, as in training
        let tile = self.tile_rows(b * tq, false);
        let cfg = self.model.config();
        let (c, v, layers) = (cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers);
        let shape = StepShape {
            batch: b,
            seq: tq,
            positions: cache.positions(tq),
            segment_start: None,
            tile,
        };
        let be = &self.be;
        let h0 = self.model.embed(&self.gbi, ids, &shape.positions)?;
        let mut h = be.upload(&h0)?;
        for i in 0..layers {
            let next = if i + 1 < layers {
                Part::Block(i + 1)
            } else {
                Part::Head
            };
            let w = self.stream.get(be, Part::Block(i), Some(next))?;
            let bl = LoraParams::block_or_none(self.lora.as_mut(), i, 0, 0.0);
            h = self
                .model
                .block_forward_cached(be, &w, &bl, &h, &shape, cache, i)?;
        }
        cache.advance(tq)?;
        let hw = self.stream.get(be, Part::Head, Some(Part::Block(0)))?;
        // only the rows whose logits are wanted go through the final norm and the head
        let (x, rows) = match which {
            LogitsOf::All => (h, b * tq),
            LogitsOf::Last => {
                let mut last = be.uninit(b * c)?;
                // last[b, :] = h[b, Tq−1, :], seeing h as [B, Tq·C]
                be.copy_cols(
                    &mut last,
                    c,
                    0,
                    &h,
                    tq * c,
                    (tq - 1) * c,
                    c,
                    crate::backend::Accumulate::Overwrite,
                )?;
                (last, b)
            }
        };
        let (xf, _) = self.model.final_norm_forward(be, &hw, &x)?;
        // logits[rows, V] = xf[rows, C] · Wᵀ, W [V, C]
        let mut logits = be.uninit(rows * v)?;
        be.matmul(
            &mut logits,
            &xf,
            hw.get("lm_head.weight")?,
            Gemm {
                m: rows,
                n: v,
                k: c,
                trans_a: false,
                trans_b: true,
                alpha: 1.0,
                accumulate: crate::backend::Accumulate::Overwrite,
            },
        )?;
        if let Some(cap) = self.model.logit_softcap() {
            be.softcap(&mut logits, cap)?;
        }
        be.download(&logits)
    }

    /// Generate continuations of `prompts` together (left-padded into one batch).
    /// `on_token(row, token)` is called for every new token as it is chosen (not for stop
    /// tokens), so callers can stream text.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    ) -> Result<Vec<Generated>> {
        let mut sampler = Sampler::new(opts.sampling.clone())?;
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(Error::config(format!(
                "prompt {i} is empty; generation needs at least one token to start from"
            )));
        }
        let b = prompts.len();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let cap = longest.saturating_add(opts.max_new_tokens.max(1));
        let pad = |p: &Vec<u32>| longest - p.len();
        let key_start: Vec<u32> = prompts.iter().map(|p| pad(p) as u32).collect();
        let mut cache = self.new_cache(b, cap, Some(key_start))?;
        // left padding repeats each row's first token; it is never attended to
        let mut ids = Vec::with_capacity(b * longest);
        for p in prompts {
            ids.extend(std::iter::repeat_n(p[0], pad(p)));
            ids.extend_from_slice(p);
        }
        let mut out: Vec<Generated> = (0..b)
            .map(|_| Generated {
                tokens: Vec::new(),
                stopped: false,
            })
            .collect();
        let v = self.model.config().vocab_size;
        let mut logits = self.forward_cached(&mut cache, &ids, LogitsOf::Last)?;
        for step in 0..opts.max_new_tokens {
            let mut next = Vec::with_capacity(b);
            for (r, g) in out.iter_mut().enumerate() {
                if g.stopped {
                    next.push(*g.tokens.last().unwrap_or(&prompts[r][0]));
                    continue;
                }
                let tok = sampler.sample(&logits[r * v..(r + 1) * v])?;
                if opts.stop_ids.contains(&tok) {
                    g.stopped = true;
                } else {
                    g.tokens.push(tok);
                    on_token(r, tok)?;
                }
                next.push(tok);
            }
            if out.iter().all(|g| g.stopped) || step + 1 == opts.max_new_tokens {
                break;
            }
            logits = self.forward_cached(&mut cache, &next, LogitsOf::Last)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(t: f32, k: Option<usize>, p: Option<f32>, seed: u64) -> Sampler {
        Sampler::new(SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            seed,
        })
        .unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = sampler(0.0, None, None, 1);
        assert_eq!(s.sample(&[0.1, 2.0, -1.0, 2.0]).unwrap(), 1);
        let mut s = sampler(1.0, Some(1), None, 1);
        assert_eq!(s.sample(&[0.1, 0.0, 3.0]).unwrap(), 2);
        assert!(s.sample(&[0.0, f32::NAN]).is_err());
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [0.0f32, 1.0, 2.0, 3.0, 4.0];
        let mut s = sampler(1.0, Some(2), None, 7);
        let mut seen = [0usize; 5];
        for _ in 0..2000 {
            seen[s.sample(&logits).unwrap() as usize] += 1;
        }
        assert_eq!(seen[..3], [0, 0, 0], "{seen:?}");
        // p(4)/p(3) = e under temperature 1
        let ratio = seen[4] as f64 / seen[3] as f64;
        assert!((ratio - std::f64::consts::E).abs() < 0.4, "{ratio}");
        // softmax of [0..4]: p(4) ≈ 0.636, p(3) ≈ 0.234 → top_p 0.7 keeps {4, 3}
        let mut s = sampler(1.0, None, Some(0.7), 7);
        let mut seen = [0usize; 5];
        for _ in 0..2000 {
            seen[s.sample(&logits).unwrap() as usize] += 1;
        }
        assert_eq!(seen[..3], [0, 0, 0], "{seen:?}");
        assert!(seen[3] > 0 && seen[4] > seen[3], "{seen:?}");
        // top_p 0.5 keeps only the first token
        let mut s = sampler(1.0, None, Some(0.5), 7);
        for _ in 0..100 {
            assert_eq!(s.sample(&logits).unwrap(), 4);
        }
    }

    #[test]
    fn temperature_flattens_and_the_seed_repeats() {
        let logits = [0.0f32, 1.0];
        let count = |t: f32| {
            let mut s = sampler(t, None, None, 3);
            (0..4000)
                .filter(|_| s.sample(&logits).unwrap() == 1)
                .count() as f64
                / 4000.0
        };
        // p(1) = 1/(1+e^{-1/t})
        for t in [0.5f32, 1.0, 4.0] {
            let want = 1.0 / (1.0 + (-1.0 / t as f64).exp());
            assert!(
                (count(t) - want).abs() < 0.03,
                "t {t}: {} vs {want}",
                count(t)
            );
        }
        let draw = |seed| {
            let mut s = sampler(1.0, None, None, seed);
            (0..50)
                .map(|_| s.sample(&[0.0, 0.0, 0.0]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn bad_params_are_rejected() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: Some(0.0),
                ..Default::default()
            },
            SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            },
        ] {
            assert!(Sampler::new(p).is_err());
        }
    }
}
