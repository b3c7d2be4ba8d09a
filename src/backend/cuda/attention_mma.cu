// Causal attention on tensor cores (attention.rs), FlashAttention-2 style: bf16 operands,
// f32 accumulation, softmax statistics in f32. Head dimensions 64 and 128, sm_80 and newer
// (mma.sync m16n8k16, ldmatrix, cp.async); other cases use the f32 kernels of attention.cu.
//
// Layouts as in attention.cu: q, dout: [B, T, H, D]; k, v: [B, T, KVH, D]; lse, dsum:
// [B, H, T]. The kernels read bf16 q, k, v and dout: the operands themselves when they are
// bf16 (Backend::attention_operand), else copies made by amma_cast_bf16 / amma_bwd_prep, so
// that tiles move global -> shared memory with cp.async (16 bytes per thread) while the
// tensor cores work on the previous tile. Outputs (out, lse, dq, dk, dv)
// are f32. Query t of batch row b sees keys s0 ..= t, s0 = ks[b * T + t] or 0.
//
// Block = 4 warps. Shared tiles hold 64 rows of D bf16 with row stride D + 8 elements, so
// that the 8 rows an ldmatrix phase reads fall in 8 different 16-byte bank groups.
//
//  * amma_fwd: a block owns 64 queries of one (batch, head), 16 per warp, or in the wide
//    form (long sequences) 128, 32 per warp; key/value tiles of 64 rows stream through a
//    two-stage cp.async ring. S = Q K^T, online softmax in log2 units, O += P V with P
//    rounded to bf16 straight from the accumulators. lse = (m + log2 l) ln 2.
//  * amma_bwd_dq: same tiling; per key tile S = Q K^T, P = exp(S - lse), dP = dO V^T,
//    dS = P (dP - dsum), dQ += dS K. dsum = rowsum(bf16(dO) * O) comes from amma_bwd_prep,
//    a pass of its own: made inside dq's blocks it held out through dq and cost more than
//    the pass (BENCHMARKS.md, issue 16).
//  * amma_bwd_dkdv: a block owns 64 keys of one (batch, kv head), 16 per warp, and walks
//    every query tile (and every query head of its group) that sees them: S^T = K Q^T,
//    dP^T = V dO^T, dV += P^T dO, dK += dS^T Q. No atomics: dq and dk/dv come from two
//    kernels, each output element is written by one thread, in a fixed order.
//  A tiling changes which warp does what, not the order of any sum: the wide kernels give
//  the 64-query kernels' bits.
//  Blocks with the most work are scheduled first (forward and dq: the last query tiles;
//  dk/dv: the first key tiles).
//
// mma.m16n8k16 fragments (g = lane / 4, c = lane % 4): A (16x16, row-major) a0 = (g, 2c..),
// a1 = (g + 8, 2c..), a2 = (g, 2c + 8..), a3 = (g + 8, 2c + 8..); B (16x8) b0 = (k = 2c.., n = g),
// b1 = (k = 2c + 8.., n = g); C (16x8) c0, c1 = (g, 2c..), c2, c3 = (g + 8, 2c..).

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800

#define AM_BM 64   // queries per block (forward, dq) and per query tile (dk/dv)
#define AM_BN 64   // keys per tile (forward, dq) and per block (dk/dv)
#define AM_NT 128  // threads per block
#define AM_LOG2E 1.4426950408889634f
#define AM_LN2 0.6931471805599453f

__device__ __forceinline__ int am_first_key(const u32* ks, int b, int t, int T) {
    return ks ? (int)ks[(i64)b * T + t] : 0;
}

// ---- PTX primitives (a host emulation of the kernels replaces this section) ----

__device__ __forceinline__ u32 am_smem(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}

