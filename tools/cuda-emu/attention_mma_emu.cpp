// Host emulation of src/backend/cuda/attention_mma.cu against an f64 reference (run.sh
// builds and runs it). One OS thread per CUDA thread, blocks one at a time, warp
// collectives (shfl, ldmatrix, mma) through per-warp exchange slots and barriers; cp.async
// copies land at the wait (default) or at once (EMU_EAGER=1), shared memory starts as NaN.
// The kernel file's "PTX primitives" section is replaced by the functions below.
// Usage: attention_mma_emu [seed] [case index]; exits 1 above a 1e-2 error.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;
using std::max;
using std::min;

#define __device__
#define __global__
#define __forceinline__
#define __launch_bounds__(x)
#define __shared__
#define __align__(x)
#define __CUDA_ARCH__ 900
#define FULL_MASK 0xffffffffu
#define INF_F INFINITY

struct dim3_ {
    unsigned x, y, z;
};
thread_local dim3_ threadIdx, blockIdx;
dim3_ gridDim, blockDim;
alignas(16) u16 am_sm[1 << 17];

struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
struct uint2 {
    u32 x, y;
};
static float2 make_float2(float a, float b) { return {a, b}; }
static uint2 make_uint2(u32 a, u32 b) { return {a, b}; }

static u32 fbits(float f) {
    u32 u;
    memcpy(&u, &f, 4);
    return u;
}
static float bitsf(u32 u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static float bf16_to_f32(u16 h) { return bitsf(((u32)h) << 16); }
static u16 f32_to_bf16(float f) {
    u32 u = fbits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// ---- block and warp machinery ----
struct Blk {
    std::barrier<>* bar;
    std::vector<std::barrier<>*> wbar;
    u32 slot[32][32][8];
    std::atomic<int> cnt[2];
};
Blk* B_;
thread_local int ph = 0;
thread_local int lane_, warp_;

static void __syncthreads() { B_->bar->arrive_and_wait(); }
static int __syncthreads_count(int p) {
    B_->cnt[ph] += p ? 1 : 0;
    B_->bar->arrive_and_wait();
    int r = B_->cnt[ph];
    B_->bar->arrive_and_wait();
    if (threadIdx.x == 0) B_->cnt[ph] = 0;
    ph ^= 1;
    return r;
}
static void wsync() { B_->wbar[warp_]->arrive_and_wait(); }
static void __syncwarp() { wsync(); }
static u32* myslot() { return B_->slot[warp_][lane_]; }
static u32* slotof(int l) { return B_->slot[warp_][l]; }

static float __shfl_xor_sync(u32, float v, int m) {
    myslot()[0] = fbits(v);
    wsync();
    float r = bitsf(slotof(lane_ ^ m)[0]);
    wsync();
    return r;
}
static float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// ---- primitives ----
static u32 am_smem(const void* p) { return (u32)((const char*)p - (const char*)am_sm); }
struct Copy {
    u32 dst;
    const void* src;
    int n;
};
thread_local std::vector<Copy> pending_open;
thread_local std::vector<std::vector<Copy>> groups;
static bool eager = false;
static void am_cp(u32 dst, const void* src, bool valid, int bytes) {
    char* d = (char*)am_sm + dst;
    if (dst % bytes) { fprintf(stderr, "misaligned cp.async dst\n"); abort(); }
    if (eager) {
        if (valid) memcpy(d, src, bytes);
        else memset(d, 0, bytes);
        return;
    }
    // deferred: valid copies read at wait time; zero fills too
    pending_open.push_back({dst, valid ? src : nullptr, bytes});
}
static void am_cp16(u32 dst, const void* src, bool valid) { am_cp(dst, src, valid, 16); }
static void am_cp4(u32 dst, const void* src, bool valid) { am_cp(dst, src, valid, 4); }
static void am_commit() {
    groups.push_back(pending_open);
    pending_open.clear();
}
template <int N>
static void am_wait() {
    while ((int)groups.size() > N) {
        for (auto& c : groups.front()) {
            char* d = (char*)am_sm + c.dst;
            if (c.src) memcpy(d, c.src, c.n);
            else memset(d, 0, c.n);
        }
        groups.erase(groups.begin());
    }
}
static u16 smem16(u32 byteaddr) {
    if (byteaddr % 2 || byteaddr >= sizeof(am_sm)) { fprintf(stderr, "bad smem addr %u\n", byteaddr); abort(); }
    return *(u16*)((char*)am_sm + byteaddr);
}
static void am_ldm(u32 (&r)[4], u32 addr) {
    if (addr % 16) { fprintf(stderr, "ldmatrix misaligned %u\n", addr); abort(); }
    myslot()[0] = addr;
    wsync();
    for (int j = 0; j < 4; ++j) {
        u32 ra = slotof(8 * j + lane_ / 4)[0] + (lane_ % 4) * 4;
        r[j] = smem16(ra) | ((u32)smem16(ra + 2) << 16);
    }
    wsync();
}
static void am_ldm_t(u32 (&r)[4], u32 addr) {
    if (addr % 16) { fprintf(stderr, "ldmatrix misaligned %u\n", addr); abort(); }
    myslot()[0] = addr;
    wsync();
    for (int j = 0; j < 4; ++j) {
        u32 lo = smem16(slotof(8 * j + (lane_ % 4) * 2)[0] + (lane_ / 4) * 2);
        u32 hi = smem16(slotof(8 * j + (lane_ % 4) * 2 + 1)[0] + (lane_ / 4) * 2);
        r[j] = lo | (hi << 16);
    }
    wsync();
}
static void am_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    u32* s = myslot();
    for (int i = 0; i < 4; ++i) s[i] = a[i];
    s[4] = b0;
    s[5] = b1;
    wsync();
    float A[16][16], Bm[16][8];
    for (int L = 0; L < 32; ++L) {
        u32* t = slotof(L);
        int g = L / 4, cc = L % 4;
        auto lo = [](u32 x) { return bf16_to_f32((u16)(x & 0xffff)); };
        auto hi = [](u32 x) { return bf16_to_f32((u16)(x >> 16)); };
        A[g][2 * cc] = lo(t[0]);
        A[g][2 * cc + 1] = hi(t[0]);
        A[g + 8][2 * cc] = lo(t[1]);
        A[g + 8][2 * cc + 1] = hi(t[1]);
        A[g][2 * cc + 8] = lo(t[2]);
        A[g][2 * cc + 9] = hi(t[2]);
        A[g + 8][2 * cc + 8] = lo(t[3]);
        A[g + 8][2 * cc + 9] = hi(t[3]);
        Bm[2 * cc][g] = lo(t[4]);
        Bm[2 * cc + 1][g] = hi(t[4]);
        Bm[2 * cc + 8][g] = lo(t[5]);
        Bm[2 * cc + 9][g] = hi(t[5]);
    }
    wsync();
    int g = lane_ / 4, cc = lane_ % 4;
    for (int e = 0; e < 4; ++e) {
        int row = g + (e >= 2 ? 8 : 0), col = 2 * cc + (e & 1);
        float acc = c[e];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * Bm[k][col];
        c[e] = acc;
    }
}
static u32 am_pack(float lo, float hi) { return f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16); }

