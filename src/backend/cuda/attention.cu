// Causal attention without a T x T matrix (attention.rs), flash-style, f32 throughout.
//
// Layouts: q, out, dout, dq: [B, T, H, D]; k, v, dk, dv: [B, T, KVH, D]; lse, dsum: [B, H, T].
// Query head h reads key/value head h / (H / KVH). Query t of batch row b sees keys
// s0 ..= t, s0 = ks[b * T + t] (packed sequences; ks never decreases along a row) or 0 when
// ks is null.
//
// Forward: a block of NW warps handles NW consecutive queries of one (batch, head); each
// warp owns one query. Keys stream through shared memory in tiles of KT = 32, one key per
// lane for the scores; the softmax is the online one (running max m and sum l), and the
// output accumulator lives in registers, DPL = ceil(D / 32) elements per lane. Each row's
// log-sum-exp is saved for the backward.
//
// Backward (two kernels, no atomics, deterministic):
//  * attn_bwd_dq: per query, dsum = dout . out (saved), then for each key j <= t:
//    p = exp(s - lse), ds = p (dout . v_j - dsum), dq += scale ds k_j.
//  * attn_bwd_dkdv: per key j of a kv head, over every query head of its group and every
//    query t >= j: dv_j += p dout_t, dk_j += scale ds q_t. p is recomputed from lse.
//
// Shared tiles read row-wise by lane (one key or query per lane) have row stride D + 1,
// so that the 32 lanes hit 32 different banks.

#define KT 32

__device__ __forceinline__ i64 qidx(i64 b, i64 t, i64 h, i64 T, i64 H, i64 D) { return ((b * T + t) * H + h) * D; }

__device__ __forceinline__ int first_key(const u32* ks, int b, int t, int T) {
    return ks ? (int)ks[(i64)b * T + t] : 0;
}

template <int DPL>
__device__ void attn_fwd(float* out, float* lse, const float* q, const float* k, const float* v, const u32* ks,
                         int T, int H, int KVH, int D, float scale) {
    extern __shared__ float sm[];
    const int nw = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = blockIdx.z, h = blockIdx.y, g = h / (H / KVH);
    const int t0 = blockIdx.x * nw, t = t0 + warp;
    float* kt = sm;                   // [KT][D + 1]
    float* vs = kt + KT * (D + 1);    // [KT][D]
    float* qs = vs + KT * D;          // [nw][D]
    const bool active = t < T;
    const int s0 = active ? first_key(ks, b, t, T) : 0;
    if (active)
        for (int d = lane; d < D; d += 32) qs[warp * D + d] = q[qidx(b, t, h, T, H, D) + d];
    float m = -INF_F, l = 0.f, o[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[i] = 0.f;
    const int t_last = min(t0 + nw, T) - 1;
    // keys from the first query's segment start (the smallest in the block)
    for (int j0 = (first_key(ks, b, t0, T) / KT) * KT; j0 <= t_last; j0 += KT) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < KT * D; idx += blockDim.x) {
            const int jj = idx / D, d = idx % D, j = j0 + jj;
            float kv = 0.f, vv = 0.f;
            if (j < T) {
                const i64 off = qidx(b, j, g, T, KVH, D) + d;
                kv = k[off];
                vv = v[off];
            }
            kt[jj * (D + 1) + d] = kv;
            vs[jj * D + d] = vv;
        }
        __syncthreads();
        if (active && j0 <= t && j0 + KT > s0) {
            const int j = j0 + lane;
            float s = -INF_F;
            if (j >= s0 && j <= t) {
                const float* kr = kt + lane * (D + 1);
                const float* qr = qs + warp * D;
                float acc = 0.f;
                for (int d = 0; d < D; ++d) acc += qr[d] * kr[d];
                s = acc * scale;
            }
            const float mn = fmaxf(m, warp_max(s));  // finite: the tile holds a key of s0..=t
            const float p = (j >= s0 && j <= t) ? expf(s - mn) : 0.f;
            const float corr = expf(m - mn);        // 0 on the first tile (m = -inf)
            l = l * corr + warp_sum(p);
#pragma unroll
            for (int i = 0; i < DPL; ++i) o[i] *= corr;
            const int jmax = min(KT, t - j0 + 1);
            for (int jj = 0; jj < jmax; ++jj) {
                const float pj = __shfl_sync(FULL_MASK, p, jj);
#pragma unroll
                for (int i = 0; i < DPL; ++i) {
                    const int d = lane + 32 * i;
                    if (d < D) o[i] += pj * vs[jj * D + d];
                }
            }
            m = mn;
        }
    }
    if (active) {
        const float inv = 1.f / l;
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const int d = lane + 32 * i;
            if (d < D) out[qidx(b, t, h, T, H, D) + d] = o[i] * inv;
        }
        if (lane == 0) lse[((i64)b * H + h) * T + t] = m + logf(l);
    }
}