// 16 bytes global -> shared; zero-filled when !valid (src is then not read).
__device__ __forceinline__ void am_cp16(u32 dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void am_cp4(u32 dst, const void* src, bool valid) {
    const int n = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void am_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void am_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void am_ldm(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void am_ldm_t(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a b (16x8x16, bf16 in, f32 accumulate)
__device__ __forceinline__ void am_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 -> one bf16x2 register (round to nearest even); lo in the low half.
__device__ __forceinline__ u32 am_pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// ---- end of PTX primitives ----

// Shared-memory byte offset of the ldmatrix row address of this lane for a 16x16 block at
// (r0, c0) of a tile with row stride LD elements:
//  * am_off_a: A operand (row-major [m][k]) or, with .trans, B stored [k][n] -> regs are
//    (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15)
//  * am_off_b: B stored [n][k] (non-trans) -> regs are b0, b1 of n rows 0-7, then b0, b1 of
//    n rows 8-15: (rows 0-7, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 0-7), ...
template <int LD>
__device__ __forceinline__ u32 am_off_a(int r0, int c0, int lane) {
    return (u32)(((r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + c0 + (lane >> 4) * 8) * 2);
}
template <int LD>
__device__ __forceinline__ u32 am_off_b(int r0, int c0, int lane) {
    return (u32)(((r0 + (lane & 7) + (lane >> 4) * 8) * LD + c0 + ((lane >> 3) & 1) * 8) * 2);
}

// Rows r0 .. r0 + R - 1 of head hd of a bf16 [B, T, NH, D] tensor into a shared tile
// (row stride D + 8); rows at or past T are zero-filled.
template <int R, int D>
__device__ __forceinline__ void am_load_tile(u32 dst, const u16* src, int b, int r0, int hd, int T, int NH) {
    constexpr int CPR = D / 8;
#pragma unroll
    for (int c = threadIdx.x; c < R * CPR; c += AM_NT) {
        const int r = c / CPR, col = (c % CPR) * 8, t = r0 + r;
        const bool ok = t < T;
        const u16* p = src + (((i64)b * T + (ok ? t : 0)) * NH + hd) * D + col;
        am_cp16(dst + (u32)((r * (D + 8) + col) * 2), p, ok);
    }
}

// The A fragment of 16 rows x 16 keys (keys 16·kk ..) from two 16x8 accumulator tiles
// (x[2kk], x[2kk + 1]), rounded to bf16: an mma's A operand straight from an earlier mma's
// result.
template <int N>
__device__ __forceinline__ void am_frag_from_acc(u32 (&a)[4], const float (&x)[N][4], int kk) {
    a[0] = am_pack(x[2 * kk][0], x[2 * kk][1]);
    a[1] = am_pack(x[2 * kk][2], x[2 * kk][3]);
    a[2] = am_pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[3] = am_pack(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

// c[mi][2n], c[mi][2n + 1] += a[mi] · (the two 16x8 B fragments in bf), for each of a warp's
// MI m16 tiles: one shared-memory fragment, MI row tiles.
template <int MI, int N>
__device__ __forceinline__ void am_mma_rows(float (&c)[MI][N][4], const u32 (&a)[MI][4], const u32 (&bf)[4], int n) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
        am_mma(c[mi][2 * n], a[mi], bf[0], bf[1]);
        am_mma(c[mi][2 * n + 1], a[mi], bf[2], bf[3]);
    }
}

// acc[mi] (16 rows x D) += bf16(x[mi]) (16 rows x KC keys) · rows kc·KC .. of a shared
// [64][D] tile (row stride LD), for each of a warp's MI m16 tiles: O += P V in the forward,
// dQ += dS K in dq. Each tile fragment is read once and feeds MI mma's.
template <int D, int LD, int MI, int KC>
__device__ __forceinline__ void am_acc_times_tile(float (&acc)[MI][D / 8][4], const float (&x)[MI][KC / 8][4],
                                                  u32 tile, int kc, int lane) {
#pragma unroll
    for (int kk = 0; kk < KC / 16; ++kk) {
        u32 pa[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) am_frag_from_acc(pa[mi], x[mi], kk);
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
            u32 bf[4];
            am_ldm_t(bf, tile + am_off_a<LD>(kc * KC + kk * 16, dd * 16, lane));
            am_mma_rows(acc, pa, bf, dd);
        }
    }
}

// The query rows a warp owns in the forward and dq kernels (16·MI from w0) and what the
// causal and segment masks make of a chunk of keys for them: rows r[mi][i] (this lane's,
// m16 tile mi, upper/lower half i) see keys s0[mi][i] ..= r[mi][i].
template <int MI>
struct AmWarpRows {
    int w0, wlast, s_first, s_last;  // first and last row (-1: none), their first keys
    int r[MI][2], s0[MI][2];

    __device__ __forceinline__ AmWarpRows(const u32* ks, int b, int i0, int warp, int lane, int T) {
        w0 = i0 + warp * 16 * MI;
        wlast = w0 < T ? min(w0 + 16 * MI, T) - 1 : -1;
        s_first = w0 < T ? am_first_key(ks, b, w0, T) : 0;
        s_last = w0 < T ? am_first_key(ks, b, wlast, T) : 0;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                r[mi][i] = w0 + mi * 16 + i * 8 + (lane >> 2);
                s0[mi][i] = r[mi][i] < T ? am_first_key(ks, b, r[mi][i], T) : 0;
            }
    }
    // keys c0 .. c0 + n - 1 lie wholly past the last row or before every row's first key
    __device__ __forceinline__ bool skips(int c0, int n) const { return c0 > wlast || c0 + n <= s_first; }
    // some key of c0 .. c0 + n - 1 is masked for some row
    __device__ __forceinline__ bool needs_mask(int c0, int n) const { return c0 + n - 1 > w0 || c0 < s_last; }
    __device__ __forceinline__ bool masked(int mi, int i, int j) const { return j > r[mi][i] || j < s0[mi][i]; }
};

// ---- forward ----------------------------------------------------------------------------

// A block owns 64·MI queries, MI m16 tiles (16·MI rows) per warp, so that every K and V
// fragment a warp reads from shared memory feeds MI mma's. Q fragments are read from shared
// memory per k-step (holding them would take 8·MI more registers per k-step of D). Each
// 64-key tile is worked in chunks of KC keys (the online softmax steps per chunk), which
// bounds the registers that hold S beside the O accumulators; the chunking, not MI,
// decides the bits.
template <int D, int MI, int KC>
__device__ void amma_fwd(float* out, float* lse, const u16* q, const u16* k, const u16* v, const u32* ks,
                         int T, int H, int KVH, float sl2) {
    constexpr int LD = D + 8, KS = D / 16, DT = D / 8, TILE = AM_BN * LD, WR = 16 * MI, BM = 4 * WR;
    extern __shared__ __align__(16) u16 am_sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = blockIdx.z, h = blockIdx.y, g = h / (H / KVH);
    const int i0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int ilast = min(i0 + BM, T) - 1;
    const int jbeg = (am_first_key(ks, b, i0, T) / AM_BN) * AM_BN;
    const int ntile = ilast / AM_BN - jbeg / AM_BN + 1;
    const u32 qs = am_smem(am_sm), kst = qs + BM * LD * 2, vst = kst + 2 * TILE * 2;

    am_load_tile<BM, D>(qs, q, b, i0, h, T, H);
    am_load_tile<AM_BN, D>(kst, k, b, jbeg, g, T, KVH);
    am_load_tile<AM_BN, D>(vst, v, b, jbeg, g, T, KVH);
    am_commit();

    const AmWarpRows<MI> rows(ks, b, i0, warp, lane, T);
    float o[MI][DT][4];
    float m[MI][2], l[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int i = 0; i < DT; ++i) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.f;
        m[mi][0] = m[mi][1] = -INF_F;
        l[mi][0] = l[mi][1] = 0.f;
    }

    for (int it = 0; it < ntile; ++it) {
        const int j0 = jbeg + it * AM_BN, st = it & 1;
        if (it + 1 < ntile) {
            am_load_tile<AM_BN, D>(kst + (st ^ 1) * TILE * 2, k, b, j0 + AM_BN, g, T, KVH);
            am_load_tile<AM_BN, D>(vst + (st ^ 1) * TILE * 2, v, b, j0 + AM_BN, g, T, KVH);
            am_commit();
            am_wait<1>();
        } else {
            am_wait<0>();
        }
        __syncthreads();
        const u32 kt = kst + st * TILE * 2, vt = vst + st * TILE * 2;
#pragma unroll
        for (int kc = 0; kc < AM_BN / KC; ++kc) {
            const int c0 = j0 + kc * KC;  // the chunk's first key
            // a chunk past this warp's last query, or before its rows' first keys, adds nothing
            if (rows.skips(c0, KC)) continue;
            float s[MI][KC / 8][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int i = 0; i < KC / 8; ++i) s[mi][i][0] = s[mi][i][1] = s[mi][i][2] = s[mi][i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                u32 qf[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) am_ldm(qf[mi], qs + am_off_a<LD>(warp * WR + mi * 16, kk * 16, lane));
#pragma unroll
                for (int np = 0; np < KC / 16; ++np) {
                    u32 bf[4];
                    am_ldm(bf, kt + am_off_b<LD>(kc * KC + np * 16, kk * 16, lane));
                    am_mma_rows(s, qf, bf, np);
                }
            }
            // scale to log2 units, mask (causal diagonal, segment starts), online softmax
            const bool need_mask = rows.needs_mask(c0, KC);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                float mx[2] = {-INF_F, -INF_F};
#pragma unroll
                for (int nt = 0; nt < KC / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x = s[mi][nt][e] * sl2;
                        if (need_mask) {
                            const int j = c0 + nt * 8 + (lane & 3) * 2 + (e & 1);
                            if (rows.masked(mi, e >> 1, j)) x = -INF_F;
                        }
                        s[mi][nt][e] = x;
                        mx[e >> 1] = fmaxf(mx[e >> 1], x);
                    }
                }
                float mu[2];
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 1));
                    mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 2));
                    const float mn = fmaxf(m[mi][i], mx[i]);
                    mu[i] = mn == -INF_F ? 0.f : mn;  // a row with no key yet: keep everything at 0
                    const float corr = exp2f(m[mi][i] - mu[i]);
                    m[mi][i] = mn;
                    l[mi][i] *= corr;
