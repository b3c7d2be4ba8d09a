//! The CUDA backend against the CPU backend (`CpuBackend<f32>`) op by op on fresh random
//! inputs, then against the transformers + PEFT fixtures and in a few training steps.
//! Runs only where a GPU and the CUDA 13 libraries are present; elsewhere each test skips
//! visibly (`common::skip_without_gpu`: a `SKIP:` line on stderr) and returns. Each
//! comparison prints a `PARITY` line (run with `--nocapture` to see the table).
//!
//! Metrics: `rel` = ‖cuda − cpu‖₂ / ‖cpu‖₂ and `max` = max|cuda − cpu| / max|cpu|; both must
//! stay under the tolerance written next to each check. The reasons, in short:
//! * f32 paths (SGEMM, norms, softmax, RoPE, attention, loss, optimizers): both sides round
//!   in f32 but sum in different orders (cuBLAS tiles, warp trees vs. the CPU's 8-lane
//!   dot), so results agree to a few f32 ulps times √(terms): ~1e-6; checked at 1e-5
//!   (2e-5 for sums over hundreds of terms, such as attention gradients).
//! * bf16/f16 weights: CUDA casts the f32 activation to the weight's half type before the
//!   GEMM (2⁻⁹ relative rounding for bf16, 2⁻¹² for f16), the CPU multiplies in f32: ~3e-3
//!   for bf16; checked at 1e-2.
//! * f64 reductions (sum of squares): only the summation order differs: 1e-12.
#![cfg(feature = "cuda")]

mod common;
use common::{poison_uninit, skip_without_gpu};

use lema::backend::cpu::CpuBackend;
use lema::backend::cuda::{self, CudaBackend, CudaOptions};
use lema::backend::{
    Accumulate, Activation, AdamWItem, AdamWStep, AttnDims, Backend, DType, DecodeDims, Gemm,
    IGNORE_INDEX, RopeAngles, SgdItem, SgdStep, dropout_keep,
};
use lema::{Device, LemaConfig, LemaModel, OptimizerConfig, Trainer};

// ---- harness ----------------------------------------------------------------------------

/// The GPU backend (with a synchronisation after each kernel, so that a fault names its
/// kernel, and NaN-filled `uninit` buffers), or None after printing why the test is
/// skipped.
fn gpu_with(f: impl FnOnce(&mut CudaOptions)) -> Option<CudaBackend> {
    poison_uninit();
    if let Err(why) = cuda::probe(0) {
        skip_without_gpu(&why.to_string());
        return None;
    }
    let mut opts = CudaOptions {
        sync_each_launch: true,
        poison_uninit: true,
        ..CudaOptions::default()
    };
    f(&mut opts);
    Some(CudaBackend::with_options(opts).expect("a GPU is present, so the backend must start"))
}

fn gpu() -> Option<CudaBackend> {
    gpu_with(|_| {})
}

fn cpu() -> CpuBackend<f32> {
    CpuBackend::<f32>::new()
}

/// splitmix64 seeded from the clock: fresh inputs on every run, the seed printed so that a
/// failure can be replayed with `LEMA_TEST_SEED`.
struct Rng(u64);

impl Rng {
    fn fresh(test: &str) -> Self {
        let seed = std::env::var("LEMA_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("{test}: seed {seed}");
        Rng(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// n values uniform in [−scale, scale).
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Compare, print a PARITY line, and fail above `tol` (NaN never passes).
fn check(what: &str, got: &[f32], want: &[f32], tol: f64) {
    if let Some(e) = check_soft(what, got, want, tol) {
        panic!("{e}");
    }
}

/// [`check`] that returns the failure instead of panicking, so that a test can report
/// every case before it fails.
fn check_soft(what: &str, got: &[f32], want: &[f32], tol: f64) -> Option<String> {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    assert!(!want.is_empty(), "{what}: nothing to compare");
    let (mut num, mut den, mut maxd, mut maxw) = (0f64, 0f64, 0f64, 0f64);
    let mut finite = true;
    for (&g, &w) in got.iter().zip(want) {
        let (g, w) = (g as f64, w as f64);
        finite &= g.is_finite() && w.is_finite();
        num += (g - w) * (g - w);
        den += w * w;
        maxd = maxd.max((g - w).abs());
        maxw = maxw.max(w.abs());
    }
    let rel = if finite {
        (num / den.max(1e-300)).sqrt()
    } else {
        f64::INFINITY
    };
    let max = if finite {
        maxd / maxw.max(1e-300)
    } else {
        f64::INFINITY
    };
    println!("PARITY {what:<44} rel={rel:.2e} max={max:.2e} tol={tol:.0e}");
    (rel > tol || max > tol || rel.is_nan() || max.is_nan())
        .then(|| format!("{what}: rel {rel:.3e}, max {max:.3e} > tol {tol:.1e}"))
}

fn check_scalar(what: &str, got: f64, want: f64, tol: f64) {
    check(what, &[got as f32], &[want as f32], tol);
}

/// Bytes of `v` stored as `dt` (what a safetensors file holds).
fn weight_bytes(v: &[f32], dt: DType) -> Vec<u8> {
    let mut out = Vec::new();
    dt.encode_into(v, &mut out);
    out
}

/// The same f32 data on both backends.
struct Pair<'a> {
    c: &'a CpuBackend<f32>,
    g: &'a CudaBackend,
}

impl Pair<'_> {
    fn up(&self, v: &[f32]) -> (<CpuBackend<f32> as Backend>::Buf, cuda::CudaBuf) {
        (self.c.upload(v).unwrap(), self.g.upload(v).unwrap())
    }
    fn weight(&self, v: &[f32], dt: DType) -> (<CpuBackend<f32> as Backend>::Buf, cuda::CudaBuf) {
        let b = weight_bytes(v, dt);
        (
            self.c.upload_weight(&b, dt).unwrap(),
            self.g.upload_weight(&b, dt).unwrap(),
        )
    }
    fn cmp(&self, what: &str, c: &<CpuBackend<f32> as Backend>::Buf, g: &cuda::CudaBuf, tol: f64) {
        check(
            what,
            &self.g.download(g).unwrap(),
            &self.c.download(c).unwrap(),
            tol,
        );
    }
}

fn gemm(m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32, acc: Accumulate) -> Gemm {
    Gemm {
        m,
        n,
        k,
        trans_a: ta,
        trans_b: tb,
        alpha,
        accumulate: acc,
    }
}

// ---- linear algebra ------------------------------------------------------------------

#[test]
fn matmul_f32_all_transposes_and_accumulate() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("matmul_f32");
    let (m, n, k) = (37, 53, 300);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for acc in [Accumulate::Overwrite, Accumulate::Add] {
            let (a, b, c0) = (r.vec(m * k, 1.0), r.vec(k * n, 1.0), r.vec(m * n, 1.0));
            let (ca, ga) = p.up(&a);
            let (cb, gb) = p.up(&b);
            let (mut cc, mut gc) = p.up(&c0);
            let gm = gemm(m, n, k, ta, tb, 0.7, acc);
            c.matmul(&mut cc, &ca, &cb, gm).unwrap();
            g.matmul(&mut gc, &ga, &gb, gm).unwrap();
            // f32 SGEMM, 300-term sums in different orders: ~1e-6.
            p.cmp(
                &format!("matmul f32 ta={ta} tb={tb} {acc:?}"),
                &cc,
                &gc,
                1e-5,
            );
        }
    }
}

#[test]
fn matmul_half_weights() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("matmul_half");
    let (n_tok, fin, fout) = (45, 256, 96);
    for dt in [DType::BF16, DType::F16] {
        let w = r.vec(fout * fin, 0.1);
        let (cw, gw) = p.weight(&w, dt);
        assert_eq!(
            gw.dtype(),
            dt,
            "half weights keep their stored type on the GPU"
        );
        // y[N, out] = x · Wᵀ (the Linear forward)
        let x = r.vec(n_tok * fin, 1.0);
        let (cx, gx) = p.up(&x);
        let (mut cy, mut gy) = p.up(&vec![0.0; n_tok * fout]);
        let gm = gemm(n_tok, fout, fin, false, true, 1.0, Accumulate::Overwrite);
        c.matmul(&mut cy, &cx, &cw, gm).unwrap();
        g.matmul(&mut gy, &gx, &gw, gm).unwrap();
        // x rounded to the weight's half type before the GEMM: ~3e-3 for bf16.
        p.cmp(&format!("matmul {dt} weight, x·Wᵀ"), &cy, &gy, 1e-2);
        // dx[N, in] += dy · W (the Linear backward, accumulating)
        let dy = r.vec(n_tok * fout, 1.0);
        let (cdy, gdy) = p.up(&dy);
        let d0 = r.vec(n_tok * fin, 1.0);
        let (mut cdx, mut gdx) = p.up(&d0);
        let gm = gemm(n_tok, fin, fout, false, false, 1.0, Accumulate::Add);
        c.matmul(&mut cdx, &cdy, &cw, gm).unwrap();
        g.matmul(&mut gdx, &gdy, &gw, gm).unwrap();
        p.cmp(&format!("matmul {dt} weight, dx += dy·W"), &cdx, &gdx, 1e-2);
        // the weight as the left operand, transposed: c[in, N] = Wᵀ · dyᵀ-like product
        let e = r.vec(fout * n_tok, 1.0);
        let (ce, ge) = p.up(&e);
        let (mut co, mut go) = p.up(&vec![0.0; fin * n_tok]);
        let gm = gemm(fin, n_tok, fout, true, false, 0.5, Accumulate::Overwrite);
        c.matmul(&mut co, &cw, &ce, gm).unwrap();
        g.matmul(&mut go, &gw, &ge, gm).unwrap();
        p.cmp(
            &format!("matmul {dt} weight as left operand"),
            &co,
            &go,
            1e-2,
        );
    }
    // F32 weights converted to bf16 at upload (CudaOptions::weight_dtype).
    let Some(gb) = gpu_with(|o| o.weight_dtype = DType::BF16) else {
        return;
    };
    let w = r.vec(fout * fin, 0.1);
    let bytes = weight_bytes(&w, DType::F32);
    let gw = gb.upload_weight(&bytes, DType::F32).unwrap();
    assert_eq!(gw.dtype(), DType::BF16);
    let cw = c.upload_weight(&bytes, DType::F32).unwrap();
    let x = r.vec(n_tok * fin, 1.0);
    let (cx, gx) = (c.upload(&x).unwrap(), gb.upload(&x).unwrap());
    let (mut cy, mut gy) = (
        c.zeros(n_tok * fout).unwrap(),
        gb.zeros(n_tok * fout).unwrap(),
    );
    let gm = gemm(n_tok, fout, fin, false, true, 1.0, Accumulate::Overwrite);
    c.matmul(&mut cy, &cx, &cw, gm).unwrap();
    gb.matmul(&mut gy, &gx, &gw, gm).unwrap();
    // weight and activation both rounded to bf16: ~4e-3.
    check(
        "matmul f32 weight stored as bf16",
        &gb.download(&gy).unwrap(),
        &c.download(&cy).unwrap(),
        1e-2,
    );
}

#[test]
fn elementwise_ops() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("elementwise");
    let (rows, cols) = (33, 200);
    let n = rows * cols;
    // axpy, both modes: one multiply-add per element, exact up to FMA contraction.
    for acc in [Accumulate::Overwrite, Accumulate::Add] {
        let (x, y) = (r.vec(n, 1.0), r.vec(n, 1.0));
        let (cx, gx) = p.up(&x);
        let (mut cy, mut gy) = p.up(&y);
        c.axpy(&mut cy, -0.3, &cx, acc).unwrap();
        g.axpy(&mut gy, -0.3, &gx, acc).unwrap();
        p.cmp(&format!("axpy {acc:?}"), &cy, &gy, 1e-6);
    }
    // bias from an f32 and a bf16 weight: one addition, exact.
    for dt in [DType::F32, DType::BF16] {
        let (x, b) = (r.vec(n, 1.0), r.vec(cols, 1.0));
        let (mut cx, mut gx) = p.up(&x);
        let (cb, gb) = p.weight(&b, dt);
        c.add_bias(&mut cx, &cb).unwrap();
        g.add_bias(&mut gx, &gb).unwrap();
        p.cmp(&format!("add_bias {dt} bias"), &cx, &gx, 1e-7);
    }
    // copy_cols into the middle of a wider matrix, both modes: exact.
    for acc in [Accumulate::Overwrite, Accumulate::Add] {
        let (dst, src) = (r.vec(rows * 3 * 64, 1.0), r.vec(rows * 64, 1.0));
        let (mut cd, mut gd) = p.up(&dst);
        let (cs, gs) = p.up(&src);
        c.copy_cols(&mut cd, 192, 64, &cs, 64, 0, 64, acc).unwrap();
        g.copy_cols(&mut gd, 192, 64, &gs, 64, 0, 64, acc).unwrap();
        p.cmp(&format!("copy_cols {acc:?}"), &cd, &gd, 1e-7);
    }
    // sum of squares in f64 on both sides: only the order differs.
    let x = r.vec(1_000_003, 2.0);
    let (cx, gx) = p.up(&x);
    let (sc, sg) = (c.sum_squares(&cx).unwrap(), g.sum_squares(&gx).unwrap());
    let rel = (sg - sc).abs() / sc;
    println!("PARITY {:<44} rel={rel:.2e} tol=1e-12", "sum_squares (f64)");
    assert!(rel <= 1e-12, "sum_squares: {sg} vs {sc}");
    // embedding gather from a bf16 table, accumulate: exact.
    let (v, ch) = (97, 48);
    let table = r.vec(v * ch, 1.0);
    let (ct, gt) = p.weight(&table, DType::BF16);
    let ids: Vec<u32> = (0..29).map(|_| r.below(v) as u32).collect();
    let base = r.vec(ids.len() * ch, 1.0);
    let (mut co, mut go) = p.up(&base);
    c.embedding_forward(&mut co, &ids, &ct, ch, Accumulate::Add)
        .unwrap();
    g.embedding_forward(&mut go, &ids, &gt, ch, Accumulate::Add)
        .unwrap();
    p.cmp("embedding_forward bf16 table", &co, &go, 1e-7);
    let bad = g.embedding_forward(&mut go, &[3, v as u32], &gt, ch, Accumulate::Overwrite);
    let msg = bad
        .expect_err("an id past the vocabulary must be rejected")
        .to_string();
    assert!(msg.contains(&v.to_string()), "{msg}");
}

