// Times tilings of the tensor-core attention kernels (src/backend/cuda/attention_mma.cu)
// on random bf16 operands, causal, one (batch, T) at a time, and checks that each variant's
// outputs equal the first variant's of its kind bit for bit or, where the tiling changes the
// arithmetic order (the forward's KC), how far they are. Built and run by
// tools/bench/attention_variants.sh on a GPU machine with nvcc:
//   attention_variants <H> <KVH> <T>...
// Prints one line per kernel variant and T: ms a call and TFLOP/s (2·T²·H·D for the
// forward, 2.5× that for dq + dk/dv, causal halves counted).
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <random>
#include <cmath>

#include "kernels.inc"  // common.cuh + attention_mma.cu (+ attention_wgmma.cu on Hopper)

AMMA_FWD(v_fwd_128_m1_k64, 128, 1, 64)
AMMA_FWD(v_fwd_128_m2_k64, 128, 2, 64)
AMMA_FWD(v_fwd_128_m2_k32, 128, 2, 32)
AMMA_FWD(v_fwd_128_m1_k32, 128, 1, 32)
AMMA_DQ(v_dq_128_m1_k64, 128, 1, 64)
AMMA_DQ(v_dq_128_m1_k32, 128, 1, 32)
AMMA_DKDV(v_dkdv_128_q32, 128, 32)
AMMA_DKDV(v_dkdv_128_q16, 128, 16)
AMMA_FWD(v_fwd_64_m1_k64, 64, 1, 64)
AMMA_FWD(v_fwd_64_m2_k64, 64, 2, 64)
AMMA_DQ(v_dq_64_m1_k64, 64, 1, 64)
AMMA_DQ(v_dq_64_m2_k64, 64, 2, 64)
#ifdef AWG_ATOM
AWG_DKDV(v_awg_dkdv_128_q64, 128, 64)
#endif