template <int DPL>
__device__ void attn_bwd_dq(float* dq, float* dsum, const float* dout, const float* out, const float* lse,
                            const float* q, const float* k, const float* v, const u32* ks, int T, int H, int KVH,
                            int D, float scale) {
    extern __shared__ float sm[];
    const int nw = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = blockIdx.z, h = blockIdx.y, g = h / (H / KVH);
    const int t0 = blockIdx.x * nw, t = t0 + warp;
    float* kt = sm;                     // [KT][D + 1]
    float* vs = kt + KT * (D + 1);      // [KT][D + 1]
    float* qs = vs + KT * (D + 1);      // [nw][D]
    float* dos = qs + nw * D;           // [nw][D]
    const bool active = t < T;
    const int s0 = active ? first_key(ks, b, t, T) : 0;
    float dt = 0.f, lt = 0.f;
    if (active) {
        const i64 base = qidx(b, t, h, T, H, D);
        float acc = 0.f;
        for (int d = lane; d < D; d += 32) {
            qs[warp * D + d] = q[base + d];
            const float go = dout[base + d];
            dos[warp * D + d] = go;
            acc += go * out[base + d];
        }
        dt = warp_sum(acc);
        lt = lse[((i64)b * H + h) * T + t];
        if (lane == 0) dsum[((i64)b * H + h) * T + t] = dt;
    }
    float a[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) a[i] = 0.f;
    const int t_last = min(t0 + nw, T) - 1;
    for (int j0 = (first_key(ks, b, t0, T) / KT) * KT; j0 <= t_last; j0 += KT) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < KT * D; idx += blockDim.x) {
            const int jj = idx / D, d = idx % D, j = j0 + jj;
            float kv = 0.f, vv = 0.f;
            if (j < T) {
                const i64 off = qidx(b, j, g, T, KVH, D) + d;
                kv = k[off];
                vv = v[off];
            }
            kt[jj * (D + 1) + d] = kv;
            vs[jj * (D + 1) + d] = vv;
        }
        __syncthreads();
        if (active && j0 <= t && j0 + KT > s0) {
            const int j = j0 + lane;
            float ds = 0.f;
            if (j >= s0 && j <= t) {
                const float* kr = kt + lane * (D + 1);
                const float* vr = vs + lane * (D + 1);
                const float* qr = qs + warp * D;
                const float* dr = dos + warp * D;
                float sacc = 0.f, pacc = 0.f;
                for (int d = 0; d < D; ++d) {
                    sacc += qr[d] * kr[d];
                    pacc += dr[d] * vr[d];
                }
                const float p = expf(sacc * scale - lt);
                ds = p * (pacc - dt);
            }
            const int jmax = min(KT, t - j0 + 1);
            for (int jj = 0; jj < jmax; ++jj) {
                const float dsj = __shfl_sync(FULL_MASK, ds, jj);
#pragma unroll
                for (int i = 0; i < DPL; ++i) {
                    const int d = lane + 32 * i;
                    if (d < D) a[i] += dsj * kt[jj * (D + 1) + d];
                }
            }
        }
    }
    if (active) {
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const int d = lane + 32 * i;
            if (d < D) dq[qidx(b, t, h, T, H, D) + d] = a[i] * scale;
        }
    }
}

