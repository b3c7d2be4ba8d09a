//! AdamW and SGD updates (PyTorch semantics), of one tensor or of many in one launch (a
//! multi-tensor table, `multi.rs`). Kernels in `optim.cu`.

use super::device::{Arg, Launch, Module};
use super::multi::{TensorTable, elementwise_blocks};
use super::{CudaBackend, CudaBuf};
use crate::backend::{AdamWItem, AdamWStep, DType, DeviceBuf, SgdItem, SgdStep};
use crate::error::Result;

pub(super) const MODULE: Module = Module::new("optim", include_str!("optim.cu"));

/// The hyper-parameter arguments of `adamw` and `adamw_multi` (after the tensors'):
/// lr, β1, β2, eps, weight decay, and the bias corrections folded in on the host in f64,
/// step size = lr / (1 − β1ᵗ) and √(1 − β2ᵗ).
fn adamw_args(h: AdamWStep) -> [Arg; 7] {
    let t = h.step.max(1) as i32;
    let bc1 = 1.0 - (h.beta1 as f64).powi(t);
    let bc2 = 1.0 - (h.beta2 as f64).powi(t);
    let step_size = (h.lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    [
        Arg::F32(h.lr),
        Arg::F32(h.beta1),
        Arg::F32(h.beta2),
        Arg::F32(h.eps),
        Arg::F32(h.weight_decay),
        Arg::F32(step_size),
        Arg::F32(bc2_sqrt),
    ]
}

/// The hyper-parameter arguments of `sgd` and `sgd_multi` (after the tensors').
fn sgd_args(h: SgdStep) -> [Arg; 4] {
    [
        Arg::F32(h.lr),
        Arg::F32(h.momentum),
        Arg::F32(h.weight_decay),
        Arg::I32(h.first as i32),
    ]
}

/// The address of `what` of tensor `i` of a multi-tensor call after checking that it is
/// f32 of `n` elements; the message (naming the tensor) is made only for a failure, not
/// for each of a step's hundreds of tensors.
fn check_nth(op: &'static str, what: &str, i: usize, b: &CudaBuf, n: usize) -> Result<u64> {
    if b.dtype() == DType::F32 && b.len() == n {
        return Ok(b.ptr());
    }
    CudaBackend::check_f32(op, &format!("{what} of tensor {i}"), b, n)
}

impl CudaBackend {
    pub(super) fn adamw_impl(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        h: AdamWStep,
    ) -> Result<()> {
        let op = "adamw_step";
        let n = p.len();
        let pp = Self::check_f32(op, "param", p, n)?;
        let pg = Self::check_f32(op, "grad", g, n)?;
        let pm = Self::check_f32(op, "exp_avg", m, n)?;
        let pv = Self::check_f32(op, "exp_avg_sq", v, n)?;
        if n == 0 {
            return Ok(());
        }
        let mut args = vec![
            Arg::Ptr(pp),
            Arg::Ptr(pg),
            Arg::Ptr(pm),
            Arg::Ptr(pv),
            Arg::I64(n as i64),
        ];
        args.extend(adamw_args(h));
        self.dev
            .launch(op, MODULE, "adamw", Launch::cover(n, 256, 65535), &args)
    }

    /// Every item's update in one launch (`adamw_multi`), the same bits as `adamw_impl` of
    /// each.
    pub(super) fn adamw_all_impl(
        &self,
        items: &mut [AdamWItem<'_, Self>],
        h: AdamWStep,
    ) -> Result<()> {
        let op = "adamw_step_all";
        let mut table = TensorTable::<4>::new();
        for (i, it) in items.iter().enumerate() {
            let n = it.p.len();
            let ptrs = [
                check_nth(op, "param", i, it.p, n)?,
                check_nth(op, "grad", i, it.g, n)?,
                check_nth(op, "exp_avg", i, it.m, n)?,
                check_nth(op, "exp_avg_sq", i, it.v, n)?,
            ];
            table.push(ptrs, n, elementwise_blocks(n));
        }
        table.launch(self, op, MODULE, "adamw_multi", &adamw_args(h))
    }

    pub(super) fn sgd_impl(
        &self,
        p: &mut CudaBuf,
        g: &CudaBuf,
        buf: &mut CudaBuf,
        h: SgdStep,
    ) -> Result<()> {
        let op = "sgd_step";
        let n = p.len();
        let pp = Self::check_f32(op, "param", p, n)?;
        let pg = Self::check_f32(op, "grad", g, n)?;
        let pb = Self::check_f32(op, "momentum_buffer", buf, n)?;
        if n == 0 {
            return Ok(());
        }
        let mut args = vec![Arg::Ptr(pp), Arg::Ptr(pg), Arg::Ptr(pb), Arg::I64(n as i64)];
        args.extend(sgd_args(h));
        self.dev
            .launch(op, MODULE, "sgd", Launch::cover(n, 256, 65535), &args)
    }

    /// Every item's update in one launch (`sgd_multi`), the same bits as `sgd_impl` of
    /// each.
    pub(super) fn sgd_all_impl(&self, items: &mut [SgdItem<'_, Self>], h: SgdStep) -> Result<()> {
        let op = "sgd_step_all";
        let mut table = TensorTable::<3>::new();
        for (i, it) in items.iter().enumerate() {
            let n = it.p.len();
            let ptrs = [
                check_nth(op, "param", i, it.p, n)?,
                check_nth(op, "grad", i, it.g, n)?,
                check_nth(op, "momentum_buffer", i, it.buf, n)?,
            ];
            table.push(ptrs, n, elementwise_blocks(n));
        }
        table.launch(self, op, MODULE, "sgd_multi", &sgd_args(h))
    }
}
