//! The one cuBLAS wrapper: every GEMM of the backend goes through [`CudaBackend::gemm_raw`].

use super::device::{self, Arg, Device, Launch, driver_err, err};
use super::multi::{TensorTable, elementwise_blocks};
use super::{CudaBackend, CudaBuf, elementwise};
use crate::backend::{Accumulate, DType, Gemm};
use crate::error::Result;
use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::CudaSlice;

/// The cuBLAS handle (bound to the compute stream) and the scratch buffer that holds an f32
/// operand cast to a half type. Held under one lock for the cast and the GEMM that reads
/// it, so that two host threads cannot interleave on the scratch.
pub(super) struct GemmState {
    blas: CudaBlas,
    scratch: Option<CudaSlice<u8>>,
    _workspace: CudaSlice<u8>,
}

/// cuBLAS's workspace (its default size on Hopper).
const GEMM_WORKSPACE_BYTES: usize = 32 << 20;

impl GemmState {
    pub fn new(dev: &Device) -> Result<Self> {
        dev.bind("init")?;
        let blas =
            CudaBlas::new(dev.stream.clone()).map_err(|e| err("init", format!("cuBLAS: {e:?}")))?;
        // A workspace of our own, the size cuBLAS takes by default on Hopper: a captured
        // GEMM (step graphs) then chooses the same kernel as an eager one, and cuBLAS never
        // allocates inside a capture.
        let workspace = dev.alloc("init", GEMM_WORKSPACE_BYTES)?;
        // SAFETY: the workspace lives in this state, beside the handle, for as long as it.
        let r = unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                Device::ptr(&workspace) as *mut std::ffi::c_void,
                GEMM_WORKSPACE_BYTES,
            )
        };
        if r != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(err("init", format!("cuBLAS workspace: {r:?}")));
        }
        Ok(GemmState {
            blas,
            scratch: None,
            _workspace: workspace,
        })
    }
}

/// One GEMM operand: device address, storage type, element count.
#[derive(Clone, Copy, Debug)]
pub(super) struct Operand {
    pub ptr: u64,
    pub dtype: DType,
}

fn cuda_type(d: DType) -> cudaDataType {
    match d {
        DType::F32 => cudaDataType::CUDA_R_32F,
        DType::F16 => cudaDataType::CUDA_R_16F,
        DType::BF16 => cudaDataType::CUDA_R_16BF,
        // quantized bytes are expanded before any GEMM (`gemm_raw` refuses them)
        DType::U8 => cudaDataType::CUDA_R_8U,
        DType::F8E4M3 => cudaDataType::CUDA_R_8F_E4M3,
    }
}

/// The half type in which GEMMs beside the weight `w` read the f32 activation `x` (`w`'s,
/// when bf16 or f16), or None when they read `x` as it is.
fn gemm_input_type(x: &CudaBuf, w: &CudaBuf) -> Option<DType> {
    (x.dtype == DType::F32 && matches!(w.dtype, DType::BF16 | DType::F16)).then_some(w.dtype)
}

impl CudaBackend {
    /// [`crate::backend::Backend::matmul`] with its shape checks.
    pub(super) fn gemm_checked(
        &self,
        c: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        g: Gemm,
    ) -> Result<()> {
        let op = "matmul";
        let shape = format!(
            "m={} n={} k={} trans_a={} trans_b={}",
            g.m, g.n, g.k, g.trans_a, g.trans_b
        );
        if a.len != g.m * g.k || b.len != g.k * g.n || c.len != g.m * g.n {
            return Err(err(
                op,
                format!(
                    "{shape}: a has {} elements, b {}, c {}",
                    a.len, b.len, c.len
                ),
            ));
        }
        // a half output only where the operands meet in that half type (the LoRA
        // intermediates, `Backend::gemm_output`)
        let half_operand = [a.dtype, b.dtype].into_iter().find(|d| *d != DType::F32);
        if c.dtype != DType::F32 && Some(c.dtype) != half_operand {
            return Err(err(
                op,
                format!(
                    "{shape}: the output is {}, but the operands are {} and {}: it must be f32 or their half type",
                    c.dtype, a.dtype, b.dtype
                ),
            ));
        }
        let oa = Operand {
            ptr: a.ptr(),
            dtype: a.dtype,
        };
        let ob = Operand {
            ptr: b.ptr(),
            dtype: b.dtype,
        };
        let oc = Operand {
            ptr: c.ptr(),
            dtype: c.dtype,
        };
        self.gemm_raw(op, oc, oa, ob, g)
    }

