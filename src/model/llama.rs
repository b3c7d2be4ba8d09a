//! The Llama family (Llama 2/3, SmolLM, TinyLlama, Mistral-style GQA): pre-norm blocks
//! of RMSNorm → attention with RoPE → residual, RMSNorm → SwiGLU MLP → residual.
//!
//! Shapes: N = B·T tokens, C hidden, H query heads, KVH key/value heads, D head dim,
//! I MLP width, V vocabulary.

use super::kv_cache::KvCache;
use super::linear::{Layout, Linear, keep_for_backward};
use super::{Keep, LayerWeights, LinearSpec, Saved, StepShape, TensorSpec, gather_rows, keep_in};
use crate::backend::{Accumulate, AttnDims, Backend};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gbi::Gbi;
use crate::lora::BlockLora;

/// What lema asks of the Llama family outside the model ([`super::family`]).
pub static FAMILY: super::family::Family = super::family::Family {
    conv1d_weights: false,
    learned_positions: false,
    mlp_matrices: 3,
    default_lora_targets: &["q_proj", "v_proj"],
    describe_sizes: |c| {
        format!(
            "vocab_size = {}, hidden_size = {}, intermediate_size = {}, \
             num_hidden_layers = {}, num_attention_heads = {}, num_key_value_heads = {}, \
             head_dim = {}",
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim
        )
    },
};

/// A Llama-family model.
#[derive(Clone, Debug)]
pub struct Llama {
    pub cfg: ModelConfig,
    /// RoPE inverse frequencies (`[D/2]`, scaling applied), computed once from `cfg`.
    pub inv_freq: Vec<f32>,
}

const Q: &str = "self_attn.q_proj";
const K: &str = "self_attn.k_proj";
const V: &str = "self_attn.v_proj";
const O: &str = "self_attn.o_proj";
const GATE: &str = "mlp.gate_proj";
const UP: &str = "mlp.up_proj";
const DOWN: &str = "mlp.down_proj";

impl Llama {
    pub(crate) fn block_prefix(&self, i: usize) -> String {
        format!("model.layers.{i}.")
    }

