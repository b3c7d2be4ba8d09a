//! CPU backend: the f32 compute path and, as `CpuBackend<f64>`, the reference that
//! finite-difference tests and the other backends are checked against.
//!
//! Each op family lives in its own file as plain generic kernels over slices
//! (`rms_norm_forward(out, rstd, x, w, c, eps)`); the [`Backend`] impl here checks every
//! buffer length against the dimensions, then calls them. The heavier kernels split rows,
//! tokens or heads over rayon. Reductions collect partial results in order and add them
//! sequentially, so no result depends on the thread count or on scheduling.

mod activation;
pub(crate) mod attention;
mod check;
mod elementwise;
mod fastexp;
mod loss;
mod matmul;
mod norm;
mod optim;
mod quant;
mod rope;
#[cfg(test)]
mod tests;
pub(crate) mod vector;

use std::marker::PhantomData;
use std::sync::Arc;

use super::{
    Accumulate, Activation, AdamWStep, AttnDims, Backend, DType, DecodeDims, DeviceBuf, Fp8Parts,
    Gemm, IGNORE_INDEX, LossSum, Nf4Parts, SgdStep,
};
use crate::error::Result;
use check::{
    attn_lens, check_key_start, dropout_check, expect_len, fail, fp8_check, nf4_check, numel,
    rope_check, rows_of, same_len, softcap_check,
};

/// Element type the CPU backend computes in: `f32` (training) or `f64` (the reference for
/// finite-difference tests). Sealed, because the `gemm` crate supports only these two here.
pub trait CpuFloat:
    num_traits::Float + Send + Sync + Copy + Default + std::fmt::Debug + 'static + sealed::Sealed
{
    /// Convert from f32 (exact for both element types).
    fn from_f32(v: f32) -> Self;
    /// Convert from f64 (rounds to nearest on f32).
    fn from_f64(v: f64) -> Self;
    /// Convert to f32 (rounds to nearest on f64).
    fn as_f32(self) -> f32;
    /// Convert to f64 (exact).
    fn as_f64(self) -> f64;
    /// e^x: f32 without a libm call, so that loops over it vectorise (`fastexp`, within
    /// 1 ulp); f64 the standard library's.
    fn exp_v(self) -> Self;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

impl CpuFloat for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn as_f32(self) -> f32 {
        self
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_v(self) -> Self {
        fastexp::exp_f32(self)
    }
}

impl CpuFloat for f64 {
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn as_f32(self) -> f32 {
        self as f32
    }
    fn as_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_v(self) -> Self {
        self.exp()
    }
}

/// A CPU buffer: a plain vector of the backend's element type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuBuf<T>(pub Vec<T>);

impl<T> CpuBuf<T> {
    /// The elements.
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }
    /// The elements, writable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.0
    }
    /// The underlying vector.
    pub fn into_vec(self) -> Vec<T> {
        self.0
    }
}

impl<T> From<Vec<T>> for CpuBuf<T> {
    /// Wrap a vector without converting it (how f64 tests put exact values in).
    fn from(v: Vec<T>) -> Self {
        CpuBuf(v)
    }
}

impl<T: Send + Sync> DeviceBuf for CpuBuf<T> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn bytes(&self) -> usize {
        std::mem::size_of_val(self.0.as_slice())
    }
    fn address(&self) -> usize {
        self.0.as_ptr() as usize
    }
}

/// The CPU backend, computing in `T` (`f32` by default, `f64` for reference tests).
/// Runs on rayon's global pool, or on its own pool from [`CpuBackend::with_threads`].
pub struct CpuBackend<T = f32> {
    pool: Option<Arc<rayon::ThreadPool>>,
    _elem: PhantomData<fn() -> T>,
}

impl<T> Clone for CpuBackend<T> {
    fn clone(&self) -> Self {
        CpuBackend {
            pool: self.pool.clone(),
            _elem: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for CpuBackend<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("elem", &std::any::type_name::<T>())
            .field(
                "threads",
                &self.pool.as_ref().map(|p| p.current_num_threads()),
            )
            .finish()
    }
}

impl<T: CpuFloat> Default for CpuBackend<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: CpuFloat> CpuBackend<T> {
    /// A backend on rayon's global thread pool.
    pub fn new() -> Self {
        CpuBackend {
            pool: None,
            _elem: PhantomData,
        }
    }

