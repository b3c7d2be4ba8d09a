// Causal attention on Hopper's warpgroup tensor-core instructions (wgmma), the same three
// passes, interfaces and arithmetic as attention_mma.cu, whose helpers this file uses
// (attention.rs compiles the two files as one module for sm_90a). D = 64 or 128.
//
// Why: a mma.sync warp reads every B fragment from shared memory through its own registers,
// so with 16 rows a warp each fragment feeds one row tile and the kernels are bound by
// shared-memory bandwidth (BENCHMARKS.md: forward 26 %, backward 19 % of the card's bf16
// rate at 128k). wgmma reads B from shared memory once for the warpgroup's 64 rows.
//
// Block = one warpgroup (4 warps, 128 threads) owning 64 rows: warp w holds rows 16w ..
// 16w + 15 of every accumulator in the mma.sync C layout (wgmma's m64nN accumulators are
// that layout per warp), so the softmax, masks and epilogues are attention_mma.cu's.
// Operands in shared memory use the 128-byte swizzle: a tile of R rows x D bf16 is stored
// as D / 64 atoms of [R][64], the 16-byte chunk c of row r at chunk c ^ (r % 8), every atom
// 1024-byte aligned. The same tile is a K-major operand (rows are M or N, d is K: S = Q K^T)
// or, with imm-trans-b, an N-major B operand (rows are K, d is N: O += P V, dQ += dS K,
// dV += P^T dO, dK += dS^T Q). A operands that are products (P, dS) come from registers.
//
// Sums run in the order of the mma.sync kernels (k16 steps in sequence, one online-softmax
// step per 64 keys); whether the bits then equal theirs is measured, not assumed
// (tools/bench/attention_variants.cu).

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define AWG_ATOM 8192  // bytes of one [64 rows][64] bf16 atom

// ---- wgmma primitives -------------------------------------------------------------------

// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading and stride
// byte offsets (>> 4). K-major: the stride is the 1024 bytes between 8-row groups and the
// leading offset is unused. N-major (imm-trans-b): the leading offset is the distance
// between the 64-column atoms, the stride that between 8-row groups along K.
__device__ __forceinline__ u64 awg_desc(u32 addr, u32 lead, u32 stride) {
    return (u64)((addr & 0x3ffffu) >> 4) | ((u64)(lead >> 4) << 16) | ((u64)(stride >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void awg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void awg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void awg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// cp.async's writes (generic proxy) made visible to wgmma's reads (async proxy)
__device__ __forceinline__ void awg_fence_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Registers an in-flight wgmma writes must not be touched by the compiler across the wait.
template <int N>
__device__ __forceinline__ void awg_hold(float (&d)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

// d (64 x 32, f32) += A (64 x 16, shared memory, K-major) · B (16 x 32, shared memory, K-major)
__device__ __forceinline__ void awg_ss_n32(float (&d)[4][4], u64 da, u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
        : "l"(da), "l"(db), "r"(1));
}

// d (64 x 64, f32) += A (64 x 16, shared memory, K-major) · B (16 x 64, shared memory, K-major)
__device__ __forceinline__ void awg_ss_n64(float (&d)[8][4], u64 da, u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "l"(da), "l"(db), "r"(1));
}

// d (64 x 64, f32) += A (64 x 16, registers: each warp's 16 rows as an mma.sync A fragment)
// · B (16 x 64, shared memory, N-major: imm-trans-b = 1)
__device__ __forceinline__ void awg_rs_n64_t(float (&d)[8][4], const u32 (&a)[4], u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// d (64 x 128, f32) += A (64 x 16, registers: each warp's 16 rows as an mma.sync A fragment)
// · B (16 x 128, shared memory, N-major: imm-trans-b = 1)
__device__ __forceinline__ void awg_rs_n128_t(float (&d)[16][4], const u32 (&a)[4], u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),
          "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),
          "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),
          "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),
          "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
          "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),
          "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),
          "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));
}

// ---- tiles --------------------------------------------------------------------------------

// Rows r0 .. r0 + R - 1 of head hd of a bf16 [B, T, NH, D] tensor into a swizzled tile
// (D / 64 atoms of [R][64]); rows at or past T are zero-filled.
template <int R, int D>
__device__ __forceinline__ void awg_load_tile(u32 dst, const u16* src, int b, int r0, int hd, int T, int NH) {
    constexpr int CPR = D / 8;
#pragma unroll
    for (int c = threadIdx.x; c < R * CPR; c += AM_NT) {
        const int r = c / CPR, ch = c % CPR, t = r0 + r;
        const bool ok = t < T;
        const u16* p = src + (((i64)b * T + (ok ? t : 0)) * NH + hd) * D + ch * 8;
        am_cp16(dst + (u32)((ch >> 3) * R * 128 + r * 128 + (((ch & 7) ^ (r & 7)) << 4)), p, ok);
    }
}

// K-major descriptor of k16 step kk of a 64-row swizzled tile (rows from row 0, or from
// row n0, a multiple of 8, for an N-slice of a B operand).
template <int R>
__device__ __forceinline__ u64 awg_kmajor(u32 tile, int kk, int n0 = 0) {
    return awg_desc(tile + (u32)((kk >> 2) * R * 128 + n0 * 128 + (kk & 3) * 32), 16, 1024);
}
// N-major descriptor of the 16 rows (along K) from row k0 of a 64-row swizzled tile.
__device__ __forceinline__ u64 awg_nmajor(u32 tile, int k0) {
    return awg_desc(tile + (u32)(k0 * 128), AWG_ATOM, 1024);
}

// The block's shared memory from a 1024-byte boundary (the launch asks for 1 KB more).
__device__ __forceinline__ u32 awg_base(const void* sm) { return (am_smem(sm) + 1023u) & ~1023u; }

// acc (64 rows x D) += bf16(x) (64 rows x 64 keys) · the 64 x D tile at `tile` (rows = keys):
// O += P V and dQ += dS K, one wgmma a k16 step, in key order.
template <int D>
__device__ __forceinline__ void awg_acc_times_tile(float (&acc)[D / 8][4], const float (&x)[8][4], u32 tile) {
    u32 pa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) am_frag_from_acc(pa[kk], x, kk);
    awg_hold(acc);
    awg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        if constexpr (D == 128) awg_rs_n128_t(acc, pa[kk], awg_nmajor(tile, kk * 16));
        else awg_rs_n64_t(acc, pa[kk], awg_nmajor(tile, kk * 16));
    }
    awg_commit();
    awg_wait0();
    awg_hold(acc);
}

// s (64 x 64) = the 64-row tile a (K-major over D) · the 64-row tile b^T.
template <int D>
__device__ __forceinline__ void awg_tile_products(float (&s)[8][4], u32 a, u32 b) {
    awg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) awg_ss_n64(s, awg_kmajor<64>(a, kk), awg_kmajor<64>(b, kk));
}

// ---- forward ----------------------------------------------------------------------------