    /// [`crate::backend::Backend::gemm_input`]: an f32 activation cast to the half type of
    /// `w` (the cast a GEMM would do on its scratch), or `None`.
    pub(super) fn gemm_input_impl(&self, x: &CudaBuf, w: &CudaBuf) -> Result<Option<CudaBuf>> {
        let op = "gemm_input";
        let Some(h) = gemm_input_type(x, w) else {
            return Ok(None);
        };
        let out = self.new_buf(op, x.len, h)?;
        self.cast_to_half(op, out.ptr(), x.ptr(), x.len, h)?;
        Ok(Some(out))
    }

    /// [`crate::backend::Backend::gemm_input_all`]: the casts of `gemm_input_impl` in one
    /// launch (`cast_f32_to_half_multi`, the same rounding).
    pub(super) fn gemm_input_all_impl(
        &self,
        pairs: &[(&CudaBuf, &CudaBuf)],
    ) -> Result<Vec<Option<CudaBuf>>> {
        let op = "gemm_input_all";
        let mut table = TensorTable::<3>::new();
        let mut out = Vec::with_capacity(pairs.len());
        for (x, w) in pairs {
            let Some(h) = gemm_input_type(x, w) else {
                out.push(None);
                continue;
            };
            let copy = self.new_buf(op, x.len, h)?;
            let to_bf16 = (h == DType::BF16) as u64;
            table.push(
                [copy.ptr(), x.ptr(), to_bf16],
                x.len,
                elementwise_blocks(x.len),
            );
            out.push(Some(copy));
        }
        table.launch(self, op, elementwise::MODULE, "cast_f32_to_half_multi", &[])?;
        Ok(out)
    }

    /// `x` (f32, f16 or bf16) as a new f32 buffer.
    pub(super) fn widen_impl(&self, x: &CudaBuf) -> Result<CudaBuf> {
        let op = "widen";
        if !matches!(x.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(err(
                op,
                format!("a {:?} buffer is not an activation to widen", x.dtype),
            ));
        }
        let out = self.new_buf(op, x.len, DType::F32)?;
        self.dev.launch(
            op,
            elementwise::MODULE,
            "widen_to_f32",
            Launch::cover(x.len, 256, 4096),
            &[
                Arg::Ptr(out.ptr()),
                Arg::Ptr(x.ptr()),
                Arg::I64(x.len as i64),
                Arg::I32(device::dtype_code(x.dtype)),
            ],
        )?;
        Ok(out)
    }

    /// `dst[i] = half(src[i])` for `count` f32 values, round to nearest even.
    fn cast_to_half(
        &self,
        op: &'static str,
        dst: u64,
        src: u64,
        count: usize,
        h: DType,
    ) -> Result<()> {
        self.dev.launch(
            op,
            elementwise::MODULE,
            "cast_f32_to_half",
            Launch::cover(count, 256, 4096),
            &[
                Arg::Ptr(dst),
                Arg::Ptr(src),
                Arg::I64(count as i64),
                Arg::I32((h == DType::BF16) as i32),
            ],
        )
    }