#pragma unroll
                    for (int dt = 0; dt < DT; ++dt) {
                        o[mi][dt][2 * i] *= corr;
                        o[mi][dt][2 * i + 1] *= corr;
                    }
                }
#pragma unroll
                for (int nt = 0; nt < KC / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const float p = exp2f(s[mi][nt][e] - mu[e >> 1]);
                        s[mi][nt][e] = p;
                        l[mi][e >> 1] += p;
                    }
                }
            }
            // O += P V
            am_acc_times_tile<D, LD, MI, KC>(o, s, vt, kc, lane);
        }
        __syncthreads();  // the next iteration's loads overwrite this stage
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            l[mi][i] += __shfl_xor_sync(FULL_MASK, l[mi][i], 1);
            l[mi][i] += __shfl_xor_sync(FULL_MASK, l[mi][i], 2);
            const int r = rows.r[mi][i];
            if (r >= T) continue;
            const float inv = 1.f / l[mi][i];
            float* dst = out + (((i64)b * T + r) * H + h) * D + (lane & 3) * 2;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const float2 val = make_float2(o[mi][dt][2 * i] * inv, o[mi][dt][2 * i + 1] * inv);
                *(float2*)(dst + dt * 8) = val;
            }
            if ((lane & 3) == 0) lse[((i64)b * H + h) * T + r] = (m[mi][i] + log2f(l[mi][i])) * AM_LN2;
        }
}

