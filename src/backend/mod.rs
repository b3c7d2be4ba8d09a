//! The backend boundary: device memory and the fused ops that model code is written
//! against (ARCHITECTURE.md §6). Model and trainer code is generic over [`Backend`], so
//! a new device (CUDA) slots in without touching them.
//!
//! Conventions, shared by every op (after llm.c):
//! * Buffers are contiguous, row-major, logically f32. A backend may store frozen weights
//!   in a narrower type (see [`Backend::upload_weight`]); activations, LoRA parameters,
//!   gradients and optimizer state are f32 (or wider on the f64 reference backend).
//! * Argument order: outputs first, then saved buffers, then inputs and weights, then
//!   dimensions. Gradients are named `d…`.
//! * Parameter gradients accumulate (`+=`); activation gradients overwrite unless the op
//!   takes an [`Accumulate`] argument (the residual stream).
//! * Shapes use B = batch, T = sequence, N = B·T tokens, C = channels, H = query heads,
//!   KVH = key/value heads, D = head dimension, V = vocabulary, R = LoRA rank.

pub mod cpu;
/// The CUDA backend; without the `cuda` feature a stand-in whose constructors explain how
/// to get it.
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(not(feature = "cuda"))]
#[path = "cuda_stub.rs"]
pub mod cuda;
pub mod cuda_options;

use crate::error::Result;

pub use crate::types::{DType, IGNORE_INDEX};

/// GPU time spent in one kind of work over a profiled interval (see
/// `CudaOptions::profile`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ProfileLine {
    /// The kernel name, or `gemm half` / `gemm f32 …` (cuBLAS), `memset`; or per phase
    /// of the step, `busy: <phase>` (the sum of its timed regions) and `idle: <phase>`
    /// (the compute stream waiting between them: for a weight copy, an offloaded
    /// activation or the host).
    pub label: String,
    pub calls: u64,
    pub ms: f64,
}

/// The activation of an MLP: of the gate in a gated MLP, of the whole first linear's output
/// in a plain one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x · σ(x)` (Llama's SwiGLU).
    Silu,
    /// GELU, tanh approximation: `½x(1 + tanh(√(2/π)(x + 0.044715x³)))` (GPT-2's
    /// `gelu_new`, Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// A frozen weight of `numel` elements stored in NF4 as bitsandbytes stores it, on the
/// device: `packed` codes (two a byte, the first element in the high nibble) of the
/// row-major weight, one scale per block of `blocksize` elements, `code` the 16 NF4
/// values. The scales are f32 (`absmax`), or with double quantization 8-bit codes of
/// `nested.code` scaled per block of `nested.blocksize` scales and shifted by
/// `nested.offset`. The buffers are stored bytes (`DType::U8`) and f32 values as the
/// file holds them.
pub struct Nf4Parts<'a, B: ?Sized + Backend> {
    pub packed: &'a B::Buf,
    pub absmax: &'a B::Buf,
    pub code: &'a B::Buf,
    pub nested: Option<Nf4Nested<'a, B>>,
    pub numel: usize,
    pub blocksize: usize,
}

/// The second level of NF4's double quantization.
pub struct Nf4Nested<'a, B: ?Sized + Backend> {
    /// f32 scale per block of `blocksize` first-level scales.
    pub absmax: &'a B::Buf,
    /// The 256 values of the signed 8-bit dynamic map.
    pub code: &'a B::Buf,
    pub blocksize: usize,
    pub offset: f32,
}

/// A frozen `[rows, cols]` weight stored in FP8 E4M3 with 128 × 128 block scales
/// (DeepSeek-V3 / Qwen3-FP8 checkpoints), on the device: `codes` the E4M3 values
/// (`DType::F8E4M3`; the CPU backend holds their exact values), `scale_inv` the f32
/// scale of each block, `[⌈rows/128⌉, ⌈cols/128⌉]` row-major.
pub struct Fp8Parts<'a, B: ?Sized + Backend> {
    pub codes: &'a B::Buf,
    pub scale_inv: &'a B::Buf,
    pub rows: usize,
    pub cols: usize,
}

/// Why buffers of `codes` and `scales` elements cannot be the parts of an FP8 weight of
/// `[rows, cols]`. For the backends' messages.
pub(crate) fn fp8_problem(rows: usize, cols: usize, codes: usize, scales: usize) -> Option<String> {
    let [br, bc] = crate::quant::fp8::scale_shape(rows, cols);
    if codes != rows * cols {
        return Some(format!("{codes} FP8 codes for a [{rows}, {cols}] weight"));
    }
    if scales != br * bc {
        return Some(format!(
            "{scales} scales for a [{rows}, {cols}] weight in 128 × 128 blocks (need {br} × {bc})"
        ));
    }
    None
}

