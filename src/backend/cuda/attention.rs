//! Causal (grouped-query) attention without a T×T matrix: flash-style forward that saves
//! each row's log-sum-exp, and a backward that recomputes the probabilities from it.
//! Two implementations of the same interface: bf16 tensor-core kernels
//! (`attention_mma.cu`, FlashAttention-2 style, for head dimensions 64 and 128 on sm_80 and
//! newer; on sm_90 their arithmetic on wgmma, `attention_wgmma.cu`, with the same bits),
//! and f32 CUDA-core kernels (`attention.cu`) for every other case and whenever
//! [`super::CudaOptions::exact_attention`] asks for exact f32 results.

use super::device::{Arg, Launch, Module, err};
use super::{CudaBackend, CudaBuf};
use crate::backend::DType;
use crate::backend::{AttnDims, DecodeDims};
use crate::error::Result;
use cudarc::driver::CudaSlice;

pub(super) const MODULE: Module = Module::new("attention", include_str!("attention.cu"));

/// The tensor-core kernels (bf16 operands, f32 accumulation).
pub(super) const MODULE_MMA: Module =
    Module::new("attention_mma", include_str!("attention_mma.cu"));

/// The wgmma kernels (Hopper): attention_mma.cu's helpers with attention_wgmma.cu, one
/// module compiled for sm_90a.
pub(super) const MODULE_WGMMA: Module = Module {
    name: "attention_wgmma",
    src: concat!(
        include_str!("attention_mma.cu"),
        "\n",
        include_str!("attention_wgmma.cu")
    ),
    arch_specific: true,
};

/// Rows (queries or keys) per block and per tile of the tensor-core kernels.
const MMA_TILE: usize = 64;

/// One tensor-core attention kernel as it is launched: its module, name, rows (queries, or
/// keys for dk/dv) per block and shared memory.
struct TcKernel {
    module: Module,
    name: &'static str,
    rows: usize,
    shared_bytes: usize,
}

/// The three tensor-core kernels of one attention call.
struct TcKernels {
    forward: TcKernel,
    dq: TcKernel,
    dkdv: TcKernel,
}

/// The mma.sync kernels (sm_80 and newer) for head dimension `hd` (64 or 128). `wide`
/// ([`super::CudaOptions::wide_attention_from`]) takes the 128-query forms of the forward
/// and (d = 64 only) dq.
fn mma_kernels(hd: usize, wide: bool) -> TcKernels {
    // one 64-row bf16 tile, row stride D + 8
    let tile = MMA_TILE * (hd + 8) * 2;
    let d64 = hd == 64;
    let pick = |a: &'static str, b: &'static str| if d64 { a } else { b };
    let fwd_rows = if wide { 2 * MMA_TILE } else { MMA_TILE };
    let dq_rows = if wide && d64 { 2 * MMA_TILE } else { MMA_TILE };
    let forward = TcKernel {
        module: MODULE_MMA,
        name: match (d64, wide) {
            (true, false) => "amma_fwd_d64",
            (true, true) => "amma_fwd_wide_d64",
            (false, false) => "amma_fwd_d128",
            (false, true) => "amma_fwd_wide_d128",
        },
        rows: fwd_rows,
        // q tile, two stages of k and v tiles
        shared_bytes: (fwd_rows / MMA_TILE + 4) * tile,
    };
    let dq = TcKernel {
        module: MODULE_MMA,
        name: match (d64, wide) {
            (true, false) => "amma_bwd_dq_d64",
            (true, true) => "amma_bwd_dq_wide_d64",
            (false, _) => "amma_bwd_dq_d128",
        },
        rows: dq_rows,
        // q and dout tiles, two stages of k and v tiles
        shared_bytes: (2 * dq_rows / MMA_TILE + 4) * tile,
    };
    let dkdv = TcKernel {
        module: MODULE_MMA,
        name: pick("amma_bwd_dkdv_d64", "amma_bwd_dkdv_d128"),
        rows: MMA_TILE,
        // k and v tiles, two stages of q and dout tiles and of lse, dsum, first key
        shared_bytes: 6 * tile + 6 * MMA_TILE * 4,
    };
    TcKernels { forward, dq, dkdv }
}