// ---- backward: dq -----------------------------------------------------------------------

// 64·MI queries a block, MI m16 tiles a warp (attention.rs: mma_kernel); each 64-key tile is worked
// in chunks of KC keys, which bounds the registers that hold S and dP beside the dQ
// accumulators.
template <int D, int MI, int KC>
__device__ void amma_bwd_dq(float* dq, const u16* q, const u16* k, const u16* v, const u16* dob,
                            const float* lse, const float* dsum, const u32* ks, int T, int H, int KVH, float sl2,
                            float scale) {
    constexpr int LD = D + 8, KS = D / 16, DT = D / 8, TILE = AM_BN * LD, WR = 16 * MI, BM = 4 * WR;
    extern __shared__ __align__(16) u16 am_sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = blockIdx.z, h = blockIdx.y, g = h / (H / KVH);
    const int i0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int ilast = min(i0 + BM, T) - 1;
    const int jbeg = (am_first_key(ks, b, i0, T) / AM_BN) * AM_BN;
    const int ntile = ilast / AM_BN - jbeg / AM_BN + 1;
    const u32 qs = am_smem(am_sm), dos = qs + BM * LD * 2, kst = dos + BM * LD * 2, vst = kst + 2 * TILE * 2;

    am_load_tile<BM, D>(qs, q, b, i0, h, T, H);
    am_load_tile<BM, D>(dos, dob, b, i0, h, T, H);
    am_load_tile<AM_BN, D>(kst, k, b, jbeg, g, T, KVH);
    am_load_tile<AM_BN, D>(vst, v, b, jbeg, g, T, KVH);
    am_commit();

    const i64 la = ((i64)b * H + h) * T;
    const AmWarpRows<MI> rows(ks, b, i0, warp, lane, T);
    float l2[MI][2], dl[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = rows.r[mi][i];
            l2[mi][i] = r < T ? lse[la + r] * AM_LOG2E : 0.f;
            dl[mi][i] = r < T ? dsum[la + r] : 0.f;
        }
    float acc[MI][DT][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < DT; ++i) acc[mi][i][0] = acc[mi][i][1] = acc[mi][i][2] = acc[mi][i][3] = 0.f;

    for (int it = 0; it < ntile; ++it) {
        const int j0 = jbeg + it * AM_BN, st = it & 1;
        if (it + 1 < ntile) {
            am_load_tile<AM_BN, D>(kst + (st ^ 1) * TILE * 2, k, b, j0 + AM_BN, g, T, KVH);
            am_load_tile<AM_BN, D>(vst + (st ^ 1) * TILE * 2, v, b, j0 + AM_BN, g, T, KVH);
            am_commit();
            am_wait<1>();
        } else {
            am_wait<0>();
        }
        __syncthreads();
        const u32 kt = kst + st * TILE * 2, vt = vst + st * TILE * 2;
#pragma unroll
        for (int kc = 0; kc < AM_BN / KC; ++kc) {
            const int c0 = j0 + kc * KC;  // the chunk's first key
            // a chunk past this warp's last query, or before its rows' first keys, adds nothing
            if (rows.skips(c0, KC)) continue;
            float s[MI][KC / 8][4], dp[MI][KC / 8][4];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int i = 0; i < KC / 8; ++i)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mi][i][e] = dp[mi][i][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                u32 qf[MI][4], da[MI][4];
#pragma unroll
                for (int mi = 0; mi < MI; ++mi) {
                    am_ldm(qf[mi], qs + am_off_a<LD>(warp * WR + mi * 16, kk * 16, lane));
                    am_ldm(da[mi], dos + am_off_a<LD>(warp * WR + mi * 16, kk * 16, lane));
                }
#pragma unroll
                for (int np = 0; np < KC / 16; ++np) {
                    u32 bf[4];
                    am_ldm(bf, kt + am_off_b<LD>(kc * KC + np * 16, kk * 16, lane));
                    am_mma_rows(s, qf, bf, np);
                    am_ldm(bf, vt + am_off_b<LD>(kc * KC + np * 16, kk * 16, lane));
                    am_mma_rows(dp, da, bf, np);
                }
            }
            const bool need_mask = rows.needs_mask(c0, KC);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int nt = 0; nt < KC / 8; ++nt) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float p = exp2f(s[mi][nt][e] * sl2 - l2[mi][e >> 1]);
                        if (need_mask) {
                            const int j = c0 + nt * 8 + (lane & 3) * 2 + (e & 1);
                            if (rows.masked(mi, e >> 1, j)) p = 0.f;
                        }
                        s[mi][nt][e] = p * (dp[mi][nt][e] - dl[mi][e >> 1]);  // dS
                    }
                }
            // dQ += dS K
            am_acc_times_tile<D, LD, MI, KC>(acc, s, kt, kc, lane);
        }
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = rows.r[mi][i];
            if (r >= T) continue;
            float* dst = dq + (((i64)b * T + r) * H + h) * D + (lane & 3) * 2;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *(float2*)(dst + dt * 8) =
                    make_float2(acc[mi][dt][2 * i] * scale, acc[mi][dt][2 * i + 1] * scale);
        }
}