#[test]
fn activations_and_dropout() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("activations");
    let n = 10_007;
    let (a, b, d) = (r.vec(n, 4.0), r.vec(n, 2.0), r.vec(n, 1.0));
    let (ca, ga) = p.up(&a);
    let (cb, gb) = p.up(&b);
    let (cd, gd) = p.up(&d);
    // exp/tanh of CUDA's libdevice vs Rust's libm: a few ulps: 1e-6.
    let (mut co, mut go) = p.up(&vec![0.0; n]);
    let (mut cg, mut gg) = p.up(&vec![0.0; n]);
    let (mut cu, mut gu) = p.up(&vec![0.0; n]);
    for act in [Activation::Silu, Activation::GeluTanh] {
        c.gated_forward(act, &mut co, &ca, &cb).unwrap();
        g.gated_forward(act, &mut go, &ga, &gb).unwrap();
        p.cmp(&format!("gated_forward {act:?}"), &co, &go, 1e-6);
        c.gated_backward(act, &mut cg, &mut cu, &cd, &ca, &cb)
            .unwrap();
        g.gated_backward(act, &mut gg, &mut gu, &gd, &ga, &gb)
            .unwrap();
        p.cmp(&format!("gated_backward dgate {act:?}"), &cg, &gg, 1e-6);
        p.cmp(&format!("gated_backward dup {act:?}"), &cu, &gu, 1e-6);
    }
    c.gelu_forward(&mut co, &ca).unwrap();
    g.gelu_forward(&mut go, &ga).unwrap();
    p.cmp("gelu_forward", &co, &go, 1e-6);
    c.gelu_backward(&mut cg, &cd, &ca).unwrap();
    g.gelu_backward(&mut gg, &gd, &ga).unwrap();
    p.cmp("gelu_backward", &cg, &gg, 1e-6);
    // dropout: the very same mask (zeros in the same places), values to one rounding.
    for p_drop in [0.0f32, 0.1, 0.5] {
        let seed = r.next_u64();
        c.dropout_forward(&mut co, &ca, p_drop, seed, 0).unwrap();
        g.dropout_forward(&mut go, &ga, p_drop, seed, 0).unwrap();
        let (hc, hg) = (c.download(&co).unwrap(), g.download(&go).unwrap());
        let zeros_c: Vec<bool> = hc.iter().map(|&x| x == 0.0).collect();
        let zeros_g: Vec<bool> = hg.iter().map(|&x| x == 0.0).collect();
        assert_eq!(zeros_c, zeros_g, "dropout p={p_drop}: masks differ");
        let kept = (0..n)
            .filter(|&i| dropout_keep(seed, i as u64, p_drop))
            .count();
        assert_eq!(
            zeros_g.iter().filter(|&&z| !z).count(),
            kept,
            "mask is dropout_keep's"
        );
        check(&format!("dropout_forward p={p_drop}"), &hg, &hc, 1e-7);
        // at an offset (a tile of a larger activation): the same mask on both sides
        let off = r.next_u64() >> 20;
        c.dropout_backward(&mut cg, &cd, p_drop, seed, off).unwrap();
        g.dropout_backward(&mut gg, &gd, p_drop, seed, off).unwrap();
        p.cmp(
            &format!("dropout_backward p={p_drop} offset {off}"),
            &cg,
            &gg,
            1e-7,
        );
    }
}

/// The kernels that write an output only GEMMs read in the GEMMs' half type
/// (`Backend::gemm_output`: RMSNorm, the gated MLP forward and backward, a GEMM's own
/// output) store exactly the cast of their f32 output: bit for bit what the cast before
/// the GEMM made, for bf16 and f16 weights.
#[test]
fn half_outputs_are_the_cast_of_the_f32_outputs() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::fresh("half outputs");
    for wdt in [DType::BF16, DType::F16] {
        // a weight of the half type decides the outputs' type
        let w_half = g
            .upload_weight(&weight_bytes(&[1.0; 64], wdt), wdt)
            .unwrap();
        let half = |len: usize| {
            let b = g.gemm_output(len, &w_half).unwrap();
            assert_eq!(b.dtype(), wdt, "gemm_output follows the weight's type");
            b
        };
        let cast = |b: &cuda::CudaBuf| {
            let h = g
                .gemm_input(b, &w_half)
                .unwrap()
                .expect("an f32 buffer is cast");
            g.download(&h).unwrap()
        };
        let same = |what: &str, got: &cuda::CudaBuf, f32_out: &cuda::CudaBuf| {
            let (got, want) = (g.download(got).unwrap(), cast(f32_out));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got),
                bits(&want),
                "{what} ({wdt}): not the cast of the f32 output"
            );
        };
        // RMSNorm, both weight offsets
        let (rows, cols) = (37, 576);
        let x = g.upload(&r.vec(rows * cols, 3.0)).unwrap();
        let w: Vec<f32> = r.vec(cols, 0.5).iter().map(|v| v + 1.0).collect();
        let w = g
            .upload_weight(&weight_bytes(&w, DType::BF16), DType::BF16)
            .unwrap();
        for off in [0.0, 1.0] {
            let (mut o32, mut oh) = (g.zeros(rows * cols).unwrap(), half(rows * cols));
            let (mut r1, mut r2) = (g.zeros(rows).unwrap(), g.zeros(rows).unwrap());
            g.rms_norm_forward(&mut o32, &mut r1, &x, &w, off, 1e-5)
                .unwrap();
            g.rms_norm_forward(&mut oh, &mut r2, &x, &w, off, 1e-5)
                .unwrap();
            same(&format!("rms_norm_forward offset {off}"), &oh, &o32);
            assert_eq!(g.download(&r1).unwrap(), g.download(&r2).unwrap());
        }
        // the gated MLP
        let n = 10_007;
        let (a, b, d) = (
            g.upload(&r.vec(n, 4.0)).unwrap(),
            g.upload(&r.vec(n, 2.0)).unwrap(),
            g.upload(&r.vec(n, 1.0)).unwrap(),
        );
        for act in [Activation::Silu, Activation::GeluTanh] {
            let (mut o32, mut oh) = (g.zeros(n).unwrap(), half(n));
            g.gated_forward(act, &mut o32, &a, &b).unwrap();
            g.gated_forward(act, &mut oh, &a, &b).unwrap();
            same(&format!("gated_forward {act:?}"), &oh, &o32);
            let (mut dg32, mut du32) = (g.zeros(n).unwrap(), g.zeros(n).unwrap());
            let (mut dgh, mut duh) = (half(n), half(n));
            g.gated_backward(act, &mut dg32, &mut du32, &d, &a, &b)
                .unwrap();
            g.gated_backward(act, &mut dgh, &mut duh, &d, &a, &b)
                .unwrap();
            same(&format!("gated_backward dgate {act:?}"), &dgh, &dg32);
            same(&format!("gated_backward dup {act:?}"), &duh, &du32);
            // one half and one f32 output is refused
            let err = g
                .gated_backward(act, &mut dgh, &mut du32, &d, &a, &b)
                .unwrap_err()
                .to_string();
            assert!(err.contains("both must be of one type"), "{err}");
        }
        // a GEMM writing its half output: the LoRA intermediates (m × r, k = in)
        let (m, k, rr) = (300, 192, 16);
        let xa = g.upload(&r.vec(m * k, 1.0)).unwrap();
        let xh = g.gemm_input(&xa, &w_half).unwrap().unwrap();
        let am = g.upload(&r.vec(rr * k, 0.1)).unwrap();
        let ah = g.gemm_input(&am, &w_half).unwrap().unwrap();
        let (mut t32, mut th) = (g.zeros(m * rr).unwrap(), half(m * rr));
        let gm = gemm(m, rr, k, false, true, 1.0, Accumulate::Overwrite);
        g.matmul(&mut t32, &xh, &ah, gm).unwrap();
        g.matmul(&mut th, &xh, &ah, gm).unwrap();
        // cuBLAS may pick another algorithm (summation order) for another output type:
        // within one rounding of the half type of the f32 result
        let ulp = if wdt == DType::BF16 {
            1.0 / 128.0
        } else {
            1.0 / 1024.0
        };
        let (got, want) = (g.download(&th).unwrap(), g.download(&t32).unwrap());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= ulp * b.abs() + 1e-6,
                "matmul into a half output ({wdt}) [{i}]: {a} vs {b}"
            );
        }
        // a half output of f32 operands is refused
        let err = g.matmul(&mut th, &xa, &am, gm).unwrap_err().to_string();
        assert!(err.contains("must be f32 or their half type"), "{err}");
    }
}

/// `upload_with` (the step's embedding, through the reused page-locked staging buffer)
/// gives what `upload` gives, also when calls follow each other before the copies ran,
/// when a larger one regrows the buffer, and for nothing at all.
#[test]
fn upload_with_matches_upload() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::fresh("upload_with");
    let mut bufs = Vec::new();
    for n in [1000, 1000, 300_000, 5, 0, 2_000_000] {
        let v = r.vec(n, 2.0);
        let b = g
            .upload_with(n, &mut |out: &mut [f32]| {
                out.copy_from_slice(&v);
                Ok(())
            })
            .unwrap();
        bufs.push((b, v));
    }
    for (b, v) in &bufs {
        assert_eq!(&g.download(b).unwrap(), v);
    }
    // an error from the filler is passed on, and the next upload works
    let Err(e) = g.upload_with(10, &mut |_| Err(lema::Error::config("no rows"))) else {
        panic!("the filler's error was dropped")
    };
    let e = e.to_string();
    assert!(e.contains("no rows"), "{e}");
    let b = g.upload_with(3, &mut |o| {
        o.copy_from_slice(&[1.0, 2.0, 3.0]);
        Ok(())
    });
    assert_eq!(g.download(&b.unwrap()).unwrap(), vec![1.0, 2.0, 3.0]);
}