/// Why the buffers of an NF4 weight of `numel` elements in blocks of `blocksize` cannot
/// be its parts: `lens` are those of (packed, absmax, code), `nested` those of the
/// second level's (absmax, code) and its block size. For the backends' messages.
pub(crate) fn nf4_problem(
    numel: usize,
    blocksize: usize,
    lens: (usize, usize, usize),
    nested: Option<(usize, usize, usize)>,
) -> Option<String> {
    if blocksize == 0 {
        return Some("NF4 block size 0".into());
    }
    let blocks = numel.div_ceil(blocksize);
    let (packed, absmax, code) = lens;
    if packed != numel.div_ceil(2) {
        return Some(format!(
            "{packed} packed bytes for {numel} NF4 values (need {})",
            numel.div_ceil(2)
        ));
    }
    if absmax != blocks {
        return Some(format!(
            "{absmax} scales for {blocks} blocks of {blocksize}"
        ));
    }
    if code != 16 {
        return Some(format!("an NF4 code table of {code} values (need 16)"));
    }
    if let Some((n_absmax, n_code, n_bs)) = nested {
        if n_bs == 0 || n_absmax != blocks.div_ceil(n_bs) {
            return Some(format!(
                "{n_absmax} second-level scales for {blocks} scales in blocks of {n_bs}"
            ));
        }
        if n_code != 256 {
            return Some(format!(
                "a second-level code table of {n_code} values (need 256)"
            ));
        }
    }
    None
}

/// Why `cap` cannot be a soft-cap (it must be a positive finite number), for the backends'
/// messages.
pub(crate) fn softcap_problem(cap: Option<f32>) -> Option<String> {
    cap.filter(|c| !(c.is_finite() && *c > 0.0))
        .map(|c| format!("soft-cap {c} is not a positive finite number"))
}

/// Whether an op overwrites its output or adds into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    /// `out = result`
    Overwrite,
    /// `out += result`
    Add,
}

/// Which of `len` operands product `i` of a [`Backend::matmul_group`] of `count` reads:
/// the one operand they share, or its own.
pub fn group_operand(len: usize, count: usize, i: usize) -> Result<usize> {
    match len {
        1 => Ok(0),
        n if n == count => Ok(i),
        n => Err(crate::error::Error::internal(format!(
            "matmul_group: {n} operands for {count} outputs"
        ))),
    }
}

/// One GEMM, row-major: `C[m×n] (=|+=) alpha · op(A)[m×k] · op(B)[k×n]`.
/// `op(A)` is A itself (stored `[m, k]`) or, with `trans_a`, Aᵀ of A stored `[k, m]`;
/// likewise B is stored `[k, n]` or, with `trans_b`, `[n, k]`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub accumulate: Accumulate,
}

/// The angles of a RoPE rotation: token `i` of a call is rotated by
/// `positions[i] · inv_freq[j]` ([`Backend::rope_forward`]).
#[derive(Clone, Copy, Debug)]
pub struct RopeAngles<'a> {
    pub positions: &'a [u32],
    pub inv_freq: &'a [f32],
}

/// Shapes of a causal self-attention call. q, out: `[B, T, H, D]`; k, v: `[B, T, KVH, D]`;
/// lse (the saved log-sum-exp of each score row): `[B, H, T]`. Query head h reads key/value
/// head `h / (H / KVH)` (grouped-query attention).
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of q·k, usually 1/√D.
    pub scale: f32,
}

/// Shapes of attention of new queries against a key/value cache (inference with a KV
/// cache). q, out: `[B, Tq, H, D]`; k_cache, v_cache: `[B, cap, KVH, D]`, of which the
/// first `kv_len` positions of each row hold keys and values, the last `Tq` of them those
/// of the new tokens. Query i of a row sits at position `p = kv_len − Tq + i` and attends
/// (causally) to keys `key_start[b] ..= p`, where `key_start` (`[B]`, optional, default 0)
/// skips a row's left padding; a query before `key_start[b]` (a padding token itself)
/// attends to itself only, so its (unused) output stays finite.
#[derive(Clone, Copy, Debug)]
pub struct DecodeDims {
    pub batch: usize,
    /// New queries per row, Tq ≥ 1.
    pub q_len: usize,
    /// Positions the cache holds per row (its capacity).
    pub cap: usize,
    /// Positions filled, the new ones included: Tq ≤ kv_len ≤ cap.
    pub kv_len: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of q·k, usually 1/√D.
    pub scale: f32,
}

