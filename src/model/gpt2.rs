//! GPT-2: pre-norm blocks of LayerNorm → attention (fused `c_attn`, learned positions) →
//! residual, LayerNorm → GELU MLP → residual. Linears are `Conv1D` (`[in, out]`).
//!
//! Shapes: N = B·T tokens, C hidden, H heads, D head dim, I MLP width, V vocabulary.

use super::kv_cache::KvCache;
use super::linear::{Layout, Linear, keep_for_backward};
use super::{Keep, LayerWeights, LinearSpec, Saved, StepShape, TensorSpec, gather_rows, keep_in};
use crate::backend::{Accumulate, AttnDims, Backend, DeviceBuf};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::gbi::Gbi;
use crate::lora::BlockLora;

/// What lema asks of GPT-2 outside the model ([`super::family`]).
pub static FAMILY: super::family::Family = super::family::Family {
    conv1d_weights: true,
    learned_positions: true,
    mlp_matrices: 2,
    default_lora_targets: &["c_attn"],
    describe_sizes: |c| {
        format!(
            "vocab_size = {}, n_embd = {}, n_inner = {}, n_layer = {}, n_head = {}, \
             n_positions = {}",
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.max_position_embeddings
        )
    },
};

/// A GPT-2 model.
#[derive(Clone, Debug)]
pub struct Gpt2 {
    pub cfg: ModelConfig,
}

const ATTN: &str = "attn.c_attn";
const APROJ: &str = "attn.c_proj";
const FC: &str = "mlp.c_fc";
const MPROJ: &str = "mlp.c_proj";

impl Gpt2 {
    pub(crate) fn block_prefix(&self, i: usize) -> String {
        format!("transformer.h.{i}.")
    }

