// Elementwise and gather ops (elementwise.rs). Grid-stride loops over i64 indices.


// x rounded to bf16 (to_bf16 = 1) or f16 (0), to nearest even.
__device__ __forceinline__ u16 f32_to_half(float x, int to_bf16) { return to_bf16 ? f32_to_bf16(x) : f32_to_f16(x); }

// out[i] = half(x[i]). Scratch operand of the half GEMMs.
extern "C" __global__ void cast_f32_to_half(u16* out, const float* x, i64 n, int to_bf16) {
    GRID_STRIDE(i, n) { out[i] = f32_to_half(x[i], to_bf16); }
}

// cast_f32_to_half over every tensor of a table of (out, x, to_bf16) per tensor (common.cuh;
// the third word is the flag, not a pointer): the GEMM copies of a block's LoRA matrices.
extern "C" __global__ void cast_f32_to_half_multi(const i64* first_block, const i64* lens, const u64* ptrs,
                                                  int count) {
    const TensorBlock tb = tensor_block(first_block, lens, count);
    const u64* q = ptrs + 3 * (i64)tb.t;
    u16* out = (u16*)q[0];
    const float* x = (const float*)q[1];
    const int to_bf16 = (int)q[2];
    BLOCK_STRIDE(i, tb.n, tb.blk, tb.nblk) { out[i] = f32_to_half(x[i], to_bf16); }
}

// out[i] = x[i] as f32, x stored as dt (0 = f32, 1 = f16, 2 = bf16): a half copy of an
// activation (cast_f32_to_half) widened back, exactly.
extern "C" __global__ void widen_to_f32(float* out, const void* x, i64 n, int dt) {
    GRID_STRIDE(i, n) { out[i] = load_w(x, i, dt); }
}

// y = alpha * x (acc = 0) or y += alpha * x (acc = 1). y is not read when overwriting.
extern "C" __global__ void axpy(float* y, const float* x, float alpha, i64 n, int acc) {
    GRID_STRIDE(i, n) { y[i] = acc ? y[i] + alpha * x[i] : alpha * x[i]; }
}

// x[r, c] += b[c]; x: [rows, cols], b stored as bdt.
extern "C" __global__ void add_bias(float* x, const void* b, int bdt, i64 rows, i64 cols) {
    GRID_STRIDE(i, rows * cols) { x[i] += load_w(b, i % cols, bdt); }
}

// dst[r, doff + j] (=|+=) src[r, soff + j] for j < width.
extern "C" __global__ void copy_cols(float* dst, i64 dcols, i64 doff, const float* src, i64 scols, i64 soff,
                                     i64 rows, i64 width, int acc) {
    GRID_STRIDE(i, rows * width) {
        i64 r = i / width, j = i % width;
        float v = src[r * scols + soff + j];
        float* d = dst + r * dcols + doff + j;
        *d = acc ? *d + v : v;
    }
}