impl DecodeDims {
    /// Check the dimensions and the buffer lengths (q/out, cache) of
    /// [`Backend::attention_decode`]; errors name the backend and the op.
    pub fn check(
        &self,
        backend: &'static str,
        lens: [(&str, usize); 4],
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        let op = "attention_decode";
        let fail = |msg: String| crate::error::Error::Backend { backend, op, msg };
        let d = self;
        if d.head_dim == 0 || d.n_kv_heads == 0 || !d.n_heads.is_multiple_of(d.n_kv_heads) {
            return Err(fail(format!(
                "head_dim {} must be positive and n_heads {} a multiple of n_kv_heads {}",
                d.head_dim, d.n_heads, d.n_kv_heads
            )));
        }
        if d.q_len == 0 || d.q_len > d.kv_len || d.kv_len > d.cap {
            return Err(fail(format!(
                "need 1 ≤ q_len ≤ kv_len ≤ cap, got q_len {}, kv_len {}, cap {}",
                d.q_len, d.kv_len, d.cap
            )));
        }
        let mul = |a: &[usize]| {
            a.iter()
                .try_fold(1usize, |x, &y| x.checked_mul(y))
                .ok_or_else(|| fail(format!("shape {a:?} overflows")))
        };
        let nq = mul(&[d.batch, d.q_len, d.n_heads, d.head_dim])?;
        let nkv = mul(&[d.batch, d.cap, d.n_kv_heads, d.head_dim])?;
        for (i, (what, len)) in lens.into_iter().enumerate() {
            let (want, shape) = if i < 2 {
                (
                    nq,
                    format!(
                        "[B={}, Tq={}, H={}, D={}]",
                        d.batch, d.q_len, d.n_heads, d.head_dim
                    ),
                )
            } else {
                (
                    nkv,
                    format!(
                        "[B={}, cap={}, KVH={}, D={}]",
                        d.batch, d.cap, d.n_kv_heads, d.head_dim
                    ),
                )
            };
            if len != want {
                return Err(fail(format!(
                    "{what} has {len} elements, expected {want} = {shape}"
                )));
            }
        }
        if let Some(ks) = key_start
            && ks.len() != d.batch
        {
            return Err(fail(format!(
                "key_start has {} entries, expected one per row (B = {})",
                ks.len(),
                d.batch
            )));
        }
        Ok(())
    }
}

/// [`Backend::attention_decode`] on the host, for any backend: check, download q and the
/// caches, compute in f32 (the CPU kernel), upload the result into `out`. The trait's
/// default body; public so that tests can compare a backend's own kernel with it.
pub fn attention_decode_on_host<B: Backend + ?Sized>(
    be: &B,
    out: &mut B::Buf,
    q: &B::Buf,
    k_cache: &B::Buf,
    v_cache: &B::Buf,
    dims: DecodeDims,
    key_start: Option<&[u32]>,
) -> Result<()> {
    dims.check(
        be.name(),
        [
            ("out", out.len()),
            ("q", q.len()),
            ("k_cache", k_cache.len()),
            ("v_cache", v_cache.len()),
        ],
        key_start,
    )?;
    let (qh, kh, vh) = (
        be.download(q)?,
        be.download(k_cache)?,
        be.download(v_cache)?,
    );
    let mut oh = vec![0f32; qh.len()];
    cpu::attention::attention_decode(&mut oh, &qh, &kh, &vh, &dims, key_start);
    *out = be.upload(&oh)?;
    Ok(())
}

/// Hyper-parameters of one AdamW update (PyTorch semantics: decoupled weight decay,
/// bias correction, eps outside the square root). `step` counts from 1.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

/// Hyper-parameters of one SGD update (PyTorch semantics, dampening 0, no Nesterov):
/// `d = g + wd·p; buf = first ? d : momentum·buf + d; p -= lr·buf`.
#[derive(Clone, Copy, Debug)]
pub struct SgdStep {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    /// True on the first update, when the momentum buffer is initialised from the gradient.
    pub first: bool,
}

/// One tensor of a multi-tensor AdamW update ([`Backend::adamw_step_all`]): parameter p,
/// gradient g and moments m, v, all of one length.
pub struct AdamWItem<'a, B: ?Sized + Backend> {
    pub p: &'a mut B::Buf,
    pub g: &'a B::Buf,
    pub m: &'a mut B::Buf,
    pub v: &'a mut B::Buf,
}

/// One tensor of a multi-tensor SGD update ([`Backend::sgd_step_all`]): parameter p,
/// gradient g and momentum buffer, all of one length.
pub struct SgdItem<'a, B: ?Sized + Backend> {
    pub p: &'a mut B::Buf,
    pub g: &'a B::Buf,
    pub buf: &'a mut B::Buf,
}

/// Result of the fused LM head + cross-entropy.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LossSum {
    /// Sum of per-token cross-entropy over counted tokens (label != -100).
    pub sum: f64,
    /// Number of counted tokens.
    pub count: usize,
}