#[test]
fn norms_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("norms");
    for (rows, cols) in [(1, 64), (37, 576), (8, 4096)] {
        for wdt in [DType::F32, DType::BF16] {
            let tag = format!("[{rows}x{cols}] {wdt} weight");
            let x = r.vec(rows * cols, 3.0);
            let (cx, gx) = p.up(&x);
            let w: Vec<f32> = r.vec(cols, 0.5).iter().map(|v| v + 1.0).collect();
            let (cw, gw) = p.weight(&w, wdt);
            let bias = r.vec(cols, 0.5);
            let (cbias, gbias) = p.weight(&bias, wdt);
            let dout = r.vec(rows * cols, 1.0);
            let (cdo, gdo) = p.up(&dout);
            // RMSNorm (and Gemma's (1 + w)): a C-term f32 sum of squares, then
            // elementwise: 1e-5.
            let (mut co, mut go) = p.up(&vec![0.0; rows * cols]);
            let (mut cr, mut gr) = p.up(&vec![0.0; rows]);
            for off in [0.0, 1.0] {
                let tag = format!("{tag} offset {off}");
                c.rms_norm_forward(&mut co, &mut cr, &cx, &cw, off, 1e-5)
                    .unwrap();
                g.rms_norm_forward(&mut go, &mut gr, &gx, &gw, off, 1e-5)
                    .unwrap();
                p.cmp(&format!("rms_norm_forward out {tag}"), &co, &go, 1e-5);
                p.cmp(&format!("rms_norm_forward rstd {tag}"), &cr, &gr, 1e-5);
                for acc in [Accumulate::Overwrite, Accumulate::Add] {
                    let d0 = r.vec(rows * cols, 1.0);
                    let (mut cdx, mut gdx) = p.up(&d0);
                    c.rms_norm_backward(&mut cdx, &cdo, &cx, &cw, off, &cr, acc)
                        .unwrap();
                    g.rms_norm_backward(&mut gdx, &gdo, &gx, &gw, off, &gr, acc)
                        .unwrap();
                    p.cmp(
                        &format!("rms_norm_backward {acc:?} {tag}"),
                        &cdx,
                        &gdx,
                        1e-5,
                    );
                }
            }
            // LayerNorm: two f32 reductions per row: 1e-5.
            let (mut cm, mut gm) = p.up(&vec![0.0; rows]);
            c.layer_norm_forward(&mut co, &mut cm, &mut cr, &cx, &cw, &cbias, 1e-5)
                .unwrap();
            g.layer_norm_forward(&mut go, &mut gm, &mut gr, &gx, &gw, &gbias, 1e-5)
                .unwrap();
            p.cmp(&format!("layer_norm_forward out {tag}"), &co, &go, 1e-5);
            p.cmp(&format!("layer_norm_forward mean {tag}"), &cm, &gm, 1e-5);
            p.cmp(&format!("layer_norm_forward rstd {tag}"), &cr, &gr, 1e-5);
            for acc in [Accumulate::Overwrite, Accumulate::Add] {
                let d0 = r.vec(rows * cols, 1.0);
                let (mut cdx, mut gdx) = p.up(&d0);
                c.layer_norm_backward(&mut cdx, &cdo, &cx, &cw, &cm, &cr, acc)
                    .unwrap();
                g.layer_norm_backward(&mut gdx, &gdo, &gx, &gw, &gm, &gr, acc)
                    .unwrap();
                p.cmp(
                    &format!("layer_norm_backward {acc:?} {tag}"),
                    &cdx,
                    &gdx,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn rope_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("rope");
    let (n, heads, d) = (50, 3, 64);
    // positions up to 4096 (long contexts), Llama's frequencies
    let positions: Vec<u32> = (0..n).map(|_| r.below(4096) as u32).collect();
    let inv_freq: Vec<f32> = (0..d / 2)
        .map(|j| 10000f32.powf(-(2.0 * j as f32) / d as f32))
        .collect();
    let x = r.vec(n * heads * d, 1.0);
    let (mut cx, mut gx) = p.up(&x);
    // the f32 angle is the same on both sides; cosf/sinf differ by ≤ 2 ulp: 1e-6.
    c.rope_forward(&mut cx, &positions, &inv_freq, heads)
        .unwrap();
    g.rope_forward(&mut gx, &positions, &inv_freq, heads)
        .unwrap();
    p.cmp("rope_forward", &cx, &gx, 1e-5);
    c.rope_backward(&mut cx, &positions, &inv_freq, heads)
        .unwrap();
    g.rope_backward(&mut gx, &positions, &inv_freq, heads)
        .unwrap();
    p.cmp("rope_backward", &cx, &gx, 1e-5);
    // and the backward undoes the forward
    check(
        "rope backward∘forward = identity",
        &g.download(&gx).unwrap(),
        &x,
        1e-5,
    );
}

// ---- attention -----------------------------------------------------------------------

/// Packed rows: each batch row cut into segments at random places (`key_start`).
fn packed_starts(r: &mut Rng, b: usize, t: usize) -> Vec<u32> {
    let mut ks = Vec::with_capacity(b * t);
    for _ in 0..b {
        let mut start = 0u32;
        for i in 0..t {
            if i > 0 && r.below(9) == 0 {
                start = i as u32;
            }
            ks.push(start);
        }
    }
    ks
}

/// Tolerances of one attention check: forward (out, lse), gradients (dq, dk, dv).
#[derive(Clone, Copy)]
struct AttnTol {
    fwd: f64,
    grad: f64,
}

/// The f32 kernels: D-term dots and T-term softmax sums in f32, in different orders than
/// the CPU: ~1e-6, checked at 1e-5; gradients sum over up to T·H/KVH terms of differences
/// p·(dp − Δ): 2e-5.
const ATTN_F32: AttnTol = AttnTol {
    fwd: 1e-5,
    grad: 2e-5,
};

/// The tensor-core kernels: q, k, v, dout and the probabilities P (and dS in the
/// backward) are rounded to bf16 (relative 2⁻⁹ each) before the f32-accumulated products,
/// so every output carries a few bf16 roundings. Measured on H100 (and predicted by a
/// bf16 model of the algorithm) with these inputs (q ~ U(−2, 2) makes the softmax peaked):
/// at most 4.3e-3 for out, 2.5e-3 for lse, 4.4e-3 for dq and dk, 2.6e-3 for dv. Checked
/// at 1e-2 for the forward and 1.5e-2 for the gradients (dS = P·(dP − Δ) cancels, and
/// the `max` metric grows slowly with the number of elements).
const ATTN_BF16: AttnTol = AttnTol {
    fwd: 1e-2,
    grad: 1.5e-2,
};

#[allow(clippy::too_many_arguments)]
fn attention_case(
    g: &CudaBackend,
    r: &mut Rng,
    b: usize,
    t: usize,
    h: usize,
    kvh: usize,
    d: usize,
    key_start: Option<&[u32]>,
) -> Vec<String> {
    let c = cpu();
    let p = Pair { c: &c, g };
    let dims = AttnDims {
        batch: b,
        seq: t,
        n_heads: h,
        n_kv_heads: kvh,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let (tol, path) = if g.attention_on_tensor_cores(d) {
        (ATTN_BF16, "bf16")
    } else {
        (ATTN_F32, "f32")
    };
    let packed = if key_start.is_some() { " packed" } else { "" };
    let tag = format!("B={b} T={t} H={h} KVH={kvh} D={d}{packed} {path}");
    let (nq, nk) = (b * t * h * d, b * t * kvh * d);
    // q scaled up so that the softmax is peaked in places, not uniform.
    let (q, k, v) = (r.vec(nq, 2.0), r.vec(nk, 1.0), r.vec(nk, 1.0));
    let (cq, gq) = p.up(&q);
    let (ck, gk) = p.up(&k);
    let (cv, gv) = p.up(&v);
    // outputs start poisoned, so an unwritten element fails
    let (mut co, mut go) = p.up(&vec![f32::NAN; nq]);
    let (mut cl, mut gl) = p.up(&vec![f32::NAN; b * h * t]);
    c.attention_forward(&mut co, &mut cl, &cq, &ck, &cv, dims, key_start)
        .unwrap();
    g.attention_forward(&mut go, &mut gl, &gq, &gk, &gv, dims, key_start)
        .unwrap();
    let mut fails = Vec::new();
    let cmp =
        |what: String, cb: &<CpuBackend<f32> as Backend>::Buf, gb: &cuda::CudaBuf, tol: f64| {
            check_soft(
                &what,
                &g.download(gb).unwrap(),
                &c.download(cb).unwrap(),
                tol,
            )
        };
    fails.extend(cmp(
        format!("attention_forward out {tag}"),
        &co,
        &go,
        tol.fwd,
    ));
    fails.extend(cmp(
        format!("attention_forward lse {tag}"),
        &cl,
        &gl,
        tol.fwd,
    ));
    let dout = r.vec(nq, 1.0);
    let (cdo, gdo) = p.up(&dout);
    let (mut cdq, mut gdq) = p.up(&vec![f32::NAN; nq]);
    let (mut cdk, mut gdk) = p.up(&vec![f32::NAN; nk]);
    let (mut cdv, mut gdv) = p.up(&vec![f32::NAN; nk]);
    c.attention_backward(
        &mut cdq, &mut cdk, &mut cdv, &cdo, &co, &cl, &cq, &ck, &cv, dims, key_start,
    )
    .unwrap();
    g.attention_backward(
        &mut gdq, &mut gdk, &mut gdv, &gdo, &go, &gl, &gq, &gk, &gv, dims, key_start,
    )
    .unwrap();
    if t == 1 {
        // One key: p = 1 and dp = Δ, so ds = 0 and dq, dk vanish up to rounding (the CPU
        // forms dp and Δ with the same dot and gets exactly 0, the GPU in two orders, so
        // a relative error means nothing): an absolute bound. The bf16 kernels form Δ from
        // the same bf16-rounded dout as dp, so they meet it too.
        for (name, buf) in [("dq", &gdq), ("dk", &gdk)] {
            let worst = g.download(buf).unwrap().iter().fold(0f32, |m, &x| {
                if x.is_nan() {
                    f32::INFINITY
                } else {
                    m.max(x.abs())
                }
            });
            let what = format!("attention_backward {name} {tag} (= 0)");
            println!("PARITY {what:<44} abs={worst:.2e} tol=1e-5");
            if worst > 1e-5 {
                fails.push(format!("{what}: |{name}| reaches {worst:e}"));
            }
        }
    } else {
        fails.extend(cmp(
            format!("attention_backward dq {tag}"),
            &cdq,
            &gdq,
            tol.grad,
        ));
        fails.extend(cmp(
            format!("attention_backward dk {tag}"),
            &cdk,
            &gdk,
            tol.grad,
        ));
    }
    fails.extend(cmp(
        format!("attention_backward dv {tag}"),
        &cdv,
        &gdv,
        tol.grad,
    ));
    fails
}

/// The cases every attention path must pass: T = 1 and tile edges, every f32 kernel
/// variant (D ≤ 32, 64, 128, 256, odd D masked; D = 256 needs > 48 KB of shared memory),
/// GQA and multi-query, packed segments.
fn attention_cases(g: &CudaBackend, r: &mut Rng) -> Vec<String> {
    let mut fails = Vec::new();
    for t in [1, 7, 64, 300] {
        fails.extend(attention_case(g, r, 2, t, 4, 2, 64, None));
    }
    fails.extend(attention_case(g, r, 1, 37, 2, 1, 16, None));
    fails.extend(attention_case(g, r, 1, 45, 6, 2, 80, None));
    fails.extend(attention_case(g, r, 2, 64, 4, 4, 128, None));
    fails.extend(attention_case(g, r, 1, 70, 2, 1, 256, None));
    // packed sequences: attention confined to segments
    for t in [7, 64, 300] {
        let ks = packed_starts(r, 2, t);
        fails.extend(attention_case(g, r, 2, t, 4, 2, 64, Some(&ks)));
    }
    fails
}

/// KV-cache decoding on the device (f32 kernel) against the CPU: one and several new
/// queries, GQA and MQA, a cache longer than what is filled, left padding (`key_start`,
/// including a row whose first key lies after some of its queries, which attend to
/// themselves only), head dimensions 16 to 256. The output starts as NaN.
#[test]
fn attention_decode_against_cpu() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("attention_decode");
    // (batch, q_len, cap, kv_len, heads, kv heads, head dim, key_start)
    #[allow(clippy::type_complexity)]
    let cases: [(
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        Option<Vec<u32>>,
    ); 7] = [
        (1, 1, 8, 1, 2, 1, 16, None),
        (2, 1, 50, 37, 8, 2, 64, Some(vec![0, 5])),
        (1, 5, 20, 20, 4, 4, 32, None),
        (3, 3, 300, 290, 9, 3, 64, Some(vec![0, 100, 289])),
        (2, 1, 1030, 1029, 32, 8, 128, Some(vec![3, 0])),
        (1, 7, 64, 40, 4, 1, 80, None),
        (2, 2, 40, 33, 4, 2, 256, Some(vec![1, 32])),
    ];
    for (b, tq, cap, kv_len, h, kvh, d, ks) in cases {
        let dims = DecodeDims {
            batch: b,
            q_len: tq,
            cap,
            kv_len,
            n_heads: h,
            n_kv_heads: kvh,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let (nq, nkv) = (b * tq * h * d, b * cap * kvh * d);
        let (cq, gq) = p.up(&r.vec(nq, 2.0));
        let (ck, gk) = p.up(&r.vec(nkv, 1.0));
        let (cv, gv) = p.up(&r.vec(nkv, 1.0));
        let (mut co, mut go) = p.up(&vec![f32::NAN; nq]);
        let ks = ks.as_deref();
        c.attention_decode(&mut co, &cq, &ck, &cv, dims, ks)
            .unwrap();
        g.attention_decode(&mut go, &gq, &gk, &gv, dims, ks)
            .unwrap();
        p.cmp(
            &format!("attention_decode B={b} Tq={tq} cap={cap} kv_len={kv_len} H={h} KVH={kvh} D={d} key_start={ks:?}"),
            &co,
            &go,
            1e-5,
        );
    }
    // a bad shape is refused with the op's name, not launched
    let dims = DecodeDims {
        batch: 1,
        q_len: 2,
        cap: 4,
        kv_len: 1,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 8,
        scale: 1.0,
    };
    let (_, gq) = p.up(&[0.0; 32]);
    let (_, gk) = p.up(&[0.0; 32]);
    let (_, mut go) = p.up(&[0.0; 32]);
    let e = g
        .attention_decode(&mut go, &gq, &gk, &gk, dims, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention_decode") && e.contains("q_len"), "{e}");
}

/// Default options: head dimensions 64 and 128 run on the bf16 tensor-core kernels (on
/// sm_80 and newer), the others on the f32 kernels; longer rows and D = 128 with GQA and
/// packing for the tensor-core tiles (64 queries × 64 keys, partial last tiles).
#[test]
fn attention_gqa_forward_backward() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::fresh("attention");
    let mut fails = attention_cases(&g, &mut r);
    fails.extend(attention_case(&g, &mut r, 1, 1, 4, 2, 128, None));
    fails.extend(attention_case(&g, &mut r, 1, 1000, 4, 1, 128, None));
    fails.extend(attention_case(&g, &mut r, 2, 513, 8, 2, 64, None));
    let ks = packed_starts(&mut r, 2, 450);
    fails.extend(attention_case(&g, &mut r, 2, 450, 4, 2, 128, Some(&ks)));
    // long segments: whole tiles before a segment start are skipped
    let mut ks = Vec::new();
    for _ in 0..2 {
        ks.extend((0..700u32).map(|i| {
            [0, 130, 200, 555][(i >= 130) as usize + (i >= 200) as usize + (i >= 555) as usize]
        }));
    }
    fails.extend(attention_case(&g, &mut r, 2, 700, 4, 2, 64, Some(&ks)));
    assert!(
        fails.is_empty(),
        "attention mismatches:\n{}",
        fails.join("\n")
    );
}

/// `exact_attention`: every case on the f32 kernels, at the f32 tolerances.
#[test]
fn attention_exact_f32_kernels() {
    let Some(g) = gpu_with(|o| o.exact_attention = true) else {
        return;
    };
    assert!(!g.attention_on_tensor_cores(64) && !g.attention_on_tensor_cores(128));
    let mut r = Rng::fresh("attention exact");
    let fails = attention_cases(&g, &mut r);
    assert!(
        fails.is_empty(),
        "attention mismatches:\n{}",
        fails.join("\n")
    );
}

/// Attention of `b` packed rows of `t` tokens, `h` query heads of `d` sharing 2 key/value
/// heads: the dims, q's and k's element counts, and the rows' first keys.
fn gqa_packed(
    r: &mut Rng,
    b: usize,
    t: usize,
    h: usize,
    d: usize,
) -> (AttnDims, usize, usize, Vec<u32>) {
    let kvh = 2;
    let dims = AttnDims {
        batch: b,
        seq: t,
        n_heads: h,
        n_kv_heads: kvh,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let ks = packed_starts(r, b, t);
    (dims, b * t * h * d, b * t * kvh * d, ks)
}

/// Random q (larger, so that softmax rows are peaked), k, v and dout of `nq` and `nk`
/// elements.
fn qkv_dout(r: &mut Rng, nq: usize, nk: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        r.vec(nq, 2.0),
        r.vec(nk, 1.0),
        r.vec(nk, 1.0),
        r.vec(nq, 1.0),
    )
}

/// The f32 bits of a buffer.
fn bits_of(g: &CudaBackend, x: &cuda::CudaBuf) -> Vec<u32> {
    g.download(x).unwrap().iter().map(|f| f.to_bits()).collect()
}

/// Attention forward and the backward that takes its inputs over, on given operands: the
/// bits of out, lse, dq, dk and dv.
fn attention_bits(
    g: &CudaBackend,
    [q, k, v, dout]: [cuda::CudaBuf; 4],
    dims: AttnDims,
    key_start: Option<&[u32]>,
) -> [Vec<u32>; 5] {
    let (nq, rows) = (
        dims.batch * dims.seq * dims.n_heads * dims.head_dim,
        dims.batch * dims.n_heads * dims.seq,
    );
    let mut o = g.zeros(nq).unwrap();
    let mut l = g.zeros(rows).unwrap();
    g.attention_forward(&mut o, &mut l, &q, &k, &v, dims, key_start)
        .unwrap();
    let (ob, lb) = (bits_of(g, &o), bits_of(g, &l));
    let (dq, dk, dv) = g
        .attention_backward_owned(dout, o, &l, q, k, v, dims, key_start)
        .unwrap();
    [ob, lb, bits_of(g, &dq), bits_of(g, &dk), bits_of(g, &dv)]
}

/// The kernels `g` launched since the last call (its profile must be on).
fn kernels_launched(g: &CudaBackend) -> Vec<String> {
    let lines = g.profile_take().unwrap().expect("profiling is on");
    lines.into_iter().map(|l| l.label).collect()
}

/// Asserts that the calls since the last [`kernels_launched`] ran the wide attention
/// kernels at head dimension `d` (the dq one exists at d = 64 only), or none of them.
fn assert_wide_kernels(g: &CudaBackend, d: usize, wide: bool, what: &str) {
    let ran = kernels_launched(g);
    let mut names = vec![format!("amma_fwd_wide_d{d}")];
    if d == 64 {
        names.push("amma_bwd_dq_wide_d64".to_string());
    }
    for name in names {
        assert_eq!(
            ran.contains(&name),
            wide,
            "{what}: {name} {} (kernels: {ran:?})",
            if wide { "did not run" } else { "ran" }
        );
    }
}

/// Asserts that two [`attention_bits`] results are the same bits, naming the output that
/// is not and `what` differed between them.
fn assert_same_attention_bits(got: &[Vec<u32>; 5], want: &[Vec<u32>; 5], what: &str) {
    for (i, name) in ["out", "lse", "dq", "dk", "dv"].iter().enumerate() {
        assert!(got[i] == want[i], "attention {name} differs {what}");
    }
}

/// The wide tensor-core kernels, forced at small sizes (`wide_attention_from = 1`), give
/// the 64-query kernels' bits for out, lse, dq, dk and dv: both head dimensions, GQA,
/// packed segments, lengths that leave partial tiles. Small enough for the sanitizers.
#[test]
fn wide_attention_kernels_match_at_small_sizes() {
    // the mma.sync kernels (on Hopper the wgmma ones would run instead)
    let Some(narrow) = gpu_with(|o| {
        o.profile = true;
        o.wgmma_attention = false;
    }) else {
        return;
    };
    let Some(wide) = gpu_with(|o| {
        o.wide_attention_from = 1;
        o.profile = true;
        o.wgmma_attention = false;
    }) else {
        return;
    };
    for (d, t, packed) in [
        (64usize, 333usize, true),
        (128, 333, true),
        (64, 200, false),
        (128, 129, false),
    ] {
        let mut r = Rng::fresh("wide attention, small");
        let (b, h) = (2usize, 4usize);
        let (dims, nq, nk, ks) = gqa_packed(&mut r, b, t, h, d);
        let (q, k, v, dout) = qkv_dout(&mut r, nq, nk);
        let ks = packed.then_some(ks);
        let run = |g: &CudaBackend| {
            let up = |x: &[f32]| g.upload(x).unwrap();
            attention_bits(g, [up(&q), up(&k), up(&v), up(&dout)], dims, ks.as_deref())
        };
        let what = format!("d = {d}, T = {t}, packed = {packed}");
        let got = run(&wide);
        assert_wide_kernels(&wide, d, true, &what);
        let want = run(&narrow);
        assert_wide_kernels(&narrow, d, false, &what);
        assert_same_attention_bits(
            &got,
            &want,
            &format!("between the wide and the 64-query kernels ({what})"),
        );
    }
    println!("PARITY wide attention kernels at small sizes: bit-identical");
}

/// On Hopper the wgmma kernels (attention_wgmma.cu, the default there) give the mma.sync
/// kernels' bits for out, lse, dq, dk and dv: both head dimensions, GQA, packed segments,
/// lengths that leave partial tiles, and one of several thousand tokens. Other GPUs do
/// not have them (the test says so and checks nothing).
#[test]
fn wgmma_attention_kernels_match_the_mma_sync_kernels() {
    let Some(mma) = gpu_with(|o| {
        o.profile = true;
        o.wgmma_attention = false;
    }) else {
        return;
    };
    if mma.arch() != "sm_90" {
        println!(
            "wgmma attention: {} is not sm_90, nothing to compare",
            mma.arch()
        );
        return;
    }
    let Some(wg) = gpu_with(|o| o.profile = true) else {
        return;
    };
    for (d, t, b, packed) in [
        (64usize, 333usize, 2usize, true),
        (128, 333, 2, true),
        (64, 200, 2, false),
        (128, 129, 2, false),
        (128, 3000, 1, true),
        (64, 4100, 1, false),
    ] {
        let mut r = Rng::fresh("wgmma attention");
        let h = 4usize;
        let (dims, nq, nk, ks) = gqa_packed(&mut r, b, t, h, d);
        let (q, k, v, dout) = qkv_dout(&mut r, nq, nk);
        let ks = packed.then_some(ks);
        let run = |g: &CudaBackend| {
            let up = |x: &[f32]| g.upload(x).unwrap();
            let bits = attention_bits(g, [up(&q), up(&k), up(&v), up(&dout)], dims, ks.as_deref());
            (bits, kernels_launched(g))
        };
        let what = format!("d = {d}, T = {t}, packed = {packed}");
        let (got, ran) = run(&wg);
        for pass in ["fwd", "bwd_dq", "bwd_dkdv"] {
            let name = format!("awg_{pass}_d{d}");
            assert!(
                ran.contains(&name),
                "{what}: {name} did not run (kernels: {ran:?})"
            );
        }
        let (want, ran) = run(&mma);
        assert!(
            !ran.iter().any(|k| k.starts_with("awg_")),
            "{what}: wgmma kernels ran with wgmma_attention off: {ran:?}"
        );
        assert_same_attention_bits(
            &got,
            &want,
            &format!("between the wgmma and the mma.sync kernels ({what})"),
        );
    }
    println!("PARITY wgmma attention kernels: bit-identical to the mma.sync kernels");
}

/// The wide tensor-core kernels (128 queries a block, for sequences of 8192 tokens and
/// more) give the 64-query kernels' bits: causal attention of the first T − 1 tokens does
/// not depend on the last one, so out, lse and dq of those rows at T = 8192 (wide) must
/// equal a call at T = 8191 (64-query kernels) on the same rows, bit for bit, at both
/// head dimensions, with GQA and packed segments. (The 64-query kernels are checked
/// against the CPU above.)
#[test]
fn wide_attention_kernels_match_on_a_prefix() {
    let Some(g) = gpu_with(|o| {
        o.profile = true;
        o.wgmma_attention = false;
    }) else {
        return;
    };
    for (d, packed) in [(64usize, false), (64, true), (128, false), (128, true)] {
        let mut r = Rng::fresh("wide attention");
        let (t, h) = (8192usize, 4usize);
        let (dims, nq, nk, ks) = gqa_packed(&mut r, 1, t, h, d);
        let (q, k, v, dout) = qkv_dout(&mut r, nq, nk);
        let ks = packed.then_some(ks);
        let run = |t: usize| {
            let ks = ks.as_ref().map(|ks| &ks[..t]);
            let dims = AttnDims { seq: t, ..dims };
            let (nq, nk) = (t * h * d, t * dims.n_kv_heads * d);
            let up = |x: &[f32], n: usize| g.upload(&x[..n]).unwrap();
            let (q, k, v) = (up(&q, nq), up(&k, nk), up(&v, nk));
            let mut o = g.zeros(nq).unwrap();
            let mut l = g.zeros(h * t).unwrap();
            g.attention_forward(&mut o, &mut l, &q, &k, &v, dims, ks)
                .unwrap();
            let (out, lse) = (g.download(&o).unwrap(), g.download(&l).unwrap());
            let (dq, _, _) = g
                .attention_backward_owned(up(&dout, nq), o, &l, q, k, v, dims, ks)
                .unwrap();
            (out, lse, g.download(&dq).unwrap())
        };
        let what = format!("d = {d}, packed = {packed}");
        let wide = run(t);
        assert_wide_kernels(&g, d, true, &format!("T = {t}, {what}"));
        let narrow = run(t - 1);
        assert_wide_kernels(&g, d, false, &format!("T = {}, {what}", t - 1));
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
        let rows = (t - 1) * h * d;
        assert!(
            bits(&wide.0[..rows]) == bits(&narrow.0),
            "out of the first {} rows differs between the wide and the 64-query forward (d = {d}, packed = {packed})",
            t - 1
        );
        for head in 0..h {
            assert!(
                bits(&wide.1[head * t..head * t + t - 1])
                    == bits(&narrow.1[head * (t - 1)..][..t - 1]),
                "lse of head {head} differs between the wide and the 64-query forward (d = {d}, packed = {packed})"
            );
        }
        assert!(
            bits(&wide.2[..rows]) == bits(&narrow.2),
            "dq of the first {} rows differs between T = {t} and T = {} (d = {d}, packed = {packed})",
            t - 1,
            t - 1
        );
        println!(
            "PARITY wide attention kernels (d = {d}, T = {t}, packed = {packed}): bit-identical on the prefix"
        );
    }
}

/// Attention gives bit-identical results when run again (no atomics, fixed reduction
/// order), on both paths, with GQA and packing.
#[test]
fn attention_is_deterministic() {
    for exact in [false, true] {
        let Some(g) = gpu_with(|o| o.exact_attention = exact) else {
            return;
        };
        let mut r = Rng::fresh("attention determinism");
        let (b, t, h) = (2usize, 333usize, 8usize);
        let (dims, nq, nk, ks) = gqa_packed(&mut r, b, t, h, 128usize);
        let q = g.upload(&r.vec(nq, 2.0)).unwrap();
        let k = g.upload(&r.vec(nk, 1.0)).unwrap();
        let v = g.upload(&r.vec(nk, 1.0)).unwrap();
        let dout = g.upload(&r.vec(nq, 1.0)).unwrap();
        let run = || {
            let mut o = g.zeros(nq).unwrap();
            let mut l = g.zeros(b * h * t).unwrap();
            let (mut dq, mut dk, mut dv) = (
                g.zeros(nq).unwrap(),
                g.zeros(nk).unwrap(),
                g.zeros(nk).unwrap(),
            );
            g.attention_forward(&mut o, &mut l, &q, &k, &v, dims, Some(&ks))
                .unwrap();
            g.attention_backward(
                &mut dq,
                &mut dk,
                &mut dv,
                &dout,
                &o,
                &l,
                &q,
                &k,
                &v,
                dims,
                Some(&ks),
            )
            .unwrap();
            [o, l, dq, dk, dv].map(|x| {
                g.download(&x)
                    .unwrap()
                    .iter()
                    .map(|f| f.to_bits())
                    .collect::<Vec<u32>>()
            })
        };
        assert_same_attention_bits(
            &run(),
            &run(),
            &format!("between two runs (exact = {exact})"),
        );
        println!("PARITY attention run twice (exact = {exact}): bit-identical");
    }
}

/// The backward that takes its inputs over (and frees them as its kernels finish with
/// them, before the gradients are allocated) gives the borrowing backward's bits, on
/// the tensor-core and the f32 path, with GQA and packing.
#[test]
fn attention_backward_taking_its_inputs_matches_the_borrowing_one() {
    for exact in [false, true] {
        let Some(g) = gpu_with(|o| o.exact_attention = exact) else {
            return;
        };
        let mut r = Rng::fresh("attention backward owned");
        let (b, t, h) = (2usize, 200usize, 8usize);
        let (dims, nq, nk, ks) = gqa_packed(&mut r, b, t, h, 64usize);
        let (q, k, v, dout) = qkv_dout(&mut r, nq, nk);
        let up = |x: &[f32]| g.upload(x).unwrap();
        let (gq, gk, gv) = (up(&q), up(&k), up(&v));
        let mut o = g.zeros(nq).unwrap();
        let mut l = g.zeros(b * h * t).unwrap();
        g.attention_forward(&mut o, &mut l, &gq, &gk, &gv, dims, Some(&ks))
            .unwrap();
        let (mut dq, mut dk, mut dv) = (
            g.zeros(nq).unwrap(),
            g.zeros(nk).unwrap(),
            g.zeros(nk).unwrap(),
        );
        let gdo = up(&dout);
        g.attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &gdo,
            &o,
            &l,
            &gq,
            &gk,
            &gv,
            dims,
            Some(&ks),
        )
        .unwrap();
        let bits = |x: &cuda::CudaBuf| {
            g.download(x)
                .unwrap()
                .iter()
                .map(|f| f.to_bits())
                .collect::<Vec<u32>>()
        };
        let want = [bits(&dq), bits(&dk), bits(&dv)];
        let o_copy = up(&g.download(&o).unwrap());
        let (oq, ok, ov) = g
            .attention_backward_owned(gdo, o_copy, &l, gq, gk, gv, dims, Some(&ks))
            .unwrap();
        let got = [bits(&oq), bits(&ok), bits(&ov)];
        for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
            assert!(
                got[i] == want[i],
                "{name} of the owned backward differs (exact = {exact})"
            );
        }
        println!("PARITY attention backward owned = borrowed (exact = {exact}): bit-identical");
    }
}

/// q, k, v and dout made by `attention_operand` (RoPE fused with the bf16 rounding on the
/// tensor-core path; rotated in place, f32, on the exact path) give the same bits through
/// the attention forward and backward as f32 operands rotated by `rope_forward`; on the
/// tensor-core path they are bf16 and equal the rounded rotation. Tiles of such operands
/// go through `uninit_like` and `copy_range` unchanged.
#[test]
fn attention_operands_match_rope_then_f32_operands() {
    for (exact, d) in [(false, 64usize), (false, 128), (true, 64)] {
        let Some(g) = gpu_with(|o| o.exact_attention = exact) else {
            return;
        };
        let mut r = Rng::fresh("attention operands");
        let (b, t, h) = (2usize, 150usize, 4usize);
        let (dims, nq, nk, ks) = gqa_packed(&mut r, b, t, h, d);
        let positions: Vec<u32> = (0..b * t).map(|_| r.below(8192) as u32).collect();
        let inv_freq: Vec<f32> = (0..d / 2)
            .map(|j| 500000f32.powf(-(2.0 * j as f32) / d as f32))
            .collect();
        let rope = RopeAngles {
            positions: &positions,
            inv_freq: &inv_freq,
        };
        let (q, k, v, dout) = qkv_dout(&mut r, nq, nk);
        let up = |x: &[f32]| g.upload(x).unwrap();
        let bits = |x: &cuda::CudaBuf| {
            g.download(x)
                .unwrap()
                .iter()
                .map(|f| f.to_bits())
                .collect::<Vec<u32>>()
        };
        // the reference: f32 operands rotated in place
        let (mut fq, mut fk, fv) = (up(&q), up(&k), up(&v));
        g.rope_forward(&mut fq, &positions, &inv_freq, h).unwrap();
        g.rope_forward(&mut fk, &positions, &inv_freq, 2).unwrap();
        let rounded = |x: &cuda::CudaBuf| {
            g.download(x)
                .unwrap()
                .iter()
                .map(|&f| half::bf16::from_f32(f).to_f32().to_bits())
                .collect::<Vec<u32>>()
        };
        let want_operands = [rounded(&fq), rounded(&fk), rounded(&fv)];
        let attend = |ops: [cuda::CudaBuf; 4]| attention_bits(&g, ops, dims, Some(&ks));
        let want = attend([fq, fk, fv, up(&dout)]);
        let oq = g.attention_operand(up(&q), Some(rope), h, d).unwrap();
        let ok = g.attention_operand(up(&k), Some(rope), 2, d).unwrap();
        let ov = g.attention_operand(up(&v), None, 2, d).unwrap();
        let half = oq.dtype() == DType::BF16;
        assert_eq!(
            half, !exact,
            "operands in bf16 exactly on the tensor-core path"
        );
        if half {
            for (i, (name, o)) in [("q", &oq), ("k", &ok), ("v", &ov)].into_iter().enumerate() {
                assert_eq!(o.dtype(), DType::BF16, "{name}");
                assert!(
                    bits(o) == want_operands[i],
                    "{name}: the fused RoPE is not the rounded rotation"
                );
            }
            // tiles of a bf16 operand: a copy of rows 3.. and back into a fresh buffer
            let n = nk;
            let mut part = g.uninit_like(n - 3 * d, &ok).unwrap();
            g.copy_range(&mut part, 0, &ok, 3 * d, n - 3 * d).unwrap();
            let mut whole = g.uninit_like(n, &ok).unwrap();
            g.copy_range(&mut whole, 0, &ok, 0, 3 * d).unwrap();
            g.copy_range(&mut whole, 3 * d, &part, 0, n - 3 * d)
                .unwrap();
            assert_eq!(part.dtype(), DType::BF16);
            assert!(bits(&whole) == bits(&ok), "copy_range of bf16 rows");
        }
        // dout as the backward's operand too (bf16 on the tensor-core path)
        let odo = g.attention_operand(up(&dout), None, h, d).unwrap();
        assert_eq!(odo.dtype() == DType::BF16, half, "dout's type");
        let got = attend([oq, ok, ov, odo]);
        assert_same_attention_bits(
            &got,
            &want,
            &format!("with attention operands (exact = {exact}, d = {d})"),
        );
        println!(
            "PARITY attention operands = rope + f32 operands (exact = {exact}, d = {d}, bf16 = {half}): bit-identical"
        );
    }
}

// ---- LM head + loss ------------------------------------------------------------------

#[test]
fn lm_head_loss_chunked_with_ignored_labels() {
    let c = cpu();
    let mut r = Rng::fresh("lm_head_loss");
    let (n, ch, v) = (37, 64, 1009);
    // chunks of 5 rows: 37 = 7·5 + 2, and V is prime
    let Some(g) = gpu_with(|o| o.logits_chunk_bytes = 5 * v * 4) else {
        return;
    };
    let Some(g_one) = gpu() else { return };
    let labels: Vec<i32> = (0..n)
        .map(|i| {
            if i % 5 == 3 {
                IGNORE_INDEX
            } else {
                r.below(v) as i32
            }
        })
        .collect();
    let count = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    let h = r.vec(n * ch, 1.0);
    let w = r.vec(v * ch, 0.5);
    for (dt, cap) in [
        (DType::F32, None),
        (DType::BF16, None),
        (DType::F32, Some(2.5f32)),
        (DType::BF16, Some(2.5)),
    ] {
        // f32: logits are 64-term dots, the loss a 1009-term softmax: 1e-5.
        // bf16: h rounded to bf16 for both GEMMs, dlogits too: 1e-2.
        let tol = if dt == DType::F32 { 1e-5 } else { 1e-2 };
        let ch_ = c.upload(&h).unwrap();
        let cw = c.upload_weight(&weight_bytes(&w, dt), dt).unwrap();
        let scale = 1.0 / count as f32;
        let (mut cdh, mut cl) = (c.zeros(n * ch).unwrap(), c.zeros(n * v).unwrap());
        let lc = c
            .lm_head_loss(
                &ch_,
                &cw,
                &labels,
                ch,
                scale,
                cap,
                Some(&mut cdh),
                Some(&mut cl),
            )
            .unwrap();
        let (cdh, cl) = (c.download(&cdh).unwrap(), c.download(&cl).unwrap());
        for (name, be) in [("5-row chunks", &g), ("one chunk", &g_one)] {
            let gh = be.upload(&h).unwrap();
            let gw = be.upload_weight(&weight_bytes(&w, dt), dt).unwrap();
            // outputs start poisoned, so an unwritten element fails
            let mut gdh = be.upload(&vec![f32::NAN; n * ch]).unwrap();
            let mut gl = be.upload(&vec![f32::NAN; n * v]).unwrap();
            let lg = be
                .lm_head_loss(
                    &gh,
                    &gw,
                    &labels,
                    ch,
                    scale,
                    cap,
                    Some(&mut gdh),
                    Some(&mut gl),
                )
                .unwrap();
            assert_eq!(lg.count, lc.count, "counted tokens");
            assert_eq!(lg.count, count);
            let tag = format!("{dt} weight, {name}, soft-cap {cap:?}");
            check_scalar(&format!("lm_head_loss loss sum {tag}"), lg.sum, lc.sum, tol);
            check(
                &format!("lm_head_loss logits {tag}"),
                &be.download(&gl).unwrap(),
                &cl,
                tol,
            );
            check(
                &format!("lm_head_loss dh {tag}"),
                &be.download(&gdh).unwrap(),
                &cdh,
                tol,
            );
            // evaluation only: no dh, no logits
            let le = be
                .lm_head_loss(&gh, &gw, &labels, ch, scale, cap, None, None)
                .unwrap();
            check_scalar(
                &format!("lm_head_loss eval-only loss {tag}"),
                le.sum,
                lc.sum,
                tol,
            );
        }
    }
    // the standalone soft-cap (generation's logits): tanh of libdevice vs libm, 1e-6
    let x = r.vec(4099, 8.0);
    let (mut cx, mut gx) = (c.upload(&x).unwrap(), g.upload(&x).unwrap());
    c.softcap(&mut cx, 2.5).unwrap();
    g.softcap(&mut gx, 2.5).unwrap();
    check(
        "softcap",
        &g.download(&gx).unwrap(),
        &c.download(&cx).unwrap(),
        1e-6,
    );
    let bad: Vec<i32> = vec![0, v as i32];
    let (gh, gw) = (
        g.upload(&r.vec(2 * ch, 1.0)).unwrap(),
        g.upload(&w).unwrap(),
    );
    let e = g
        .lm_head_loss(&gh, &gw, &bad, ch, 1.0, None, None, None)
        .expect_err("label past V");
    assert!(e.to_string().contains(&v.to_string()), "{e}");
}

/// NF4 expansion (bitsandbytes' layout, with and without double quantization, a short
/// last block, into f32, f16 and bf16) equals the CPU's bit for bit: both compute
/// code · scale in f32 with each operation rounded alone, then round once.
#[test]
fn nf4_dequantize_matches_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("nf4");
    let code = r.vec(16, 1.0);
    let (cc, gc) = p.up(&code);
    for (numel, nested) in [(64 * 37 + 10usize, false), (64 * 300 + 1, true), (1, true)] {
        let blocks = numel.div_ceil(64);
        let bytes =
            |n: usize, r: &mut Rng| -> Vec<f32> { (0..n).map(|_| r.below(256) as f32).collect() };
        let (cp, gp) = p.weight(&bytes(numel.div_ceil(2), &mut r), DType::U8);
        let (ca, ga) = if nested {
            p.weight(&bytes(blocks, &mut r), DType::U8)
        } else {
            p.up(&r.vec(blocks, 0.1))
        };
        let (cna, gna) = p.up(&r.vec(blocks.div_ceil(256), 0.1));
        let (cnc, gnc) = p.up(&r.vec(256, 1.0));
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let parts_c = lema::backend::Nf4Parts::<CpuBackend<f32>> {
                packed: &cp,
                absmax: &ca,
                code: &cc,
                nested: nested.then_some(lema::backend::Nf4Nested {
                    absmax: &cna,
                    code: &cnc,
                    blocksize: 256,
                    offset: 0.0371,
                }),
                numel,
                blocksize: 64,
            };
            let parts_g = lema::backend::Nf4Parts::<CudaBackend> {
                packed: &gp,
                absmax: &ga,
                code: &gc,
                nested: nested.then_some(lema::backend::Nf4Nested {
                    absmax: &gna,
                    code: &gnc,
                    blocksize: 256,
                    offset: 0.0371,
                }),
                numel,
                blocksize: 64,
            };
            let want = c.dequantize_nf4(&parts_c, dt).unwrap();
            let got = g.dequantize_nf4(&parts_g, dt).unwrap();
            // as a weight: read back through a GEMM-free path, the f32 download of f32
            let want = c.download(&want).unwrap();
            let got = expanded_as_f32(&g, &got, numel, dt);
            check(
                &format!("nf4 {numel} elements, nested {nested}, into {dt}"),
                &got,
                &want,
                0.0,
            );
        }
    }
}