    /// A backend with its own pool of `threads` worker threads (≥ 1).
    pub fn with_threads(threads: usize) -> Result<Self> {
        if threads == 0 {
            return Err(fail(
                "with_threads",
                "thread count must be at least 1, got 0",
            ));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| {
                fail(
                    "with_threads",
                    format!("cannot start {threads} threads: {e}"),
                )
            })?;
        Ok(CpuBackend {
            pool: Some(Arc::new(pool)),
            _elem: PhantomData,
        })
    }

    /// Number of worker threads the ops run on.
    pub fn threads(&self) -> usize {
        match &self.pool {
            Some(p) => p.current_num_threads(),
            None => rayon::current_num_threads(),
        }
    }

    /// Run `f` on this backend's pool (so nested rayon and gemm work uses it).
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

impl<T: CpuFloat> Backend for CpuBackend<T> {
    type Buf = CpuBuf<T>;
    type Parked = CpuBuf<T>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    // ---- memory ----------------------------------------------------------------------

    /// Reserved fallibly: a buffer sized by a wrong number (a huge max_new_tokens, say) is
    /// an error that names its size, not an abort.
    fn zeros(&self, n: usize) -> Result<CpuBuf<T>> {
        let mut v = Vec::new();
        v.try_reserve_exact(n).map_err(|_| {
            fail(
                "zeros",
                format!(
                    "cannot allocate {n} elements ({} bytes) of host memory",
                    n.saturating_mul(std::mem::size_of::<T>())
                ),
            )
        })?;
        v.resize(n, T::zero());
        Ok(CpuBuf(v))
    }

    /// Zeros, as [`Backend::zeros`]: safe, and host memory is cheap to clear.
    fn uninit(&self, n: usize) -> Result<CpuBuf<T>> {
        self.zeros(n)
    }

    /// Host memory is the CPU's only memory: the same as [`Backend::zeros`].
    fn zeros_host(&self, n: usize) -> Result<CpuBuf<T>> {
        self.zeros(n)
    }

    fn upload(&self, data: &[f32]) -> Result<CpuBuf<T>> {
        Ok(CpuBuf(data.iter().map(|&x| T::from_f32(x)).collect()))
    }

    fn upload_weight(&self, bytes: &[u8], dtype: DType) -> Result<CpuBuf<T>> {
        let op = "upload_weight";
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(fail(
                op,
                format!(
                    "{} bytes is not a whole number of {dtype} elements ({} bytes each)",
                    bytes.len(),
                    dtype.size()
                ),
            ));
        }
        let n = bytes.len() / dtype.size();
        // Decode through a small f32 scratch so that at most one T-sized copy exists.
        const CHUNK: usize = 1 << 14;
        let mut out = Vec::with_capacity(n);
        let mut scratch = vec![0f32; CHUNK.min(n)];
        for piece in bytes.chunks(CHUNK * dtype.size()) {
            let s = &mut scratch[..piece.len() / dtype.size()];
            dtype.decode_into(piece, s);
            out.extend(s.iter().map(|&x| T::from_f32(x)));
        }
        Ok(CpuBuf(out))
    }

    fn download(&self, buf: &CpuBuf<T>) -> Result<Vec<f32>> {
        Ok(buf.0.iter().map(|&x| x.as_f32()).collect())
    }