// ---- backward: dk, dv -------------------------------------------------------------------

// QC: queries per compute step (of the 64 in a shared tile), bounding the registers that
// hold S^T and dP^T next to the dK and dV accumulators.
template <int D, int QC>
__device__ void amma_bwd_dkdv(float* dk, float* dv, const u16* q, const u16* k, const u16* v, const u16* dob,
                              const float* lse, const float* dsum, const u32* ks, int T, int H, int KVH, float sl2,
                              float scale) {
    constexpr int LD = D + 8, KS = D / 16, DT = D / 8, TILE = AM_BM * LD;
    extern __shared__ __align__(16) u16 am_sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tid = threadIdx.x;
    const int b = blockIdx.z, g = blockIdx.y, group = H / KVH;
    const int j0 = blockIdx.x * AM_BN, jlast = min(j0 + AM_BN, T) - 1;
    const u32 ksm = am_smem(am_sm), vsm = ksm + AM_BN * LD * 2, qst = vsm + AM_BN * LD * 2,
              dost = qst + 2 * TILE * 2;
    float* lse_s = (float*)(am_sm + AM_BN * LD * 2 + 4 * TILE);  // [2][BM]
    float* dl_s = lse_s + 2 * AM_BM;                             // [2][BM]
    int* s0_s = (int*)(dl_s + 2 * AM_BM);                        // [2][BM]

    // Query tiles from the one holding key j0 (AM_BM == AM_BN) to the last one whose first
    // query still sees a key of this block (segment starts never decrease along a row).
    const int nqt = (T - j0 + AM_BM - 1) / AM_BM;
    int n = nqt;
    if (ks) {
        n = 0;
        for (int base = 0; base < nqt; base += AM_NT) {
            const int it = base + tid;
            n += __syncthreads_count(it < nqt && am_first_key(ks, b, j0 + it * AM_BM, T) <= jlast);
        }
    }
    const int total = group * n;

    auto issue = [&](int step, int stage) {
        const int h = g * group + step / n, i0 = j0 + (step % n) * AM_BM;
        am_load_tile<AM_BM, D>(qst + stage * TILE * 2, q, b, i0, h, T, H);
        am_load_tile<AM_BM, D>(dost + stage * TILE * 2, dob, b, i0, h, T, H);
        const i64 la = ((i64)b * H + h) * T;
        if (tid < AM_BM) {
            const int t = i0 + tid;
            am_cp4(am_smem(lse_s + stage * AM_BM + tid), lse + la + (t < T ? t : 0), t < T);
        } else {
            const int t = i0 + tid - AM_BM;
            am_cp4(am_smem(dl_s + stage * AM_BM + tid - AM_BM), dsum + la + (t < T ? t : 0), t < T);
        }
        if (tid < AM_BM) {
            const int t = i0 + tid;
            if (ks)
                am_cp4(am_smem(s0_s + stage * AM_BM + tid), ks + (i64)b * T + (t < T ? t : 0), t < T);
            else
                s0_s[stage * AM_BM + tid] = 0;
        }
    };

    am_load_tile<AM_BN, D>(ksm, k, b, j0, g, T, KVH);
    am_load_tile<AM_BN, D>(vsm, v, b, j0, g, T, KVH);
    issue(0, 0);
    am_commit();

    const int ka = j0 + warp * 16 + (lane >> 2), kb = ka + 8;
    float adk[DT][4], adv[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) adk[i][e] = adv[i][e] = 0.f;

    for (int step = 0; step < total; ++step) {
        const int st = step & 1, i0 = j0 + (step % n) * AM_BM;
        if (step + 1 < total) {
            issue(step + 1, st ^ 1);
            am_commit();
            am_wait<1>();
        } else {
            am_wait<0>();
        }
        __syncthreads();
        const u32 qt = qst + st * TILE * 2, dt_ = dost + st * TILE * 2;
        const float* ls = lse_s + st * AM_BM;
        const float* dls = dl_s + st * AM_BM;
        const int* s0s = s0_s + st * AM_BM;
        const int nvalid = min(AM_BM, T - i0);
        const bool need_mask = i0 < j0 + AM_BN || nvalid < AM_BM || s0s[nvalid - 1] > j0;
#pragma unroll
        for (int qc = 0; qc < AM_BM / QC; ++qc) {
            float s[QC / 8][4], dp[QC / 8][4];
#pragma unroll
            for (int i = 0; i < QC / 8; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                u32 ka_[4], va_[4];
                am_ldm(ka_, ksm + am_off_a<LD>(warp * 16, kk * 16, lane));
                am_ldm(va_, vsm + am_off_a<LD>(warp * 16, kk * 16, lane));
#pragma unroll
                for (int np = 0; np < QC / 16; ++np) {
                    u32 bf[4];
                    am_ldm(bf, qt + am_off_b<LD>(qc * QC + np * 16, kk * 16, lane));
                    am_mma(s[2 * np], ka_, bf[0], bf[1]);
                    am_mma(s[2 * np + 1], ka_, bf[2], bf[3]);
                    am_ldm(bf, dt_ + am_off_b<LD>(qc * QC + np * 16, kk * 16, lane));
                    am_mma(dp[2 * np], va_, bf[0], bf[1]);
                    am_mma(dp[2 * np + 1], va_, bf[2], bf[3]);
                }
            }
            // P^T and dS^T; s holds P^T, dp becomes dS^T
#pragma unroll
            for (int nt = 0; nt < QC / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int tq = qc * QC + nt * 8 + (lane & 3) * 2 + (e & 1);
                    float p = exp2f(s[nt][e] * sl2 - ls[tq] * AM_LOG2E);
                    if (need_mask) {
                        const int t = i0 + tq, kr = e < 2 ? ka : kb;
                        if (t < kr || t >= T || s0s[tq] > kr) p = 0.f;
                    }
                    s[nt][e] = p;
                    dp[nt][e] = p * (dp[nt][e] - dls[tq]);
                }
            }
            // dV += P^T dO, dK += dS^T Q
#pragma unroll
            for (int kk = 0; kk < QC / 16; ++kk) {
                u32 pa[4], sa[4];
                am_frag_from_acc(pa, s, kk);
                am_frag_from_acc(sa, dp, kk);
#pragma unroll
                for (int dd = 0; dd < D / 16; ++dd) {
                    u32 bf[4];
                    am_ldm_t(bf, dt_ + am_off_a<LD>(qc * QC + kk * 16, dd * 16, lane));
                    am_mma(adv[2 * dd], pa, bf[0], bf[1]);
                    am_mma(adv[2 * dd + 1], pa, bf[2], bf[3]);
                    am_ldm_t(bf, qt + am_off_a<LD>(qc * QC + kk * 16, dd * 16, lane));
                    am_mma(adk[2 * dd], sa, bf[0], bf[1]);
                    am_mma(adk[2 * dd + 1], sa, bf[2], bf[3]);
                }
            }
        }
        __syncthreads();
    }
    am_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = i == 0 ? ka : kb;
        if (r >= T) continue;
        const i64 off = (((i64)b * T + r) * KVH + g) * D + (lane & 3) * 2;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            *(float2*)(dk + off + dt * 8) = make_float2(adk[dt][2 * i] * scale, adk[dt][2 * i + 1] * scale);
            *(float2*)(dv + off + dt * 8) = make_float2(adv[dt][2 * i], adv[dt][2 * i + 1]);
        }
    }
}

