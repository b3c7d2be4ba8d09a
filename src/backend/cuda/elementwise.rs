//! Elementwise and gather ops: axpy, bias, column copies, embedding, SwiGLU, GELU,
//! dropout and the f64 sum of squares. Kernels in `elementwise.cu`.

use super::device::{Arg, Launch, Module, err};
use super::multi::{self, TensorTable};
use super::{CudaBackend, CudaBuf, rows_of};
use crate::backend::{Accumulate, Activation, DType, DeviceBuf};
use crate::error::Result;

pub(super) const MODULE: Module = Module::new("elementwise", include_str!("elementwise.cu"));

/// Threads per block of the grid-stride kernels, and the most blocks they use.
const BLOCK: u32 = 256;
const MAX_BLOCKS: usize = 65535;

fn acc_flag(acc: Accumulate) -> i32 {
    matches!(acc, Accumulate::Add) as i32
}

impl CudaBackend {
    fn run(&self, op: &'static str, kernel: &'static str, n: usize, args: &[Arg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.dev.launch(
            op,
            MODULE,
            kernel,
            Launch::cover(n, BLOCK, MAX_BLOCKS),
            args,
        )
    }

    pub(super) fn axpy_impl(
        &self,
        y: &mut CudaBuf,
        alpha: f32,
        x: &CudaBuf,
        acc: Accumulate,
    ) -> Result<()> {
        let op = "axpy";
        let n = y.len();
        let py = Self::check_f32(op, "y", y, n)?;
        let px = Self::check_f32(op, "x", x, n)?;
        self.run(
            op,
            "axpy",
            n,
            &[
                Arg::Ptr(py),
                Arg::Ptr(px),
                Arg::F32(alpha),
                Arg::I64(n as i64),
                Arg::I32(acc_flag(acc)),
            ],
        )
    }

    pub(super) fn add_bias_impl(&self, x: &mut CudaBuf, b: &CudaBuf) -> Result<()> {
        let op = "add_bias";
        let cols = b.len();
        let rows = rows_of(op, "x", x.len(), cols)?;
        let px = Self::check_f32(op, "x", x, rows * cols)?;
        let (pb, bdt) = Self::check_any(op, "bias", b, cols)?;
        self.run(
            op,
            "add_bias",
            rows * cols,
            &[
                Arg::Ptr(px),
                Arg::Ptr(pb),
                Arg::I32(bdt),
                Arg::I64(rows as i64),
                Arg::I64(cols as i64),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn copy_cols_impl(
        &self,
        dst: &mut CudaBuf,
        dst_cols: usize,
        dst_off: usize,
        src: &CudaBuf,
        src_cols: usize,
        src_off: usize,
        width: usize,
        acc: Accumulate,
    ) -> Result<()> {
        let op = "copy_cols";
        let rows = rows_of(op, "dst", dst.len(), dst_cols)?;
        if rows_of(op, "src", src.len(), src_cols)? != rows {
            return Err(err(
                op,
                format!(
                    "dst has {rows} rows of {dst_cols}, src {} elements in rows of {src_cols}",
                    src.len()
                ),
            ));
        }
        if dst_off + width > dst_cols || src_off + width > src_cols {
            return Err(err(
                op,
                format!(
                    "columns {dst_off}..{} of {dst_cols} (dst) or {src_off}..{} of {src_cols} (src) out of range",
                    dst_off + width,
                    src_off + width
                ),
            ));
        }
        let pd = Self::check_f32(op, "dst", dst, rows * dst_cols)?;
        let ps = Self::check_f32(op, "src", src, rows * src_cols)?;
        self.run(
            op,
            "copy_cols",
            rows * width,
            &[
                Arg::Ptr(pd),
                Arg::I64(dst_cols as i64),
                Arg::I64(dst_off as i64),
                Arg::Ptr(ps),
                Arg::I64(src_cols as i64),
                Arg::I64(src_off as i64),
                Arg::I64(rows as i64),
                Arg::I64(width as i64),
                Arg::I32(acc_flag(acc)),
            ],
        )
    }

    /// [`crate::backend::Backend::copy_range`]: a stream-ordered device copy of the bytes
    /// of `len` elements between two buffers of one element type.
    pub(super) fn copy_range_impl(
        &self,
        dst: &mut CudaBuf,
        dst_off: usize,
        src: &CudaBuf,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        let op = "copy_range";
        if dst.dtype() != src.dtype() {
            return Err(err(
                op,
                format!("dst is {} but src is {}", dst.dtype(), src.dtype()),
            ));
        }
        if dst_off + len > dst.len() || src_off + len > src.len() {
            return Err(err(
                op,
                format!(
                    "elements {dst_off}..{} of {} (dst) or {src_off}..{} of {} (src) out of range",
                    dst_off + len,
                    dst.len(),
                    src_off + len,
                    src.len()
                ),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        self.dev.bind(op)?;
        let size = dst.dtype().size();
        let (pd, ps) = (
            dst.ptr() + (dst_off * size) as u64,
            src.ptr() + (src_off * size) as u64,
        );
        self.dev.timed("copy_range", || {
            // SAFETY: both ranges were checked to lie inside their buffers, which stay
            // alive until the copy, ordered on the compute stream, is done.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    pd,
                    ps,
                    len * size,
                    self.dev.stream.cu_stream(),
                )
            }
            .map_err(|e| super::device::driver_err(op, e))
        })
    }

    pub(super) fn sum_squares_impl(&self, x: &CudaBuf) -> Result<f64> {
        self.sum_squares_all_impl(&[x])
    }

    /// One kernel over every buffer (a multi-tensor table): each buffer gets ⌈n/256⌉ blocks
    /// of 256 threads, at most 512, as when it had a launch of its own; each block writes
    /// one f64 partial sum to a device array that is read back once (one synchronisation
    /// for all the gradients of a step); summed per buffer, in order.
    pub(super) fn sum_squares_all_impl(&self, xs: &[&CudaBuf]) -> Result<f64> {
        let op = "sum_squares";
        let mut table = TensorTable::<1>::new();
        let mut blocks = Vec::with_capacity(xs.len());
        for (i, x) in xs.iter().enumerate() {
            let n = x.len();
            let px = Self::check_f32(op, &format!("x {i}"), x, n)?;
            let b = if n == 0 {
                0
            } else {
                Launch::cover(n, multi::BLOCK, 512).grid.0
            };
            table.push([px], n, b);
            blocks.push(b);
        }
        if table.blocks() == 0 {
            return Ok(0.0);
        }
        let partial = self.dev.alloc(op, table.blocks() * 8)?;
        table.launch(
            self,
            op,
            MODULE,
            "sum_squares_partial",
            &[Arg::Ptr(super::Device::ptr(&partial))],
        )?;
        let bytes = self
            .dev
            .stream
            .clone_dtoh(&partial)
            .map_err(|e| super::device::driver_err(op, e))?;
        let mut values = bytes
            .chunks_exact(8)
            .map(|c| f64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
        Ok(blocks
            .iter()
            .fold(0.0, |acc, &b| acc + values.by_ref().take(b).sum::<f64>()))
    }

    /// The f32 buffers of `bufs` zeroed by one kernel (`fill_zero_multi`), any others (half
    /// or byte buffers) by a memset each.
    pub(super) fn fill_zero_all_impl(&self, bufs: &mut [&mut CudaBuf]) -> Result<()> {
        let op = "fill_zero_all";
        self.dev.bind(op)?;
        let mut table = TensorTable::<1>::new();
        for b in bufs.iter_mut() {
            if b.dtype == DType::F32 {
                table.push([b.ptr()], b.len(), multi::elementwise_blocks(b.len()));
            } else {
                self.memset_zero(op, b)?;
            }
        }
        table.launch(self, op, MODULE, "fill_zero_multi", &[])
    }

    pub(super) fn embedding_impl(
        &self,
        out: &mut CudaBuf,
        ids: &[u32],
        table: &CudaBuf,
        c: usize,
        acc: Accumulate,
    ) -> Result<()> {
        let op = "embedding_forward";
        let v = rows_of(op, "table", table.len(), c)?;
        if let Some((i, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= v) {
            return Err(err(
                op,
                format!("token id {id} at position {i} is outside the vocabulary of {v}"),
            ));
        }
        let n = ids.len();
        let po = Self::check_f32(op, "out", out, n * c)?;
        let (pt, tdt) = Self::check_any(op, "table", table, v * c)?;
        if n == 0 {
            return Ok(());
        }
        let idbuf = self.upload_u32(op, ids)?;
        self.run(
            op,
            "embedding",
            n * c,
            &[
                Arg::Ptr(po),
                Arg::Ptr(super::Device::ptr(&idbuf)),
                Arg::Ptr(pt),
                Arg::I32(tdt),
                Arg::I64(n as i64),
                Arg::I64(c as i64),
                Arg::I32(acc_flag(acc)),
            ],
        )
    }

    /// Small host arrays (ids, positions, labels) to the device, ordered on the stream.
    pub(super) fn upload_u32(
        &self,
        op: &'static str,
        v: &[u32],
    ) -> Result<cudarc::driver::CudaSlice<u8>> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_ne_bytes()).collect();
        self.upload_bytes(op, &bytes)
    }

    pub(super) fn upload_bytes(
        &self,
        op: &'static str,
        bytes: &[u8],
    ) -> Result<cudarc::driver::CudaSlice<u8>> {
        let mut mem = self.dev.alloc(op, bytes.len())?;
        if !bytes.is_empty() && self.capturing() {
            self.capture_htod(op, super::device::Device::ptr(&mem), bytes)?;
        } else if !bytes.is_empty() {
            self.dev
                .stream
                .memcpy_htod(bytes, &mut mem)
                .map_err(|e| super::device::driver_err(op, e))?;
        }
        Ok(mem)
    }

    pub(super) fn gated_forward_impl(
        &self,
        act: Activation,
        out: &mut CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
    ) -> Result<()> {
        let op = "gated_forward";
        let n = out.len();
        let (po, odt) = Self::check_act(op, "out", out, n)?;
        let pg = Self::check_f32(op, "gate", gate, n)?;
        let pu = Self::check_f32(op, "up", up, n)?;
        self.run(
            op,
            "gated_fwd",
            n,
            &[
                Arg::Ptr(po),
                Arg::I32(odt),
                Arg::Ptr(pg),
                Arg::Ptr(pu),
                Arg::I64(n as i64),
                Arg::I32(act_index(act)),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn gated_backward_impl(
        &self,
        act: Activation,
        dgate: &mut CudaBuf,
        dup: &mut CudaBuf,
        dout: &CudaBuf,
        gate: &CudaBuf,
        up: &CudaBuf,
    ) -> Result<()> {
        let op = "gated_backward";
        let n = dout.len();
        let (pdg, odt) = Self::check_act(op, "dgate", dgate, n)?;
        let (pdu, odt_up) = Self::check_act(op, "dup", dup, n)?;
        if odt != odt_up {
            return Err(err(
                op,
                format!(
                    "dgate is {} and dup {}: both must be of one type",
                    dgate.dtype, dup.dtype
                ),
            ));
        }
        let pd = Self::check_f32(op, "dout", dout, n)?;
        let pg = Self::check_f32(op, "gate", gate, n)?;
        let pu = Self::check_f32(op, "up", up, n)?;
        self.run(
            op,
            "gated_bwd",
            n,
            &[
                Arg::Ptr(pdg),
                Arg::Ptr(pdu),
                Arg::I32(odt),
                Arg::Ptr(pd),
                Arg::Ptr(pg),
                Arg::Ptr(pu),
                Arg::I64(n as i64),
                Arg::I32(act_index(act)),
            ],
        )
    }

    pub(super) fn gelu_forward_impl(&self, out: &mut CudaBuf, x: &CudaBuf) -> Result<()> {
        let op = "gelu_forward";
        let n = out.len();
        let po = Self::check_f32(op, "out", out, n)?;
        let px = Self::check_f32(op, "x", x, n)?;
        self.run(
            op,
            "gelu_fwd",
            n,
            &[Arg::Ptr(po), Arg::Ptr(px), Arg::I64(n as i64)],
        )
    }

    pub(super) fn gelu_backward_impl(
        &self,
        dx: &mut CudaBuf,
        dout: &CudaBuf,
        x: &CudaBuf,
    ) -> Result<()> {
        let op = "gelu_backward";
        let n = dx.len();
        let pdx = Self::check_f32(op, "dx", dx, n)?;
        let pd = Self::check_f32(op, "dout", dout, n)?;
        let px = Self::check_f32(op, "x", x, n)?;
        self.run(
            op,
            "gelu_bwd",
            n,
            &[
                Arg::Ptr(pdx),
                Arg::Ptr(pd),
                Arg::Ptr(px),
                Arg::I64(n as i64),
            ],
        )
    }

    /// Forward and backward of dropout are the same map:
    /// `out[i] = keep(offset + i) ? x[i]/(1−p) : 0`.
    pub(super) fn dropout_impl(
        &self,
        op: &'static str,
        out: &mut CudaBuf,
        x: &CudaBuf,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            return Err(err(
                op,
                format!("dropout probability {p} is outside [0, 1)"),
            ));
        }
        let n = out.len();
        let po = Self::check_f32(op, "out", out, n)?;
        let px = Self::check_f32(op, "x", x, n)?;
        let scale = 1.0 / (1.0 - p);
        self.run(
            op,
            "dropout",
            n,
            &[
                Arg::Ptr(po),
                Arg::Ptr(px),
                Arg::F32(p),
                Arg::F32(scale),
                Arg::U64(seed),
                Arg::U64(offset),
                Arg::I64(n as i64),
            ],
        )
    }
}

/// The kernels' index of an activation (`ACT_*` in elementwise.cu).
fn act_index(act: Activation) -> i32 {
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    }
}