/// An expanded weight of `numel` elements of `dt`, read back in f32 through a GEMM-free
/// path: the download of an f32 one, a half one times the identity.
fn expanded_as_f32(g: &CudaBackend, w: &cuda::CudaBuf, numel: usize, dt: DType) -> Vec<f32> {
    if dt == DType::F32 {
        return g.download(w).unwrap();
    }
    let mut out = g.zeros(numel).unwrap();
    let one = g.upload(&[1.0]).unwrap();
    g.matmul(
        &mut out,
        &one,
        w,
        Gemm {
            m: 1,
            n: numel,
            k: 1,
            trans_a: false,
            trans_b: true,
            alpha: 1.0,
            accumulate: Accumulate::Overwrite,
        },
    )
    .unwrap();
    g.download(&out).unwrap()
}

#[test]
fn fp8_dequantize_matches_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("fp8");
    // rows x cols: element by element (cols % 16 != 0), 16 a thread, short edge blocks
    for (rows, cols) in [(200usize, 130usize), (256, 384), (300, 144), (1, 16)] {
        let codes: Vec<f32> = (0..rows * cols)
            .map(|_| {
                let b = r.below(254) as u8;
                lema::quant::fp8::e4m3_to_f32(if b & 0x7f == 0x7f { 0 } else { b })
            })
            .collect();
        let (cq, gq) = p.weight(&codes, DType::F8E4M3);
        let [br, bc] = lema::quant::fp8::scale_shape(rows, cols);
        let (cs, gs) = p.up(&r.vec(br * bc, 0.01));
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let want = c
                .dequantize_fp8(
                    &lema::backend::Fp8Parts::<CpuBackend<f32>> {
                        codes: &cq,
                        scale_inv: &cs,
                        rows,
                        cols,
                    },
                    dt,
                )
                .unwrap();
            let got = g
                .dequantize_fp8(
                    &lema::backend::Fp8Parts::<CudaBackend> {
                        codes: &gq,
                        scale_inv: &gs,
                        rows,
                        cols,
                    },
                    dt,
                )
                .unwrap();
            let want = c.download(&want).unwrap();
            let got = expanded_as_f32(&g, &got, rows * cols, dt);
            check(&format!("fp8 [{rows}, {cols}] into {dt}"), &got, &want, 0.0);
        }
    }
}