#define CK(x)                                                                        \
    do {                                                                             \
        cudaError_t e = (x);                                                         \
        if (e != cudaSuccess) {                                                      \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

typedef void (*FwdK)(float*, float*, const u16*, const u16*, const u16*, const u32*, int, int, int, float);
typedef void (*DqK)(float*, const u16*, const u16*, const u16*, const u16*, const float*, const float*, const u32*,
                    int, int, int, float, float);
typedef void (*DkdvK)(float*, float*, const u16*, const u16*, const u16*, const u16*, const float*, const float*,
                      const u32*, int, int, int, float, float);

static u16 host_bf16(float f) {
    u32 u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

template <class F>
static float time_ms(F launch, int reps) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    launch();
    CK(cudaDeviceSynchronize());
    CK(cudaEventRecord(a));
    for (int i = 0; i < reps; ++i) launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    CK(cudaGetLastError());
    return ms / reps;
}

static double max_rel(const std::vector<float>& a, const std::vector<float>& b, bool* same) {
    double num = 0, den = 0;
    *same = memcmp(a.data(), b.data(), a.size() * 4) == 0;
    for (size_t i = 0; i < a.size(); ++i) {
        num = fmax(num, fabs((double)a[i] - b[i]));
        den = fmax(den, fabs((double)b[i]));
    }
    return num / fmax(den, 1e-30);
}

static std::vector<float> down(const float* p, size_t n) {
    std::vector<float> h(n);
    CK(cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost));
    return h;
}

int main(int argc, char** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s H KVH T...\n", argv[0]);
        return 2;
    }
    const int H = atoi(argv[1]), KVH = atoi(argv[2]);
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device %s\n", prop.name);
    for (int D : {128, 64}) {
        for (int ai = 3; ai < argc; ++ai) {
            const int T = atoi(argv[ai]), B = 1;
            const size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * KVH * D, nl = (size_t)B * H * T;
            std::mt19937 rng(7);
            std::uniform_real_distribution<float> U(-1.f, 1.f);
            std::vector<u16> hq(nq), hk(nk), hv(nk), hdo(nq);
            for (auto& x : hq) x = host_bf16(2.f * U(rng));
            for (auto& x : hk) x = host_bf16(U(rng));
            for (auto& x : hv) x = host_bf16(U(rng));
            for (auto& x : hdo) x = host_bf16(U(rng));
            u16 *q, *k, *v, *dob;
            float *out, *lse, *dsum, *dq, *dk, *dv;
            CK(cudaMalloc(&q, nq * 2));
            CK(cudaMalloc(&k, nk * 2));
            CK(cudaMalloc(&v, nk * 2));
            CK(cudaMalloc(&dob, nq * 2));
            CK(cudaMalloc(&out, nq * 4));
            CK(cudaMalloc(&lse, nl * 4));
            CK(cudaMalloc(&dsum, nl * 4));
            CK(cudaMalloc(&dq, nq * 4));
            CK(cudaMalloc(&dk, nk * 4));
            CK(cudaMalloc(&dv, nk * 4));
            CK(cudaMemcpy(q, hq.data(), nq * 2, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(k, hk.data(), nk * 2, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(v, hv.data(), nk * 2, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(dob, hdo.data(), nq * 2, cudaMemcpyHostToDevice));
            const float scale = 1.f / sqrtf((float)D), sl2 = scale * 1.4426950408889634f;
            const size_t tile = 64 * (D + 8) * 2;
            const double fwd_flops = 2.0 * T * (double)T * H * D;  // causal half of 4·T²·H·D
            const int reps = T >= 32768 ? 2 : T >= 8192 ? 5 : 20;
            // the wgmma kernels' tiles: D / 64 swizzled atoms of 64 rows, 1 KB for alignment
            const size_t wtile = (size_t)(D / 64) * 8192;
            struct F {
                const char* name;
                FwdK k;
                int mi;
                size_t sh = 0;  // wgmma: its shared memory (one 64-query warpgroup a block)
            };
            std::vector<F> fw = D == 128 ? std::vector<F>{{"fwd m1 k64", v_fwd_128_m1_k64, 1},
                                                          {"fwd m2 k64", v_fwd_128_m2_k64, 2},
                                                          {"fwd m2 k32", v_fwd_128_m2_k32, 2},
                                                          {"fwd m1 k32", v_fwd_128_m1_k32, 1}}
                                         : std::vector<F>{{"fwd m1 k64", v_fwd_64_m1_k64, 1},
                                                          {"fwd m2 k64", v_fwd_64_m2_k64, 2}};
#ifdef AWG_ATOM
            fw.push_back({"fwd wgmma", D == 128 ? awg_fwd_d128 : awg_fwd_d64, 1, 5 * wtile + 1024});
#endif
            std::vector<float> ref_out, ref_lse;
            for (auto& f : fw) {
                const size_t sh = f.sh ? f.sh : (f.mi + 4) * tile;
                CK(cudaFuncSetAttribute(f.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sh));
                dim3 grid((T + 64 * f.mi - 1) / (64 * f.mi), H, B);
                float ms = time_ms([&] { f.k<<<grid, 128, sh>>>(out, lse, q, k, v, nullptr, T, H, KVH, sl2); }, reps);
                auto o = down(out, nq), l = down(lse, nl);
                bool same = true, same_l = true;
                double e = 0;
                if (ref_out.empty()) {
                    ref_out = o;
                    ref_lse = l;
                } else {
                    e = max_rel(o, ref_out, &same);
                    max_rel(l, ref_lse, &same_l);
                }
                printf("D=%d T=%d %-12s %9.3f ms %6.1f TFLOP/s  %s (max rel %.1e)\n", D, T, f.name, ms,
                       fwd_flops / ms / 1e9, same && same_l ? "bit-equal" : "differs", e);
            }
            // dsum = rowsum(dO * O) on the host from the first variant's out (its exact value does not matter for timing)
            {
                std::vector<float> ds(nl);
                for (int h = 0; h < H; ++h)
                    for (int t = 0; t < T; ++t) {
                        double a = 0;
                        for (int d = 0; d < D; ++d) {
                            u32 u = (u32)hdo[((size_t)t * H + h) * D + d] << 16;
                            float f;
                            memcpy(&f, &u, 4);
                            a += f * ref_out[((size_t)t * H + h) * D + d];
                        }
                        ds[(size_t)h * T + t] = (float)a;
                    }
                CK(cudaMemcpy(dsum, ds.data(), nl * 4, cudaMemcpyHostToDevice));
                CK(cudaMemcpy(lse, ref_lse.data(), nl * 4, cudaMemcpyHostToDevice));
            }
            struct Q {
                const char* name;
                DqK k;
                int mi;
                size_t sh = 0;
            };
            std::vector<Q> dqs = D == 128 ? std::vector<Q>{{"dq m1 k64", v_dq_128_m1_k64, 1}, {"dq m1 k32", v_dq_128_m1_k32, 1}}
                                          : std::vector<Q>{{"dq m1 k64", v_dq_64_m1_k64, 1}, {"dq m2 k64", v_dq_64_m2_k64, 2}};
#ifdef AWG_ATOM
            dqs.push_back({"dq wgmma", D == 128 ? awg_bwd_dq_d128 : awg_bwd_dq_d64, 1, 6 * wtile + 1024});
#endif
            std::vector<float> ref_dq;
            for (auto& f : dqs) {
                const size_t sh = f.sh ? f.sh : (2 * f.mi + 4) * tile;
                CK(cudaFuncSetAttribute(f.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sh));
                dim3 grid((T + 64 * f.mi - 1) / (64 * f.mi), H, B);
                float ms = time_ms(
                    [&] { f.k<<<grid, 128, sh>>>(dq, q, k, v, dob, lse, dsum, nullptr, T, H, KVH, sl2, scale); }, reps);
                auto g = down(dq, nq);
                bool same = true;
                double e = 0;
                if (ref_dq.empty()) ref_dq = g;
                else e = max_rel(g, ref_dq, &same);
                printf("D=%d T=%d %-12s %9.3f ms %6.1f TFLOP/s (of 1.0x fwd)  %s (max rel %.1e)\n", D, T, f.name, ms,
                       fwd_flops / ms / 1e9, same ? "bit-equal" : "differs", e);
            }
            {
                struct K {
                    const char* name;
                    DkdvK k;
                    size_t sh = 0;
                };
                std::vector<K> ks;
                if (D == 128) ks = {{"dkdv q32", v_dkdv_128_q32}, {"dkdv q16", v_dkdv_128_q16}};
                else ks = {{"dkdv q64", amma_bwd_dkdv_d64}};
#ifdef AWG_ATOM
                ks.push_back({"dkdv wgmma", D == 128 ? awg_bwd_dkdv_d128 : awg_bwd_dkdv_d64, 6 * wtile + 6 * 64 * 4 + 1024});
                if (D == 128) ks.push_back({"dkdv wgmma q64", v_awg_dkdv_128_q64, 6 * wtile + 6 * 64 * 4 + 1024});
#endif
                std::vector<float> ref_dk, ref_dv;
                for (auto& f : ks) {
                    const size_t sh = f.sh ? f.sh : 6 * tile + 6 * 64 * 4;
                    CK(cudaFuncSetAttribute(f.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sh));
                    dim3 grid((T + 63) / 64, KVH, B);
                    float ms = time_ms(
                        [&] { f.k<<<grid, 128, sh>>>(dk, dv, q, k, v, dob, lse, dsum, nullptr, T, H, KVH, sl2, scale); },
                        reps);
                    auto g = down(dk, nk), gv = down(dv, nk);
                    bool same = true, same_v = true;
                    double e = 0, ev = 0;
                    if (ref_dk.empty()) {
                        ref_dk = g;
                        ref_dv = gv;
                    } else {
                        e = max_rel(g, ref_dk, &same);
                        ev = max_rel(gv, ref_dv, &same_v);
                        e = fmax(e, ev);
                        same = same && same_v;
                    }
                    printf("D=%d T=%d %-12s %9.3f ms %6.1f TFLOP/s (of 1.5x fwd)  %s (max rel %.1e)\n", D, T, f.name,
                           ms, 1.5 * fwd_flops / ms / 1e9, same ? "bit-equal" : "differs", e);
                }
            }
            for (void* p : {(void*)q, (void*)k, (void*)v, (void*)dob, (void*)out, (void*)lse, (void*)dsum, (void*)dq,
                            (void*)dk, (void*)dv})
                CK(cudaFree(p));
        }
    }
    return 0;
}