/// The wgmma kernels (sm_90) for head dimension `hd` (64 or 128): 64 rows a block; tiles of
/// D / 64 swizzled 8 KB atoms, and 1 KB to align them.
fn wgmma_kernels(hd: usize) -> TcKernels {
    let tile = hd / 64 * 8192;
    let d64 = hd == 64;
    let kernel = |name, shared_bytes| TcKernel {
        module: MODULE_WGMMA,
        name,
        rows: MMA_TILE,
        shared_bytes: shared_bytes + 1024,
    };
    TcKernels {
        // q tile, two stages of k and v tiles
        forward: kernel(if d64 { "awg_fwd_d64" } else { "awg_fwd_d128" }, 5 * tile),
        // q and dout tiles, two stages of k and v tiles
        dq: kernel(
            if d64 {
                "awg_bwd_dq_d64"
            } else {
                "awg_bwd_dq_d128"
            },
            6 * tile,
        ),
        // k and v tiles, two stages of q and dout tiles and of lse, dsum, first key
        dkdv: kernel(
            if d64 {
                "awg_bwd_dkdv_d64"
            } else {
                "awg_bwd_dkdv_d128"
            },
            6 * tile + 6 * MMA_TILE * 4,
        ),
    }
}

/// Threads per block of the tensor-core kernels (4 warps).
const MMA_THREADS: u32 = 128;

/// Warps (queries, or keys in the dk/dv kernel) per block.
const WARPS: usize = 4;
/// Keys (or queries) per shared-memory tile: one per lane.
const KT: usize = 32;

/// The kernel variant for head dimension `d`: register accumulators hold ⌈d/32⌉ values per
/// lane, rounded up to 1, 2, 4 or 8.
fn variant(op: &'static str, d: usize) -> Result<&'static str> {
    Ok(match d {
        1..=32 => "d32",
        33..=64 => "d64",
        65..=128 => "d128",
        129..=256 => "d256",
        _ => {
            return Err(err(
                op,
                format!("head dimension {d} is not supported (1 to 256)"),
            ));
        }
    })
}

fn kernel(prefix: &'static str, v: &'static str) -> &'static str {
    match (prefix, v) {
        ("fwd", "d32") => "attn_fwd_d32",
        ("fwd", "d64") => "attn_fwd_d64",
        ("fwd", "d128") => "attn_fwd_d128",
        ("fwd", _) => "attn_fwd_d256",
        ("dq", "d32") => "attn_bwd_dq_d32",
        ("dq", "d64") => "attn_bwd_dq_d64",
        ("dq", "d128") => "attn_bwd_dq_d128",
        ("dq", _) => "attn_bwd_dq_d256",
        ("decode", "d32") => "attn_decode_d32",
        ("decode", "d64") => "attn_decode_d64",
        ("decode", "d128") => "attn_decode_d128",
        ("decode", _) => "attn_decode_d256",
        (_, "d32") => "attn_bwd_dkdv_d32",
        (_, "d64") => "attn_bwd_dkdv_d64",
        (_, "d128") => "attn_bwd_dkdv_d128",
        _ => "attn_bwd_dkdv_d256",
    }
}