template <int DPL>
__device__ void attn_bwd_dkdv(float* dk, float* dv, const float* dout, const float* lse, const float* dsum,
                              const float* q, const float* k, const float* v, const u32* ks, int T, int H, int KVH,
                              int D, float scale) {
    extern __shared__ float sm[];
    const int nw = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int b = blockIdx.z, g = blockIdx.y, group = H / KVH;
    const int j0b = blockIdx.x * nw, j = j0b + warp;
    float* qs = sm;                      // [KT][D + 1]
    float* dos = qs + KT * (D + 1);      // [KT][D + 1]
    float* kj = dos + KT * (D + 1);      // [nw][D]
    float* vj = kj + nw * D;             // [nw][D]
    float* ls = vj + nw * D;             // [KT]
    float* dss = ls + KT;                // [KT]
    int* ss = (int*)(dss + KT);          // [KT] first key of each query of the tile
    const bool active = j < T;
    const int j_last = min(j0b + nw, T) - 1;
    if (active) {
        const i64 base = qidx(b, j, g, T, KVH, D);
        for (int d = lane; d < D; d += 32) {
            kj[warp * D + d] = k[base + d];
            vj[warp * D + d] = v[base + d];
        }
    }
    float ak[DPL], av[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) ak[i] = av[i] = 0.f;
    for (int hh = 0; hh < group; ++hh) {
        const int h = g * group + hh;
        for (int t0 = (j0b / KT) * KT; t0 < T; t0 += KT) {
            __syncthreads();
            for (int idx = threadIdx.x; idx < KT * D; idx += blockDim.x) {
                const int tt = idx / D, d = idx % D, t = t0 + tt;
                float qv = 0.f, gv = 0.f;
                if (t < T) {
                    const i64 off = qidx(b, t, h, T, H, D) + d;
                    qv = q[off];
                    gv = dout[off];
                }
                qs[tt * (D + 1) + d] = qv;
                dos[tt * (D + 1) + d] = gv;
            }
            for (int tt = threadIdx.x; tt < KT; tt += blockDim.x) {
                const int t = t0 + tt;
                ls[tt] = t < T ? lse[((i64)b * H + h) * T + t] : 0.f;
                dss[tt] = t < T ? dsum[((i64)b * H + h) * T + t] : 0.f;
                ss[tt] = t < T ? first_key(ks, b, t, T) : T;
            }
            __syncthreads();
            // Segment starts never decrease: once a tile's first query starts after every
            // key of this block, no later query sees them either (uniform over the block).
            if (ss[0] > j_last) break;
            if (active && t0 + KT - 1 >= j) {
                const int t = t0 + lane;
                float p = 0.f, ds = 0.f;
                if (t >= j && t < T && ss[lane] <= j) {
                    const float* qr = qs + lane * (D + 1);
                    const float* dr = dos + lane * (D + 1);
                    const float* kr = kj + warp * D;
                    const float* vr = vj + warp * D;
                    float sacc = 0.f, pacc = 0.f;
                    for (int d = 0; d < D; ++d) {
                        sacc += qr[d] * kr[d];
                        pacc += dr[d] * vr[d];
                    }
                    p = expf(sacc * scale - ls[lane]);
                    ds = p * (pacc - dss[lane]);
                }
                const int tmax = min(KT, T - t0);
                for (int tt = 0; tt < tmax; ++tt) {
                    const float pt = __shfl_sync(FULL_MASK, p, tt);
                    const float dst = __shfl_sync(FULL_MASK, ds, tt);
#pragma unroll
                    for (int i = 0; i < DPL; ++i) {
                        const int d = lane + 32 * i;
                        if (d < D) {
                            av[i] += pt * dos[tt * (D + 1) + d];
                            ak[i] += dst * qs[tt * (D + 1) + d];
                        }
                    }
                }
            }
        }
    }
    if (active) {
        const i64 base = qidx(b, j, g, T, KVH, D);
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const int d = lane + 32 * i;
            if (d < D) {
                dk[base + d] = ak[i] * scale;
                dv[base + d] = av[i];
            }
        }
    }
}