#include "kern.inc"

template <class F>
void launch(dim3_ grid, unsigned nthreads, F f) {
    gridDim = grid;
    blockDim = {nthreads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                Blk* blk = new Blk();
                blk->bar = new std::barrier<>(nthreads);
                for (unsigned w = 0; w < nthreads / 32; ++w) blk->wbar.push_back(new std::barrier<>(32));
                blk->cnt[0] = blk->cnt[1] = 0;
                B_ = blk;
                memset(am_sm, 0xff, sizeof(am_sm));  // NaN poison
                std::vector<std::thread> th;
                for (unsigned t = 0; t < nthreads; ++t)
                    th.emplace_back([=] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        lane_ = t % 32;
                        warp_ = t / 32;
                        ph = 0;
                        groups.clear();
                        pending_open.clear();
                        f();
                    });
                for (auto& t : th) t.join();
                delete blk->bar;
                for (auto* w : blk->wbar) delete w;
                delete blk;
            }
}

// ---- reference (double) ----
struct Case {
    int B, T, H, KVH, D;
    int packed;
};

static double metric(const std::vector<float>& g, const std::vector<double>& w, double* rel_o, double* max_o) {
    double num = 0, den = 0, md = 0, mw = 0;
    bool fin = true;
    for (size_t i = 0; i < g.size(); ++i) {
        if (!std::isfinite(g[i])) fin = false;
        double d = g[i] - w[i];
        num += d * d;
        den += w[i] * w[i];
        md = max(md, fabs(d));
        mw = max(mw, fabs(w[i]));
    }
    double rel = fin ? sqrt(num / max(den, 1e-300)) : INFINITY, mx = fin ? md / max(mw, 1e-300) : INFINITY;
    *rel_o = rel;
    *max_o = mx;
    return max(rel, mx);
}