// amma_fwd<D, 1, 64>'s arithmetic; the block's 64 queries are the warpgroup's rows. Every
// warp takes part in every wgmma, so a warp works the key tiles its rows do not see too;
// their probabilities are 0 and leave m, l and O as they were.
template <int D>
__device__ void awg_fwd(float* out, float* lse, const u16* q, const u16* k, const u16* v, const u32* ks, int T,
                        int H, int KVH, float sl2) {
    constexpr int DT = D / 8, TILE = (D / 64) * AWG_ATOM;
    extern __shared__ __align__(16) u16 am_sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = blockIdx.z, h = blockIdx.y, g = h / (H / KVH);
    const int i0 = (gridDim.x - 1 - blockIdx.x) * AM_BM;
    const int ilast = min(i0 + AM_BM, T) - 1;
    const int jbeg = (am_first_key(ks, b, i0, T) / AM_BN) * AM_BN;
    const int ntile = ilast / AM_BN - jbeg / AM_BN + 1;
    const u32 qs = awg_base(am_sm), kst = qs + TILE, vst = kst + 2 * TILE;

    awg_load_tile<AM_BM, D>(qs, q, b, i0, h, T, H);
    awg_load_tile<AM_BN, D>(kst, k, b, jbeg, g, T, KVH);
    awg_load_tile<AM_BN, D>(vst, v, b, jbeg, g, T, KVH);
    am_commit();

    const AmWarpRows<1> rows(ks, b, i0, warp, lane, T);
    float o[DT][4];
    float m[2], l[2];
#pragma unroll
    for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    m[0] = m[1] = -INF_F;
    l[0] = l[1] = 0.f;

    for (int it = 0; it < ntile; ++it) {
        const int j0 = jbeg + it * AM_BN, st = it & 1;
        if (it + 1 < ntile) {
            awg_load_tile<AM_BN, D>(kst + (st ^ 1) * TILE, k, b, j0 + AM_BN, g, T, KVH);
            awg_load_tile<AM_BN, D>(vst + (st ^ 1) * TILE, v, b, j0 + AM_BN, g, T, KVH);
            am_commit();
            am_wait<1>();
        } else {
            am_wait<0>();
        }
        awg_fence_smem();
        __syncthreads();
        const u32 kt = kst + st * TILE, vt = vst + st * TILE;
        float s[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        awg_hold(s);
        awg_tile_products<D>(s, qs, kt);
        awg_commit();
        awg_wait0();
        awg_hold(s);
        // scale to log2 units, mask (causal diagonal, segment starts), online softmax
        const bool need_mask = rows.needs_mask(j0, AM_BN);
        float mx[2] = {-INF_F, -INF_F};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nt][e] * sl2;
                if (need_mask) {
                    const int j = j0 + nt * 8 + (lane & 3) * 2 + (e & 1);
                    if (rows.masked(0, e >> 1, j)) x = -INF_F;
                }
                s[nt][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
        float mu[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(FULL_MASK, mx[i], 2));
            const float mn = fmaxf(m[i], mx[i]);
            mu[i] = mn == -INF_F ? 0.f : mn;  // a row with no key yet: keep everything at 0
            const float corr = exp2f(m[i] - mu[i]);
            m[i] = mn;
            l[i] *= corr;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[dt][2 * i] *= corr;
                o[dt][2 * i + 1] *= corr;
            }
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[nt][e] - mu[e >> 1]);
                s[nt][e] = p;
                l[e >> 1] += p;
            }
        }
        // O += P V
        awg_acc_times_tile<D>(o, s, vt);
        __syncthreads();  // the next iteration's loads overwrite this stage
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(FULL_MASK, l[i], 1);
        l[i] += __shfl_xor_sync(FULL_MASK, l[i], 2);
        const int r = rows.r[0][i];
        if (r >= T) continue;
        const float inv = 1.f / l[i];
        float* dst = out + (((i64)b * T + r) * H + h) * D + (lane & 3) * 2;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) *(float2*)(dst + dt * 8) = make_float2(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
        if ((lane & 3) == 0) lse[((i64)b * H + h) * T + r] = (m[i] + log2f(l[i])) * AM_LN2;
    }
}

// ---- backward: dq -----------------------------------------------------------------------

