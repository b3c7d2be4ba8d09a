//! Fused LM head and cross-entropy over row chunks: at most one chunk of `[rows, V]` f32
//! logits exists at a time. Per chunk: logits = h·wᵀ (cuBLAS, half weight), the fused
//! softmax / cross-entropy / dlogits kernel of `loss.cu` (dlogits written in the half
//! weight's type, when it is one, for the next GEMM), then dh = dlogits·w.

use super::device::{Arg, Device, Launch, Module, driver_err, err};
use super::gemm::Operand;
use super::{CudaBackend, CudaBuf, rows_of};
use crate::backend::{Accumulate, DType, DeviceBuf, Gemm, IGNORE_INDEX, LossSum};
use crate::error::Result;

pub(super) const MODULE: Module = Module::new("loss", include_str!("loss.cu"));

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lm_head_loss_impl(
        &self,
        h: &CudaBuf,
        w: &CudaBuf,
        labels: &[i32],
        c: usize,
        loss_scale: f32,
        softcap: Option<f32>,
        dh: Option<&mut CudaBuf>,
        logits: Option<&mut CudaBuf>,
    ) -> Result<LossSum> {
        let op = "lm_head_loss";
        check_softcap(op, softcap)?;
        let v = rows_of(op, "lm_head weight", w.len(), c)?;
        let n = labels.len();
        let ph = Self::check_f32(op, "h", h, n * c)?;
        let (pw, _) = Self::check_any(op, "lm_head weight", w, v * c)?;
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l != IGNORE_INDEX && (l < 0 || l as usize >= v))
        {
            return Err(err(
                op,
                format!(
                    "label {l} at position {i} is outside the vocabulary of {v} (and is not the ignore index {IGNORE_INDEX})"
                ),
            ));
        }
        let pdh = match &dh {
            Some(d) => Some(Self::check_f32(op, "dh", d, n * c)?),
            None => None,
        };
        let plog = match &logits {
            Some(l) => Some(Self::check_f32(op, "logits", l, n * v)?),
            None => None,
        };
        let count = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        if n == 0 {
            return Ok(LossSum { sum: 0.0, count });
        }
        let chunk = (self.opts.logits_chunk_bytes / (4 * v)).clamp(1, n);
        let buf = self.dev.alloc(op, chunk * v * 4)?;
        let pbuf = Device::ptr(&buf);
        // an uninitialised buffer like any other: the head GEMM overwrites every row of a
        // chunk before the loss kernel reads it (NaN under poisoning shows one it missed)
        self.poison(op, pbuf, chunk * v * 4)?;
        let label_bytes: Vec<u8> = labels.iter().flat_map(|l| l.to_ne_bytes()).collect();
        let lab = self.upload_bytes(op, &label_bytes)?;
        let plab = Device::ptr(&lab);
        // dlogits: in the logits' f32 buffer, or for a half weight straight in the head
        // GEMM's type (the values its cast would make), so no cast pass follows
        let dl = match w.dtype() {
            DType::BF16 | DType::F16 if pdh.is_some() => {
                Some(self.dev.alloc(op, chunk * v * w.dtype().size())?)
            }
            _ => None,
        };
        let dlogits = dl.as_ref().map_or(
            Operand {
                ptr: pbuf,
                dtype: DType::F32,
            },
            |b| Operand {
                ptr: Device::ptr(b),
                dtype: w.dtype(),
            },
        );
        // inside a capture, memory that outlives the graph (graph.rs)
        let row_loss = match self.capturing() {
            true => RowLoss::Plain(super::graph::PlainAlloc::new(&self.dev, op, n * 4)?),
            false => RowLoss::Pool(self.dev.alloc(op, n * 4)?),
        };
        let ploss = row_loss.ptr();
        let block = (v.div_ceil(32) * 32).clamp(32, 1024) as u32;
        let weight = Operand {
            ptr: pw,
            dtype: w.dtype(),
        };
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            // logits[rows, V] = h[r0.., C] · wᵀ, w [V, C]
            self.gemm_raw(
                op,
                Operand {
                    ptr: pbuf,
                    dtype: DType::F32,
                },
                Operand {
                    ptr: ph + (r0 * c * 4) as u64,
                    dtype: DType::F32,
                },
                weight,
                Gemm {
                    m: rows,
                    n: v,
                    k: c,
                    trans_a: false,
                    trans_b: true,
                    alpha: 1.0,
                    accumulate: Accumulate::Overwrite,
                },
                super::gemm::Batch::ONE,
            )?;
            if let Some(cap) = softcap {
                self.softcap_raw(op, pbuf, rows * v, cap)?;
            }
            if let Some(pl) = plog {
                // SAFETY: both ranges lie inside their buffers (rows·V f32 at row r0).
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        pl + (r0 * v * 4) as u64,
                        pbuf,
                        rows * v * 4,
                        self.dev.stream.cu_stream(),
                    )
                }
                .map_err(|e| driver_err(op, e))?;
            }
            self.dev.launch(
                op,
                MODULE,
                "ce_fwd_bwd",
                Launch {
                    grid: (rows, 1, 1),
                    block,
                    shared_bytes: 0,
                },
                &[
                    Arg::Ptr(pbuf),
                    Arg::Ptr(dlogits.ptr),
                    Arg::I32(super::device::dtype_code(dlogits.dtype)),
                    Arg::Ptr(ploss + (r0 * 4) as u64),
                    Arg::Ptr(plab + (r0 * 4) as u64),
                    Arg::I64(v as i64),
                    Arg::F32(loss_scale),
                    Arg::I32(pdh.is_some() as i32),
                    Arg::F32(softcap.unwrap_or(0.0)),
                ],
            )?;
            if let Some(pd) = pdh {
                // dh[r0.., C] = dlogits[rows, V] · w[V, C]
                self.gemm_raw(
                    op,
                    Operand {
                        ptr: pd + (r0 * c * 4) as u64,
                        dtype: DType::F32,
                    },
                    dlogits,
                    weight,
                    Gemm {
                        m: rows,
                        n: c,
                        k: v,
                        trans_a: false,
                        trans_b: false,
                        alpha: 1.0,
                        accumulate: Accumulate::Overwrite,
                    },
                    super::gemm::Batch::ONE,
                )?;
            }
        }
        let row_loss = match row_loss {
            RowLoss::Plain(rows) => {
                // summed after the graph's launch; the caller takes the sum from there
                self.capture_loss(super::graph::PendingLoss { rows, n, count })?;
                return Ok(LossSum { sum: 0.0, count });
            }
            RowLoss::Pool(rows) => rows,
        };
        let bytes = self
            .dev
            .stream
            .clone_dtoh(&row_loss)
            .map_err(|e| driver_err(op, e))?;
        Ok(super::graph::loss_sum(&bytes, n, count))
    }

    /// `x = cap · tanh(x / cap)` over the f32 buffer x.
    pub(super) fn softcap_impl(&self, x: &mut CudaBuf, cap: f32) -> Result<()> {
        let op = "softcap";
        check_softcap(op, Some(cap))?;
        let n = x.len();
        let px = Self::check_f32(op, "x", x, n)?;
        self.softcap_raw(op, px, n, cap)
    }

    fn softcap_raw(&self, op: &'static str, px: u64, n: usize, cap: f32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.dev.launch(
            op,
            MODULE,
            "softcap_fwd",
            Launch::cover(n, 256, 65535),
            &[Arg::Ptr(px), Arg::I64(n as i64), Arg::F32(cap)],
        )
    }
}

/// A soft-cap must be a positive finite number.
fn check_softcap(op: &'static str, cap: Option<f32>) -> Result<()> {
    crate::backend::softcap_problem(cap).map_or(Ok(()), |m| Err(err(op, m)))
}

/// Where `lm_head_loss` writes its per-row losses: the stream's pool, or inside a step
/// graph's capture memory that outlives the graph.
enum RowLoss {
    Pool(cudarc::driver::CudaSlice<u8>),
    Plain(super::graph::PlainAlloc),
}

impl RowLoss {
    fn ptr(&self) -> u64 {
        match self {
            RowLoss::Pool(s) => Device::ptr(s),
            RowLoss::Plain(p) => p.ptr,
        }
    }
}