int main(int argc, char** argv) {
    eager = getenv("EMU_EAGER") != nullptr;
    std::mt19937_64 rng(argc > 1 ? atoll(argv[1]) : 1);
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    std::vector<Case> cases = {{1, 1, 2, 1, 64, false},   {2, 7, 4, 2, 64, false},   {1, 130, 4, 2, 64, false},
                               {1, 100, 2, 2, 128, false}, {1, 200, 2, 1, 64, 9},  {1, 150, 4, 2, 128, 9},
                               {2, 64, 2, 2, 128, false}, {2, 300, 2, 1, 64, 80}, {1, 260, 2, 2, 128, 70}};
    if (argc > 2) cases = {cases[atoi(argv[2])]};
    double worst = 0;
    for (auto cs : cases) {
        const int B = cs.B, T = cs.T, H = cs.H, KVH = cs.KVH, D = cs.D;
        const float scale = 1.f / sqrtf((float)D);
        const size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D;
        std::vector<float> q(nq), k(nk), v(nk), dout(nq);
        for (auto& x : q) x = 2.f * U(rng);
        for (auto& x : k) x = U(rng);
        for (auto& x : v) x = U(rng);
        for (auto& x : dout) x = U(rng);
        std::vector<u32> ks(B * T);
        for (int b = 0; b < B; ++b) {
            u32 s = 0;
            for (int t = 0; t < T; ++t) {
                if (cs.packed && t > 0 && rng() % cs.packed == 0) s = t;
                ks[b * T + t] = s;
            }
        }
        const u32* pks = cs.packed ? ks.data() : nullptr;
        // reference
        const int grp = H / KVH;
        std::vector<double> ro(nq), rl((size_t)B * H * T), rdq(nq, 0), rdk(nk, 0), rdv(nk, 0);
        for (int b = 0; b < B; ++b)
            for (int h = 0; h < H; ++h) {
                int g = h / grp;
                for (int t = 0; t < T; ++t) {
                    int s0 = ks[b * T + t] * (cs.packed ? 1 : 0);
                    std::vector<double> sc(t + 1, -INFINITY);
                    double m = -INFINITY;
                    for (int j = s0; j <= t; ++j) {
                        double a = 0;
                        for (int d = 0; d < D; ++d)
                            a += (double)q[((size_t)(b * T + t) * H + h) * D + d] * k[((size_t)(b * T + j) * KVH + g) * D + d];
                        sc[j] = a * scale;
                        m = max(m, sc[j]);
                    }
                    double l = 0;
                    for (int j = s0; j <= t; ++j) l += exp(sc[j] - m);
                    double lse = m + log(l);
                    rl[((size_t)b * H + h) * T + t] = lse;
                    std::vector<double> p(t + 1, 0), dp(t + 1, 0);
                    for (int j = s0; j <= t; ++j) p[j] = exp(sc[j] - lse);
                    for (int d = 0; d < D; ++d) {
                        double a = 0;
                        for (int j = s0; j <= t; ++j) a += p[j] * v[((size_t)(b * T + j) * KVH + g) * D + d];
                        ro[((size_t)(b * T + t) * H + h) * D + d] = a;
                    }
                    double delta = 0;
                    for (int d = 0; d < D; ++d)
                        delta += (double)dout[((size_t)(b * T + t) * H + h) * D + d] * ro[((size_t)(b * T + t) * H + h) * D + d];
                    for (int j = s0; j <= t; ++j) {
                        double a = 0;
                        for (int d = 0; d < D; ++d)
                            a += (double)dout[((size_t)(b * T + t) * H + h) * D + d] * v[((size_t)(b * T + j) * KVH + g) * D + d];
                        double ds = p[j] * (a - delta);
                        for (int d = 0; d < D; ++d) {
                            rdq[((size_t)(b * T + t) * H + h) * D + d] += ds * scale * k[((size_t)(b * T + j) * KVH + g) * D + d];
                            rdk[((size_t)(b * T + j) * KVH + g) * D + d] += ds * scale * q[((size_t)(b * T + t) * H + h) * D + d];
                            rdv[((size_t)(b * T + j) * KVH + g) * D + d] += p[j] * dout[((size_t)(b * T + t) * H + h) * D + d];
                        }
                    }
                }
            }
        // kernels
        std::vector<u16> qb(nq), kb(nk), vb(nk), dob(nq);
        std::vector<float> out(nq, NAN), lse((size_t)B * H * T, NAN), dq(nq, NAN), dk(nk, NAN), dv(nk, NAN),
            dsum((size_t)B * H * T, NAN);
        auto cast = [&](u16* dst, const float* src, size_t n) {
            launch({2, 1, 1}, 64, [&] { amma_cast_bf16(dst, src, (i64)n); });
        };
        cast(qb.data(), q.data(), nq);
        cast(kb.data(), k.data(), nk);
        cast(vb.data(), v.data(), nk);
        const float sl2 = scale * 1.4426950408889634f;
        const unsigned nt = (T + 63) / 64, nw = (T + 127) / 128;
        const dim3_ gq = {nt, (unsigned)H, (unsigned)B}, gw = {nw, (unsigned)H, (unsigned)B},
                    gk = {nt, (unsigned)KVH, (unsigned)B};
        auto fwd = [&](bool wide, float* o, float* l) {
            auto f = D == 64 ? (wide ? amma_fwd_wide_d64 : amma_fwd_d64) : (wide ? amma_fwd_wide_d128 : amma_fwd_d128);
            launch(wide ? gw : gq, 128, [&] { f(o, l, qb.data(), kb.data(), vb.data(), pks, T, H, KVH, sl2); });
        };
        fwd(false, out.data(), lse.data());
        // the wide forward: the same bits
        std::vector<float> out_w(nq, NAN), lse_w((size_t)B * H * T, NAN);
        fwd(true, out_w.data(), lse_w.data());
        const bool wide_same = memcmp(out.data(), out_w.data(), nq * 4) == 0 &&
                               memcmp(lse.data(), lse_w.data(), lse.size() * 4) == 0;
        // dsum and dout's copy
        i64 rows = (i64)B * T * H;
        launch({(unsigned)((rows + 7) / 8), 1, 1}, 256,
               [&] { amma_bwd_prep(dob.data(), dsum.data(), dout.data(), 0, out.data(), T, H, D, rows); });
        auto dqk = [&](bool wide, float* g) {
            auto f = D == 64 ? (wide ? amma_bwd_dq_wide_d64 : amma_bwd_dq_d64) : amma_bwd_dq_d128;
            launch(wide && D == 64 ? gw : gq, 128, [&] {
                f(g, qb.data(), kb.data(), vb.data(), dob.data(), lse.data(), dsum.data(), pks, T, H, KVH, sl2, scale);
            });
        };
        dqk(false, dq.data());
        // the wide dq, where there is one: the same bits
        std::vector<float> dq_w(nq, NAN);
        dqk(true, dq_w.data());
        const bool dq_same = memcmp(dq.data(), dq_w.data(), nq * 4) == 0;
        auto dkdv = D == 64 ? amma_bwd_dkdv_d64 : amma_bwd_dkdv_d128;
        launch(gk, 128, [&] {
            dkdv(dk.data(), dv.data(), qb.data(), kb.data(), vb.data(), dob.data(), lse.data(), dsum.data(), pks, T, H,
                 KVH, sl2, scale);
        });
        if (!wide_same || !dq_same) {
            printf("B=%d T=%d D=%d: %s%s\n", B, T, D, wide_same ? "" : "wide forward differs ",
                   dq_same ? "" : "wide dq differs");
            worst = INFINITY;
        }
        double r, m;
        printf("B=%d T=%d H=%d KVH=%d D=%d%s:", B, T, H, KVH, D, cs.packed ? " packed" : "");
        const char* names[] = {"out", "lse", "dq", "dk", "dv"};
        std::vector<float>* gs[] = {&out, &lse, &dq, &dk, &dv};
        std::vector<double>* ws[] = {&ro, &rl, &rdq, &rdk, &rdv};
        for (int i = 0; i < 5; ++i) {
            if (T == 1 && (i == 2 || i == 3)) {
                double a = 0;
                for (float x : *gs[i]) a = std::isfinite(x) ? max(a, (double)fabs(x)) : INFINITY;
                printf(" %s=abs%.1e", names[i], a);
                continue;
            }
            double e = metric(*gs[i], *ws[i], &r, &m);
            worst = max(worst, e);
            printf(" %s=%.1e/%.1e", names[i], r, m);
        }
        printf("\n");
        fflush(stdout);
    }
    printf("worst %.2e\n", worst);
    return worst < 1e-2 ? 0 : 1;
}
