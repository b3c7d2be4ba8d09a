//! Rotary position embedding (HF rotate-half layout), in place or into an attention
//! operand of the tensor-core kernels (bf16). Kernel in `rope.cu`.

use super::device::{Arg, Launch, Module, err};
use super::{CudaBackend, CudaBuf, rows_of};
use crate::backend::{DType, DeviceBuf, RopeAngles};
use crate::error::Result;

pub(super) const MODULE: Module = Module::new("rope", include_str!("rope.cu"));

impl CudaBackend {
    /// Rotate x `[N, heads, D]` in place by `sign ·` the angles `positions[i] · inv_freq[j]`.
    pub(super) fn rope_impl(
        &self,
        op: &'static str,
        x: &mut CudaBuf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
        sign: f32,
    ) -> Result<()> {
        let px = self.rope_check(op, x, positions, inv_freq, heads)?;
        self.rope_launch(op, (px, DType::F32), px, positions, inv_freq, heads, sign)
    }

    /// [`crate::backend::Backend::attention_operand`]: on the tensor-core path a new bf16
    /// buffer holding `x` rotated (f32 arithmetic, rounded once as it is stored) or, with
    /// no rotation, `x` rounded; otherwise `x` rotated in place.
    pub(super) fn attention_operand_impl(
        &self,
        mut x: CudaBuf,
        rope: Option<RopeAngles<'_>>,
        heads: usize,
        head_dim: usize,
    ) -> Result<CudaBuf> {
        let op = "attention_operand";
        if !self.attention_on_tensor_cores(head_dim) {
            if let Some(r) = rope {
                self.rope_impl(op, &mut x, r.positions, r.inv_freq, heads, 1.0)?;
            }
            return Ok(x);
        }
        let n = x.len();
        let out = self.new_buf(op, n, DType::BF16)?;
        match rope {
            Some(r) => {
                let px = self.rope_check(op, &x, r.positions, r.inv_freq, heads)?;
                let dst = (out.ptr(), DType::BF16);
                self.rope_launch(op, dst, px, r.positions, r.inv_freq, heads, 1.0)?;
            }
            None => {
                let px = Self::check_f32(op, "x", &x, n)?;
                rows_of(op, "x", n, head_dim)?;
                // every element written: head_dim (64 or 128) is a multiple of 4
                self.attn_cast_bf16(op, out.ptr(), px, n)?;
            }
        }
        // x is freed in stream order, after the kernel that reads it
        drop(x);
        Ok(out)
    }

    /// x's address after checking that it is f32 `[positions.len(), heads, 2 · inv_freq.len()]`.
    fn rope_check(
        &self,
        op: &'static str,
        x: &CudaBuf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
    ) -> Result<u64> {
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
        Self::check_f32(op, "x", x, n * heads * d)
    }

    /// The rotation of the checked f32 `px` into `dst` (its address and type: `px` itself
    /// as f32 for in place, or a bf16 buffer of as many elements).
    #[allow(clippy::too_many_arguments)]
    fn rope_launch(
        &self,
        op: &'static str,
        (pout, dtype): (u64, DType),
        px: u64,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
        sign: f32,
    ) -> Result<()> {
        let (n, d) = (positions.len(), inv_freq.len() * 2);
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
                Arg::Ptr(pout),
                Arg::I32(super::device::dtype_code(dtype)),
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