// Entry points: NAME(...) runs the template at the given tiling (see each kernel above).
#define AMMA_FWD(NAME, D, MI, KC)                                                                           \
    extern "C" __global__ void __launch_bounds__(AM_NT)                                                     \
        NAME(float* out, float* lse, const u16* q, const u16* k, const u16* v, const u32* ks, int T, int H, \
             int KVH, float sl2) {                                                                          \
        amma_fwd<D, MI, KC>(out, lse, q, k, v, ks, T, H, KVH, sl2);                                         \
    }
#define AMMA_DQ(NAME, D, MI, KC)                                                                               \
    extern "C" __global__ void __launch_bounds__(AM_NT)                                                        \
        NAME(float* dq, const u16* q, const u16* k, const u16* v, const u16* dob, const float* lse,            \
             const float* dsum, const u32* ks, int T, int H, int KVH, float sl2, float scale) {                \
        amma_bwd_dq<D, MI, KC>(dq, q, k, v, dob, lse, dsum, ks, T, H, KVH, sl2, scale);                        \
    }
#define AMMA_DKDV(NAME, D, QC)                                                                                 \
    extern "C" __global__ void __launch_bounds__(AM_NT)                                                        \
        NAME(float* dk, float* dv, const u16* q, const u16* k, const u16* v, const u16* dob, const float* lse, \
             const float* dsum, const u32* ks, int T, int H, int KVH, float sl2, float scale) {                \
        amma_bwd_dkdv<D, QC>(dk, dv, q, k, v, dob, lse, dsum, ks, T, H, KVH, sl2, scale);                      \
    }