    fn fill_zero(&self, buf: &mut CpuBuf<T>) -> Result<()> {
        buf.0.fill(T::zero());
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn park(&self, buf: CpuBuf<T>) -> Result<CpuBuf<T>> {
        Ok(buf) // host memory already
    }

    fn unpark(&self, parked: CpuBuf<T>) -> Result<CpuBuf<T>> {
        Ok(parked)
    }

    fn upload_f64(&self, data: &[f64]) -> Result<CpuBuf<T>> {
        Ok(CpuBuf(data.iter().map(|&x| T::from_f64(x)).collect()))
    }

    fn download_f64(&self, buf: &CpuBuf<T>) -> Result<Vec<f64>> {
        Ok(buf.0.iter().map(|&x| x.as_f64()).collect())
    }

    // ---- linear algebra --------------------------------------------------------------

    fn matmul(&self, c: &mut CpuBuf<T>, a: &CpuBuf<T>, b: &CpuBuf<T>, g: Gemm) -> Result<()> {
        let op = "matmul";
        let (m, n, k) = (g.m, g.n, g.k);
        let a_shape = if g.trans_a { [k, m] } else { [m, k] };
        let b_shape = if g.trans_b { [n, k] } else { [k, n] };
        expect_len(op, "c", c.len(), numel(op, &[m, n])?, || {
            format!("[m={m}, n={n}]")
        })?;
        expect_len(op, "a", a.len(), numel(op, &a_shape)?, || {
            format!("{a_shape:?} (m={m}, k={k}, trans_a={})", g.trans_a)
        })?;
        expect_len(op, "b", b.len(), numel(op, &b_shape)?, || {
            format!("{b_shape:?} (k={k}, n={n}, trans_b={})", g.trans_b)
        })?;
        self.install(|| matmul::matmul(&mut c.0, &a.0, &b.0, &g));
        Ok(())
    }

    fn axpy(&self, y: &mut CpuBuf<T>, alpha: f32, x: &CpuBuf<T>, acc: Accumulate) -> Result<()> {
        same_len("axpy", ("y", y.len()), ("x", x.len()))?;
        self.install(|| elementwise::axpy(&mut y.0, T::from_f32(alpha), &x.0, acc));
        Ok(())
    }

    fn add_bias(&self, x: &mut CpuBuf<T>, b: &CpuBuf<T>) -> Result<()> {
        let op = "add_bias";
        if x.is_empty() {
            return Ok(());
        }
        rows_of(op, "x", x.len(), b.len())?;
        self.install(|| elementwise::add_bias(&mut x.0, &b.0));
        Ok(())
    }

    fn copy_cols(
        &self,
        dst: &mut CpuBuf<T>,
        dst_cols: usize,
        dst_off: usize,
        src: &CpuBuf<T>,
        src_cols: usize,
        src_off: usize,
        width: usize,
        acc: Accumulate,
    ) -> Result<()> {
        let op = "copy_cols";
        let rows = rows_of(op, "dst", dst.len(), dst_cols)?;
        let src_rows = rows_of(op, "src", src.len(), src_cols)?;
        if src_rows != rows {
            return Err(fail(
                op,
                format!(
                    "dst has {rows} rows of {dst_cols} ({} elements) but src has {src_rows} rows of {src_cols} ({} elements)",
                    dst.len(),
                    src.len()
                ),
            ));
        }
        for (what, off, cols) in [("dst", dst_off, dst_cols), ("src", src_off, src_cols)] {
            if off.checked_add(width).is_none_or(|end| end > cols) {
                return Err(fail(
                    op,
                    format!("{what} columns {off}..{off}+{width} exceed its {cols} columns"),
                ));
            }
        }
        self.install(|| {
            elementwise::copy_cols(
                &mut dst.0, dst_cols, dst_off, &src.0, src_cols, src_off, width, acc,
            )
        });
        Ok(())
    }

    fn sum_squares(&self, x: &CpuBuf<T>) -> Result<f64> {
        Ok(self.install(|| elementwise::sum_squares(&x.0)))
    }

    // ---- embedding -------------------------------------------------------------------

    fn embedding_forward(
        &self,
        out: &mut CpuBuf<T>,
        ids: &[u32],
        table: &CpuBuf<T>,
        c: usize,
        acc: Accumulate,
    ) -> Result<()> {
        let op = "embedding_forward";
        let v = rows_of(op, "table", table.len(), c)?;
        let n = ids.len();
        expect_len(op, "out", out.len(), numel(op, &[n, c])?, || {
            format!("[N={n} (ids), C={c}]")
        })?;
        if let Some((i, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= v) {
            return Err(fail(
                op,
                format!("token id {id} at position {i} is out of range for a vocabulary of {v}"),
            ));
        }
        self.install(|| elementwise::embedding_forward(&mut out.0, ids, &table.0, c, acc));
        Ok(())
    }

    // ---- normalisation ---------------------------------------------------------------

    fn rms_norm_forward(
        &self,
        out: &mut CpuBuf<T>,
        rstd: &mut CpuBuf<T>,
        x: &CpuBuf<T>,
        w: &CpuBuf<T>,
        w_offset: f32,
        eps: f32,
    ) -> Result<()> {
        let op = "rms_norm_forward";
        let c = w.len();
        let n = rows_of(op, "x", x.len(), c)?;
        expect_len(op, "out", out.len(), x.len(), || format!("[N={n}, C={c}]"))?;
        expect_len(op, "rstd", rstd.len(), n, || format!("[N={n}]"))?;
        self.install(|| {
            norm::rms_norm_forward(
                &mut out.0,
                &mut rstd.0,
                &x.0,
                &w.0,
                T::from_f32(w_offset),
                c,
                T::from_f32(eps),
            )
        });
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        dx: &mut CpuBuf<T>,
        dout: &CpuBuf<T>,
        x: &CpuBuf<T>,
        w: &CpuBuf<T>,
        w_offset: f32,
        rstd: &CpuBuf<T>,
        acc: Accumulate,
    ) -> Result<()> {
        let op = "rms_norm_backward";
        let c = w.len();
        let n = rows_of(op, "x", x.len(), c)?;
        expect_len(op, "dx", dx.len(), x.len(), || format!("[N={n}, C={c}]"))?;
        expect_len(op, "dout", dout.len(), x.len(), || {
            format!("[N={n}, C={c}]")
        })?;
        expect_len(op, "rstd", rstd.len(), n, || format!("[N={n}]"))?;
        let off = T::from_f32(w_offset);
        self.install(|| {
            norm::rms_norm_backward(&mut dx.0, &dout.0, &x.0, &w.0, off, &rstd.0, c, acc)
        });
        Ok(())
    }

    fn layer_norm_forward(
        &self,
        out: &mut CpuBuf<T>,
        mean: &mut CpuBuf<T>,
        rstd: &mut CpuBuf<T>,
        x: &CpuBuf<T>,
        w: &CpuBuf<T>,
        b: &CpuBuf<T>,
        eps: f32,
    ) -> Result<()> {
        let op = "layer_norm_forward";
        let c = w.len();
        let n = rows_of(op, "x", x.len(), c)?;
        expect_len(op, "b", b.len(), c, || format!("[C={c}] (from w)"))?;
        expect_len(op, "out", out.len(), x.len(), || format!("[N={n}, C={c}]"))?;
        expect_len(op, "mean", mean.len(), n, || format!("[N={n}]"))?;
        expect_len(op, "rstd", rstd.len(), n, || format!("[N={n}]"))?;
        self.install(|| {
            norm::layer_norm_forward(
                &mut out.0,
                &mut mean.0,
                &mut rstd.0,
                &x.0,
                &w.0,
                &b.0,
                c,
                T::from_f32(eps),
            )
        });
        Ok(())
    }

    fn layer_norm_backward(
        &self,
        dx: &mut CpuBuf<T>,
        dout: &CpuBuf<T>,
        x: &CpuBuf<T>,
        w: &CpuBuf<T>,
        mean: &CpuBuf<T>,
        rstd: &CpuBuf<T>,
        acc: Accumulate,
    ) -> Result<()> {
        let op = "layer_norm_backward";
        let c = w.len();
        let n = rows_of(op, "x", x.len(), c)?;
        expect_len(op, "dx", dx.len(), x.len(), || format!("[N={n}, C={c}]"))?;
        expect_len(op, "dout", dout.len(), x.len(), || {
            format!("[N={n}, C={c}]")
        })?;
        expect_len(op, "mean", mean.len(), n, || format!("[N={n}]"))?;
        expect_len(op, "rstd", rstd.len(), n, || format!("[N={n}]"))?;
        self.install(|| {
            norm::layer_norm_backward(&mut dx.0, &dout.0, &x.0, &w.0, &mean.0, &rstd.0, c, acc)
        });
        Ok(())
    }

    // ---- rotary position embedding ----------------------------------------------------

    fn rope_forward(
        &self,
        x: &mut CpuBuf<T>,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
    ) -> Result<()> {
        rope_check("rope_forward", x.len(), positions, inv_freq, heads)?;
        self.install(|| rope::rope_forward(&mut x.0, positions, inv_freq, heads));
        Ok(())
    }

    fn rope_backward(
        &self,
        dx: &mut CpuBuf<T>,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
    ) -> Result<()> {
        rope_check("rope_backward", dx.len(), positions, inv_freq, heads)?;
        self.install(|| rope::rope_backward(&mut dx.0, positions, inv_freq, heads));
        Ok(())
    }

    // ---- attention -------------------------------------------------------------------

    fn attention_forward(
        &self,
        out: &mut CpuBuf<T>,
        lse: &mut CpuBuf<T>,
        q: &CpuBuf<T>,
        k: &CpuBuf<T>,
        v: &CpuBuf<T>,
        dims: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        let op = "attention_forward";
        check_key_start(op, &dims, key_start)?;
        let (nq, nkv, nlse) = attn_lens(op, &dims)?;
        let AttnDims {
            batch: b,
            seq: t,
            n_heads: h,
            n_kv_heads: kvh,
            head_dim: d,
            ..
        } = dims;
        let q_shape = || format!("[B={b}, T={t}, H={h}, D={d}]");
        let kv_shape = || format!("[B={b}, T={t}, KVH={kvh}, D={d}]");
        expect_len(op, "out", out.len(), nq, q_shape)?;
        expect_len(op, "q", q.len(), nq, q_shape)?;
        expect_len(op, "k", k.len(), nkv, kv_shape)?;
        expect_len(op, "v", v.len(), nkv, kv_shape)?;
        expect_len(op, "lse", lse.len(), nlse, || {
            format!("[B={b}, H={h}, T={t}]")
        })?;
        self.install(|| {
            attention::attention_forward(&mut out.0, &mut lse.0, &q.0, &k.0, &v.0, &dims, key_start)
        });
        Ok(())
    }

    fn attention_backward(
        &self,
        dq: &mut CpuBuf<T>,
        dk: &mut CpuBuf<T>,
        dv: &mut CpuBuf<T>,
        dout: &CpuBuf<T>,
        out: &CpuBuf<T>,
        lse: &CpuBuf<T>,
        q: &CpuBuf<T>,
        k: &CpuBuf<T>,
        v: &CpuBuf<T>,
        dims: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        let op = "attention_backward";
        check_key_start(op, &dims, key_start)?;
        let (nq, nkv, nlse) = attn_lens(op, &dims)?;
        let AttnDims {
            batch: b,
            seq: t,
            n_heads: h,
            n_kv_heads: kvh,
            head_dim: d,
            ..
        } = dims;
        let q_shape = || format!("[B={b}, T={t}, H={h}, D={d}]");
        let kv_shape = || format!("[B={b}, T={t}, KVH={kvh}, D={d}]");
        for (what, len) in [
            ("dq", dq.len()),
            ("dout", dout.len()),
            ("out", out.len()),
            ("q", q.len()),
        ] {
            expect_len(op, what, len, nq, q_shape)?;
        }
        for (what, len) in [
            ("dk", dk.len()),
            ("dv", dv.len()),
            ("k", k.len()),
            ("v", v.len()),
        ] {
            expect_len(op, what, len, nkv, kv_shape)?;
        }
        expect_len(op, "lse", lse.len(), nlse, || {
            format!("[B={b}, H={h}, T={t}]")
        })?;
        self.install(|| {
            attention::attention_backward(
                &mut dq.0, &mut dk.0, &mut dv.0, &dout.0, &out.0, &lse.0, &q.0, &k.0, &v.0, &dims,
                key_start,
            )
        });
        Ok(())
    }

    fn attention_decode(
        &self,
        out: &mut CpuBuf<T>,
        q: &CpuBuf<T>,
        k_cache: &CpuBuf<T>,
        v_cache: &CpuBuf<T>,
        dims: DecodeDims,
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        dims.check(
            "cpu",
            [
                ("out", out.len()),
                ("q", q.len()),
                ("k_cache", k_cache.len()),
                ("v_cache", v_cache.len()),
            ],
            key_start,
        )?;
        self.install(|| {
            attention::attention_decode(&mut out.0, &q.0, &k_cache.0, &v_cache.0, &dims, key_start)
        });
        Ok(())
    }

    // ---- MLP activations -------------------------------------------------------------

    fn gated_forward(
        &self,
        act: Activation,
        out: &mut CpuBuf<T>,
        gate: &CpuBuf<T>,
        up: &CpuBuf<T>,
    ) -> Result<()> {
        let op = "gated_forward";
        same_len(op, ("out", out.len()), ("gate", gate.len()))?;
        same_len(op, ("up", up.len()), ("gate", gate.len()))?;
        self.install(|| activation::gated_forward(act, &mut out.0, &gate.0, &up.0));
        Ok(())
    }

    fn gated_backward(
        &self,
        act: Activation,
        dgate: &mut CpuBuf<T>,
        dup: &mut CpuBuf<T>,
        dout: &CpuBuf<T>,
        gate: &CpuBuf<T>,
        up: &CpuBuf<T>,
    ) -> Result<()> {
        let op = "gated_backward";
        for (what, len) in [
            ("dgate", dgate.len()),
            ("dup", dup.len()),
            ("dout", dout.len()),
            ("up", up.len()),
        ] {
            same_len(op, (what, len), ("gate", gate.len()))?;
        }
        self.install(|| {
            activation::gated_backward(act, &mut dgate.0, &mut dup.0, &dout.0, &gate.0, &up.0)
        });
        Ok(())
    }

    fn gelu_forward(&self, out: &mut CpuBuf<T>, x: &CpuBuf<T>) -> Result<()> {
        same_len("gelu_forward", ("out", out.len()), ("x", x.len()))?;
        self.install(|| activation::gelu_forward(&mut out.0, &x.0));
        Ok(())
    }

    fn gelu_backward(&self, dx: &mut CpuBuf<T>, dout: &CpuBuf<T>, x: &CpuBuf<T>) -> Result<()> {
        let op = "gelu_backward";
        same_len(op, ("dx", dx.len()), ("x", x.len()))?;
        same_len(op, ("dout", dout.len()), ("x", x.len()))?;
        self.install(|| activation::gelu_backward(&mut dx.0, &dout.0, &x.0));
        Ok(())
    }

    // ---- dropout (LoRA input) --------------------------------------------------------

    fn dropout_forward(
        &self,
        out: &mut CpuBuf<T>,
        x: &CpuBuf<T>,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Result<()> {
        let op = "dropout_forward";
        dropout_check(op, p)?;
        same_len(op, ("out", out.len()), ("x", x.len()))?;
        self.install(|| activation::dropout(&mut out.0, &x.0, p, seed, offset));
        Ok(())
    }

    fn dropout_backward(
        &self,
        dx: &mut CpuBuf<T>,
        dout: &CpuBuf<T>,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Result<()> {
        let op = "dropout_backward";
        dropout_check(op, p)?;
        same_len(op, ("dx", dx.len()), ("dout", dout.len()))?;
        // out = mask·x/(1 − p) is linear in x, so dx = mask·dout/(1 − p): the same kernel.
        self.install(|| activation::dropout(&mut dx.0, &dout.0, p, seed, offset));
        Ok(())
    }

    // ---- LM head + loss --------------------------------------------------------------

    fn lm_head_loss(
        &self,
        h: &CpuBuf<T>,
        w: &CpuBuf<T>,
        labels: &[i32],
        c: usize,
        loss_scale: f32,
        softcap: Option<f32>,
        dh: Option<&mut CpuBuf<T>>,
        logits: Option<&mut CpuBuf<T>>,
    ) -> Result<LossSum> {
        let op = "lm_head_loss";
        softcap_check(op, softcap)?;
        let v = rows_of(op, "w", w.len(), c)?;
        let n = labels.len();
        let h_shape = || format!("[N={n} (labels), C={c}]");
        expect_len(op, "h", h.len(), numel(op, &[n, c])?, h_shape)?;
        if let Some(dh) = &dh {
            expect_len(op, "dh", dh.len(), h.len(), h_shape)?;
        }
        if let Some(lg) = &logits {
            expect_len(op, "logits", lg.len(), numel(op, &[n, v])?, || {
                format!("[N={n}, V={v}]")
            })?;
        }
        let bad = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l != IGNORE_INDEX && !(0..v as i64).contains(&(l as i64)));
        if let Some((i, &l)) = bad {
            return Err(fail(
                op,
                format!(
                    "label {l} at position {i} is outside 0..{v} (vocabulary) and is not the ignore index {IGNORE_INDEX}"
                ),
            ));
        }
        let dh = dh.map(|b| b.0.as_mut_slice());
        let logits = logits.map(|b| b.0.as_mut_slice());
        Ok(self.install(|| {
            loss::lm_head_loss(
                &h.0,
                &w.0,
                labels,
                c,
                T::from_f32(loss_scale),
                softcap.map(T::from_f32),
                dh,
                logits,
            )
        }))
    }

    fn dequantize_nf4(&self, q: &Nf4Parts<'_, Self>, dtype: DType) -> Result<CpuBuf<T>> {
        let op = "dequantize_nf4";
        nf4_check(
            op,
            q.numel,
            q.blocksize,
            (q.packed.len(), q.absmax.len(), q.code.len()),
            q.nested
                .as_ref()
                .map(|n| (n.absmax.len(), n.code.len(), n.blocksize)),
        )?;
        let nested = q.nested.as_ref().map(|n| quant::Nested {
            absmax: &n.absmax.0,
            code: &n.code.0,
            blocksize: n.blocksize,
            offset: n.offset,
        });
        let mut out = CpuBuf(vec![T::zero(); q.numel]);
        self.install(|| {
            quant::dequantize_nf4(
                &mut out.0,
                &q.packed.0,
                &q.absmax.0,
                &q.code.0,
                nested.as_ref(),
                q.blocksize,
                dtype,
            )
        });
        Ok(out)
    }

    fn dequantize_fp8(&self, q: &Fp8Parts<'_, Self>, dtype: DType) -> Result<CpuBuf<T>> {
        let op = "dequantize_fp8";
        fp8_check(op, q.rows, q.cols, q.codes.len(), q.scale_inv.len())?;
        let mut out = CpuBuf(vec![T::zero(); q.rows * q.cols]);
        self.install(|| {
            quant::dequantize_fp8(&mut out.0, &q.codes.0, &q.scale_inv.0, q.cols, dtype)
        });
        Ok(out)
    }

    fn softcap(&self, x: &mut CpuBuf<T>, cap: f32) -> Result<()> {
        softcap_check("softcap", Some(cap))?;
        self.install(|| loss::softcap_in_place(&mut x.0, T::from_f32(cap)));
        Ok(())
    }

    // ---- optimizers ------------------------------------------------------------------

    fn adamw_step(
        &self,
        p: &mut CpuBuf<T>,
        g: &CpuBuf<T>,
        m: &mut CpuBuf<T>,
        v: &mut CpuBuf<T>,
        h: AdamWStep,
    ) -> Result<()> {
        let op = "adamw_step";
        if h.step == 0 {
            return Err(fail(op, "step counts from 1, got 0"));
        }
        for (what, len) in [("g", g.len()), ("m", m.len()), ("v", v.len())] {
            same_len(op, (what, len), ("p", p.len()))?;
        }
        self.install(|| optim::adamw_step(&mut p.0, &g.0, &mut m.0, &mut v.0, &h));
        Ok(())
    }

    fn sgd_step(
        &self,
        p: &mut CpuBuf<T>,
        g: &CpuBuf<T>,
        buf: &mut CpuBuf<T>,
        h: SgdStep,
    ) -> Result<()> {
        let op = "sgd_step";
        same_len(op, ("g", g.len()), ("p", p.len()))?;
        same_len(op, ("buf", buf.len()), ("p", p.len()))?;
        self.install(|| optim::sgd_step(&mut p.0, &g.0, &mut buf.0, &h));
        Ok(())
    }
}