// amma_bwd_dq<D, 1, 64>'s arithmetic, the block's 64 queries the warpgroup's rows.
template <int D>
__device__ void awg_bwd_dq(float* dq, const u16* q, const u16* k, const u16* v, const u16* dob, const float* lse,
                           const float* dsum, const u32* ks, int T, int H, int KVH, float sl2, float scale) {
    constexpr int DT = D / 8, TILE = (D / 64) * AWG_ATOM;
    extern __shared__ __align__(16) u16 am_sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = blockIdx.z, h = blockIdx.y, g = h / (H / KVH);
    const int i0 = (gridDim.x - 1 - blockIdx.x) * AM_BM;
    const int ilast = min(i0 + AM_BM, T) - 1;
    const int jbeg = (am_first_key(ks, b, i0, T) / AM_BN) * AM_BN;
    const int ntile = ilast / AM_BN - jbeg / AM_BN + 1;
    const u32 qs = awg_base(am_sm), dos = qs + TILE, kst = dos + TILE, vst = kst + 2 * TILE;

    awg_load_tile<AM_BM, D>(qs, q, b, i0, h, T, H);
    awg_load_tile<AM_BM, D>(dos, dob, b, i0, h, T, H);
    awg_load_tile<AM_BN, D>(kst, k, b, jbeg, g, T, KVH);
    awg_load_tile<AM_BN, D>(vst, v, b, jbeg, g, T, KVH);
    am_commit();

    const i64 la = ((i64)b * H + h) * T;
    const AmWarpRows<1> rows(ks, b, i0, warp, lane, T);
    float l2[2], dl[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = rows.r[0][i];
        l2[i] = r < T ? lse[la + r] * AM_LOG2E : 0.f;
        dl[i] = r < T ? dsum[la + r] : 0.f;
    }
    float acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

    for (int it = 0; it < ntile; ++it) {
        const int j0 = jbeg + it * AM_BN, st = it & 1;
        if (it + 1 < ntile) {
            awg_load_tile<AM_BN, D>(kst + (st ^ 1) * TILE, k, b, j0 + AM_BN, g, T, KVH);
            awg_load_tile<AM_BN, D>(vst + (st ^ 1) * TILE, v, b, j0 + AM_BN, g, T, KVH);
            am_commit();
            am_wait<1>();
        } else {
            am_wait<0>();
        }
        awg_fence_smem();
        __syncthreads();
        const u32 kt = kst + st * TILE, vt = vst + st * TILE;
        float s[8][4], dp[8][4];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
        awg_hold(s);
        awg_hold(dp);
        awg_tile_products<D>(s, qs, kt);
        awg_tile_products<D>(dp, dos, vt);
        awg_commit();
        awg_wait0();
        awg_hold(s);
        awg_hold(dp);
        const bool need_mask = rows.needs_mask(j0, AM_BN);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float p = exp2f(s[nt][e] * sl2 - l2[e >> 1]);
                if (need_mask) {
                    const int j = j0 + nt * 8 + (lane & 3) * 2 + (e & 1);
                    if (rows.masked(0, e >> 1, j)) p = 0.f;
                }
                s[nt][e] = p * (dp[nt][e] - dl[e >> 1]);  // dS
            }
        }
        // dQ += dS K
        awg_acc_times_tile<D>(acc, s, kt);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = rows.r[0][i];
        if (r >= T) continue;
        float* dst = dq + (((i64)b * T + r) * H + h) * D + (lane & 3) * 2;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
            *(float2*)(dst + dt * 8) = make_float2(acc[dt][2 * i] * scale, acc[dt][2 * i + 1] * scale);
    }
}

// ---- backward: dk, dv -------------------------------------------------------------------

// amma_bwd_dkdv<D, QC>'s arithmetic, the block's 64 keys the warpgroup's rows; QC queries
// (of a 64-query tile) a compute step.
template <int D, int QC>
__device__ void awg_bwd_dkdv(float* dk, float* dv, const u16* q, const u16* k, const u16* v, const u16* dob,
                             const float* lse, const float* dsum, const u32* ks, int T, int H, int KVH, float sl2,
                             float scale) {
    constexpr int DT = D / 8, TILE = (D / 64) * AWG_ATOM;
    extern __shared__ __align__(16) u16 am_sm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tid = threadIdx.x;
    const int b = blockIdx.z, g = blockIdx.y, group = H / KVH;
    const int j0 = blockIdx.x * AM_BN, jlast = min(j0 + AM_BN, T) - 1;
    const u32 ksm = awg_base(am_sm), vsm = ksm + TILE, qst = vsm + TILE, dost = qst + 2 * TILE;
    // [2][BM] each of lse, dsum and first keys, after the tiles
    float* lse_s = (float*)((char*)am_sm + (dost + 2 * TILE - am_smem(am_sm)));
    float* dl_s = lse_s + 2 * AM_BM;
    int* s0_s = (int*)(dl_s + 2 * AM_BM);

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
        awg_load_tile<AM_BM, D>(qst + stage * TILE, q, b, i0, h, T, H);
        awg_load_tile<AM_BM, D>(dost + stage * TILE, dob, b, i0, h, T, H);
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

    awg_load_tile<AM_BN, D>(ksm, k, b, j0, g, T, KVH);
    awg_load_tile<AM_BN, D>(vsm, v, b, j0, g, T, KVH);
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
        awg_fence_smem();
        __syncthreads();
        const u32 qt = qst + st * TILE, dt_ = dost + st * TILE;
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
            // S^T = K Q^T, dP^T = V dO^T over this step's QC queries
            awg_hold(s);
            awg_hold(dp);
            awg_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                if constexpr (QC == 64) {
                    awg_ss_n64(s, awg_kmajor<64>(ksm, kk), awg_kmajor<64>(qt, kk, qc * QC));
                    awg_ss_n64(dp, awg_kmajor<64>(vsm, kk), awg_kmajor<64>(dt_, kk, qc * QC));
                } else {
                    awg_ss_n32(s, awg_kmajor<64>(ksm, kk), awg_kmajor<64>(qt, kk, qc * QC));
                    awg_ss_n32(dp, awg_kmajor<64>(vsm, kk), awg_kmajor<64>(dt_, kk, qc * QC));
                }
            }
            awg_commit();
            awg_wait0();
            awg_hold(s);
            awg_hold(dp);
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
            u32 pa[QC / 16][4], sa[QC / 16][4];