    pub(crate) fn head_names(&self) -> &'static [&'static str] {
        &["model.norm.weight", "lm_head.weight"]
    }

    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        let c = &self.cfg;
        (
            c.hidden_size,
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
            c.intermediate_size,
            c.vocab_size,
        )
    }

    pub(crate) fn linears(&self) -> Vec<LinearSpec> {
        let (c, qd, kvd, i, _) = self.dims();
        let l = |name, in_features, out_features| LinearSpec {
            name,
            in_features,
            out_features,
        };
        vec![
            l(Q, c, qd),
            l(K, c, kvd),
            l(V, c, kvd),
            l(O, qd, c),
            l(GATE, c, i),
            l(UP, c, i),
            l(DOWN, i, c),
        ]
    }

    pub(crate) fn tensor_specs(&self) -> Vec<TensorSpec> {
        let (c, _, _, _, v) = self.dims();
        let t = |name: String, shape: Vec<usize>| TensorSpec { name, shape };
        let mut out = vec![t("model.embed_tokens.weight".into(), vec![v, c])];
        for layer in 0..self.cfg.num_hidden_layers {
            let p = self.block_prefix(layer);
            out.push(t(format!("{p}input_layernorm.weight"), vec![c]));
            out.push(t(format!("{p}post_attention_layernorm.weight"), vec![c]));
            for lin in self.linears() {
                out.push(t(
                    format!("{p}{}.weight", lin.name),
                    vec![lin.out_features, lin.in_features],
                ));
                if self.has_bias(lin.name) {
                    out.push(t(format!("{p}{}.bias", lin.name), vec![lin.out_features]));
                }
            }
        }
        out.push(t("model.norm.weight".into(), vec![c]));
        out.push(t("lm_head.weight".into(), vec![v, c]));
        out
    }

    fn has_bias(&self, linear: &str) -> bool {
        if linear.starts_with("self_attn.") {
            self.cfg.attention_bias
        } else {
            self.cfg.mlp_bias
        }
    }

    pub(crate) fn embed(&self, gbi: &Gbi, ids: &[u32], _positions: &[u32]) -> Result<Vec<f32>> {
        gather_rows(gbi, "model.embed_tokens.weight", ids, self.cfg.hidden_size)
    }

    fn linear<'w, B: Backend>(
        &self,
        w: &'w LayerWeights<B>,
        name: &'static str,
    ) -> Result<Linear<'w, B>> {
        let spec = self
            .linears()
            .into_iter()
            .find(|l| l.name == name)
            .map(|l| (l.in_features, l.out_features))
            .unwrap_or((0, 0));
        Ok(Linear {
            name,
            w: w.get(&format!("{name}.weight"))?,
            bias: w.opt(&format!("{name}.bias")),
            layout: Layout::OutIn,
            in_features: spec.0,
            out_features: spec.1,
        })
    }

    fn attn_dims(&self, s: &StepShape) -> AttnDims {
        AttnDims {
            batch: s.batch,
            seq: s.seq,
            n_heads: self.cfg.num_attention_heads,
            n_kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
            scale: 1.0 / (self.cfg.head_dim as f32).sqrt(),
        }
    }

    /// The block forward, attention over this call's tokens (training, evaluation) or,
    /// with a cache, over the cache they are appended to (generation).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_forward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        lora: &BlockLora<B>,
        x: &B::Buf,
        s: &StepShape,
        keep: Keep,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Result<(Option<B::Buf>, Saved<B>)> {
        let (c, qd, _, i, _) = self.dims();
        let n = s.tokens();
        let eps = self.cfg.norm_eps;
        let inv_freq = &self.inv_freq;
        let (h_, kvh) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let mut sv = Saved::default();

        // ln1[N, C] = rms_norm(x) · input_layernorm (the kernel writes every row and rstd)
        let mut ln1 = be.uninit(n * c)?;
        let mut rstd1 = be.uninit(n)?;
        be.rms_norm_forward(
            &mut ln1,
            &mut rstd1,
            x,
            w.get("input_layernorm.weight")?,
            eps,
        )?;
        // q[N, H·D], k, v[N, KVH·D]; RoPE on q and k
        let in1 = self.linear(w, Q)?.input(&ln1);
        let mut q = self
            .linear(w, Q)?
            .forward(be, &in1, n, lora, keep_in(keep, &mut sv))?;
        let mut k = self
            .linear(w, K)?
            .forward(be, &in1, n, lora, keep_in(keep, &mut sv))?;
        let v = self
            .linear(w, V)?
            .forward(be, &in1, n, lora, keep_in(keep, &mut sv))?;
        be.rope_forward(&mut q, &s.positions, inv_freq, h_)?;
        be.rope_forward(&mut k, &s.positions, inv_freq, kvh)?;
        // att[N, H·D] = causal_attention(q, k, v), or over the cache that k, v join
        let (att, lse) = match cache {
            Some((cache, layer)) => (cache.attend(be, layer, &q, &k, &v, s.seq)?, None),
            None => {
                // every query attends at least to itself: out and lse of every row written
                let mut att = be.uninit(n * qd)?;
                let mut lse = be.uninit(s.batch * h_ * s.seq)?;
                be.attention_forward(
                    &mut att,
                    &mut lse,
                    &q,
                    &k,
                    &v,
                    self.attn_dims(s),
                    s.key_start(),
                )?;
                (att, Some(lse))
            }
        };
        // h[N, C] = x + att · Woᵀ
        let wo = self.linear(w, O)?;
        let mut h = wo.forward(be, &wo.input(&att), n, lora, keep_in(keep, &mut sv))?;
        be.axpy(&mut h, 1.0, x, Accumulate::Add)?;
        // ln2 = rms_norm(h) · post_attention_layernorm
        let mut ln2 = be.uninit(n * c)?;
        let mut rstd2 = be.uninit(n)?;
        be.rms_norm_forward(
            &mut ln2,
            &mut rstd2,
            &h,
            w.get("post_attention_layernorm.weight")?,
            eps,
        )?;
        // act[N, I] = silu(ln2·Wgᵀ) · (ln2·Wuᵀ)
        let in2 = self.linear(w, GATE)?.input(&ln2);
        let g = self
            .linear(w, GATE)?
            .forward(be, &in2, n, lora, keep_in(keep, &mut sv))?;
        let u = self
            .linear(w, UP)?
            .forward(be, &in2, n, lora, keep_in(keep, &mut sv))?;
        let mut act = be.uninit(n * i)?;
        be.swiglu_forward(&mut act, &g, &u)?;
        // y[N, C] = h + act · Wdᵀ
        let wd = self.linear(w, DOWN)?;
        let ia = wd.input(&act);
        let y = wd.forward_residual(be, &ia, &h, n, lora, keep, &mut sv)?;
        if keep.saved() {
            // ln1, ln2 and act are read by the backward only as linear inputs
            let p = lora.dropout;
            let ln1 = keep_for_backward(in1.into_gemm_copy(), ln1, p);
            let ln2 = keep_for_backward(in2.into_gemm_copy(), ln2, p);
            let act = keep_for_backward(ia.into_gemm_copy(), act, p);
            let lse =
                lse.ok_or_else(|| Error::config("internal: a cached forward keeps nothing"))?;
            for (name, buf) in [
                ("ln1", ln1),
                ("rstd1", rstd1),
                ("q", q),
                ("k", k),
                ("v", v),
                ("att", att),
                ("lse", lse),
                ("h", h),
                ("ln2", ln2),
                ("rstd2", rstd2),
                ("g", g),
                ("u", u),
                ("act", act),
            ] {
                sv.put(name, buf);
            }
        }
        Ok((y, sv))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn block_backward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        lora: &mut BlockLora<B>,
        x: &B::Buf,
        sv: &mut Saved<B>,
        dy: &B::Buf,
        s: &StepShape,
    ) -> Result<B::Buf> {
        let (c, qd, _, i, _) = self.dims();
        let n = s.tokens();
        let inv_freq = &self.inv_freq;
        let (h_, kvh) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);

        // y = h + act·Wdᵀ  ⇒  dh = dy (residual), dact = dy·Wd
        // (outputs of an `Overwrite` backward or of an elementwise kernel start uninit)
        let mut dact = be.uninit(n * i)?;
        let wd = self.linear(w, DOWN)?;
        wd.backward(
            be,
            &mut dact,
            dy,
            &wd.input(sv.get("act")?),
            n,
            lora,
            sv,
            Accumulate::Overwrite,
        )?;
        sv.release(&["act"]);
        // act = silu(g)·u
        let mut dg = be.uninit(n * i)?;
        let mut du = be.uninit(n * i)?;
        be.swiglu_backward(&mut dg, &mut du, &dact, sv.get("g")?, sv.get("u")?)?;
        drop(dact);
        sv.release(&["g", "u"]);
        // g = ln2·Wgᵀ, u = ln2·Wuᵀ
        let in2 = self.linear(w, GATE)?.input(sv.get("ln2")?);
        let mut dln2 = be.uninit(n * c)?;
        self.linear(w, GATE)?.backward(
            be,
            &mut dln2,
            &dg,
            &in2,
            n,
            lora,
            sv,
            Accumulate::Overwrite,
        )?;
        self.linear(w, UP)?
            .backward(be, &mut dln2, &du, &in2, n, lora, sv, Accumulate::Add)?;
        drop((dg, du, in2));
        // ln2 = rms_norm(h)  ⇒  dh = dy + rms_norm_backward(dln2)
        let mut dh = be.uninit(n * c)?;
        be.axpy(&mut dh, 1.0, dy, Accumulate::Overwrite)?;
        let h = sv.get("h")?;
        be.rms_norm_backward(
            &mut dh,
            &dln2,
            h,
            w.get("post_attention_layernorm.weight")?,
            sv.get("rstd2")?,
            Accumulate::Add,
        )?;
        drop(dln2);
        // h = x + att·Woᵀ  ⇒  datt = dh·Wo
        let mut datt = be.uninit(n * qd)?;
        let wo = self.linear(w, O)?;
        wo.backward(
            be,
            &mut datt,
            &dh,
            &wo.input(sv.get("att")?),
            n,
            lora,
            sv,
            Accumulate::Overwrite,
        )?;
        // att = attention(q, k, v)
        let (mut dq, mut dk, dv) =
            super::attention_backward_saved(be, sv, &datt, self.attn_dims(s), s)?;
        drop(datt);
        // q, k were rotated in place after their projections
        be.rope_backward(&mut dq, &s.positions, inv_freq, h_)?;
        be.rope_backward(&mut dk, &s.positions, inv_freq, kvh)?;
        let in1 = self.linear(w, Q)?.input(sv.get("ln1")?);
        let mut dln1 = be.uninit(n * c)?;
        self.linear(w, Q)?.backward(
            be,
            &mut dln1,
            &dq,
            &in1,
            n,
            lora,
            sv,
            Accumulate::Overwrite,
        )?;
        self.linear(w, K)?
            .backward(be, &mut dln1, &dk, &in1, n, lora, sv, Accumulate::Add)?;
        self.linear(w, V)?
            .backward(be, &mut dln1, &dv, &in1, n, lora, sv, Accumulate::Add)?;
        // ln1 = rms_norm(x)  ⇒  dx = dh + rms_norm_backward(dln1)
        be.rms_norm_backward(
            &mut dh,
            &dln1,
            x,
            w.get("input_layernorm.weight")?,
            sv.get("rstd1")?,
            Accumulate::Add,
        )?;
        Ok(dh)
    }

    pub(crate) fn final_norm_forward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        x: &B::Buf,
    ) -> Result<(B::Buf, Saved<B>)> {
        let c = self.cfg.hidden_size;
        let n = super::rows(x, c);
        let mut out = be.uninit(n * c)?;
        let mut rstd = be.uninit(n)?;
        be.rms_norm_forward(
            &mut out,
            &mut rstd,
            x,
            w.get("model.norm.weight")?,
            self.cfg.norm_eps,
        )?;
        let mut sv = Saved::default();
        sv.put("rstd", rstd);
        Ok((out, sv))
    }

    pub(crate) fn final_norm_backward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        x: &B::Buf,
        sv: &Saved<B>,
        dout: &B::Buf,
    ) -> Result<B::Buf> {
        let mut dx = be.uninit(super::rows(x, self.cfg.hidden_size) * self.cfg.hidden_size)?;
        be.rms_norm_backward(
            &mut dx,
            dout,
            x,
            w.get("model.norm.weight")?,
            sv.get("rstd")?,
            Accumulate::Overwrite,
        )?;
        Ok(dx)
    }
}
