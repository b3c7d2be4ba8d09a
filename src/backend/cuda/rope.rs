//! Rotary position embedding in place (HF rotate-half layout). Kernel in `rope.cu`.

use super::device::{Arg, Launch, Module, err};
use super::{CudaBackend, CudaBuf, rows_of};
use crate::backend::DeviceBuf;
use crate::error::Result;

pub(super) const MODULE: Module = Module {
    name: "rope",
    src: include_str!("rope.cu"),
};

impl CudaBackend {
    /// Rotate x `[N, heads, D]` by `sign ·` the angles `positions[i] · inv_freq[j]`.
    pub(super) fn rope_impl(
        &self,
        op: &'static str,
        x: &mut CudaBuf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
        sign: f32,
    ) -> Result<()> {
        let d = inv_freq.len() * 2;
        let n = positions.len();
        if heads == 0 || d == 0 {
            return Err(err(
                op,
                format!("heads = {heads} and head dimension {d} must be positive"),
            ));
        }
        let rows = rows_of(op, "x", x.len(), heads * d)?;
        if rows != n {
            return Err(err(
                op,
                format!("x has {rows} tokens of {heads} heads × {d}, but {n} positions were given"),
            ));
        }
        let px = Self::check_f32(op, "x", x, n * heads * d)?;
        if n == 0 {
            return Ok(());
        }
        let pos = self.upload_u32(op, positions)?;
        let freq: Vec<u8> = inv_freq.iter().flat_map(|f| f.to_ne_bytes()).collect();
        let freq = self.upload_bytes(op, &freq)?;
        self.dev.launch(
            op,
            MODULE,
            "rope",
            Launch::cover(n * heads * d / 2, 256, 65535),
            &[
                Arg::Ptr(px),
                Arg::Ptr(super::Device::ptr(&pos)),
                Arg::Ptr(super::Device::ptr(&freq)),
                Arg::I64(n as i64),
                Arg::I64(heads as i64),
                Arg::I64(d as i64),
                Arg::F32(sign),
            ],
        )
    }
}