// ---- uninitialised buffers -----------------------------------------------------------

/// Buffers from `Backend::uninit` read as NaN here (`poison_uninit`), and every op whose
/// output the model code takes from `uninit` fills such a buffer completely: the result
/// equals the CPU's, no NaN left. (Attention and the LM head loss write into NaN-filled
/// outputs in their own tests.)
#[test]
fn uninit_outputs_are_fully_written() {
    let Some(g) = gpu() else { return };
    assert!(
        g.poisons_uninit(),
        "the tests run with poisoned uninit buffers"
    );
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("uninit");
    let poisoned = g.download(&g.uninit(1001).unwrap()).unwrap();
    assert!(
        poisoned.iter().all(|x| x.is_nan()),
        "a poisoned uninit buffer reads as NaN"
    );
    assert!(lema::backend::DeviceBuf::is_empty(&g.uninit(0).unwrap()));
    // an output pair: zeros on the CPU, NaN on the GPU
    let un = |n: usize| (c.uninit(n).unwrap(), g.uninit(n).unwrap());
    let (rows, cols, k) = (37, 96, 200);
    let n = rows * cols;
    // GEMM with Overwrite (the Linear forward x·Wᵀ), f32 and bf16 weights; k = 0 is a
    // memset of the output
    let (cx, gx) = p.up(&r.vec(rows * k, 1.0));
    let w = r.vec(cols * k, 0.1);
    for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        let (cw, gw) = p.weight(&w, dt);
        let (mut cy, mut gy) = un(n);
        let gm = gemm(rows, cols, k, false, true, 1.0, Accumulate::Overwrite);
        c.matmul(&mut cy, &cx, &cw, gm).unwrap();
        g.matmul(&mut gy, &gx, &gw, gm).unwrap();
        p.cmp(
            &format!("uninit: matmul {dt} weight Overwrite"),
            &cy,
            &gy,
            tol,
        );
    }
    let (ce, ge) = p.up(&[]);
    let (mut cy, mut gy) = un(n);
    let gm = gemm(rows, cols, 0, false, false, 1.0, Accumulate::Overwrite);
    c.matmul(&mut cy, &ce, &ce, gm).unwrap();
    g.matmul(&mut gy, &ge, &ge, gm).unwrap();
    p.cmp("uninit: matmul k=0 Overwrite (zeros)", &cy, &gy, 0.0);
    // axpy Overwrite (the residual gradient dh = dy)
    let (cs, gs) = p.up(&r.vec(n, 1.0));
    let (mut cy, mut gy) = un(n);
    c.axpy(&mut cy, 0.5, &cs, Accumulate::Overwrite).unwrap();
    g.axpy(&mut gy, 0.5, &gs, Accumulate::Overwrite).unwrap();
    p.cmp("uninit: axpy Overwrite", &cy, &gy, 1e-6);
    // copy_cols: three column blocks fill [rows, 3·cols] (GPT-2's q, k, v and dqkv)
    let parts: Vec<_> = (0..3).map(|_| p.up(&r.vec(n, 1.0))).collect();
    let (mut cd, mut gd) = un(3 * n);
    for (j, (cs, gs)) in parts.iter().enumerate() {
        c.copy_cols(
            &mut cd,
            3 * cols,
            j * cols,
            cs,
            cols,
            0,
            cols,
            Accumulate::Overwrite,
        )
        .unwrap();
        g.copy_cols(
            &mut gd,
            3 * cols,
            j * cols,
            gs,
            cols,
            0,
            cols,
            Accumulate::Overwrite,
        )
        .unwrap();
    }
    p.cmp("uninit: copy_cols, all columns", &cd, &gd, 1e-7);
    // norms, forward and backward (Overwrite)
    let nw: Vec<f32> = r.vec(cols, 0.5).iter().map(|v| v + 1.0).collect();
    let (cnw, gnw) = p.weight(&nw, DType::BF16);
    let (cnb, gnb) = p.weight(&r.vec(cols, 0.5), DType::BF16);
    let (cx, gx) = p.up(&r.vec(n, 3.0));
    let (cdo, gdo) = p.up(&r.vec(n, 1.0));
    let (mut co, mut go) = un(n);
    let (mut cr, mut gr) = un(rows);
    c.rms_norm_forward(&mut co, &mut cr, &cx, &cnw, 0.0, 1e-5)
        .unwrap();
    g.rms_norm_forward(&mut go, &mut gr, &gx, &gnw, 0.0, 1e-5)
        .unwrap();
    p.cmp("uninit: rms_norm_forward out", &co, &go, 1e-5);
    p.cmp("uninit: rms_norm_forward rstd", &cr, &gr, 1e-5);
    let (mut cdx, mut gdx) = un(n);
    c.rms_norm_backward(&mut cdx, &cdo, &cx, &cnw, 0.0, &cr, Accumulate::Overwrite)
        .unwrap();
    g.rms_norm_backward(&mut gdx, &gdo, &gx, &gnw, 0.0, &gr, Accumulate::Overwrite)
        .unwrap();
    p.cmp("uninit: rms_norm_backward Overwrite", &cdx, &gdx, 1e-5);
    let (mut co, mut go) = un(n);
    let (mut cm, mut gm) = un(rows);
    let (mut cr, mut gr) = un(rows);
    c.layer_norm_forward(&mut co, &mut cm, &mut cr, &cx, &cnw, &cnb, 1e-5)
        .unwrap();
    g.layer_norm_forward(&mut go, &mut gm, &mut gr, &gx, &gnw, &gnb, 1e-5)
        .unwrap();
    p.cmp("uninit: layer_norm_forward out", &co, &go, 1e-5);
    p.cmp("uninit: layer_norm_forward mean", &cm, &gm, 1e-5);
    p.cmp("uninit: layer_norm_forward rstd", &cr, &gr, 1e-5);
    let (mut cdx, mut gdx) = un(n);
    c.layer_norm_backward(&mut cdx, &cdo, &cx, &cnw, &cm, &cr, Accumulate::Overwrite)
        .unwrap();
    g.layer_norm_backward(&mut gdx, &gdo, &gx, &gnw, &gm, &gr, Accumulate::Overwrite)
        .unwrap();
    p.cmp("uninit: layer_norm_backward Overwrite", &cdx, &gdx, 1e-5);
    // activations and dropout: elementwise over the whole buffer
    let (ca, ga) = p.up(&r.vec(n, 4.0));
    let (cb, gb) = p.up(&r.vec(n, 2.0));
    let (mut co, mut go) = un(n);
    c.gated_forward(Activation::Silu, &mut co, &ca, &cb)
        .unwrap();
    g.gated_forward(Activation::Silu, &mut go, &ga, &gb)
        .unwrap();
    p.cmp("uninit: swiglu_forward", &co, &go, 1e-6);
    let (mut cg, mut gg) = un(n);
    let (mut cu, mut gu) = un(n);
    c.gated_backward(Activation::Silu, &mut cg, &mut cu, &cdo, &ca, &cb)
        .unwrap();
    g.gated_backward(Activation::Silu, &mut gg, &mut gu, &gdo, &ga, &gb)
        .unwrap();
    p.cmp("uninit: swiglu_backward dgate", &cg, &gg, 1e-6);
    p.cmp("uninit: swiglu_backward dup", &cu, &gu, 1e-6);
    let (mut co, mut go) = un(n);
    c.gelu_forward(&mut co, &ca).unwrap();
    g.gelu_forward(&mut go, &ga).unwrap();
    p.cmp("uninit: gelu_forward", &co, &go, 1e-6);
    let (mut cdx, mut gdx) = un(n);
    c.gelu_backward(&mut cdx, &cdo, &ca).unwrap();
    g.gelu_backward(&mut gdx, &gdo, &ga).unwrap();
    p.cmp("uninit: gelu_backward", &cdx, &gdx, 1e-6);
    let seed = r.next_u64();
    let (mut co, mut go) = un(n);
    c.dropout_forward(&mut co, &ca, 0.1, seed, 0).unwrap();
    g.dropout_forward(&mut go, &ga, 0.1, seed, 0).unwrap();
    p.cmp("uninit: dropout_forward", &co, &go, 1e-7);
    let (mut cdx, mut gdx) = un(n);
    c.dropout_backward(&mut cdx, &cdo, 0.1, seed, 0).unwrap();
    g.dropout_backward(&mut gdx, &gdo, 0.1, seed, 0).unwrap();
    p.cmp("uninit: dropout_backward", &cdx, &gdx, 1e-7);
}

// ---- optimizers ----------------------------------------------------------------------

/// The AdamW hyper-parameters the optimizer tests step with (PyTorch's defaults, lr 1e-3,
/// weight decay 0.01) at step `step`.
fn adamw_hyper(step: u64) -> AdamWStep {
    AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step,
    }
}

#[test]
fn optimizers_adamw_and_sgd() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("optimizers");
    let n = 5000;
    let (mut cp, mut gp) = p.up(&r.vec(n, 1.0));
    let (mut cm, mut gm) = p.up(&vec![0.0; n]);
    let (mut cv, mut gv) = p.up(&vec![0.0; n]);
    for step in 1..=3 {
        let (cg, gg) = p.up(&r.vec(n, 0.01));
        let h = adamw_hyper(step);
        c.adamw_step(&mut cp, &cg, &mut cm, &mut cv, h).unwrap();
        g.adamw_step(&mut gp, &gg, &mut gm, &mut gv, h).unwrap();
    }
    // elementwise f32 arithmetic; the CPU's lerp and f64 bias corrections differ by ulps.
    p.cmp("adamw_step param (3 steps)", &cp, &gp, 1e-6);
    p.cmp("adamw_step exp_avg", &cm, &gm, 1e-6);
    p.cmp("adamw_step exp_avg_sq", &cv, &gv, 1e-6);
    let (mut cb, mut gb) = p.up(&vec![0.0; n]);
    for step in 0..3 {
        let (cg, gg) = p.up(&r.vec(n, 0.1));
        let h = SgdStep {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 0.01,
            first: step == 0,
        };
        c.sgd_step(&mut cp, &cg, &mut cb, h).unwrap();
        g.sgd_step(&mut gp, &gg, &mut gb, h).unwrap();
    }
    p.cmp("sgd_step param (3 steps)", &cp, &gp, 1e-6);
    p.cmp("sgd_step momentum", &cb, &gb, 1e-6);
}