#pragma unroll
            for (int kk = 0; kk < QC / 16; ++kk) {
                am_frag_from_acc(pa[kk], s, kk);
                am_frag_from_acc(sa[kk], dp, kk);
            }
            awg_hold(adv);
            awg_hold(adk);
            awg_fence();
#pragma unroll
            for (int kk = 0; kk < QC / 16; ++kk) {
                const int r0 = qc * QC + kk * 16;
                if constexpr (D == 128) {
                    awg_rs_n128_t(adv, pa[kk], awg_nmajor(dt_, r0));
                    awg_rs_n128_t(adk, sa[kk], awg_nmajor(qt, r0));
                } else {
                    awg_rs_n64_t(adv, pa[kk], awg_nmajor(dt_, r0));
                    awg_rs_n64_t(adk, sa[kk], awg_nmajor(qt, r0));
                }
            }
            awg_commit();
            awg_wait0();
            awg_hold(adv);
            awg_hold(adk);
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

// Entry points, the signatures of attention_mma.cu's.
#define AWG_FWD(NAME, D)                                                                                    \
    extern "C" __global__ void __launch_bounds__(AM_NT)                                                     \
        NAME(float* out, float* lse, const u16* q, const u16* k, const u16* v, const u32* ks, int T, int H, \
             int KVH, float sl2) {                                                                          \
        awg_fwd<D>(out, lse, q, k, v, ks, T, H, KVH, sl2);                                                  \
    }
#define AWG_DQ(NAME, D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(AM_NT)                                                        \
        NAME(float* dq, const u16* q, const u16* k, const u16* v, const u16* dob, const float* lse,            \
             const float* dsum, const u32* ks, int T, int H, int KVH, float sl2, float scale) {                \
        awg_bwd_dq<D>(dq, q, k, v, dob, lse, dsum, ks, T, H, KVH, sl2, scale);                                 \
    }
#define AWG_DKDV(NAME, D, QC)                                                                                  \
    extern "C" __global__ void __launch_bounds__(AM_NT)                                                        \
        NAME(float* dk, float* dv, const u16* q, const u16* k, const u16* v, const u16* dob, const float* lse, \
             const float* dsum, const u32* ks, int T, int H, int KVH, float sl2, float scale) {                \
        awg_bwd_dkdv<D, QC>(dk, dv, q, k, v, dob, lse, dsum, ks, T, H, KVH, sl2, scale);                       \
    }

AWG_FWD(awg_fwd_d64, 64)
AWG_FWD(awg_fwd_d128, 128)
AWG_DQ(awg_bwd_dq_d64, 64)
AWG_DQ(awg_bwd_dq_d128, 128)
AWG_DKDV(awg_bwd_dkdv_d64, 64, 64)
AWG_DKDV(awg_bwd_dkdv_d128, 128, 32)

#endif