// out[i, :] (=|+=) table[ids[i], :]; ids were checked against V on the host.
extern "C" __global__ void embedding(float* out, const u32* ids, const void* table, int tdt, i64 n, i64 c, int acc) {
    GRID_STRIDE(i, n * c) {
        i64 r = i / c, j = i % c;
        float v = load_w(table, (i64)ids[r] * c + j, tdt);
        out[i] = acc ? out[i] + v : v;
    }
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_C 0.044715f

// GELU, tanh approximation (GPT-2 gelu_new, Gemma gelu_pytorch_tanh): 0.5 x (1 + tanh(k (x + c x^3)))
__device__ __forceinline__ float gelu_(float v) { return 0.5f * v * (1.f + tanhf(GELU_K * (v + GELU_C * v * v * v))); }

// d gelu / dx
__device__ __forceinline__ float gelu_slope_(float v) {
    float t = tanhf(GELU_K * (v + GELU_C * v * v * v));
    float dt = GELU_K * (1.f + 3.f * GELU_C * v * v);
    return 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * dt;
}

// Activations of backend::Activation, by index.
#define ACT_SILU 0
#define ACT_GELU_TANH 1

// out = act(gate) * up, stored as odt (store_act)
extern "C" __global__ void gated_fwd(void* out, int odt, const float* gate, const float* up, i64 n, int act) {
    GRID_STRIDE(i, n) {
        float g = gate[i];
        store_act(out, i, odt, act == ACT_SILU ? g * sigmoidf_(g) * up[i] : gelu_(g) * up[i]);
    }
}

// dup = dout * act(g), dgate = dout * up * act'(g); for SiLU, s = sigmoid(g):
// dgate = dout * up * s * (1 + g * (1 - s)), dup = dout * g * s; both stored as odt (store_act)
extern "C" __global__ void gated_bwd(void* dgate, void* dup, int odt, const float* dout, const float* gate,
                                     const float* up, i64 n, int act) {
    GRID_STRIDE(i, n) {
        float g = gate[i], d = dout[i];
        if (act == ACT_SILU) {
            float s = sigmoidf_(g);
            store_act(dgate, i, odt, d * up[i] * s * (1.f + g * (1.f - s)));
            store_act(dup, i, odt, d * g * s);
        } else {
            store_act(dgate, i, odt, d * up[i] * gelu_slope_(g));
            store_act(dup, i, odt, d * gelu_(g));
        }
    }
}

extern "C" __global__ void gelu_fwd(float* out, const float* x, i64 n) {
    GRID_STRIDE(i, n) { out[i] = gelu_(x[i]); }
}

extern "C" __global__ void gelu_bwd(float* dx, const float* dout, const float* x, i64 n) {
    GRID_STRIDE(i, n) { dx[i] = dout[i] * gelu_slope_(x[i]); }
}

// Bit-exact port of backend::dropout_keep (splitmix64 of seed ^ i * golden ratio).
__device__ __forceinline__ bool dropout_keep(u64 seed, u64 i, float p) {
    u64 z = seed ^ (i * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    return u >= p;
}

// out[i] = keep(offset + i) ? x[i] * scale : 0, scale = 1 / (1 - p) computed on the host.
// Forward and backward are the same map (the mask is a function of (seed, index)); offset
// is the mask index of element 0 (a tile of rows of a larger activation).
extern "C" __global__ void dropout(float* out, const float* x, float p, float scale, u64 seed, u64 offset,
                                   i64 n) {
    GRID_STRIDE(i, n) { out[i] = dropout_keep(seed, offset + (u64)i, p) ? x[i] * scale : 0.f; }
}

// partial[b] = sum of x[i]^2 over block b's share of its tensor (a multi-tensor table of
// one pointer, x, per tensor; common.cuh), accumulated in f64: the partial sums a launch over
// that tensor alone would give. The host adds each tensor's (at most a few hundred) partials
// in f64, in order.
extern "C" __global__ void sum_squares_partial(const i64* first_block, const i64* lens, const u64* ptrs, int count,
                                               double* partial) {
    __shared__ double sh[32];
    const TensorBlock tb = tensor_block(first_block, lens, count);
    const float* x = (const float*)ptrs[tb.t];
    double acc = 0.0;
    BLOCK_STRIDE(i, tb.n, tb.blk, tb.nblk) {
        double v = (double)x[i];
        acc += v * v;
    }
    acc = warp_sum_d(acc);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    if (lane == 0) sh[w] = acc;
    __syncthreads();
    if (w == 0) {
        double s = lane < nw ? sh[lane] : 0.0;
        s = warp_sum_d(s);
        if (lane == 0) partial[blockIdx.x] = s;
    }
}

// x[i] = 0 for every tensor of a multi-tensor table of one pointer, x, per tensor (the
// step's gradients, Backend::fill_zero_all).
extern "C" __global__ void fill_zero_multi(const i64* first_block, const i64* lens, const u64* ptrs, int count) {
    const TensorBlock tb = tensor_block(first_block, lens, count);
    float* x = (float*)ptrs[tb.t];
    BLOCK_STRIDE(i, tb.n, tb.blk, tb.nblk) { x[i] = 0.f; }
}