/// Lengths for the multi-tensor tests: empty, one element, around the 256-thread block and
/// the 2048 elements of an elementwise block's share, and past the 512 blocks × 256 of a
/// sum of squares (whose blocks then stride).
const MULTI_LENS: [usize; 9] = [
    0,
    1,
    255,
    256,
    2047,
    2049,
    5000,
    16 * 2048 + 3,
    131_072 + 517,
];

/// The bits of a buffer's values.
fn bits(g: &CudaBackend, b: &cuda::CudaBuf) -> Vec<u32> {
    g.download(b).unwrap().iter().map(|x| x.to_bits()).collect()
}

/// `data` on the GPU: in device memory, or with `host` in mapped host memory
/// (`zeros_host`, as offloaded optimizer state), copied exactly.
fn gpu_buf(g: &CudaBackend, data: &[f32], host: bool) -> cuda::CudaBuf {
    if !host {
        return g.upload(data).unwrap();
    }
    let n = data.len();
    let mut b = g.zeros_host(n).unwrap();
    if n > 0 {
        let src = g.upload(data).unwrap();
        g.copy_cols(&mut b, n, 0, &src, n, 0, n, Accumulate::Overwrite)
            .unwrap();
    }
    b
}

/// Parameters and optimizer state of one tensor: the multi-tensor call's copy (state in
/// mapped host memory where `host`) and the per-tensor calls' copy (device memory).
struct MultiCase {
    multi: Vec<cuda::CudaBuf>,
    single: Vec<cuda::CudaBuf>,
}

/// One [`MultiCase`] per length of [`MULTI_LENS`] with `states` state tensors (random,
/// non-negative like AdamW's second moment), those of tensors 3 and 6 offloaded on the
/// multi-tensor side.
fn multi_cases(g: &CudaBackend, r: &mut Rng, states: usize) -> Vec<MultiCase> {
    MULTI_LENS
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut data = vec![r.vec(n, 1.0)];
            for _ in 0..states {
                data.push(r.vec(n, 0.01).iter().map(|x| x.abs()).collect());
            }
            let host = i == 3 || i == 6;
            MultiCase {
                multi: (data.iter().enumerate())
                    .map(|(j, d)| gpu_buf(g, d, host && j > 0))
                    .collect(),
                single: data.iter().map(|d| gpu_buf(g, d, false)).collect(),
            }
        })
        .collect()
}

/// Every buffer of the multi-tensor side has the bits of the per-tensor side, and every
/// non-empty parameter moved from `start`.
fn assert_same_bits(
    g: &CudaBackend,
    what: &str,
    cases: &[MultiCase],
    start: &[Vec<u32>],
    names: &[&str],
) {
    for (i, c) in cases.iter().enumerate() {
        let n = MULTI_LENS[i];
        for (j, name) in names.iter().enumerate() {
            let (got, want) = (bits(g, &c.multi[j]), bits(g, &c.single[j]));
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                diff, 0,
                "{what}, tensor {i} ({n} elements): {diff} values of {name} differ"
            );
        }
        if n > 0 {
            assert_ne!(
                bits(g, &c.single[0]),
                start[i],
                "{what}: tensor {i} did not move"
            );
        }
    }
    println!(
        "PARITY {:<44} bit-identical",
        format!("{what} multi-tensor vs per tensor")
    );
}

#[test]
fn multi_tensor_optimizers_match_per_tensor_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::fresh("multi_tensor_optimizers");
    let grads = |r: &mut Rng| -> Vec<cuda::CudaBuf> {
        MULTI_LENS
            .iter()
            .map(|&n| g.upload(&r.vec(n, 0.01)).unwrap())
            .collect()
    };
    let mut cases = multi_cases(&g, &mut r, 2);
    let start: Vec<Vec<u32>> = cases.iter().map(|c| bits(&g, &c.single[0])).collect();
    for step in 1..=3 {
        let gs = grads(&mut r);
        let h = adamw_hyper(step);
        let mut items: Vec<AdamWItem<'_, CudaBackend>> = cases
            .iter_mut()
            .zip(&gs)
            .map(|(c, gr)| match c.multi.as_mut_slice() {
                [p, m, v] => AdamWItem { p, g: gr, m, v },
                _ => unreachable!("two moments"),
            })
            .collect();
        g.adamw_step_all(&mut items, h).unwrap();
        for (c, gr) in cases.iter_mut().zip(&gs) {
            let [p, m, v] = c.single.as_mut_slice() else {
                unreachable!("two moments")
            };
            g.adamw_step(p, gr, m, v, h).unwrap();
        }
    }
    assert_same_bits(
        &g,
        "adamw_step_all (3 steps)",
        &cases,
        &start,
        &["param", "exp_avg", "exp_avg_sq"],
    );

    let mut cases = multi_cases(&g, &mut r, 1);
    let start: Vec<Vec<u32>> = cases.iter().map(|c| bits(&g, &c.single[0])).collect();
    for step in 0..3 {
        let gs = grads(&mut r);
        let h = SgdStep {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 0.01,
            first: step == 0,
        };
        let mut items: Vec<SgdItem<'_, CudaBackend>> = cases
            .iter_mut()
            .zip(&gs)
            .map(|(c, gr)| match c.multi.as_mut_slice() {
                [p, buf] => SgdItem { p, g: gr, buf },
                _ => unreachable!("one momentum buffer"),
            })
            .collect();
        g.sgd_step_all(&mut items, h).unwrap();
        for (c, gr) in cases.iter_mut().zip(&gs) {
            let [p, buf] = c.single.as_mut_slice() else {
                unreachable!("one buffer")
            };
            g.sgd_step(p, gr, buf, h).unwrap();
        }
    }
    assert_same_bits(
        &g,
        "sgd_step_all (3 steps)",
        &cases,
        &start,
        &["param", "momentum_buffer"],
    );

    // a tensor whose gradient has the wrong length is named, and no tensor is updated
    let (mut p, mut b) = (g.zeros(8).unwrap(), g.zeros(8).unwrap());
    let (mut q, mut c) = (g.zeros(4).unwrap(), g.zeros(4).unwrap());
    let (g8, g3) = (g.upload(&[1.0; 8]).unwrap(), g.zeros(3).unwrap());
    let mut items = vec![
        SgdItem {
            p: &mut p,
            g: &g8,
            buf: &mut b,
        },
        SgdItem {
            p: &mut q,
            g: &g3,
            buf: &mut c,
        },
    ];
    let h = SgdStep {
        lr: 1.0,
        momentum: 0.0,
        weight_decay: 0.0,
        first: true,
    };
    let msg = g.sgd_step_all(&mut items, h).unwrap_err().to_string();
    assert!(
        msg.contains("grad of tensor 1") && msg.contains("3 elements"),
        "{msg}"
    );
    assert!(bits(&g, &p).iter().all(|&b| b == 0), "tensor 0 was updated");
}

#[test]
fn multi_tensor_sum_squares_matches_per_tensor_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let mut r = Rng::fresh("multi_tensor_sum_squares");
    let data: Vec<Vec<f32>> = MULTI_LENS.iter().map(|&n| r.vec(n, 2.0)).collect();
    let gx: Vec<cuda::CudaBuf> = data.iter().map(|d| g.upload(d).unwrap()).collect();
    let cx: Vec<_> = data.iter().map(|d| c.upload(d).unwrap()).collect();
    let refs: Vec<&cuda::CudaBuf> = gx.iter().collect();
    let all = g.sum_squares_all(&refs).unwrap();
    let each = refs
        .iter()
        .fold(0.0, |acc, x| acc + g.sum_squares(x).unwrap());
    assert_eq!(
        all.to_bits(),
        each.to_bits(),
        "sum_squares_all {all} vs per tensor {each}"
    );
    println!(
        "PARITY {:<44} bit-identical",
        "sum_squares_all vs per tensor (f64)"
    );
    let want = c.sum_squares_all(&cx.iter().collect::<Vec<_>>()).unwrap();
    let rel = (all - want).abs() / want;
    println!(
        "PARITY {:<44} rel={rel:.2e} tol=1e-12",
        "sum_squares_all (f64) vs cpu"
    );
    assert!(rel <= 1e-12, "sum_squares_all: {all} vs cpu {want}");
    assert_eq!(g.sum_squares_all(&[]).unwrap(), 0.0);
    assert_eq!(
        g.sum_squares_all(&[&gx[0], &gx[0]]).unwrap(),
        0.0,
        "only empty buffers"
    );
}

#[test]
fn fill_zero_all_zeroes_exactly_the_buffers_given() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::fresh("fill_zero_all");
    let data: Vec<Vec<f32>> = MULTI_LENS.iter().map(|&n| r.vec(n, 1.0)).collect();
    // the zeroed buffers (one of them in mapped host memory), each beside one left alone
    let mut zeroed: Vec<cuda::CudaBuf> = (data.iter().enumerate())
        .map(|(i, d)| gpu_buf(&g, d, i == 4))
        .collect();
    let kept: Vec<cuda::CudaBuf> = data.iter().map(|d| g.upload(d).unwrap()).collect();
    // a bf16 buffer (not f32: zeroed by a memset of its own)
    let half = r.vec(1001, 1.0);
    let mut hb = g
        .upload_weight(&weight_bytes(&half, DType::BF16), DType::BF16)
        .unwrap();
    let mut list: Vec<&mut cuda::CudaBuf> = zeroed.iter_mut().collect();
    list.push(&mut hb);
    g.fill_zero_all(&mut list).unwrap();
    for (i, (z, k)) in zeroed.iter().zip(&kept).enumerate() {
        assert!(
            bits(&g, z).iter().all(|&b| b == 0),
            "buffer {i} ({} elements) not zeroed",
            MULTI_LENS[i]
        );
        let want: Vec<u32> = data[i].iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            bits(&g, k),
            want,
            "buffer {i} beside the zeroed ones changed"
        );
    }
    assert!(
        bits(&g, &hb).iter().all(|&b| b == 0),
        "the bf16 buffer was not zeroed"
    );
    g.fill_zero_all(&mut []).unwrap();
    println!(
        "PARITY {:<44} exact",
        "fill_zero_all (f32, mapped host, bf16)"
    );
}

/// `matmul_group` (one strided-batched cuBLAS call for the LoRA products of linears that
/// share an input) against the CPU's products and against the same products one by one:
/// the forward's t_i = x·A_iᵀ into group outputs, and the backward's dA_i += dt_iᵀ·x into
/// a block's grouped gradients, with bf16 and f32 weights; and the fallback (operands not at
/// one stride) bit for bit the products one by one.
#[test]
fn group_gemms_match_the_products_one_by_one() {
    let Some(g) = gpu() else { return };
    let c = cpu();
    let p = Pair { c: &c, g: &g };
    let mut r = Rng::fresh("matmul_group");
    let (n, fin, rank, count) = (45, 192, 16, 3);
    for dt in [DType::BF16, DType::F32] {
        let (_, gw) = p.weight(&r.vec(8 * fin, 0.1), dt);
        let x = r.vec(n * fin, 1.0);
        let (cx, gx) = p.up(&x);
        let gxh = g.gemm_input(&gx, &gw).unwrap();
        let gxg = gxh.as_ref().unwrap_or(&gx);
        let a: Vec<Vec<f32>> = (0..count).map(|_| r.vec(rank * fin, 0.1)).collect();
        let ca: Vec<_> = a.iter().map(|v| c.upload(v).unwrap()).collect();
        let ga: Vec<_> = a.iter().map(|v| g.upload(v).unwrap()).collect();
        let copies = g
            .gemm_input_all(&ga.iter().map(|b| (b, &gw)).collect::<Vec<_>>())
            .unwrap();
        let ga_g: Vec<&cuda::CudaBuf> = copies
            .iter()
            .zip(&ga)
            .map(|(h, a)| h.as_ref().unwrap_or(a))
            .collect();
        // forward: t_i[N, R] = x · A_iᵀ
        let fwd = gemm(n, rank, fin, false, true, 1.0, Accumulate::Overwrite);
        let mut ts = g.gemm_output_group(n * rank, count, &gw).unwrap();
        g.matmul_group(&mut ts.iter_mut().collect::<Vec<_>>(), &[gxg], &ga_g, fwd)
            .unwrap();
        for i in 0..count {
            let mut one = g.gemm_output(n * rank, &gw).unwrap();
            g.matmul(&mut one, gxg, ga_g[i], fwd).unwrap();
            let mut ct = c.zeros(n * rank).unwrap();
            c.matmul(&mut ct, &cx, &ca[i], fwd).unwrap();
            let tol = if dt == DType::F32 { 1e-4 } else { 2e-2 };
            p.cmp(
                &format!("{dt} group t_{i} against the CPU"),
                &ct,
                &ts[i],
                tol,
            );
            let same = bits(&g, &one) == bits(&g, &ts[i]);
            println!("{dt} group t_{i}: bit-identical to the product alone: {same}");
            check(
                &format!("{dt} group t_{i} against the product alone"),
                &g.download(&ts[i]).unwrap(),
                &g.download(&one).unwrap(),
                tol,
            );
        }
        // backward: dA_i[R, in] += dt_iᵀ · x, into one block's grouped gradients
        let dt_vals: Vec<Vec<f32>> = (0..count).map(|_| r.vec(n * rank, 1.0)).collect();
        let mut gdt = g.gemm_output_group(n * rank, count, &gw).unwrap();
        for (b, v) in gdt.iter_mut().zip(&dt_vals) {
            // dt in the type the GEMMs read: written by a GEMM with an identity
            let (_, gi) = p.up(&identity(n));
            let src = g.upload(v).unwrap();
            let ident = g.gemm_input(&gi, &gw).unwrap();
            let srch = g.gemm_input(&src, &gw).unwrap();
            let eye = gemm(n, rank, n, false, false, 1.0, Accumulate::Overwrite);
            g.matmul(
                b,
                ident.as_ref().unwrap_or(&gi),
                srch.as_ref().unwrap_or(&src),
                eye,
            )
            .unwrap();
        }
        let lens = vec![rank * fin; count];
        let mut das = g.zeros_group(&[vec![7], lens.clone()].concat()).unwrap();
        let mut das = das.split_off(1);
        let bwd = gemm(rank, fin, n, true, false, 1.0, Accumulate::Add);
        let dt_refs: Vec<&cuda::CudaBuf> = gdt.iter().collect();
        g.matmul_group(
            &mut das.iter_mut().collect::<Vec<_>>(),
            &dt_refs,
            &[gxg],
            bwd,
        )
        .unwrap();
        for i in 0..count {
            let mut one = g.zeros(rank * fin).unwrap();
            g.matmul(&mut one, dt_refs[i], gxg, bwd).unwrap();
            let (cdt, _) = p.up(&g.download(dt_refs[i]).unwrap());
            let mut cda = c.zeros(rank * fin).unwrap();
            c.matmul(&mut cda, &cdt, &cx, bwd).unwrap();
            let tol = if dt == DType::F32 { 1e-4 } else { 2e-2 };
            p.cmp(
                &format!("{dt} group dA_{i} against the CPU"),
                &cda,
                &das[i],
                tol,
            );
            let same = bits(&g, &one) == bits(&g, &das[i]);
            println!("{dt} group dA_{i}: bit-identical to the product alone: {same}");
            check(
                &format!("{dt} group dA_{i} against the product alone"),
                &g.download(&das[i]).unwrap(),
                &g.download(&one).unwrap(),
                tol,
            );
        }
        // operands in separate allocations: the products one by one, bit for bit
        let mut sep: Vec<cuda::CudaBuf> =
            (0..count).map(|_| g.zeros(rank * fin).unwrap()).collect();
        g.matmul_group(
            &mut sep.iter_mut().collect::<Vec<_>>(),
            &dt_refs,
            &[gxg],
            bwd,
        )
        .unwrap();
        for (i, b) in sep.iter().enumerate() {
            let mut one = g.zeros(rank * fin).unwrap();
            g.matmul(&mut one, dt_refs[i], gxg, bwd).unwrap();
            assert_eq!(bits(&g, b), bits(&g, &one), "{dt}: separate dA_{i}");
        }
    }
    // a list of operands that is neither one nor one per output is a bug, reported
    let mut outs: Vec<cuda::CudaBuf> = (0..3).map(|_| g.zeros(4).unwrap()).collect();
    let ops: Vec<cuda::CudaBuf> = (0..2).map(|_| g.zeros(4).unwrap()).collect();
    let e = g
        .matmul_group(
            &mut outs.iter_mut().collect::<Vec<_>>(),
            &ops.iter().collect::<Vec<_>>(),
            &[&ops[0]],
            gemm(2, 2, 2, false, false, 1.0, Accumulate::Overwrite),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 operands for 3 outputs"), "{e}");
}

fn identity(n: usize) -> Vec<f32> {
    (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect()
}

#[test]
fn gemm_input_all_matches_gemm_input_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::fresh("gemm_input_all");
    let weight = |dt: DType| g.upload_weight(&weight_bytes(&[0.5; 4], dt), dt).unwrap();
    let weights = [weight(DType::BF16), weight(DType::F16), weight(DType::F32)];
    // values past the f16 range and near rounding ties, in every length
    let xs: Vec<cuda::CudaBuf> = MULTI_LENS
        .iter()
        .map(|&n| g.upload(&r.vec(n, 7e4)).unwrap())
        .collect();
    let pairs: Vec<(&cuda::CudaBuf, &cuda::CudaBuf)> = (xs.iter().enumerate())
        .map(|(i, x)| (x, &weights[i % 3]))
        .collect();
    let all = g.gemm_input_all(&pairs).unwrap();
    assert_eq!(all.len(), pairs.len());
    for (i, (got, (x, w))) in all.iter().zip(&pairs).enumerate() {
        let want = g.gemm_input(x, w).unwrap();
        match (got, &want) {
            (Some(a), Some(b)) => {
                assert_eq!(a.dtype(), b.dtype(), "pair {i}");
                assert_eq!(
                    bits(&g, a),
                    bits(&g, b),
                    "pair {i} ({} elements, {})",
                    MULTI_LENS[i],
                    w.dtype()
                );
            }
            (None, None) => assert_eq!(w.dtype(), DType::F32, "pair {i}"),
            _ => panic!(
                "pair {i}: gemm_input_all {} a copy, gemm_input {}",
                got.is_some(),
                want.is_some()
            ),
        }
    }
    assert!(g.gemm_input_all(&[]).unwrap().is_empty());
    println!(
        "PARITY {:<44} bit-identical",
        "gemm_input_all vs gemm_input (bf16, f16)"
    );
}

// ---- faults and the streaming hooks --------------------------------------------------

#[test]
fn out_of_memory_says_what_to_change() {
    let Some(g) = gpu() else { return };
    let e = match g.zeros(1 << 40) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("4 TiB allocation succeeded"),
    };
    println!("OOM message: {e}");
    assert!(
        e.contains("out of GPU memory") && e.contains("free") && e.contains("batch"),
        "{e}"
    );
    // the backend still works afterwards
    let b = g.upload(&[1.0, 2.0]).unwrap();
    assert_eq!(g.download(&b).unwrap(), vec![1.0, 2.0]);
}