// Decode (attention_decode): new queries against a key/value cache. q, out: [B, Tq, H, D];
// kc, vc: [B, cap, KVH, D]. Query i of row b sits at position p = kv_len - Tq + i and
// attends to keys s0 ..= p, s0 = min(ks[b], p) (ks: [B], or null for 0), so a padding
// query before its row's first key attends to itself only. One warp per (b, i, h): q in
// shared memory, one key per lane per step of 32 (its whole dot product), online softmax,
// then each lane adds p_j v_j into its DPL output dimensions.
template <int DPL>
__device__ void attn_decode(float* out, const float* q, const float* kc, const float* vc, const u32* ks,
                            int Tq, int cap, int kv_len, int H, int KVH, int D, float scale) {
    extern __shared__ float sm[];
    const int nw = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.x * nw + warp, i = blockIdx.y, b = blockIdx.z;
    if (h >= H) return;  // whole warps only: no block-wide barrier below
    const int g = h / (H / KVH);
    const int p = kv_len - Tq + i;
    const int s0 = ks ? min((int)ks[b], p) : 0;
    const i64 qo = (((i64)b * Tq + i) * H + h) * D;
    float* qs = sm + warp * D;
    for (int d = lane; d < D; d += 32) qs[d] = q[qo + d];
    __syncwarp();
    float m = -INF_F, l = 0.f, o[DPL];
#pragma unroll
    for (int k = 0; k < DPL; ++k) o[k] = 0.f;
    for (int j0 = s0; j0 <= p; j0 += 32) {
        const int j = j0 + lane;
        float s = -INF_F;
        if (j <= p) {
            const float* kr = kc + (((i64)b * cap + j) * KVH + g) * D;
            float acc = 0.f;
            for (int d = 0; d < D; ++d) acc += qs[d] * kr[d];
            s = acc * scale;
        }
        const float mn = fmaxf(m, warp_max(s));  // finite: key j0 <= p is in this step
        const float pj = j <= p ? expf(s - mn) : 0.f;
        const float corr = expf(m - mn);         // 0 on the first step (m = -inf)
        l = l * corr + warp_sum(pj);
#pragma unroll
        for (int k = 0; k < DPL; ++k) o[k] *= corr;
        const int n = min(32, p - j0 + 1);
        for (int jj = 0; jj < n; ++jj) {
            const float pw = __shfl_sync(0xffffffffu, pj, jj);
            const float* vr = vc + (((i64)b * cap + j0 + jj) * KVH + g) * D;
#pragma unroll
            for (int k = 0; k < DPL; ++k) {
                const int d = lane + 32 * k;
                if (d < D) o[k] += pw * vr[d];
            }
        }
        m = mn;
    }
    const float inv = 1.f / l;
#pragma unroll
    for (int k = 0; k < DPL; ++k) {
        const int d = lane + 32 * k;
        if (d < D) out[qo + d] = o[k] * inv;
    }
}

#define ATTN_VARIANTS(DPL, SUFFIX)                                                                                   \
    extern "C" __global__ void attn_fwd_##SUFFIX(float* out, float* lse, const float* q, const float* k,            \
                                                 const float* v, const u32* ks, int T, int H, int KVH, int D,        \
                                                 float scale) {                                                      \
        attn_fwd<DPL>(out, lse, q, k, v, ks, T, H, KVH, D, scale);                                                   \
    }                                                                                                                \
    extern "C" __global__ void attn_bwd_dq_##SUFFIX(float* dq, float* dsum, const float* dout, const float* out,     \
                                                    const float* lse, const float* q, const float* k,               \
                                                    const float* v, const u32* ks, int T, int H, int KVH, int D,     \
                                                    float scale) {                                                   \
        attn_bwd_dq<DPL>(dq, dsum, dout, out, lse, q, k, v, ks, T, H, KVH, D, scale);                                \
    }                                                                                                                \
    extern "C" __global__ void attn_bwd_dkdv_##SUFFIX(float* dk, float* dv, const float* dout, const float* lse,     \
                                                      const float* dsum, const float* q, const float* k,            \
                                                      const float* v, const u32* ks, int T, int H, int KVH, int D,   \
                                                      float scale) {                                                 \
        attn_bwd_dkdv<DPL>(dk, dv, dout, lse, dsum, q, k, v, ks, T, H, KVH, D, scale);                               \
    }                                                                                                                \
    extern "C" __global__ void attn_decode_##SUFFIX(float* out, const float* q, const float* kc, const float* vc,   \
                                                    const u32* ks, int Tq, int cap, int kv_len, int H, int KVH,     \
                                                    int D, float scale) {                                            \
        attn_decode<DPL>(out, q, kc, vc, ks, Tq, cap, kv_len, H, KVH, D, scale);                                     \
    }

ATTN_VARIANTS(1, d32)
ATTN_VARIANTS(2, d64)
ATTN_VARIANTS(4, d128)
ATTN_VARIANTS(8, d256)
