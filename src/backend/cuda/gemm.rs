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

/// The operands of `c (=|+=) op(a)·op(b)` after the shape and type checks of
/// [`crate::backend::Backend::matmul`].
fn operands(c: &CudaBuf, a: &CudaBuf, b: &CudaBuf, g: Gemm) -> Result<[Operand; 3]> {
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
    let of = |x: &CudaBuf| Operand {
        ptr: x.ptr(),
        dtype: x.dtype,
    };
    Ok([of(c), of(a), of(b)])
}

/// Products of one shape in one cuBLAS call: `count` of them, product i reading and
/// writing its operands at `ptr + i·stride` (in elements; 0 for an operand they share).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Batch {
    pub count: usize,
    pub a: usize,
    pub b: usize,
    pub c: usize,
}

impl Batch {
    /// One product.
    pub const ONE: Batch = Batch {
        count: 1,
        a: 0,
        b: 0,
        c: 0,
    };

    /// The batch that runs the products `ops` (`[c, a, b]` each) in one call, if their
    /// operands have one type each, both factors of one half type (no cast: `gemm_raw`
    /// casts an f32 operand beside a half one in a scratch that one product at a time can
    /// use), and lie at one stride; the outputs must not overlap.
    fn of(ops: &[[Operand; 3]], g: Gemm) -> Option<Batch> {
        let sizes = [g.m * g.n, g.m * g.k, g.k * g.n];
        let mut strides = [0usize; 3];
        for (j, stride) in strides.iter_mut().enumerate() {
            let dtype = ops[0][j].dtype;
            if ops.iter().any(|o| o[j].dtype != dtype) {
                return None;
            }
            let step = ops[1][j].ptr.checked_sub(ops[0][j].ptr)? as usize;
            let uniform = ops
                .windows(2)
                .all(|w| w[1][j].ptr.checked_sub(w[0][j].ptr) == Some(step as u64));
            if !uniform || !step.is_multiple_of(dtype.size()) {
                return None;
            }
            *stride = step / dtype.size();
        }
        // f32 × f32 products stay one by one: cuBLAS's batched SGEMM sums in another
        // order than its SGEMM, and the f32 path is the exact one the goldens hold
        let (a, b) = (ops[0][1].dtype, ops[0][2].dtype);
        let half = a == b && matches!(a, DType::BF16 | DType::F16);
        if !half || strides[0] < sizes[0] {
            return None;
        }
        Some(Batch {
            count: ops.len(),
            c: strides[0],
            a: strides[1],
            b: strides[2],
        })
    }
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
        let [oc, oa, ob] = operands(c, a, b, g)?;
        self.gemm_raw("matmul", oc, oa, ob, g, Batch::ONE)
    }

    /// [`crate::backend::Backend::matmul_group`]: one strided-batched cuBLAS call when the
    /// operands that differ from product to product lie at one stride and no operand needs
    /// a cast, else the products one by one.
    pub(super) fn gemm_group_checked(
        &self,
        cs: &mut [&mut CudaBuf],
        a: &[&CudaBuf],
        b: &[&CudaBuf],
        g: Gemm,
    ) -> Result<()> {
        let count = cs.len();
        let mut ops = Vec::with_capacity(count);
        for (i, c) in cs.iter().enumerate() {
            let pick = |len| crate::backend::group_operand(len, count, i);
            ops.push(operands(c, a[pick(a.len())?], b[pick(b.len())?], g)?);
        }
        let batch = (count > 1 && g.k > 0).then(|| Batch::of(&ops, g)).flatten();
        match batch {
            Some(batch) => {
                let [oc, oa, ob] = ops[0];
                self.gemm_raw("matmul_group", oc, oa, ob, g, batch)
            }
            None => ops
                .into_iter()
                .try_for_each(|[oc, oa, ob]| self.gemm_raw("matmul", oc, oa, ob, g, Batch::ONE)),
        }
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
        // the copies of one half type in one allocation, in the order of `pairs`, so that
        // equally long ones lie at one stride (`Backend::matmul_group`)
        let types: Vec<Option<DType>> = pairs.iter().map(|(x, w)| gemm_input_type(x, w)).collect();
        let mut copies: Vec<Option<CudaBuf>> = pairs.iter().map(|_| None).collect();
        for h in [DType::BF16, DType::F16] {
            let of_h: Vec<usize> = (0..pairs.len()).filter(|&i| types[i] == Some(h)).collect();
            let lens: Vec<usize> = of_h.iter().map(|&i| pairs[i].0.len).collect();
            for (i, copy) in of_h.into_iter().zip(self.new_bufs(op, &lens, h)?) {
                copies[i] = Some(copy);
            }
        }
        for ((x, _), copy) in pairs.iter().zip(&copies) {
            let Some(copy) = copy else { continue };
            let to_bf16 = (copy.dtype == DType::BF16) as u64;
            table.push(
                [copy.ptr(), x.ptr(), to_bf16],
                x.len,
                elementwise_blocks(x.len),
            );
        }
        let out = copies;
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
        batch: Batch,
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
        if batch != Batch::ONE && (g.k == 0 || a.dtype != b.dtype) {
            return Err(err(
                op,
                format!(
                    "{}: a batch of products that need a cast (a bug in lema)",
                    shape()
                ),
            ));
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
                match (half.is_none(), batch == Batch::ONE) {
                    (true, true) => cudarc::cublas::result::sgemm(
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
                    ),
                    (false, true) => cudarc::cublas::result::gemm_ex(
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
                    ),
                    // SAFETY (batches): product i's operands lie at ptr + i·stride and are
                    // as long as one product's (checked per product by `operands`)
                    (true, false) => cudarc::cublas::result::sgemm_strided_batched(
                        handle,
                        op_b,
                        op_a,
                        n,
                        m,
                        k,
                        &alpha,
                        b.ptr as *const f32,
                        ldb,
                        batch.b as i64,
                        a.ptr as *const f32,
                        lda,
                        batch.a as i64,
                        &beta,
                        c.ptr as *mut f32,
                        n,
                        batch.c as i64,
                        int(batch.count)?,
                    ),
                    (false, false) => cudarc::cublas::result::gemm_strided_batched_ex(
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
                        batch.b as i64,
                        a.ptr as *const _,
                        cuda_type(a.dtype),
                        lda,
                        batch.a as i64,
                        &beta as *const f32 as *const _,
                        c.ptr as *mut _,
                        cuda_type(c.dtype),
                        n,
                        batch.c as i64,
                        int(batch.count)?,
                        cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    ),
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

#[cfg(test)]
mod tests {
    use super::{Batch, Operand};
    use crate::backend::{Accumulate, DType, Gemm};

    fn op(ptr: u64, dtype: DType) -> Operand {
        Operand { ptr, dtype }
    }

    /// `[c, a, b]` of product i: c at `c0 + i·sc` bytes, a shared, b at `b0 + i·sb`.
    fn ops(sc: u64, sb: u64, a_type: DType) -> Vec<[Operand; 3]> {
        (0..3)
            .map(|i| {
                [
                    op(0x10000 + i * sc, DType::F32),
                    op(0x20000, a_type),
                    op(0x30000 + i * sb, DType::BF16),
                ]
            })
            .collect()
    }

    const G: Gemm = Gemm {
        m: 4,
        n: 4,
        k: 8,
        trans_a: false,
        trans_b: true,
        alpha: 1.0,
        accumulate: Accumulate::Overwrite,
    };

    #[test]
    fn a_batch_needs_one_stride_one_type_and_outputs_apart() {
        // 16 f32 outputs (64 bytes) and 32 bf16 b elements (64 bytes) a product
        assert_eq!(
            Batch::of(&ops(64, 64, DType::BF16), G),
            Some(Batch {
                count: 3,
                c: 16,
                a: 0,
                b: 32
            })
        );
        let mut uneven = ops(64, 64, DType::BF16);
        uneven[2][2].ptr += 2;
        assert_eq!(Batch::of(&uneven, G), None, "b not at one stride");
        assert_eq!(
            Batch::of(&ops(64, 64, DType::F32), G),
            None,
            "an f32 operand beside a bf16 one needs a cast"
        );
        let mut f32s = ops(64, 128, DType::F32);
        f32s.iter_mut().for_each(|o| o[2].dtype = DType::F32);
        assert_eq!(Batch::of(&f32s, G), None, "f32 products run one by one");
        assert_eq!(
            Batch::of(&ops(32, 64, DType::BF16), G),
            None,
            "outputs overlap"
        );
        let mut backwards = ops(64, 64, DType::BF16);
        backwards.reverse();
        assert_eq!(Batch::of(&backwards, G), None, "descending addresses");
        let mut mixed = ops(64, 64, DType::BF16);
        mixed[1][0].dtype = DType::BF16;
        assert_eq!(Batch::of(&mixed, G), None, "outputs of two types");
    }
}