/// Whether element `i` survives dropout with probability `p` under `seed`. A pure
/// counter-based hash (splitmix64), so every backend draws the same mask and a recomputed
/// forward (gradient checkpointing) draws it again without storing it.
#[inline]
pub fn dropout_keep(seed: u64, i: u64, p: f32) -> bool {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // 24 high bits → uniform in [0, 1)
    let u = (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
    u >= p
}

/// A buffer owned by a backend.
pub trait DeviceBuf: Send + Sync {
    /// Number of elements.
    fn len(&self) -> usize;
    /// True when the buffer holds no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes the elements occupy.
    fn bytes(&self) -> usize;
    /// Address of the first element, for sharing the memory with another library
    /// (DLPack): a host address on the CPU, a device address on CUDA. It stays valid
    /// while the buffer lives; ops write into a buffer in place and never move it.
    fn address(&self) -> usize;
}

/// A compute device: owns memory and runs the fused ops. Every op checks that its buffers
/// have the lengths its dimensions imply and reports the op's name when they do not.
pub trait Backend: Send + Sync + 'static {
    /// Device memory holding a contiguous array.
    type Buf: DeviceBuf;
    /// A saved activation moved off the device between a layer's forward and its backward
    /// (activation offloading); on the CPU simply the buffer.
    type Parked: Send;

    /// Short name for messages ("cpu", "cuda").
    fn name(&self) -> &'static str;

    /// Profiling hint: the work queued from now on belongs to `phase` of a step
    /// ("forward", "backward", …). Backends that do not profile ignore it.
    fn profile_phase(&self, _phase: &'static str) {}

    // ---- step graphs (CUDA graphs; `backend/cuda/graph.rs`) ---------------------------

    /// Start capturing the device work of one step whose inputs `key` names: until
    /// [`Backend::step_graph_end`], ops only record. False (the default) where the backend
    /// does not capture; then nothing changes.
    fn step_graph_begin(&self, _key: u64) -> Result<bool> {
        Ok(false)
    }
    /// End the capture. With `ok` (the step's host code succeeded) run the captured work
    /// once and return the step's loss, which the captured `lm_head_loss` could not read
    /// back. None: the capture was dropped and nothing of it ran. The step's inputs, what
    /// depends on its tokens, are given as the step uploaded them: the embedding rows
    /// (`upload_with`) and the shifted labels (`lm_head_loss`); a replay takes new ones.
    fn step_graph_end(
        &self,
        _ok: bool,
        _embedded: &[f32],
        _labels: &[i32],
    ) -> Result<Option<LossSum>> {
        Ok(None)
    }
    /// Run the step captured under `key` again with new inputs (`embed` writes the
    /// embedding rows where the graph's upload reads them; the parameters as they are
    /// now) and return its loss; None when no such step is held.
    fn step_graph_replay(
        &self,
        _key: u64,
        _embed: &mut dyn FnMut(&mut [f32]) -> Result<()>,
        _labels: &[i32],
    ) -> Result<Option<LossSum>> {
        Ok(None)
    }
    /// Steps replayed so far, and why the last capture was not kept; None where the
    /// backend has no step graphs.
    fn step_graph_report(&self) -> Option<(u64, Option<String>)> {
        None
    }

    /// Device bytes new buffers can still take: free device memory plus what the
    /// backend's pool holds unused (CUDA). For choosing a sequence tile; None where the
    /// device's memory is the host's (the CPU).
    fn free_memory(&self) -> Option<u64> {
        None
    }

    // ---- memory ----------------------------------------------------------------------

    /// A new buffer of `n` zeros.
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// A new buffer of `n` elements whose contents are unspecified: every element must be
    /// written before it is read. For outputs that the next op overwrites completely — a
    /// GEMM with [`Accumulate::Overwrite`], an elementwise or per-row kernel, an op whose
    /// output is documented as overwritten — it saves the memset of [`Backend::zeros`].
    /// Never for a buffer that is accumulated into (`Accumulate::Add`, parameter
    /// gradients) or only partly written. The CPU returns zeros; CUDA returns memory as
    /// allocated, or NaN everywhere with `CudaOptions::poison_uninit`, so that a read
    /// before a write shows up in tests.
    fn uninit(&self, n: usize) -> Result<Self::Buf>;
    /// `x` rounded to the type in which GEMMs with the weight `w` read their activations,
    /// when that is narrower than `x` (CUDA: f32 → bf16/f16 for a half weight), so that
    /// several GEMMs can share one rounded copy; `None` when GEMMs read `x` as it is. A
    /// GEMM given the copy computes exactly what it computes given `x`.
    fn gemm_input(&self, _x: &Self::Buf, _w: &Self::Buf) -> Result<Option<Self::Buf>> {
        Ok(None)
    }
    /// [`Backend::gemm_input`] of every pair `(x, w)`, in order: a backend may round them
    /// all in one launch (CUDA) instead of one each (a block's LoRA matrices).
    fn gemm_input_all(&self, pairs: &[(&Self::Buf, &Self::Buf)]) -> Result<Vec<Option<Self::Buf>>> {
        pairs.iter().map(|(x, w)| self.gemm_input(x, w)).collect()
    }
    /// A new buffer of `n` elements for an output that only GEMMs beside the weight `w`
    /// read — of an [`Accumulate::Overwrite`] GEMM (the LoRA intermediates), or of the ops
    /// that say they take one (RMSNorm, the gated MLP): in the type
    /// those GEMMs read activations in ([`Backend::gemm_input`]; CUDA: `w`'s half type for
    /// a half `w`), so the GEMM rounds its f32 result once as it stores it and no cast
    /// follows. Unspecified contents, as [`Backend::uninit`] (the default).
    fn gemm_output(&self, n: usize, _w: &Self::Buf) -> Result<Self::Buf> {
        self.uninit(n)
    }
    /// `count` buffers as [`Backend::gemm_output`] makes them, for the outputs of one
    /// [`Backend::matmul_group`] (CUDA: consecutive in one allocation).
    fn gemm_output_group(&self, n: usize, count: usize, w: &Self::Buf) -> Result<Vec<Self::Buf>> {
        (0..count).map(|_| self.gemm_output(n, w)).collect()
    }
    /// Zeroed f32 buffers of `lens[i]` elements (CUDA: consecutive in one allocation, so
    /// that the gradients of one block's LoRA matrices of one shape lie at one stride).
    fn zeros_group(&self, lens: &[usize]) -> Result<Vec<Self::Buf>> {
        lens.iter().map(|&n| self.zeros(n)).collect()
    }
    /// `x` as f32: a copy that [`Backend::gemm_input`] rounded to a half type widened
    /// back (exactly: every half value is an f32), or an f32 buffer copied. For block
    /// inputs parked in half precision (`LemaConfig::offload_activations_half`). The
    /// default goes through the host; backends with half buffers override it.
    fn widen(&self, x: &Self::Buf) -> Result<Self::Buf> {
        self.upload(&self.download(x)?)
    }
    /// True when `x` is stored in a half type narrower than the f32 that ops other than
    /// GEMMs read (a [`Backend::gemm_input`] copy); such a buffer is read through
    /// [`Backend::widen`]. Backends whose buffers are all of one type: false.
    fn is_half(&self, _x: &Self::Buf) -> bool {
        false
    }
    /// A new buffer of `n` elements of `like`'s element type (f32 or a half type), with
    /// unspecified contents as [`Backend::uninit`] (the default, for backends whose
    /// buffers are all of one type).
    fn uninit_like(&self, n: usize, _like: &Self::Buf) -> Result<Self::Buf> {
        self.uninit(n)
    }
    /// `dst[dst_off..dst_off + len] = src[src_off..src_off + len]`, flat element ranges of
    /// two buffers of one element type (f32 or a half type: tiles of an activation stored
    /// in half precision, [`Backend::attention_operand`]). The default is a one-row
    /// [`Backend::copy_cols`].
    fn copy_range(
        &self,
        dst: &mut Self::Buf,
        dst_off: usize,
        src: &Self::Buf,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        let (dst_len, src_len) = (dst.len(), src.len());
        self.copy_cols(
            dst,
            dst_len,
            dst_off,
            src,
            src_len,
            src_off,
            len,
            Accumulate::Overwrite,
        )
    }
    /// A new buffer of `n` f32 zeros that ops use like any other but that lives in host
    /// memory the device reads and writes over the bus (CUDA: page-locked host memory
    /// mapped into the device's address space): no device memory, but every access crosses
    /// PCIe, so it is meant for state touched once per step (optimizer moments, see
    /// `LemaConfig::offload_optimizer`). Backends without a separate device memory (the
    /// CPU) return an ordinary buffer, as [`Backend::zeros`].
    fn zeros_host(&self, n: usize) -> Result<Self::Buf>;
    /// A new buffer holding `data`.
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    /// A new buffer of `n` values that `fill` writes on the host (every element; the
    /// slice's contents on entry are unspecified): the step's input activations, gathered
    /// straight into memory the device copies from (CUDA: a reused page-locked staging
    /// buffer, copied asynchronously) instead of a fresh host vector uploaded from
    /// pageable memory. The default fills a vector and uploads it.
    fn upload_with(
        &self,
        n: usize,
        fill: &mut dyn FnMut(&mut [f32]) -> Result<()>,
    ) -> Result<Self::Buf> {
        let mut v = vec![0.0f32; n];
        fill(&mut v)?;
        self.upload(&v)
    }
    /// A frozen weight from its stored little-endian bytes; the backend chooses its storage
    /// type (the CPU decodes to its compute type; CUDA keeps bf16/f16 for the GEMMs).
    fn upload_weight(&self, bytes: &[u8], dtype: DType) -> Result<Self::Buf>;
    /// The buffer's contents as f32.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Set every element to zero.
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()>;
    /// [`Backend::fill_zero`] of every buffer of `bufs` (a step's gradients): a backend
    /// may zero them all in one launch (CUDA) instead of one each.
    fn fill_zero_all(&self, bufs: &mut [&mut Self::Buf]) -> Result<()> {
        bufs.iter_mut().try_for_each(|b| self.fill_zero(b))
    }
    /// Wait until all queued work is done.
    fn synchronize(&self) -> Result<()>;
    /// Move `buf` off the device (CUDA: to pinned host memory, asynchronously); its
    /// device memory is released once the copy is done.
    fn park(&self, buf: Self::Buf) -> Result<Self::Parked>;
    /// Bring a parked buffer back to the device, exactly as it was.
    fn unpark(&self, parked: Self::Parked) -> Result<Self::Buf>;
    /// Start bringing a parked buffer back now, so that a later [`Backend::unpark`] finds
    /// it on the device (CUDA: the copy runs on its own stream, overlapped with the work
    /// queued before that unpark). Optional: unpark works without it.
    fn prefetch(&self, _parked: &mut Self::Parked) -> Result<()> {
        Ok(())
    }
    /// A new buffer holding `data` at the backend's full precision, so that the f64
    /// reference backend can take finite-difference perturbations that f32 would round
    /// away. Backends that compute in f32 round to f32 (the default).
    fn upload_f64(&self, data: &[f64]) -> Result<Self::Buf> {
        let narrow: Vec<f32> = data.iter().map(|&x| x as f32).collect();
        self.upload(&narrow)
    }
    /// The buffer's contents as f64, exactly on the f64 reference backend (the default
    /// widens [`Backend::download`]).
    fn download_f64(&self, buf: &Self::Buf) -> Result<Vec<f64>> {
        Ok(self.download(buf)?.into_iter().map(f64::from).collect())
    }

    // ---- linear algebra --------------------------------------------------------------

    /// `c (=|+=) alpha · op(a) · op(b)`, see [`Gemm`].
    fn matmul(&self, c: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, g: Gemm) -> Result<()>;
    /// One GEMM of one shape for every `cs[i]`: `cs[i] (=|+=) alpha · op(a_i) · op(b_i)`,
    /// where `a_i` is `a[i]`, or `a[0]` for every i when `a` has one element (an operand
    /// the group shares); likewise `b`. The LoRA products of linears that read one input
    /// (q, k, v; gate, up). Each product is the one [`Backend::matmul`] would make, to the
    /// rounding of the kernel that runs it. The default runs them one by one; CUDA runs
    /// them in one launch when both factors are of one half type and the operands that
    /// differ lie at one stride
    /// ([`Backend::gemm_output_group`], [`Backend::zeros_group`]).
    fn matmul_group(
        &self,
        cs: &mut [&mut Self::Buf],
        a: &[&Self::Buf],
        b: &[&Self::Buf],
        g: Gemm,
    ) -> Result<()> {
        let count = cs.len();
        for (i, c) in cs.iter_mut().enumerate() {
            let (ia, ib) = (
                group_operand(a.len(), count, i)?,
                group_operand(b.len(), count, i)?,
            );
            self.matmul(c, a[ia], b[ib], g)?;
        }
        Ok(())
    }
    /// `y (=|+=) alpha · x`, elementwise over the whole buffers.
    fn axpy(&self, y: &mut Self::Buf, alpha: f32, x: &Self::Buf, acc: Accumulate) -> Result<()>;
    /// `x[r, :] += b` for every row r of x `[rows, b.len()]`.
    fn add_bias(&self, x: &mut Self::Buf, b: &Self::Buf) -> Result<()>;
    /// Column block copy: `dst[r, dst_off..dst_off+width] (=|+=) src[r, src_off..src_off+width]`
    /// for r in 0..rows, where dst has `dst_cols` columns and src `src_cols`.
    #[allow(clippy::too_many_arguments)]
    fn copy_cols(
        &self,
        dst: &mut Self::Buf,
        dst_cols: usize,
        dst_off: usize,
        src: &Self::Buf,
        src_cols: usize,
        src_off: usize,
        width: usize,
        acc: Accumulate,
    ) -> Result<()>;
    /// Sum of squares of all elements, accumulated in f64 (for gradient clipping).
    fn sum_squares(&self, x: &Self::Buf) -> Result<f64>;
    /// The sum over `xs` of [`Backend::sum_squares`], added in order, bit for bit (a
    /// backend may compute them in one launch and read them back at once).
    fn sum_squares_all(&self, xs: &[&Self::Buf]) -> Result<f64> {
        xs.iter()
            .try_fold(0.0, |acc, x| Ok(acc + self.sum_squares(x)?))
    }

    // ---- embedding -------------------------------------------------------------------

    /// `out[i, :] (=|+=) table[ids[i], :]`; out `[N, C]`, table `[V, C]`. An id ≥ V is an
    /// error that quotes the id. (Embeddings are frozen: no backward.)
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        ids: &[u32],
        table: &Self::Buf,
        c: usize,
        acc: Accumulate,
    ) -> Result<()>;

    // ---- normalisation ---------------------------------------------------------------

    /// RMSNorm over rows of x `[N, C]`: `out = x · rstd · (w_offset + w)`,
    /// `rstd[i] = 1/√(mean(x²)+eps)` saved for the backward. `w_offset` is 0 for the usual
    /// RMSNorm and 1 for Gemma's `(1 + w)`, added in f32 as transformers does. `out` may
    /// be a buffer of [`Backend::gemm_output`] (computed in f32, rounded as stored).
    fn rms_norm_forward(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        w_offset: f32,
        eps: f32,
    ) -> Result<()>;
    /// Input gradient of RMSNorm (the weight is frozen): `dx (=|+=) ∂L/∂x`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward(
        &self,
        dx: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        w_offset: f32,
        rstd: &Self::Buf,
        acc: Accumulate,
    ) -> Result<()>;
    /// LayerNorm over rows of x `[N, C]`: `out = (x − mean)·rstd·w + b`; mean and rstd
    /// `[N]` saved for the backward.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        eps: f32,
    ) -> Result<()>;
    /// Input gradient of LayerNorm (weight and bias frozen).
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        dx: &mut Self::Buf,
        dout: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        acc: Accumulate,
    ) -> Result<()>;

    // ---- rotary position embedding ----------------------------------------------------

    /// Rotate x `[N, heads, D]` in place by angles `positions[i] · inv_freq[j]`, HF's
    /// rotate-half layout (pairs j and j + D/2); `inv_freq` has D/2 entries.
    fn rope_forward(
        &self,
        x: &mut Self::Buf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
    ) -> Result<()>;
    /// Gradient of [`Backend::rope_forward`] in place: the inverse rotation of dx.
    fn rope_backward(
        &self,
        dx: &mut Self::Buf,
        positions: &[u32],
        inv_freq: &[f32],
        heads: usize,
    ) -> Result<()>;

    /// `x` `[N, heads, head_dim]` (f32, as projected) made a q, k or v operand of
    /// [`Backend::attention_forward`] and [`Backend::attention_backward`] (or the
    /// backward's dout, without a rotation): rotated by
    /// RoPE at `rope` when given (as [`Backend::rope_forward`]), and stored in the type
    /// the attention kernels read. The default (attention reading f32) rotates `x` in
    /// place and returns it. CUDA's tensor-core kernels read bf16: there the rotation is
    /// computed in f32 and rounded to a new bf16 buffer as it is stored, which is what
    /// those kernels made of an f32 operand themselves, so results do not change while
    /// the call's q, k and v take half the memory and no cast pass runs.
    fn attention_operand(
        &self,
        mut x: Self::Buf,
        rope: Option<RopeAngles<'_>>,
        heads: usize,
        _head_dim: usize,
    ) -> Result<Self::Buf> {
        if let Some(r) = rope {
            self.rope_forward(&mut x, r.positions, r.inv_freq, heads)?;
        }
        Ok(x)
    }

    // ---- attention -------------------------------------------------------------------

    /// Causal softmax attention without a stored score matrix; saves each row's
    /// log-sum-exp in `lse` for the backward. Shapes in [`AttnDims`]. With `key_start`
    /// (`[B·T]`, packed sequences), query t of a row attends to keys
    /// `key_start[t] ..= t` only, so packed examples do not see each other; without it,
    /// to keys `0 ..= t`. q, k and v are f32 or as [`Backend::attention_operand`] makes
    /// them (also for the backward).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        dims: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<()>;
    /// Gradients of causal attention (same `key_start` as the forward); dq, dk, dv are
    /// overwritten.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        dout: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        dims: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<()>;

    /// [`Backend::attention_backward`] into new dq, dk, dv, taking dout, out, q, k and v,
    /// which nothing after it reads, so that a backend can free them as soon as its
    /// kernels are done with them (CUDA's tensor-core path: before the gradients are
    /// allocated, so that they never coexist). The same values as the borrowing call.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_owned(
        &self,
        dout: Self::Buf,
        out: Self::Buf,
        lse: &Self::Buf,
        q: Self::Buf,
        k: Self::Buf,
        v: Self::Buf,
        dims: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        // overwritten by the kernels (every row written)
        let mut dq = self.uninit(q.len())?;
        let mut dk = self.uninit(k.len())?;
        let mut dv = self.uninit(v.len())?;
        self.attention_backward(
            &mut dq, &mut dk, &mut dv, &dout, &out, lse, &q, &k, &v, dims, key_start,
        )?;
        Ok((dq, dk, dv))
    }

    /// Attention of `Tq` new queries against a key/value cache (inference; no lse, no
    /// backward). Shapes and the causal rule in [`DecodeDims`]; out is overwritten.
    ///
    /// The default runs on the host (download, compute in f32, upload), so every backend
    /// has it; backends override it with a device kernel.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        out: &mut Self::Buf,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        dims: DecodeDims,
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        attention_decode_on_host(self, out, q, k_cache, v_cache, dims, key_start)
    }

    // ---- MLP activations -------------------------------------------------------------

    /// `out = act(gate) · up`, elementwise (SwiGLU with [`Activation::Silu`], GeGLU with
    /// [`Activation::GeluTanh`]). `out` may be a buffer of [`Backend::gemm_output`].
    fn gated_forward(
        &self,
        act: Activation,
        out: &mut Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
    ) -> Result<()>;
    /// Gradients of [`Backend::gated_forward`]; dgate and dup are overwritten, both f32 or
    /// both buffers of [`Backend::gemm_output`].
    fn gated_backward(
        &self,
        act: Activation,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
        dout: &Self::Buf,
        gate: &Self::Buf,
        up: &Self::Buf,
    ) -> Result<()>;
    /// GPT-2's `gelu_new` (tanh approximation), elementwise.
    fn gelu_forward(&self, out: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// Gradient of [`Backend::gelu_forward`]; dx is overwritten.
    fn gelu_backward(&self, dx: &mut Self::Buf, dout: &Self::Buf, x: &Self::Buf) -> Result<()>;

    // ---- dropout (LoRA input) --------------------------------------------------------

    /// `out[i] = keep(offset + i) ? x[i] / (1 − p) : 0` with the mask of
    /// [`dropout_keep`]. `offset` is the mask index of element 0: a tile of rows of an
    /// activation draws the whole activation's mask at its position (0 for a whole one).
    fn dropout_forward(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Result<()>;
    /// Gradient of dropout with the same `p`, `seed` and `offset`; dx is overwritten.
    fn dropout_backward(
        &self,
        dx: &mut Self::Buf,
        dout: &Self::Buf,
        p: f32,
        seed: u64,
        offset: u64,
    ) -> Result<()>;

    // ---- LM head + loss --------------------------------------------------------------

    /// Fused LM head and cross-entropy over row chunks, so that no `[N, V]` matrix need
    /// exist: `logits = h · wᵀ` (h `[N, C]`, w `[V, C]`), soft-capped to
    /// `cap · tanh(logits / cap)` when `softcap` is given (Gemma's final soft-cap), per-row
    /// loss against `labels[i]` (already shifted; [`IGNORE_INDEX`] is skipped). When `dh`
    /// is given it is overwritten with `∂(loss_scale · loss)/∂h`; when `logits` is given it
    /// receives the full `[N, V]` (capped) logits.
    #[allow(clippy::too_many_arguments)]
    fn lm_head_loss(
        &self,
        h: &Self::Buf,
        w: &Self::Buf,
        labels: &[i32],
        c: usize,
        loss_scale: f32,
        softcap: Option<f32>,
        dh: Option<&mut Self::Buf>,
        logits: Option<&mut Self::Buf>,
    ) -> Result<LossSum>;

    /// `x = cap · tanh(x / cap)` in place (the head's soft-cap, for logits computed
    /// outside [`Backend::lm_head_loss`]).
    fn softcap(&self, x: &mut Self::Buf, cap: f32) -> Result<()>;

    // ---- quantized weights -----------------------------------------------------------

    /// The weight an NF4-stored frozen weight stands for, as a frozen weight of `dtype`
    /// (the type bitsandbytes dequantizes it to: its `quant_state` dtype): element i is
    /// `code[nibble i] · scale[i / blocksize]`, computed in f32 and rounded to `dtype`.
    fn dequantize_nf4(&self, q: &Nf4Parts<'_, Self>, dtype: DType) -> Result<Self::Buf>;

    /// The weight an FP8-stored frozen weight stands for, as a frozen weight of `dtype`
    /// (the model's, as transformers' `Fp8Dequantize` expands it): element (i, j) is
    /// `e4m3(codes[i, j]) · scale_inv[i / 128, j / 128]`, in f32, rounded to `dtype`.
    fn dequantize_fp8(&self, q: &Fp8Parts<'_, Self>, dtype: DType) -> Result<Self::Buf>;

    // ---- optimizers ------------------------------------------------------------------

    /// One AdamW update of parameter p with gradient g and moments m, v.
    fn adamw_step(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        h: AdamWStep,
    ) -> Result<()>;
    /// One SGD (momentum) update of parameter p with gradient g and momentum buffer.
    fn sgd_step(
        &self,
        p: &mut Self::Buf,
        g: &Self::Buf,
        buf: &mut Self::Buf,
        h: SgdStep,
    ) -> Result<()>;
    /// [`Backend::adamw_step`] of every item with the same hyper-parameters, bit for bit:
    /// a backend may update them all in one launch (CUDA) instead of one each, which is
    /// most of the time of a step's hundreds of small LoRA tensors.
    fn adamw_step_all(&self, items: &mut [AdamWItem<'_, Self>], h: AdamWStep) -> Result<()> {
        items
            .iter_mut()
            .try_for_each(|it| self.adamw_step(it.p, it.g, it.m, it.v, h))
    }
    /// [`Backend::sgd_step`] of every item with the same hyper-parameters, bit for bit (one
    /// launch on CUDA, as [`Backend::adamw_step_all`]).
    fn sgd_step_all(&self, items: &mut [SgdItem<'_, Self>], h: SgdStep) -> Result<()> {
        items
            .iter_mut()
            .try_for_each(|it| self.sgd_step(it.p, it.g, it.buf, h))
    }
}