// 64 queries a block (one m16 tile a warp), and the "wide" forms for long sequences: 128
// queries a block, so that every shared-memory fragment feeds two mma's. The wide dq
// exists only at D = 64: at D = 128 its q and dout tiles (128 rows each) would need 139 KB
// of shared memory a block, one block a multiprocessor.
AMMA_FWD(amma_fwd_d64, 64, 1, 64)
AMMA_FWD(amma_fwd_wide_d64, 64, 2, 64)
AMMA_FWD(amma_fwd_d128, 128, 1, 64)
AMMA_FWD(amma_fwd_wide_d128, 128, 2, 64)
AMMA_DQ(amma_bwd_dq_d64, 64, 1, 64)
AMMA_DQ(amma_bwd_dq_wide_d64, 64, 2, 64)
AMMA_DQ(amma_bwd_dq_d128, 128, 1, 64)
AMMA_DKDV(amma_bwd_dkdv_d64, 64, 64)
AMMA_DKDV(amma_bwd_dkdv_d128, 128, 32)

// ---- conversions ------------------------------------------------------------------------

// dst = bf16(src), n a multiple of 4 (every tensor here is a multiple of D elements).
extern "C" __global__ void amma_cast_bf16(u16* dst, const float* src, i64 n) {
    const i64 n4 = n / 4;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += (i64)gridDim.x * blockDim.x) {
        const float4 x = ((const float4*)src)[i];
        ((uint2*)dst)[i] = make_uint2(am_pack(x.x, x.y), am_pack(x.z, x.w));
    }
}

