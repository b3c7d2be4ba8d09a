//! Expansion of quantized frozen weights (NF4, FP8 E4M3 with block scales) into plain
//! weights on the GPU (`quant.cu`).

use super::device::{Arg, Launch, Module, err};
use super::{CudaBackend, CudaBuf};
use crate::backend::{DType, DeviceBuf, Fp8Parts, Nf4Parts};
use crate::error::Result;

pub(super) const MODULE: Module = Module::new("quant", include_str!("quant.cu"));

impl CudaBackend {
    pub(super) fn dequantize_nf4_impl(
        &self,
        q: &Nf4Parts<'_, Self>,
        dtype: DType,
    ) -> Result<CudaBuf> {
        let op = "dequantize_nf4";
        if let Some(m) = crate::backend::nf4_problem(
            q.numel,
            q.blocksize,
            (q.packed.len(), q.absmax.len(), q.code.len()),
            q.nested
                .as_ref()
                .map(|n| (n.absmax.len(), n.code.len(), n.blocksize)),
        ) {
            return Err(err(op, m));
        }
        let want = |what: &str, b: &CudaBuf, dt: DType| {
            if b.dtype == dt {
                Ok(b.ptr())
            } else {
                Err(err(op, format!("{what} must be {dt}, it is {}", b.dtype)))
            }
        };
        let packed = want("packed codes", q.packed, DType::U8)?;
        let code = want("code table", q.code, DType::F32)?;
        let (absmax, nested) = match &q.nested {
            None => (want("absmax", q.absmax, DType::F32)?, None),
            Some(n) => (
                want("absmax codes", q.absmax, DType::U8)?,
                Some((
                    want("nested absmax", n.absmax, DType::F32)?,
                    want("nested code table", n.code, DType::F32)?,
                    n.blocksize,
                    n.offset,
                )),
            ),
        };
        if dtype == DType::U8 {
            return Err(err(op, "cannot expand into u8"));
        }
        // the kernel expands 16 elements of one block per thread, indexing blocks by shifts
        let shift = |what: &str, bs: usize| -> Result<i32> {
            if bs.is_power_of_two() && bs >= 16 {
                Ok(bs.trailing_zeros() as i32)
            } else {
                Err(err(
                    op,
                    format!(
                        "{what} block size {bs} is not a power of two of at least 16 (bitsandbytes writes 32 to 4096)"
                    ),
                ))
            }
        };
        let bs_shift = shift("NF4", q.blocksize)?;
        let nbs_shift = match &q.nested {
            Some(n) if n.blocksize.is_power_of_two() => n.blocksize.trailing_zeros() as i32,
            Some(n) => {
                return Err(err(
                    op,
                    format!("nested block size {} is not a power of two", n.blocksize),
                ));
            }
            None => 0,
        };
        let out = self.new_buf(op, q.numel, dtype)?;
        if q.numel == 0 {
            return Ok(out);
        }
        let (nabsmax, ncode, _, offset) = nested.unwrap_or((0, 0, 1, 0.0));
        self.dev.launch(
            op,
            MODULE,
            "nf4_dequant",
            Launch::cover(q.numel.div_ceil(16), 256, 65535),
            &[
                Arg::Ptr(out.ptr()),
                Arg::I32(super::device::dtype_code(dtype)),
                Arg::Ptr(packed),
                Arg::Ptr(absmax),
                Arg::Ptr(code),
                Arg::I32(nested.is_some() as i32),
                Arg::Ptr(nabsmax),
                Arg::Ptr(ncode),
                Arg::F32(offset),
                Arg::I64(q.numel as i64),
                Arg::I32(bs_shift),
                Arg::I32(nbs_shift),
            ],
        )?;
        Ok(out)
    }

    pub(super) fn dequantize_fp8_impl(
        &self,
        q: &Fp8Parts<'_, Self>,
        dtype: DType,
    ) -> Result<CudaBuf> {
        let op = "dequantize_fp8";
        if let Some(m) =
            crate::backend::fp8_problem(q.rows, q.cols, q.codes.len(), q.scale_inv.len())
        {
            return Err(err(op, m));
        }
        if q.codes.dtype != DType::F8E4M3 || q.scale_inv.dtype != DType::F32 {
            return Err(err(
                op,
                format!(
                    "codes must be f8e4m3 and scales f32, they are {} and {}",
                    q.codes.dtype, q.scale_inv.dtype
                ),
            ));
        }
        if dtype.size() == 1 {
            return Err(err(op, format!("cannot expand into {dtype}")));
        }
        let n = q.rows * q.cols;
        let out = self.new_buf(op, n, dtype)?;
        if n == 0 {
            return Ok(out);
        }
        self.dev.launch(
            op,
            MODULE,
            "fp8_dequant",
            Launch::cover(n.div_ceil(16), 256, 65535),
            &[
                Arg::Ptr(out.ptr()),
                Arg::I32(super::device::dtype_code(dtype)),
                Arg::Ptr(q.codes.ptr()),
                Arg::Ptr(q.scale_inv.ptr()),
                Arg::I64(q.rows as i64),
                Arg::I64(q.cols as i64),
            ],
        )?;
        Ok(out)
    }
}