    /// `C[m×n] (=|+=) alpha · op(A) · op(B)`, all row-major; C f32, or the operands'
    /// half type (the f32 result rounded as it is stored).
    ///
    /// Row-major ↔ column-major: cuBLAS is column-major, and a row-major `[r, c]` matrix is
    /// the column-major `[c, r]` matrix with leading dimension c, i.e. its transpose. So we
    /// ask cuBLAS for `Cᵀ = op(B)ᵀ · op(A)ᵀ`: its "A" is our B, its "B" is our A, its
    /// (m, n) are our (n, m), and each operand keeps its own transpose flag with the
    /// leading dimension of its storage (B stored `[k, n]` → ld n, `[n, k]` → ld k; A
    /// stored `[m, k]` → ld k, `[k, m]` → ld m); `Cᵀ` has leading dimension n.
    ///
    /// Types: f32 × f32 runs SGEMM. When one operand is a bf16/f16 weight, the f32 operand
    /// is cast to that type in a scratch buffer and `cublasGemmEx` runs with f32 output and
    /// CUBLAS_COMPUTE_32F (f32 accumulation).
    pub(super) fn gemm_raw(
        &self,
        op: &'static str,
        c: Operand,
        a: Operand,
        b: Operand,
        g: Gemm,
    ) -> Result<()> {
        let shape = || {
            format!(
                "m={} n={} k={} trans_a={} trans_b={}",
                g.m, g.n, g.k, g.trans_a, g.trans_b
            )
        };
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        if [a.dtype, b.dtype].iter().any(|d| d.size() == 1) {
            return Err(err(
                op,
                "a quantized weight reached a GEMM without being expanded (a bug in lema)",
            ));
        }
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| {
                err(
                    op,
                    format!("{}: dimension {v} exceeds cuBLAS's 32-bit range", shape()),
                )
            })
        };
        let (m, n, k) = (int(g.m)?, int(g.n)?, int(g.k)?);
        let lda = if g.trans_a { m } else { k };
        let ldb = if g.trans_b { k } else { n };
        let op_a = if g.trans_a {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        };
        let op_b = if g.trans_b {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        };
        let alpha: f32 = g.alpha;
        let beta: f32 = match g.accumulate {
            Accumulate::Overwrite => 0.0,
            Accumulate::Add => 1.0,
        };
        self.dev.bind(op)?;
        if g.k == 0 {
            // op(A)·op(B) is the zero matrix: C = beta·C.
            if g.accumulate == Accumulate::Overwrite {
                // SAFETY: c addresses m·n f32 values on the compute stream's device.
                unsafe {
                    cudarc::driver::result::memset_d8_async(
                        c.ptr,
                        0,
                        g.m * g.n * c.dtype.size(),
                        self.dev.stream.cu_stream(),
                    )
                }
                .map_err(|e| driver_err(op, e))?;
            }
            return Ok(());
        }
        let mut st = self
            .gemm
            .lock()
            .map_err(|_| err(op, "cuBLAS lock poisoned"))?;
        // Bring both operands to one storage type.
        let half = match (a.dtype, b.dtype) {
            (DType::F32, DType::F32) => None,
            (DType::F32, h) | (h, DType::F32) => Some(h),
            (x, y) if x == y => Some(x),
            (x, y) => {
                return Err(err(
                    op,
                    format!(
                        "{}: operands are {x} and {y}; mixed half types are not supported",
                        shape()
                    ),
                ));
            }
        };
        let (a, b) = match half {
            None => (a, b),
            Some(h) => {
                // Which operand is f32 (if any) and how many elements it has.
                let (f32_side, count) = if a.dtype == DType::F32 {
                    (Some(0), g.m * g.k)
                } else if b.dtype == DType::F32 {
                    (Some(1), g.k * g.n)
                } else {
                    (None, 0)
                };
                match f32_side {
                    None => (a, b),
                    Some(side) => {
                        let need = count * 2;
                        let fits = st.scratch.as_ref().is_some_and(|s| s.len() >= need);
                        if !fits {
                            // a scratch made in a capture would outlive the step
                            self.refuse_in_capture(op, "a larger GEMM scratch buffer")?;
                            st.scratch = None; // free first, then allocate the larger one
                            st.scratch = Some(self.dev.alloc(op, need.max(1 << 20))?);
                        }
                        let scratch = st.scratch.as_ref().map(Device::ptr).unwrap_or(0);
                        let src = if side == 0 { a.ptr } else { b.ptr };
                        self.cast_to_half(op, scratch, src, count, h)?;
                        let cast = Operand {
                            ptr: scratch,
                            dtype: h,
                        };
                        if side == 0 { (cast, b) } else { (a, cast) }
                    }
                }
            }
        };
        let handle = *st.blas.handle();
        // SAFETY: the pointers address device buffers of at least m·k (A), k·n (B) and m·n
        // (C) elements of their types (checked by the callers), alive for this call, which
        // only enqueues work on the compute stream that owns them; alpha and beta are host
        // f32 values, as CUBLAS_COMPUTE_32F expects.
        let label = match (half.is_some(), g.m.min(g.n).min(g.k)) {
            (true, _) => "gemm half",
            (false, t) if t > 64 => "gemm f32",
            (false, _) if g.k <= 64 => "gemm f32 (thin k)",
            (false, _) if g.n <= 64 => "gemm f32 (thin n)",
            _ => "gemm f32 (thin m)",
        };
        let r = self.dev.timed(label, || {
            Ok(unsafe {
                if half.is_none() {
                    cudarc::cublas::result::sgemm(
                        handle,
                        op_b,
                        op_a,
                        n,
                        m,
                        k,
                        &alpha,
                        b.ptr as *const f32,
                        ldb,
                        a.ptr as *const f32,
                        lda,
                        &beta,
                        c.ptr as *mut f32,
                        n,
                    )
                } else {
                    cudarc::cublas::result::gemm_ex(
                        handle,
                        op_b,
                        op_a,
                        n,
                        m,
                        k,
                        &alpha as *const f32 as *const _,
                        b.ptr as *const _,
                        cuda_type(b.dtype),
                        ldb,
                        a.ptr as *const _,
                        cuda_type(a.dtype),
                        lda,
                        &beta as *const f32 as *const _,
                        c.ptr as *mut _,
                        cuda_type(c.dtype),
                        n,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
            })
        })?;
        r.map_err(|e| err(op, format!("{}: cuBLAS GEMM failed: {e:?}", shape())))?;
        drop(st);
        if self.dev.sync_each_launch {
            self.dev
                .stream
                .synchronize()
                .map_err(|e| driver_err(op, e))?;
        }
        Ok(())
    }
}