#[test]
fn async_weight_upload_on_a_copy_stream() {
    let Some(g) = gpu() else { return };
    let mut r = Rng::fresh("async_upload");
    let (n_tok, fin, fout) = (16, 128, 64);
    let w = r.vec(fout * fin, 0.1);
    let bytes = weight_bytes(&w, DType::BF16);
    let mut pinned = g.alloc_pinned(bytes.len()).unwrap();
    pinned.as_mut_slice().unwrap().copy_from_slice(&bytes);
    let copy = g.new_copy_stream().unwrap();
    let mut slot = g.alloc_weight(fout * fin, DType::BF16).unwrap();
    let free = g.record_compute_event().unwrap();
    // SAFETY: `pinned` outlives the wait below and is not changed meanwhile.
    let done =
        unsafe { g.upload_weight_async(&mut slot, pinned.as_slice().unwrap(), &copy, Some(&free)) }
            .unwrap();
    g.compute_wait(&done).unwrap();
    let x = g.upload(&r.vec(n_tok * fin, 1.0)).unwrap();
    let gm = gemm(n_tok, fout, fin, false, true, 1.0, Accumulate::Overwrite);
    let mut y_async = g.zeros(n_tok * fout).unwrap();
    g.matmul(&mut y_async, &x, &slot, gm).unwrap();
    let sync_w = g.upload_weight(&bytes, DType::BF16).unwrap();
    let mut y_sync = g.zeros(n_tok * fout).unwrap();
    g.matmul(&mut y_sync, &x, &sync_w, gm).unwrap();
    // the same bytes and the same GEMM: identical.
    check(
        "upload_weight_async then matmul",
        &g.download(&y_async).unwrap(),
        &g.download(&y_sync).unwrap(),
        0.0,
    );
    g.synchronize().unwrap();
}

// ---- whole model: PEFT fixtures and training steps ------------------------------------

/// A fixture folder: `tests/fixtures` under the working directory when there is one (the
/// GPU machine runs the test binary from a copy of the tree elsewhere than where it was
/// built), else under the crate that built the test.
fn fixture(case: &str) -> std::path::PathBuf {
    let here = std::path::Path::new("tests/fixtures").join(case);
    if here.join("model.safetensors").exists() {
        here
    } else {
        common::fixture(case)
    }
}

fn fixture_config(case: &str, device: Device) -> LemaConfig {
    let dir = fixture(case);
    let mut cfg = LemaConfig::new(dir.join("model.safetensors"));
    cfg.adapter_path = Some(dir.join("adapter"));
    cfg.device = device;
    cfg
}

fn adamw_of(case: &str) -> OptimizerConfig {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(case).join("meta.json")).unwrap())
            .unwrap();
    let o = &meta["optimizers"]["adamw"];
    let betas = o["betas"].as_array().expect("betas");
    OptimizerConfig::AdamW {
        lr: o["lr"].as_f64().unwrap() as f32,
        beta1: betas[0].as_f64().unwrap() as f32,
        beta2: betas[1].as_f64().unwrap() as f32,
        eps: o["eps"].as_f64().unwrap() as f32,
        weight_decay: o["weight_decay"].as_f64().unwrap() as f32,
    }
}

/// The fixtures' weights are f32 and stay f32 on the GPU (SGEMM), so CUDA meets PEFT as
/// the CPU does, up to summation order through a few layers: 1e-4.
#[test]
fn peft_fixtures_on_cuda() {
    poison_uninit();
    if let Err(why) = cuda::probe(0) {
        skip_without_gpu(&why.to_string());
        return;
    }
    for &case in common::EVERY_ARCHITECTURE {
        let reference = common::read_tensors(&fixture(case).join("reference.safetensors"));
        let batch = common::fixture_batch(&reference);
        let model = LemaModel::new(fixture_config(case, Device::Cuda)).expect("model on CUDA");
        assert_eq!(model.device(), Device::Cuda);
        let mut trainer = Trainer::new(model, adamw_of(case)).expect("trainer");
        let out = trainer.train_step_with_logits(&batch).expect("step");
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        check(
            &format!("PEFT {case} logits"),
            out.logits.as_ref().unwrap(),
            &f32s(&reference["logits"].1),
            1e-4,
        );
        check_scalar(
            &format!("PEFT {case} loss"),
            out.loss,
            reference["loss"].1[0],
            1e-4,
        );
        check_scalar(
            &format!("PEFT {case} grad norm"),
            out.grad_norm,
            reference["grad_norm"].1[0],
            1e-4,
        );
        for (key, gr) in trainer.model.lora_grads().unwrap() {
            let want = &reference[&format!("grad.{key}")].1;
            check(
                &format!("PEFT {case} grad {}", short(&key)),
                &gr,
                &f32s(want),
                1e-4,
            );
        }
        let mut losses = vec![out.loss as f32];
        for _ in 1..5 {
            losses.push(trainer.train_step(&batch).expect("step").loss as f32);
        }
        check(
            &format!("PEFT {case} 5 AdamW losses"),
            &losses,
            &f32s(&reference["losses_adamw"].1),
            1e-4,
        );
    }
}

fn short(key: &str) -> String {
    key.trim_start_matches("base_model.model.")
        .replace(".weight", "")
}

/// Training from a fresh adapter with LoRA dropout on every linear: CPU and CUDA draw the
/// same masks, so the losses of a few AdamW steps agree (f32 weights: 1e-4).
/// With bf16 weights the CUDA path differs most from the CPU's: activations rounded to
/// bf16 for the frozen GEMMs and for the LoRA GEMMs that share their input copies, the
/// blocks keeping only those copies, the recompute that skips the block output. One SGD
/// step from the fixtures' adapters (non-zero B, no dropout) on a bf16 copy of each model:
/// the loss, the gradient norm and every LoRA update against the CPU on the same bf16
/// weights, and with both offloads on, bit for bit against CUDA without them.
#[test]
fn bf16_training_step_matches_cpu() {
    poison_uninit();
    if let Err(why) = cuda::probe(0) {
        skip_without_gpu(&why.to_string());
        return;
    }
    for case in ["llama_gqa", "gpt2"] {
        let dir = tempfile::tempdir().unwrap();
        let model = common::bf16_copy(case, dir.path());
        let reference = common::read_tensors(&fixture(case).join("reference.safetensors"));
        let batch = common::fixture_batch(&reference);
        let mut runs = Vec::new();
        for (device, offload) in [
            (Device::Cpu, false),
            (Device::Cuda, false),
            (Device::Cuda, true),
        ] {
            let mut cfg = LemaConfig::new(&model);
            cfg.adapter_path = Some(fixture(case).join("adapter"));
            cfg.device = device;
            cfg.offload_activations = offload;
            cfg.offload_optimizer = offload;
            let m = LemaModel::new(cfg).expect("model");
            let weights = |m: &LemaModel| -> Vec<f32> {
                m.lora_tensors()
                    .unwrap()
                    .into_iter()
                    .flat_map(|(_, _, w)| w)
                    .collect()
            };
            let before = weights(&m);
            let mut t = Trainer::new(m, OptimizerConfig::sgd(0.1, 0.0)).unwrap();
            let out = t.train_step(&batch).unwrap();
            let delta: Vec<f32> = weights(&t.model)
                .iter()
                .zip(&before)
                .map(|(a, b)| a - b)
                .collect();
            runs.push((out.loss as f32, out.grad_norm as f32, delta));
        }
        let (cpu, gpu, off) = (&runs[0], &runs[1], &runs[2]);
        check(&format!("bf16 {case} loss"), &[gpu.0], &[cpu.0], 5e-3);
        check(&format!("bf16 {case} grad norm"), &[gpu.1], &[cpu.1], 2e-2);
        check(&format!("bf16 {case} LoRA updates"), &gpu.2, &cpu.2, 3e-2);
        assert!(
            cpu.2.iter().any(|&d| d != 0.0),
            "{case}: the step changed nothing"
        );
        assert_eq!(gpu, off, "{case}: offloading changed the step");
    }
}

#[test]
fn training_steps_cuda_match_cpu() {
    poison_uninit();
    if let Err(why) = cuda::probe(0) {
        skip_without_gpu(&why.to_string());
        return;
    }
    for case in ["llama_gqa", "gpt2"] {
        let reference = common::read_tensors(&fixture(case).join("reference.safetensors"));
        let batch = common::fixture_batch(&reference);
        let mut runs = Vec::new();
        for device in [Device::Cpu, Device::Cuda] {
            let mut cfg = fixture_config(case, device);
            cfg.adapter_path = None;
            cfg.lora_dropout = 0.1;
            cfg.lora_target_modules = Some(vec!["all-linear".into()]);
            let mut model = LemaModel::new(cfg).expect("model");
            assert_eq!(model.device(), device);
            model.initialize_lora().unwrap();
            let mut t = Trainer::new(model, OptimizerConfig::adamw(1e-2)).unwrap();
            t.max_grad_norm = Some(1.0);
            let losses: Vec<f32> = (0..4)
                .map(|_| t.train_step(&batch).unwrap().loss as f32)
                .collect();
            let weights: Vec<f32> = t
                .model
                .lora_tensors()
                .unwrap()
                .into_iter()
                .flat_map(|(_, _, w)| w)
                .collect();
            runs.push((losses, weights));
        }
        println!(
            "{case}: CPU losses {:?}, CUDA losses {:?}",
            runs[0].0, runs[1].0
        );
        check(
            &format!("train {case} 4 AdamW losses, dropout 0.1"),
            &runs[1].0,
            &runs[0].0,
            1e-4,
        );
        check(
            &format!("train {case} LoRA weights after 4 steps"),
            &runs[1].1,
            &runs[0].1,
            1e-3,
        );
    }
}

/// Sequence tiles on CUDA (`seq_tile`): a block's per-token parts over tiles of rows,
/// attention over the whole call, against the untiled block on the same GPU. f32
/// fixtures: the same ops on row ranges, cuBLAS choosing its kernels by the row count and
/// the LoRA gradients summed per tile: 1e-4, as CUDA against PEFT. bf16 copies (with and
/// without both offloads): a last-bit difference in an f32 value can move the bf16
/// rounding of the activation it feeds, so the bf16 test's tolerances. Fresh adapters
/// with dropout 0.1 on every linear: a tile draws the untiled mask, so a few steps agree.
/// The uninit buffers are NaN-poisoned: a tile that leaves rows of an assembled buffer
/// unwritten fails.
#[test]
fn sequence_tiles_match_untiled_on_cuda() {
    poison_uninit();
    if let Err(why) = cuda::probe(0) {
        skip_without_gpu(&why.to_string());
        return;
    }
    type Run = (f32, Vec<f32>, Vec<f32>, Vec<f32>);
    let step = |cfg: LemaConfig, batch: &lema::Batch, fresh: bool| -> Run {
        let mut model = LemaModel::new(cfg).expect("model on CUDA");
        assert_eq!(model.device(), Device::Cuda);
        if fresh {
            model.initialize_lora().unwrap();
        }
        let mut t = Trainer::new(model, OptimizerConfig::sgd(0.1, 0.9)).unwrap();
        let out = t.train_step_with_logits(batch).unwrap();
        let grads: Vec<f32> = t
            .model
            .lora_grads()
            .unwrap()
            .into_iter()
            .flat_map(|(_, g)| g)
            .collect();
        let mut losses = vec![out.loss as f32];
        for _ in 0..3 {
            losses.push(t.train_step(batch).unwrap().loss as f32);
        }
        (out.loss as f32, out.logits.unwrap(), grads, losses)
    };
    let compare = |tag: &str, got: &Run, want: &Run, tol: [f64; 3]| {
        check(&format!("{tag} loss"), &[got.0], &[want.0], tol[0]);
        check(&format!("{tag} logits"), &got.1, &want.1, tol[0]);
        check(&format!("{tag} LoRA grads"), &got.2, &want.2, tol[1]);
        check(&format!("{tag} 4 SGD losses"), &got.3, &want.3, tol[2]);
    };
    for &case in common::EVERY_ARCHITECTURE {
        let reference = common::read_tensors(&fixture(case).join("reference.safetensors"));
        let batch = common::fixture_batch(&reference);
        let n = batch.batch * batch.seq;
        let with = |tile: usize| {
            let mut cfg = fixture_config(case, Device::Cuda);
            cfg.seq_tile = Some(tile);
            cfg
        };
        let whole = step(with(0), &batch, false);
        for tile in [1, 5, n - 1] {
            let tag = format!("tiles {case} f32 tile={tile}");
            compare(&tag, &step(with(tile), &batch, false), &whole, [1e-4; 3]);
        }
        let fresh = |tile: usize| {
            let mut cfg = with(tile);
            cfg.adapter_path = None;
            cfg.lora_dropout = 0.1;
            cfg.lora_target_modules = Some(vec!["all-linear".into()]);
            cfg
        };
        let whole = step(fresh(0), &batch, true);
        let tag = format!("tiles {case} f32 dropout 0.1 tile=3");
        compare(&tag, &step(fresh(3), &batch, true), &whole, [1e-4; 3]);
    }
    for case in ["llama_gqa", "gpt2", "phi3", "gemma3"] {
        let dir = tempfile::tempdir().unwrap();
        let model = common::bf16_copy(case, dir.path());
        let reference = common::read_tensors(&fixture(case).join("reference.safetensors"));
        let batch = common::fixture_batch(&reference);
        for offload in [false, true] {
            let with = |tile: usize| {
                let mut cfg = LemaConfig::new(&model);
                cfg.adapter_path = Some(fixture(case).join("adapter"));
                cfg.device = Device::Cuda;
                cfg.offload_activations = offload;
                cfg.offload_optimizer = offload;
                cfg.seq_tile = Some(tile);
                cfg
            };
            let whole = step(with(0), &batch, false);
            for tile in [2, 5] {
                let tag = format!("tiles {case} bf16 offload={offload} tile={tile}");
                compare(
                    &tag,
                    &step(with(tile), &batch, false),
                    &whole,
                    [5e-3, 3e-2, 5e-3],
                );
            }
        }
    }
}