/// `key_start` must give, for every token t of a row, a first key ≤ t, never decreasing
/// along the row (the kernels rely on both).
fn check_key_start(op: &'static str, d: &AttnDims, key_start: Option<&[u32]>) -> Result<()> {
    let Some(ks) = key_start else { return Ok(()) };
    if ks.len() != d.batch * d.seq {
        return Err(err(
            op,
            format!(
                "key_start has {} entries, expected B·T = {}",
                ks.len(),
                d.batch * d.seq
            ),
        ));
    }
    for (r, row) in ks.chunks(d.seq.max(1)).enumerate() {
        for (t, &s) in row.iter().enumerate() {
            if s as usize > t || (t > 0 && s < row[t - 1]) {
                return Err(err(
                    op,
                    format!(
                        "key_start[{r}, {t}] = {s} must be ≤ {t} and not below the previous entry"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_dims(op: &'static str, d: &AttnDims) -> Result<()> {
    if d.n_heads == 0 || d.n_kv_heads == 0 || !d.n_heads.is_multiple_of(d.n_kv_heads) {
        return Err(err(
            op,
            format!(
                "{} query heads are not a multiple of {} key/value heads",
                d.n_heads, d.n_kv_heads
            ),
        ));
    }
    let int = |v: usize| v <= i32::MAX as usize;
    if !int(d.seq) || !int(d.n_heads) || !int(d.head_dim) {
        return Err(err(op, "dimensions exceed 32-bit range"));
    }
    Ok(())
}

impl CudaBackend {
    /// Whether attention with this head dimension runs on the bf16 tensor-core kernels
    /// (head dimension 64 or 128, sm_80 or newer, [`super::CudaOptions::exact_attention`]
    /// off); otherwise the f32 kernels run.
    pub fn attention_on_tensor_cores(&self, head_dim: usize) -> bool {
        let sm: u32 = self
            .dev
            .arch
            .trim_start_matches("sm_")
            .trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .parse()
            .unwrap_or(0);
        !self.opts.exact_attention && sm >= 80 && matches!(head_dim, 64 | 128)
    }

    /// `dst` (bf16, `n` elements) = `src` (f32) rounded to nearest even; `n` is a multiple
    /// of 4.
    pub(super) fn attn_cast_bf16(
        &self,
        op: &'static str,
        dst: u64,
        src: u64,
        n: usize,
    ) -> Result<()> {
        self.dev.launch(
            op,
            MODULE_MMA,
            "amma_cast_bf16",
            Launch::cover(n / 4, 256, 4096),
            &[Arg::Ptr(dst), Arg::Ptr(src), Arg::I64(n as i64)],
        )
    }

    /// The tensor-core kernels for head dimension `hd` at sequence length `t`: wgmma on
    /// sm_90 ([`super::CudaOptions::wgmma_attention`]), else mma.sync.
    fn tc_kernels(&self, hd: usize, t: usize) -> TcKernels {
        if self.opts.wgmma_attention && self.dev.arch == "sm_90" {
            wgmma_kernels(hd)
        } else {
            mma_kernels(hd, t >= self.opts.wide_attention_from)
        }
    }

    /// The bf16 q, k, v the tensor-core kernels read: the operands themselves when they
    /// are bf16 already ([`crate::backend::Backend::attention_operand`]), else copies of
    /// the f32 ones, returned beside their addresses (freed in stream order when dropped).
    fn bf16_operands(
        &self,
        op: &'static str,
        (pq, pk, pv): Operands,
        d: &AttnDims,
    ) -> Result<(Bf16Qkv, Option<CudaSlice<u8>>)> {
        if pq.half {
            return Ok(((pq.ptr, pk.ptr, pv.ptr), None));
        }
        let nq = d.batch * d.seq * d.n_heads * d.head_dim;
        let nk = d.batch * d.seq * d.n_kv_heads * d.head_dim;
        let copies = self.dev.alloc(op, (nq + 2 * nk) * 2)?;
        let pqb = super::Device::ptr(&copies);
        let (pkb, pvb) = (pqb + (nq * 2) as u64, pqb + ((nq + nk) * 2) as u64);
        self.attn_cast_bf16(op, pqb, pq.ptr, nq)?;
        self.attn_cast_bf16(op, pkb, pk.ptr, nk)?;
        self.attn_cast_bf16(op, pvb, pv.ptr, nk)?;
        Ok(((pqb, pkb, pvb), Some(copies)))
    }

    /// The checked addresses of q, k, v: f32, or bf16 from
    /// [`crate::backend::Backend::attention_operand`] (only where the tensor-core kernels
    /// run), all of one type.
    fn operands(
        &self,
        op: &'static str,
        d: &AttnDims,
        [q, k, v]: [&CudaBuf; 3],
    ) -> Result<Operands> {
        let nq = d.batch * d.seq * d.n_heads * d.head_dim;
        let nk = d.batch * d.seq * d.n_kv_heads * d.head_dim;
        for (what, b) in [("k", k), ("v", v)] {
            if b.dtype() != q.dtype() {
                return Err(err(
                    op,
                    format!(
                        "q is {} but {what} is {}: q, k and v must be of one type",
                        q.dtype(),
                        b.dtype()
                    ),
                ));
            }
        }
        let one = |what, b, n| self.operand(op, what, b, n, d.head_dim);
        Ok((one("q", q, nq)?, one("k", k, nk)?, one("v", v, nk)?))
    }

    /// The checked address of one operand of `n` elements: f32, or bf16 where the
    /// tensor-core kernels run.
    fn operand(
        &self,
        op: &'static str,
        what: &str,
        b: &CudaBuf,
        n: usize,
        head_dim: usize,
    ) -> Result<Operand> {
        let half = b.dtype() == DType::BF16;
        if half && !self.attention_on_tensor_cores(head_dim) {
            return Err(err(
                op,
                format!(
                    "{what} is bf16, but attention with head dimension {head_dim} runs on the \
                     f32 kernels here (a bug in lema: attention_operand makes f32 operands there)"
                ),
            ));
        }
        let ptr = if half {
            Self::check_any(op, what, b, n)?.0
        } else {
            Self::check_f32(op, what, b, n)?
        };
        Ok(Operand { ptr, half })
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_forward_mma(
        &self,
        op: &'static str,
        po: u64,
        pl: u64,
        (pq, pk, pv): Operands,
        pks: u64,
        d: &AttnDims,
    ) -> Result<()> {
        let (b, t, h, kvh, hd) = (d.batch, d.seq, d.n_heads, d.n_kv_heads, d.head_dim);
        let ((pqb, pkb, pvb), _copies) = self.bf16_operands(op, (pq, pk, pv), d)?;
        let kf = self.tc_kernels(hd, t).forward;
        self.dev.launch(
            op,
            kf.module,
            kf.name,
            Launch {
                grid: (t.div_ceil(kf.rows), h, b),
                block: MMA_THREADS,
                shared_bytes: kf.shared_bytes,
            },
            &[
                Arg::Ptr(po),
                Arg::Ptr(pl),
                Arg::Ptr(pqb),
                Arg::Ptr(pkb),
                Arg::Ptr(pvb),
                Arg::Ptr(pks),
                Arg::I32(t as i32),
                Arg::I32(h as i32),
                Arg::I32(kvh as i32),
                Arg::F32(d.scale * std::f32::consts::LOG2_E),
            ],
        )
    }

    /// `release` hears when the kernels are done with q, k, v (their bf16 copies are
    /// made), then with out and dout (dsum and dout's bf16 copy are), and gives dq, dk,
    /// dv. Operands that are bf16 already are read by the kernels to the end.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_mma(
        &self,
        op: &'static str,
        release: &mut dyn Release,
        pdo: Operand,
        po: u64,
        pl: u64,
        qkv: Operands,
        pks: u64,
        d: &AttnDims,
    ) -> Result<()> {
        let (b, t, h, kvh, hd) = (d.batch, d.seq, d.n_heads, d.n_kv_heads, d.head_dim);
        let nq = b * t * h * hd;
        // bf16 q, k, v; then (once f32 ones may go) bf16 dout and f32 dsum [b, h, t] =
        // bf16(dout) · out. Operands already in bf16 are read to the end.
        let ((pqb, pkb, pvb), copies) = self.bf16_operands(op, qkv, d)?;
        if copies.is_some() {
            release.qkv_read();
        }
        // dout's bf16 copy (unless it is bf16) and dsum
        let copy = if pdo.half { 0 } else { nq * 2 };
        let dos = self.dev.alloc(op, copy + b * h * t * 4)?;
        let pds = super::Device::ptr(&dos) + copy as u64;
        let pdob = if pdo.half {
            pdo.ptr
        } else {
            super::Device::ptr(&dos)
        };
        let rows = b * t * h;
        self.dev.launch(
            op,
            MODULE_MMA,
            "amma_bwd_prep",
            Launch {
                grid: (rows.div_ceil(8), 1, 1),
                block: 256,
                shared_bytes: 0,
            },
            &[
                Arg::Ptr(pdob),
                Arg::Ptr(pds),
                Arg::Ptr(pdo.ptr),
                Arg::I32(pdo.half as i32),
                Arg::Ptr(po),
                Arg::I32(t as i32),
                Arg::I32(h as i32),
                Arg::I32(hd as i32),
                Arg::I64(rows as i64),
            ],
        )?;
        release.out_read();
        if !pdo.half {
            release.dout_read();
        }
        let (pdq, pdk, pdv) = release.grads()?;
        let common = [
            Arg::Ptr(pqb),
            Arg::Ptr(pkb),
            Arg::Ptr(pvb),
            Arg::Ptr(pdob),
            Arg::Ptr(pl),
            Arg::Ptr(pds),
            Arg::Ptr(pks),
            Arg::I32(t as i32),
            Arg::I32(h as i32),
            Arg::I32(kvh as i32),
            Arg::F32(d.scale * std::f32::consts::LOG2_E),
            Arg::F32(d.scale),
        ];
        let kernels = self.tc_kernels(hd, t);
        let mut args = vec![Arg::Ptr(pdq)];
        args.extend_from_slice(&common);
        let kq = kernels.dq;
        self.dev.launch(
            op,
            kq.module,
            kq.name,
            Launch {
                grid: (t.div_ceil(kq.rows), h, b),
                block: MMA_THREADS,
                shared_bytes: kq.shared_bytes,
            },
            &args,
        )?;
        let mut args = vec![Arg::Ptr(pdk), Arg::Ptr(pdv)];
        args.extend_from_slice(&common);
        let kk = kernels.dkdv;
        self.dev.launch(
            op,
            kk.module,
            kk.name,
            Launch {
                grid: (t.div_ceil(kk.rows), kvh, b),
                block: MMA_THREADS,
                shared_bytes: kk.shared_bytes,
            },
            &args,
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_forward_impl(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        d: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        let op = "attention_forward";
        check_dims(op, &d)?;
        check_key_start(op, &d, key_start)?;
        let var = variant(op, d.head_dim)?;
        let (b, t, h, kvh, hd) = (d.batch, d.seq, d.n_heads, d.n_kv_heads, d.head_dim);
        let po = Self::check_f32(op, "out", out, b * t * h * hd)?;
        let pl = Self::check_f32(op, "lse", lse, b * h * t)?;
        let qkv = self.operands(op, &d, [q, k, v])?;
        if b * t == 0 {
            return Ok(());
        }
        let ks = key_start.map(|ks| self.upload_u32(op, ks)).transpose()?;
        let pks = ks.as_ref().map_or(0, super::Device::ptr);
        if self.attention_on_tensor_cores(hd) {
            return self.attention_forward_mma(op, po, pl, qkv, pks, &d);
        }
        let (pq, pk, pv) = (qkv.0.ptr, qkv.1.ptr, qkv.2.ptr);
        // kt [KT][D+1], vs [KT][D], qs [WARPS][D]
        let shared = (KT * (hd + 1) + KT * hd + WARPS * hd) * 4;
        self.dev.launch(
            op,
            MODULE,
            kernel("fwd", var),
            Launch {
                grid: (t.div_ceil(WARPS), h, b),
                block: (WARPS * 32) as u32,
                shared_bytes: shared,
            },
            &[
                Arg::Ptr(po),
                Arg::Ptr(pl),
                Arg::Ptr(pq),
                Arg::Ptr(pk),
                Arg::Ptr(pv),
                Arg::Ptr(pks),
                Arg::I32(t as i32),
                Arg::I32(h as i32),
                Arg::I32(kvh as i32),
                Arg::I32(hd as i32),
                Arg::F32(d.scale),
            ],
        )
    }

    /// [`crate::backend::Backend::attention_decode`] on the device: f32 CUDA cores, one
    /// warp per query head (decoding reads each cached key once per query; no tiles).
    pub(super) fn attention_decode_impl(
        &self,
        out: &mut CudaBuf,
        q: &CudaBuf,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        d: DecodeDims,
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        let op = "attention_decode";
        d.check(
            super::device::BACKEND,
            [
                ("out", out.len),
                ("q", q.len),
                ("k_cache", k_cache.len),
                ("v_cache", v_cache.len),
            ],
            key_start,
        )?;
        let var = variant(op, d.head_dim)?;
        let nq = d.batch * d.q_len * d.n_heads * d.head_dim;
        let nkv = d.batch * d.cap * d.n_kv_heads * d.head_dim;
        let po = Self::check_f32(op, "out", out, nq)?;
        let pq = Self::check_f32(op, "q", q, nq)?;
        let pk = Self::check_f32(op, "k_cache", k_cache, nkv)?;
        let pv = Self::check_f32(op, "v_cache", v_cache, nkv)?;
        if nq == 0 {
            return Ok(());
        }
        let int = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| err(op, format!("{what} {v} exceeds 32 bits")))
        };
        let ks = key_start.map(|ks| self.upload_u32(op, ks)).transpose()?;
        let pks = ks.as_ref().map_or(0, super::Device::ptr);
        self.dev.launch(
            op,
            MODULE,
            kernel("decode", var),
            Launch {
                grid: (d.n_heads.div_ceil(WARPS), d.q_len, d.batch),
                block: (WARPS * 32) as u32,
                shared_bytes: WARPS * d.head_dim * 4,
            },
            &[
                Arg::Ptr(po),
                Arg::Ptr(pq),
                Arg::Ptr(pk),
                Arg::Ptr(pv),
                Arg::Ptr(pks),
                Arg::I32(int(d.q_len, "q_len")?),
                Arg::I32(int(d.cap, "cap")?),
                Arg::I32(int(d.kv_len, "kv_len")?),
                Arg::I32(int(d.n_heads, "n_heads")?),
                Arg::I32(int(d.n_kv_heads, "n_kv_heads")?),
                Arg::I32(int(d.head_dim, "head_dim")?),
                Arg::F32(d.scale),
            ],
        )
    }

    /// The backward into given dq, dk, dv ([`crate::backend::Backend::attention_backward`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_impl(
        &self,
        dq: &mut CudaBuf,
        dk: &mut CudaBuf,
        dv: &mut CudaBuf,
        dout: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        q: &CudaBuf,
        k: &CudaBuf,
        v: &CudaBuf,
        d: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<()> {
        let op = "attention_backward";
        let (nq, nk) = (
            d.batch * d.seq * d.n_heads * d.head_dim,
            d.batch * d.seq * d.n_kv_heads * d.head_dim,
        );
        let pdq = Self::check_f32(op, "dq", dq, nq)?;
        let pdk = Self::check_f32(op, "dk", dk, nk)?;
        let pdv = Self::check_f32(op, "dv", dv, nk)?;
        let held = Held::check(self, op, &d, [dout, out, q, k, v])?;
        self.attention_backward_run(op, held, lse, d, key_start, &mut Given((pdq, pdk, pdv)))
    }

    /// The backward into new dq, dk, dv, freeing dout, out, q, k and v as soon as the
    /// kernels are done with them: on the tensor-core path before dq, dk and dv are
    /// allocated, so the step's peak holds only their bf16 copies beside the gradients
    /// ([`crate::backend::Backend::attention_backward_owned`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_backward_owned_impl(
        &self,
        dout: CudaBuf,
        out: CudaBuf,
        lse: &CudaBuf,
        q: CudaBuf,
        k: CudaBuf,
        v: CudaBuf,
        d: AttnDims,
        key_start: Option<&[u32]>,
    ) -> Result<(CudaBuf, CudaBuf, CudaBuf)> {
        let op = "attention_backward";
        let (nq, nk) = (q.len, k.len);
        let held = Held::check(self, op, &d, [&dout, &out, &q, &k, &v])?;
        let mut own = Owned {
            be: self,
            op,
            qkv: Some((q, k, v)),
            dout: Some(dout),
            out: Some(out),
            lens: (nq, nk),
            grads: None,
        };
        self.attention_backward_run(op, held, lse, d, key_start, &mut own)?;
        own.grads
            .ok_or_else(|| err(op, "the gradients were not allocated (a bug in lema)"))
    }

    /// The backward's checks and kernels; `grads` gives dq, dk, dv once the kernels no
    /// longer read the inputs in `held` (at once on the f32 path).
    fn attention_backward_run(
        &self,
        op: &'static str,
        held: Held,
        lse: &CudaBuf,
        d: AttnDims,
        key_start: Option<&[u32]>,
        release: &mut dyn Release,
    ) -> Result<()> {
        check_key_start(op, &d, key_start)?;
        let var = variant(op, d.head_dim)?;
        let (b, t, h, kvh, hd) = (d.batch, d.seq, d.n_heads, d.n_kv_heads, d.head_dim);
        let Held { pdo, po, qkv } = held;
        let pl = Self::check_f32(op, "lse", lse, b * h * t)?;
        if b * t == 0 {
            release.grads()?;
            return Ok(());
        }
        let ks = key_start.map(|ks| self.upload_u32(op, ks)).transpose()?;
        let pks = ks.as_ref().map_or(0, super::Device::ptr);
        if self.attention_on_tensor_cores(hd) {
            return self.attention_backward_mma(op, release, pdo, po, pl, qkv, pks, &d);
        }
        let (pq, pk, pv, pdo) = (qkv.0.ptr, qkv.1.ptr, qkv.2.ptr, pdo.ptr);
        // the f32 kernels read every input to the end (an owner frees them after the
        // launches)
        let (pdq, pdk, pdv) = release.grads()?;
        // dsum[b, h, t] = dout · out, written by the dq kernel, read by the dk/dv kernel.
        let dsum = self.dev.alloc(op, b * h * t * 4)?;
        let pds = super::Device::ptr(&dsum);
        let dims = [
            Arg::Ptr(pks),
            Arg::I32(t as i32),
            Arg::I32(h as i32),
            Arg::I32(kvh as i32),
            Arg::I32(hd as i32),
            Arg::F32(d.scale),
        ];
        // ks, vs [KT][D+1]; qs, dos [WARPS][D]
        let shared_dq = (2 * KT * (hd + 1) + 2 * WARPS * hd) * 4;
        let mut args = vec![
            Arg::Ptr(pdq),
            Arg::Ptr(pds),
            Arg::Ptr(pdo),
            Arg::Ptr(po),
            Arg::Ptr(pl),
            Arg::Ptr(pq),
            Arg::Ptr(pk),
            Arg::Ptr(pv),
        ];
        args.extend_from_slice(&dims);
        self.dev.launch(
            op,
            MODULE,
            kernel("dq", var),
            Launch {
                grid: (t.div_ceil(WARPS), h, b),
                block: (WARPS * 32) as u32,
                shared_bytes: shared_dq,
            },
            &args,
        )?;
        // qs, dos [KT][D+1]; kj, vj [WARPS][D]; lse, dsum, first key [KT]
        let shared_kv = (2 * KT * (hd + 1) + 2 * WARPS * hd + 3 * KT) * 4;
        let mut args = vec![
            Arg::Ptr(pdk),
            Arg::Ptr(pdv),
            Arg::Ptr(pdo),
            Arg::Ptr(pl),
            Arg::Ptr(pds),
            Arg::Ptr(pq),
            Arg::Ptr(pk),
            Arg::Ptr(pv),
        ];
        args.extend_from_slice(&dims);
        self.dev.launch(
            op,
            MODULE,
            kernel("dkdv", var),
            Launch {
                grid: (t.div_ceil(WARPS), kvh, b),
                block: (WARPS * 32) as u32,
                shared_bytes: shared_kv,
            },
            &args,
        )
    }
}

/// The checked address of a q, k or v operand, and whether it is bf16
/// ([`crate::backend::Backend::attention_operand`]) rather than f32.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    half: bool,
}

/// q, k and v (all of one type).
type Operands = (Operand, Operand, Operand);

/// Addresses of bf16 q, k and v.
type Bf16Qkv = (u64, u64, u64);

/// The checked device pointers of the attention backward's inputs that its kernels read
/// until the gradients are made: dout, out, q, k, v.
struct Held {
    pdo: Operand,
    po: u64,
    qkv: Operands,
}

impl Held {
    fn check(
        be: &CudaBackend,
        op: &'static str,
        d: &AttnDims,
        [dout, out, q, k, v]: [&CudaBuf; 5],
    ) -> Result<Held> {
        check_dims(op, d)?;
        let nq = d.batch * d.seq * d.n_heads * d.head_dim;
        Ok(Held {
            pdo: be.operand(op, "dout", dout, nq, d.head_dim)?,
            po: CudaBackend::check_f32(op, "out", out, nq)?,
            qkv: be.operands(op, d, [q, k, v])?,
        })
    }
}

/// What the backward's kernels tell the owner of their inputs and outputs
/// ([`CudaBackend::attention_backward_mma`]).
trait Release {
    /// q, k and v are no longer read.
    fn qkv_read(&mut self) {}
    /// out is no longer read.
    fn out_read(&mut self) {}
    /// dout is no longer read.
    fn dout_read(&mut self) {}
    /// dq, dk and dv, to be overwritten (inputs not released are still read).
    fn grads(&mut self) -> Result<(u64, u64, u64)>;
}

/// Gradients into the caller's buffers; the caller keeps the inputs.
struct Given((u64, u64, u64));

impl Release for Given {
    fn grads(&mut self) -> Result<(u64, u64, u64)> {
        Ok(self.0)
    }
}

/// Inputs handed over, freed in stream order as soon as they are read for the last time
/// (kernels queued before a free still read them; what is still held goes when the
/// owner drops, after the last launch); gradients allocated when asked for.
struct Owned<'a> {
    be: &'a CudaBackend,
    op: &'static str,
    qkv: Option<(CudaBuf, CudaBuf, CudaBuf)>,
    dout: Option<CudaBuf>,
    out: Option<CudaBuf>,
    lens: (usize, usize),
    grads: Option<(CudaBuf, CudaBuf, CudaBuf)>,
}

impl Release for Owned<'_> {
    fn qkv_read(&mut self) {
        self.qkv = None;
    }
    fn out_read(&mut self) {
        self.out = None;
    }
    fn dout_read(&mut self) {
        self.dout = None;
    }
    fn grads(&mut self) -> Result<(u64, u64, u64)> {
        let (nq, nk) = self.lens;
        let new = |n| self.be.new_buf(self.op, n, DType::F32);
        let g = (new(nq)?, new(nk)?, new(nk)?);
        let p = (g.0.ptr(), g.1.ptr(), g.2.ptr());
        self.grads = Some(g);
        Ok(p)
    }
}
