//! A frozen linear layer with an optional LoRA branch — the one place where the
//! `x·Wᵀ + scale·(drop(x)·Aᵀ)·Bᵀ` forward and its backward are written.

use super::Saved;
use crate::backend::{Accumulate, Backend, Gemm};
use crate::error::Result;
use crate::lora::BlockLora;

/// How a frozen weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `nn.Linear`: `[out, in]`, y = x·Wᵀ.
    OutIn,
    /// GPT-2's `Conv1D`: `[in, out]`, y = x·W.
    InOut,
}

/// A frozen linear of a block: weight, optional bias, shapes.
pub struct Linear<'a, B: Backend> {
    /// Module path relative to the block (`self_attn.q_proj`), as LoRA modules name it.
    pub name: &'static str,
    pub w: &'a B::Buf,
    pub bias: Option<&'a B::Buf>,
    pub layout: Layout,
    pub in_features: usize,
    pub out_features: usize,
}

fn gemm(
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    acc: Accumulate,
) -> Gemm {
    Gemm {
        m,
        n,
        k,
        trans_a,
        trans_b,
        alpha,
        accumulate: acc,
    }
}

impl<B: Backend> Linear<'_, B> {
    /// y `[N, out]` = x `[N, in]`·Wᵀ + bias + LoRA. When `saved` is given, keeps the LoRA
    /// intermediate `t = drop(x)·Aᵀ` `[N, R]` for the backward.
    pub fn forward(
        &self,
        be: &B,
        x: &B::Buf,
        n: usize,
        lora: &BlockLora<B>,
        saved: Option<&mut Saved<B>>,
    ) -> Result<B::Buf> {
        let (fi, fo) = (self.in_features, self.out_features);
        let mut y = be.zeros(n * fo)?;
        // y[N, out] = x[N, in] · op(W), W [out, in] (transposed) or [in, out]
        be.matmul(
            &mut y,
            x,
            self.w,
            gemm(
                n,
                fo,
                fi,
                false,
                self.layout == Layout::OutIn,
                1.0,
                Accumulate::Overwrite,
            ),
        )?;
        if let Some(b) = self.bias {
            be.add_bias(&mut y, b)?;
        }
        if let Some((idx, m)) = lora.find(self.name) {
            let r = lora.r;
            let dropped;
            let xd = if lora.dropout > 0.0 {
                let mut d = be.zeros(n * fi)?;
                be.dropout_forward(&mut d, x, lora.dropout, lora.module_seed(idx))?;
                dropped = d;
                &dropped
            } else {
                x
            };
            // t[N, R] = xd[N, in] · Aᵀ, A [R, in]
            let mut t = be.zeros(n * r)?;
            be.matmul(
                &mut t,
                xd,
                &m.a,
                gemm(n, r, fi, false, true, 1.0, Accumulate::Overwrite),
            )?;
            // y[N, out] += scale · t · Bᵀ, B [out, R]
            be.matmul(
                &mut y,
                &t,
                &m.b,
                gemm(n, fo, r, false, true, lora.scale, Accumulate::Add),
            )?;
            if let Some(s) = saved {
                s.put(format!("{}.lora_t", self.name), t);
            }
        }
        Ok(y)
    }

    /// Backward of [`Linear::forward`]: `dx (=|+=) dy·W` plus the LoRA branch's input
    /// gradient; adds dA and dB into the adapter's gradients. The weight and bias are
    /// frozen and get none.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        be: &B,
        dx: &mut B::Buf,
        dy: &B::Buf,
        x: &B::Buf,
        n: usize,
        lora: &mut BlockLora<B>,
        saved: &Saved<B>,
        acc: Accumulate,
    ) -> Result<()> {
        let (fi, fo) = (self.in_features, self.out_features);
        // forward: y = x · op(W)  ⇒  dx = dy · op(W)ᵀ; W [out, in] is used as stored.
        be.matmul(
            dx,
            dy,
            self.w,
            gemm(n, fi, fo, false, self.layout == Layout::InOut, 1.0, acc),
        )?;
        let (r, scale, p) = (lora.r, lora.scale, lora.dropout);
        let seed = lora.find(self.name).map(|(idx, _)| lora.module_seed(idx));
        let Some((_, m)) = lora.find_mut(self.name) else {
            return Ok(());
        };
        let t = saved.get(&format!("{}.lora_t", self.name))?;
        // forward: y += scale · t · Bᵀ  ⇒  dB[out, R] += scale · dyᵀ · t
        be.matmul(
            &mut m.db,
            dy,
            t,
            gemm(fo, r, n, true, false, scale, Accumulate::Add),
        )?;
        //                              dt[N, R] = scale · dy · B
        let mut dt = be.zeros(n * r)?;
        be.matmul(
            &mut dt,
            dy,
            &m.b,
            gemm(n, r, fo, false, false, scale, Accumulate::Overwrite),
        )?;
        // forward: t = xd · Aᵀ  ⇒  dA[R, in] += dtᵀ · xd,  dxd[N, in] = dt · A
        if p > 0.0 {
            let seed = seed.unwrap_or_default();
            let mut xd = be.zeros(n * fi)?;
            be.dropout_forward(&mut xd, x, p, seed)?;
            be.matmul(
                &mut m.da,
                &dt,
                &xd,
                gemm(r, fi, n, true, false, 1.0, Accumulate::Add),
            )?;
            let mut dxd = be.zeros(n * fi)?;
            be.matmul(
                &mut dxd,
                &dt,
                &m.a,
                gemm(n, fi, r, false, false, 1.0, Accumulate::Overwrite),
            )?;
            // forward: xd = dropout(x)  ⇒  dx += dropout_backward(dxd)
            be.dropout_backward(&mut xd, &dxd, p, seed)?;
            be.axpy(dx, 1.0, &xd, Accumulate::Add)?;
        } else {
            be.matmul(
                &mut m.da,
                &dt,
                x,
                gemm(r, fi, n, true, false, 1.0, Accumulate::Add),
            )?;
            be.matmul(
                dx,
                &dt,
                &m.a,
                gemm(n, fi, r, false, false, 1.0, Accumulate::Add),
            )?;
        }
        Ok(())
    }
}