    pub(crate) fn head_names(&self) -> &'static [&'static str] {
        &[
            "transformer.ln_f.weight",
            "transformer.ln_f.bias",
            "lm_head.weight",
        ]
    }

    pub(crate) fn linears(&self) -> Vec<LinearSpec> {
        let (c, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let l = |name, in_features, out_features| LinearSpec {
            name,
            in_features,
            out_features,
        };
        vec![
            l(ATTN, c, 3 * c),
            l(APROJ, c, c),
            l(FC, c, i),
            l(MPROJ, i, c),
        ]
    }

    pub(crate) fn tensor_specs(&self) -> Vec<TensorSpec> {
        let (c, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let t = |name: String, shape: Vec<usize>| TensorSpec { name, shape };
        let mut out = vec![
            t("transformer.wte.weight".into(), vec![v, c]),
            t(
                "transformer.wpe.weight".into(),
                vec![self.cfg.max_position_embeddings, c],
            ),
        ];
        for layer in 0..self.cfg.num_hidden_layers {
            let p = self.block_prefix(layer);
            for ln in ["ln_1", "ln_2"] {
                out.push(t(format!("{p}{ln}.weight"), vec![c]));
                out.push(t(format!("{p}{ln}.bias"), vec![c]));
            }
            for lin in self.linears() {
                out.push(t(
                    format!("{p}{}.weight", lin.name),
                    vec![lin.in_features, lin.out_features],
                ));
                out.push(t(format!("{p}{}.bias", lin.name), vec![lin.out_features]));
            }
        }
        out.push(t("transformer.ln_f.weight".into(), vec![c]));
        out.push(t("transformer.ln_f.bias".into(), vec![c]));
        out.push(t("lm_head.weight".into(), vec![v, c]));
        out
    }

    pub(crate) fn embed(&self, gbi: &Gbi, ids: &[u32], positions: &[u32]) -> Result<Vec<f32>> {
        let c = self.cfg.hidden_size;
        let mut h = gather_rows(gbi, "transformer.wte.weight", ids, c)?;
        let p = gather_rows(gbi, "transformer.wpe.weight", positions, c)?;
        for (a, b) in h.iter_mut().zip(&p) {
            *a += b;
        }
        Ok(h)
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
            bias: Some(w.get(&format!("{name}.bias"))?),
            layout: Layout::InOut,
            in_features: spec.0,
            out_features: spec.1,
        })
    }

    fn attn_dims(&self, s: &StepShape) -> AttnDims {
        let h = self.cfg.num_attention_heads;
        AttnDims {
            batch: s.batch,
            seq: s.seq,
            n_heads: h,
            n_kv_heads: h,
            head_dim: self.cfg.head_dim,
            scale: 1.0 / (self.cfg.head_dim as f32).sqrt(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_norm<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        ln: &str,
        x: &B::Buf,
        n: usize,
        sv: &mut Saved<B>,
        keep: Keep,
    ) -> Result<B::Buf> {
        let c = self.cfg.hidden_size;
        // the kernel writes every row of out, mean and rstd
        let mut out = be.uninit(n * c)?;
        let mut mean = be.uninit(n)?;
        let mut rstd = be.uninit(n)?;
        be.layer_norm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            x,
            w.get(&format!("{ln}.weight"))?,
            w.get(&format!("{ln}.bias"))?,
            self.cfg.norm_eps,
        )?;
        if keep.saved() {
            sv.put(format!("{ln}.mean"), mean);
            sv.put(format!("{ln}.rstd"), rstd);
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        ln: &str,
        dx: &mut B::Buf,
        dout: &B::Buf,
        x: &B::Buf,
        sv: &Saved<B>,
        acc: Accumulate,
    ) -> Result<()> {
        be.layer_norm_backward(
            dx,
            dout,
            x,
            w.get(&format!("{ln}.weight"))?,
            sv.get(&format!("{ln}.mean"))?,
            sv.get(&format!("{ln}.rstd"))?,
            acc,
        )
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
        let (c, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let n = s.tokens();
        let mut sv = Saved::default();
        // ln1[N, C] = layer_norm(x)
        let ln1 = self.layer_norm(be, w, "ln_1", x, n, &mut sv, keep)?;
        // qkv[N, 3C] = ln1 · W_attn + b; q, k, v = its three column blocks
        let wa = self.linear(w, ATTN)?;
        let in1 = wa.input(&ln1);
        let qkv = wa.forward(be, &in1, n, lora, keep_in(keep, &mut sv))?;
        let mut parts = Vec::with_capacity(3);
        for j in 0..3 {
            // all c columns of every row copied
            let mut p = be.uninit(n * c)?;
            be.copy_cols(&mut p, c, 0, &qkv, 3 * c, j * c, c, Accumulate::Overwrite)?;
            parts.push(p);
        }
        drop(qkv);
        let (q, k, v) = (&parts[0], &parts[1], &parts[2]);
        // att[N, C] = causal_attention(q, k, v), or over the cache that k, v join
        let (att, lse) = match cache {
            Some((cache, layer)) => (cache.attend(be, layer, q, k, v, s.seq)?, None),
            None => {
                // every query attends at least to itself: out and lse of every row written
                let mut att = be.uninit(n * c)?;
                let mut lse = be.uninit(s.batch * self.cfg.num_attention_heads * s.seq)?;
                be.attention_forward(
                    &mut att,
                    &mut lse,
                    q,
                    k,
                    v,
                    self.attn_dims(s),
                    s.key_start(),
                )?;
                (att, Some(lse))
            }
        };
        // h = x + att · W_proj + b
        let mut h = self.linear(w, APROJ)?.forward(
            be,
            &self.linear(w, APROJ)?.input(&att),
            n,
            lora,
            keep_in(keep, &mut sv),
        )?;
        be.axpy(&mut h, 1.0, x, Accumulate::Add)?;
        // f[N, I] = layer_norm(h) · W_fc + b; a = gelu(f)
        let ln2 = self.layer_norm(be, w, "ln_2", &h, n, &mut sv, keep)?;
        let wf = self.linear(w, FC)?;
        let in2 = wf.input(&ln2);
        let f = wf.forward(be, &in2, n, lora, keep_in(keep, &mut sv))?;
        let mut a = be.uninit(n * i)?;
        be.gelu_forward(&mut a, &f)?;
        // y = h + a · W_mproj + b
        let wm = self.linear(w, MPROJ)?;
        let ia = wm.input(&a);
        let y = wm.forward_residual(be, &ia, &h, n, lora, keep, &mut sv)?;
        if keep.saved() {
            // ln1, ln2 and a are read by the backward only as linear inputs
            let p = lora.dropout;
            let ln1 = keep_for_backward(in1.into_gemm_copy(), ln1, p);
            let ln2 = keep_for_backward(in2.into_gemm_copy(), ln2, p);
            let a = keep_for_backward(ia.into_gemm_copy(), a, p);
            let lse = lse.ok_or_else(|| {
                crate::error::Error::config("internal: a cached forward keeps nothing")
            })?;
            let [q, k, v]: [B::Buf; 3] = parts
                .try_into()
                .map_err(|_| crate::error::Error::config("internal: qkv split"))?;
            for (name, buf) in [
                ("ln1", ln1),
                ("q", q),
                ("k", k),
                ("v", v),
                ("att", att),
                ("lse", lse),
                ("h", h),
                ("ln2", ln2),
                ("f", f),
                ("a", a),
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
        let (c, i) = (self.cfg.hidden_size, self.cfg.intermediate_size);
        let n = s.tokens();
        // y = h + a·W_mproj  ⇒  da = dy·W_mprojᵀ
        // (outputs of an `Overwrite` backward or of an elementwise kernel start uninit)
        let mut da = be.uninit(n * i)?;
        self.linear(w, MPROJ)?.backward(
            be,
            &mut da,
            dy,
            &self.linear(w, MPROJ)?.input(sv.get("a")?),
            n,
            lora,
            sv,
            Accumulate::Overwrite,
        )?;
        sv.release(&["a"]);
        // a = gelu(f)
        let mut df = be.uninit(n * i)?;
        be.gelu_backward(&mut df, &da, sv.get("f")?)?;
        drop(da);
        sv.release(&["f"]);
        // f = ln2·W_fc
        let mut dln2 = be.uninit(n * c)?;
        self.linear(w, FC)?.backward(
            be,
            &mut dln2,
            &df,
            &self.linear(w, FC)?.input(sv.get("ln2")?),
            n,
            lora,
            sv,
            Accumulate::Overwrite,
        )?;
        drop(df);
        // ln2 = layer_norm(h)  ⇒  dh = dy + layer_norm_backward(dln2)
        let mut dh = be.uninit(n * c)?;
        be.axpy(&mut dh, 1.0, dy, Accumulate::Overwrite)?;
        self.layer_norm_backward(
            be,
            w,
            "ln_2",
            &mut dh,
            &dln2,
            sv.get("h")?,
            sv,
            Accumulate::Add,
        )?;
        drop(dln2);
        // h = x + att·W_proj  ⇒  datt = dh·W_projᵀ
        let mut datt = be.uninit(n * c)?;
        self.linear(w, APROJ)?.backward(
            be,
            &mut datt,
            &dh,
            &self.linear(w, APROJ)?.input(sv.get("att")?),
            n,
            lora,
            sv,
            Accumulate::Overwrite,
        )?;
        // att = attention(q, k, v)
        let (dq, dk, dv) = super::attention_backward_saved(be, sv, &datt, self.attn_dims(s), s)?;
        drop(datt);
        // q, k, v = column blocks of qkv
        // the three copies cover all 3c columns
        let mut dqkv = be.uninit(n * 3 * c)?;
        for (j, d) in [&dq, &dk, &dv].into_iter().enumerate() {
            be.copy_cols(&mut dqkv, 3 * c, j * c, d, c, 0, c, Accumulate::Overwrite)?;
        }
        drop((dq, dk, dv));
        // qkv = ln1·W_attn
        let mut dln1 = be.uninit(n * c)?;
        self.linear(w, ATTN)?.backward(
            be,
            &mut dln1,
            &dqkv,
            &self.linear(w, ATTN)?.input(sv.get("ln1")?),
            n,
            lora,
            sv,
            Accumulate::Overwrite,
        )?;
        // ln1 = layer_norm(x)  ⇒  dx = dh + layer_norm_backward(dln1)
        self.layer_norm_backward(be, w, "ln_1", &mut dh, &dln1, x, sv, Accumulate::Add)?;
        Ok(dh)
    }

    pub(crate) fn final_norm_forward<B: Backend>(
        &self,
        be: &B,
        w: &LayerWeights<B>,
        x: &B::Buf,
    ) -> Result<(B::Buf, Saved<B>)> {
        let n = super::rows(x, self.cfg.hidden_size);
        let mut sv = Saved::default();
        let out = self.layer_norm(
            be,
            w,
            "transformer.ln_f",
            x,
            n,
            &mut sv,
            Keep::OutputAndSaved,
        )?;
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
        let mut dx = be.uninit(x.len())?;
        self.layer_norm_backward(
            be,
            w,
            "transformer.ln_f",
            &mut dx,
            dout,
            x,
            sv,
            Accumulate::Overwrite,
        )?;
        Ok(dx)
    }
}