// Per row (b, t, h), one warp: dob = bf16(dout) and dsum[b, h, t] = bf16(dout) . out. The
// rounded dout is the one the kernels multiply with, so that dsum = sum_j P_j dP_j holds
// as closely as the bf16 products allow (with one key, dS is then ~0, as it must be). With
// dout_bf16, dout is bf16 already (Backend::attention_operand): it is read as it is and
// dob is not written (the kernels read dout itself).
extern "C" __global__ void amma_bwd_prep(u16* dob, float* dsum, const void* dout, int dout_bf16, const float* out,
                                         int T, int H, int D, i64 rows) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* o = out + row * D;
    float acc = 0.f;
    for (int d = lane * 2; d < D; d += 64) {
        const float2 y = *(const float2*)(o + d);
        u32 p;
        if (dout_bf16) {
            p = *(const u32*)((const u16*)dout + row * D + d);
        } else {
            const float2 x = *(const float2*)((const float*)dout + row * D + d);
            p = am_pack(x.x, x.y);
            *(u32*)(dob + row * D + d) = p;
        }
        acc += bf16_to_f32((u16)(p & 0xffffu)) * y.x + bf16_to_f32((u16)(p >> 16)) * y.y;
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        const i64 bt = row / H;  // b * T + t
        const int h = (int)(row % H);
        const i64 b = bt / T, t = bt % T;
        dsum[(b * H + h) * T + t] = acc;
    }
}

#endif
