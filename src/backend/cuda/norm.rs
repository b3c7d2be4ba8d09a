//! RMSNorm and LayerNorm, one block per row. Kernels in `norm.cu`.

use super::device::{Arg, Launch, Module};
use super::{CudaBackend, CudaBuf, rows_of};
use crate::backend::{Accumulate, DeviceBuf};
use crate::error::Result;

pub(super) const MODULE: Module = Module::new("norm", include_str!("norm.cu"));

/// One block per row: enough threads for the row, at most 1024.
fn per_row(rows: usize, c: usize) -> Launch {
    let block = (c.div_ceil(32) * 32).clamp(32, 1024) as u32;
    Launch {
        grid: (rows, 1, 1),
        block,
        shared_bytes: 0,
    }
}

fn acc_flag(acc: Accumulate) -> i32 {
    matches!(acc, Accumulate::Add) as i32
}

impl CudaBackend {
    pub(super) fn rms_norm_forward_impl(
        &self,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        w_offset: f32,
        eps: f32,
    ) -> Result<()> {
        let op = "rms_norm_forward";
        let c = w.len();
        let n = rows_of(op, "x", x.len(), c)?;
        let (po, odt) = Self::check_act(op, "out", out, n * c)?;
        let pr = Self::check_f32(op, "rstd", rstd, n)?;
        let px = Self::check_f32(op, "x", x, n * c)?;
        let (pw, wdt) = Self::check_any(op, "weight", w, c)?;
        self.dev.launch(
            op,
            MODULE,
            "rms_norm_fwd",
            per_row(n, c),
            &[
                Arg::Ptr(po),
                Arg::I32(odt),
                Arg::Ptr(pr),
                Arg::Ptr(px),
                Arg::Ptr(pw),
                Arg::I32(wdt),
                Arg::F32(w_offset),
                Arg::I64(c as i64),
                Arg::F32(eps),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rms_norm_backward_impl(
        &self,
        dx: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        w_offset: f32,
        rstd: &CudaBuf,
        acc: Accumulate,
    ) -> Result<()> {
        let op = "rms_norm_backward";
        let c = w.len();
        let n = rows_of(op, "x", x.len(), c)?;
        let pdx = Self::check_f32(op, "dx", dx, n * c)?;
        let pd = Self::check_f32(op, "dout", dout, n * c)?;
        let px = Self::check_f32(op, "x", x, n * c)?;
        let (pw, wdt) = Self::check_any(op, "weight", w, c)?;
        let pr = Self::check_f32(op, "rstd", rstd, n)?;
        self.dev.launch(
            op,
            MODULE,
            "rms_norm_bwd",
            per_row(n, c),
            &[
                Arg::Ptr(pdx),
                Arg::Ptr(pd),
                Arg::Ptr(px),
                Arg::Ptr(pw),
                Arg::I32(wdt),
                Arg::F32(w_offset),
                Arg::Ptr(pr),
                Arg::I64(c as i64),
                Arg::I32(acc_flag(acc)),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_norm_forward_impl(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        b: &CudaBuf,
        eps: f32,
    ) -> Result<()> {
        let op = "layer_norm_forward";
        let c = w.len();
        let n = rows_of(op, "x", x.len(), c)?;
        let po = Self::check_f32(op, "out", out, n * c)?;
        let pm = Self::check_f32(op, "mean", mean, n)?;
        let pr = Self::check_f32(op, "rstd", rstd, n)?;
        let px = Self::check_f32(op, "x", x, n * c)?;
        let (pw, wdt) = Self::check_any(op, "weight", w, c)?;
        let (pb, bdt) = Self::check_any(op, "bias", b, c)?;
        if bdt != wdt {
            return Err(super::device::err(
                op,
                "weight and bias are stored in different types",
            ));
        }
        self.dev.launch(
            op,
            MODULE,
            "layer_norm_fwd",
            per_row(n, c),
            &[
                Arg::Ptr(po),
                Arg::Ptr(pm),
                Arg::Ptr(pr),
                Arg::Ptr(px),
                Arg::Ptr(pw),
                Arg::Ptr(pb),
                Arg::I32(wdt),
                Arg::I64(c as i64),
                Arg::F32(eps),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_norm_backward_impl(
        &self,
        dx: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
        w: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        acc: Accumulate,
    ) -> Result<()> {
        let op = "layer_norm_backward";
        let c = w.len();
        let n = rows_of(op, "x", x.len(), c)?;
        let pdx = Self::check_f32(op, "dx", dx, n * c)?;
        let pd = Self::check_f32(op, "dout", dout, n * c)?;
        let px = Self::check_f32(op, "x", x, n * c)?;
        let (pw, wdt) = Self::check_any(op, "weight", w, c)?;
        let pm = Self::check_f32(op, "mean", mean, n)?;
        let pr = Self::check_f32(op, "rstd", rstd, n)?;
        self.dev.launch(
            op,
            MODULE,
            "layer_norm_bwd",
            per_row(n, c),
            &[
                Arg::Ptr(pdx),
                Arg::Ptr(pd),
                Arg::Ptr(px),
                Arg::Ptr(pw),
                Arg::I32(wdt),
                Arg::Ptr(pm),
                Arg::Ptr(pr),
                Arg::I64(c as i64),
                Arg::I32(acc_flag(acc)),
            ],
        )
    }
}
