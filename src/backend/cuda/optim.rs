//! AdamW and SGD updates (PyTorch semantics). Kernels in `optim.cu`.

use super::device::{Arg, Launch, Module};
use super::{CudaBackend, CudaBuf};
use crate::backend::{AdamWStep, DeviceBuf, SgdStep};
use crate::error::Result;

pub(super) const MODULE: Module = Module {
    name: "optim",
    src: include_str!("optim.cu"),
};

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
        let t = h.step.max(1) as i32;
        let bc1 = 1.0 - (h.beta1 as f64).powi(t);
        let bc2 = 1.0 - (h.beta2 as f64).powi(t);
        let step_size = (h.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        self.dev.launch(
            op,
            MODULE,
            "adamw",
            Launch::cover(n, 256, 65535),
            &[
                Arg::Ptr(pp),
                Arg::Ptr(pg),
                Arg::Ptr(pm),
                Arg::Ptr(pv),
                Arg::I64(n as i64),
                Arg::F32(h.lr),
                Arg::F32(h.beta1),
                Arg::F32(h.beta2),
                Arg::F32(h.eps),
                Arg::F32(h.weight_decay),
                Arg::F32(step_size),
                Arg::F32(bc2_sqrt),
            ],
        )
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
        self.dev.launch(
            op,
            MODULE,
            "sgd",
            Launch::cover(n, 256, 65535),
            &[
                Arg::Ptr(pp),
                Arg::Ptr(pg),
                Arg::Ptr(pb),
                Arg::I64(n as i64),
                Arg::F32(h.lr),
                Arg::F32(h.momentum),
                Arg::F32(h.weight_decay),
                Arg::I32(h.first as i32),
            ],
        )
    }
}