/// Block inputs parked in bf16 (`offload_activations_half`): the forward is untouched,
/// so the loss is the f32-parked run's bit for bit; the backward re-runs each block from
/// its rounded input, so the LoRA gradients move by about bf16's rounding of the
/// residual stream (2⁻⁹ relative), checked at the bf16 test's 3e-2; with f32 weights
/// the GEMMs read f32 and nothing is rounded: bit for bit.
#[test]
fn half_parked_activations_on_cuda() {
    poison_uninit();
    if let Err(why) = cuda::probe(0) {
        skip_without_gpu(&why.to_string());
        return;
    }
    for case in ["llama_gqa", "gpt2", "phi3"] {
        let dir = tempfile::tempdir().unwrap();
        let reference = common::read_tensors(&fixture(case).join("reference.safetensors"));
        let batch = common::fixture_batch(&reference);
        for bf16 in [true, false] {
            let model = if bf16 {
                common::bf16_copy(case, dir.path())
            } else {
                fixture(case).join("model.safetensors")
            };
            let run = |half: bool, tile: usize| {
                let mut cfg = LemaConfig::new(&model);
                cfg.adapter_path = Some(fixture(case).join("adapter"));
                cfg.device = Device::Cuda;
                cfg.offload_activations = true;
                cfg.offload_activations_half = half;
                cfg.seq_tile = Some(tile);
                let mut t =
                    Trainer::new(LemaModel::new(cfg).unwrap(), OptimizerConfig::sgd(0.1, 0.0))
                        .unwrap();
                let loss = t.train_step(&batch).unwrap().loss;
                let grads: Vec<f32> = t
                    .model
                    .lora_grads()
                    .unwrap()
                    .into_iter()
                    .flat_map(|(_, g)| g)
                    .collect();
                (loss, grads)
            };
            for tile in [0, 5] {
                let (full, half) = (run(false, tile), run(true, tile));
                let tag = format!("half-parked {case} bf16={bf16} tile={tile}");
                assert_eq!(
                    full.0.to_bits(),
                    half.0.to_bits(),
                    "{tag}: the forward changed"
                );
                if bf16 {
                    check(&format!("{tag} LoRA grads"), &half.1, &full.1, 3e-2);
                } else {
                    assert_eq!(full.1, half.1, "{tag}: f32 weights, yet the step changed");
                }
            }
        }
    }
}

#[test]
fn auto_device_picks_cuda_when_present() {
    poison_uninit();
    let available = cuda::probe(0).is_ok();
    let mut cfg = fixture_config("llama_gqa", Device::Auto);
    cfg.adapter_path = None;
    let model = LemaModel::new(cfg).expect("auto always builds a model");
    if available {
        assert_eq!(model.device(), Device::Cuda);
        assert!(model.device_note().is_none());
    } else {
        assert_eq!(model.device(), Device::Cpu);
        assert!(model.device_note().is_some());
    }
}

// ---- timings (not a test of speed: numbers for the notes; run with --ignored) ----------

fn median_ms(be: &CudaBackend, reps: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up (module load, allocations)
    be.synchronize().unwrap();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = std::time::Instant::now();
            f();
            be.synchronize().unwrap();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[reps / 2]
}

#[test]
#[ignore = "timings for the notes, GPU only"]
fn op_timings_llama7b_shapes() {
    let Some(g) = gpu_with(|o| {
        o.sync_each_launch = false;
        o.poison_uninit = false;
    }) else {
        return;
    };
    let mut r = Rng::fresh("timings");
    let (n, c, f, v) = (4096usize, 4096usize, 11008usize, 32000usize);
    println!("device {} ({})", g.device_name(), g.arch());
    // bf16 GEMM x·Wᵀ (the MLP up projection of one 4096-token step)
    let w = g
        .upload_weight(&weight_bytes(&r.vec(f * c, 0.02), DType::BF16), DType::BF16)
        .unwrap();
    let x = g.upload(&r.vec(n * c, 1.0)).unwrap();
    let mut y = g.zeros(n * f).unwrap();
    let gm = gemm(n, f, c, false, true, 1.0, Accumulate::Overwrite);
    let ms = median_ms(&g, 10, || g.matmul(&mut y, &x, &w, gm).unwrap());
    println!(
        "TIMING matmul bf16 [{n}x{c}]·[{f}x{c}]ᵀ incl. cast: {ms:.3} ms, {:.0} TFLOP/s",
        2.0 * (n * c * f) as f64 / ms / 1e9
    );
    let wf = g.upload(&r.vec(f * c, 0.02)).unwrap();
    let ms = median_ms(&g, 5, || g.matmul(&mut y, &x, &wf, gm).unwrap());
    println!(
        "TIMING matmul f32 SGEMM same shape: {ms:.3} ms, {:.1} TFLOP/s",
        2.0 * (n * c * f) as f64 / ms / 1e9
    );
    drop((w, wf, y));
    // attention, Llama-2-7B heads, T = 4096
    let (h, d, t) = (32usize, 128usize, 4096usize);
    let dims = AttnDims {
        batch: 1,
        seq: t,
        n_heads: h,
        n_kv_heads: h,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let q = g.upload(&r.vec(t * h * d, 1.0)).unwrap();
    let k = g.upload(&r.vec(t * h * d, 1.0)).unwrap();
    let vv = g.upload(&r.vec(t * h * d, 1.0)).unwrap();
    let mut o = g.zeros(t * h * d).unwrap();
    let mut l = g.zeros(h * t).unwrap();
    let flops = 4.0 * (t * t) as f64 / 2.0 * (d * h) as f64;
    let ms = median_ms(&g, 5, || {
        g.attention_forward(&mut o, &mut l, &q, &k, &vv, dims, None)
            .unwrap()
    });
    println!(
        "TIMING attention_forward T={t} H={h} D={d}: {ms:.2} ms, {:.1} TFLOP/s",
        flops / ms / 1e9
    );
    let (mut dq, mut dk, mut dv) = (
        g.zeros(t * h * d).unwrap(),
        g.zeros(t * h * d).unwrap(),
        g.zeros(t * h * d).unwrap(),
    );
    let ms = median_ms(&g, 3, || {
        g.attention_backward(
            &mut dq, &mut dk, &mut dv, &x, &o, &l, &q, &k, &vv, dims, None,
        )
        .unwrap()
    });
    println!(
        "TIMING attention_backward T={t} H={h} D={d}: {ms:.2} ms, {:.1} TFLOP/s",
        2.5 * flops / ms / 1e9
    );
    drop((q, k, vv, o, dq, dk, dv));
    // LM head + loss, bf16 head, 4096 tokens
    let hw = g
        .upload_weight(&weight_bytes(&r.vec(v * c, 0.02), DType::BF16), DType::BF16)
        .unwrap();
    let labels: Vec<i32> = (0..n).map(|_| r.below(v) as i32).collect();
    let mut dh = g.zeros(n * c).unwrap();
    let ms = median_ms(&g, 5, || {
        g.lm_head_loss(
            &x,
            &hw,
            &labels,
            c,
            1.0 / n as f32,
            None,
            Some(&mut dh),
            None,
        )
        .unwrap();
    });
    println!(
        "TIMING lm_head_loss N={n} C={c} V={v} bf16 with dh: {ms:.2} ms, {:.0} TFLOP/s",
        4.0 * (n * c * v) as f64 / ms / 1e9
    );
    // RMSNorm forward over [4096, 4096]
    let nw = g.upload(&r.vec(c, 1.0)).unwrap();
    let mut out = g.zeros(n * c).unwrap();
    let mut rs = g.zeros(n).unwrap();
    let ms = median_ms(&g, 10, || {
        g.rms_norm_forward(&mut out, &mut rs, &x, &nw, 0.0, 1e-5)
            .unwrap()
    });
    println!(
        "TIMING rms_norm_forward [{n}x{c}]: {ms:.3} ms, {:.0} GB/s",
        (2 * n * c * 4) as f64 / ms / 1e6
    );
}

/// Median over `reps` of the mean time of `inner` back-to-back calls (one synchronisation
/// per batch, so launch latency hides behind the GPU work as it does in training).
fn median_batched_ms(be: &CudaBackend, reps: usize, inner: usize, mut f: impl FnMut()) -> f64 {
    f();
    be.synchronize().unwrap();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = std::time::Instant::now();
            for _ in 0..inner {
                f();
            }
            be.synchronize().unwrap();
            s.elapsed().as_secs_f64() * 1e3 / inner as f64
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[reps / 2]
}

/// Attention forward and backward at Llama-2-7B heads (H = 32, D = 128), f32 kernels
/// (`exact_attention`) against the bf16 tensor-core kernels on the same card, each given
/// its operands as a block makes them (`attention_operand`: bf16 for the fast path, so
/// its times are the kernels' and dsum's scratch, without casts).
#[test]
#[ignore = "timings for the notes, GPU only"]
fn attention_timings() {
    let Some(fast) = gpu_with(|o| {
        o.sync_each_launch = false;
        o.poison_uninit = false;
    }) else {
        return;
    };
    let exact = gpu_with(|o| {
        o.sync_each_launch = false;
        o.poison_uninit = false;
        o.exact_attention = true;
    })
    .unwrap();
    println!("device {} ({})", fast.device_name(), fast.arch());
    let mut r = Rng::fresh("attention timings");
    let (h, d) = (32usize, 128usize);
    for (b, t) in [
        (1usize, 512usize),
        (1, 1024),
        (1, 2048),
        (1, 4096),
        (8, 512),
    ] {
        let dims = AttnDims {
            batch: b,
            seq: t,
            n_heads: h,
            n_kv_heads: h,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let n = b * t * h * d;
        // causal: half the T×T scores; forward 2 GEMMs, backward 5 (FlashAttention count)
        let flops = 4.0 * (b * t * t) as f64 / 2.0 * (d * h) as f64;
        for (name, g) in [("f32 ", &exact), ("bf16", &fast)] {
            // as a block gives them: bf16 operands on the tensor-core path
            let mut operand = || {
                let x = g.upload(&r.vec(n, 1.0)).unwrap();
                g.attention_operand(x, None, h, d).unwrap()
            };
            let (q, k, v, dout) = (operand(), operand(), operand(), operand());
            let mut o = g.zeros(n).unwrap();
            let mut l = g.zeros(b * h * t).unwrap();
            let (mut dq, mut dk, mut dv) = (
                g.zeros(n).unwrap(),
                g.zeros(n).unwrap(),
                g.zeros(n).unwrap(),
            );
            let slow = name.starts_with("f32") && t >= 2048;
            let (reps, inner) = if slow { (3, 1) } else { (7, 5) };
            let fwd = median_batched_ms(g, reps, inner, || {
                g.attention_forward(&mut o, &mut l, &q, &k, &v, dims, None)
                    .unwrap()
            });
            let bwd = median_batched_ms(g, reps, inner, || {
                g.attention_backward(
                    &mut dq, &mut dk, &mut dv, &dout, &o, &l, &q, &k, &v, dims, None,
                )
                .unwrap()
            });
            println!(
                "TIMING attention {name} B={b} T={t} H={h} D={d}: forward {fwd:.3} ms ({:.0} TFLOP/s), backward {bwd:.3} ms ({:.0} TFLOP/s)",
                flops / fwd / 1e9,
                2.5 * flops / bwd / 1e9
            );
        }
    }
}

/// A host optimizer (torch, through DLPack) writes the LoRA masters in device memory
/// between calls, which the engine does not see happen: the next pass must use the new
/// values, not the bf16 GEMM copies of the old ones (`LoraParams::drop_gemm_copies`).
#[test]
fn lora_written_through_shared_memory_is_seen_by_the_next_pass() {
    poison_uninit();
    if let Err(why) = cuda::probe(0) {
        skip_without_gpu(&why.to_string());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = common::bf16_copy("llama_gqa", dir.path());
    let reference = common::read_tensors(&fixture("llama_gqa").join("reference.safetensors"));
    let batch = common::fixture_batch(&reference);
    let mut cfg = LemaConfig::new(&model);
    cfg.adapter_path = Some(fixture("llama_gqa").join("adapter"));
    cfg.device = Device::Cuda;
    let mut m = LemaModel::new(cfg).expect("model");
    let (_, _, before) = m.evaluate(&batch, true).unwrap();
    // every B matrix scaled by 3, written straight into the shared device memory
    let mut written = 0;
    for t in m.shared_tensors().unwrap() {
        if !t.name.contains("lora_B") {
            continue;
        }
        let old: Vec<f32> = m
            .lora_tensors()
            .unwrap()
            .into_iter()
            .find(|(k, _, _)| *k == t.name)
            .map(|(_, _, w)| w)
            .unwrap();
        let new: Vec<f32> = old.iter().map(|x| x * 3.0).collect();
        m.order_before(0).unwrap();
        // SAFETY: `param` addresses shape[0]·shape[1] f32 of device memory of this model's
        // context, alive while the model lives; the engine's work is ordered before.
        unsafe {
            cudarc::driver::result::memcpy_htod_sync(t.param as u64, &new).unwrap();
        }
        written += 1;
    }
    assert!(written > 0, "the fixture adapts some linears");
    let (_, _, after) = m.evaluate(&batch, true).unwrap();
    // the same values saved and loaded the ordinary way
    let saved = dir.path().join("scaled-adapter");
    m.save_adapter(&saved).unwrap();
    let mut m2 = {
        let mut cfg = LemaConfig::new(&model);
        cfg.adapter_path = Some(saved);
        cfg.device = Device::Cuda;
        LemaModel::new(cfg).expect("model")
    };
    let (_, _, want) = m2.evaluate(&batch, true).unwrap();
    assert_ne!(
        after, before,
        "the pass after the write used the old adapter"
    );
    assert_eq!(
        after, want,
        "the pass after the write differs from loading those values"
    );
}
