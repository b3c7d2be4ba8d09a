// Shared by every lema CUDA module (prepended to each .cu before NVRTC compiles it).
// No CUDA headers: half conversions are written out here, so NVRTC needs no include path.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define FULL_MASK 0xffffffffu
#define IGNORE_INDEX (-100)
#define INF_F __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even, NaN stays NaN (as the `half` crate and PyTorch do).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Element i of a frozen weight stored as dt: 0 = f32, 1 = f16, 2 = bf16 (device.rs dtype_code).
__device__ __forceinline__ float load_w(const void* p, i64 i, int dt) {
    if (dt == 0) return ((const float*)p)[i];
    if (dt == 1) return f16_to_f32(((const u16*)p)[i]);
    return bf16_to_f32(((const u16*)p)[i]);
}

// Store v as element i of an activation of type dt: 0 = f32, 1 = f16, 2 = bf16 (an output
// that only GEMMs read, written in the type they read: Backend::gemm_output).
__device__ __forceinline__ void store_act(void* p, i64 i, int dt, float v) {
    if (dt == 0) ((float*)p)[i] = v;
    else ((u16*)p)[i] = dt == 1 ? f32_to_f16(v) : f32_to_bf16(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Sum of v over the block (every thread gets the result). sh: 32 floats of shared memory.
// Safe to call repeatedly with the same sh.
__device__ float block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < nw ? sh[lane] : 0.f;
        x = warp_sum(x);
        if (lane == 0) sh[0] = x;
    }
    __syncthreads();
    return sh[0];
}

__device__ float block_max(float v, float* sh) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < nw ? sh[lane] : -INF_F;
        x = warp_max(x);
        if (lane == 0) sh[0] = x;
    }
    __syncthreads();
    return sh[0];
}

// for (i = each index of 0..n this thread covers as a thread of block blk of nblk blocks)
#define BLOCK_STRIDE(i, n, blk, nblk) \
    for (i64 i = (i64)(blk) * blockDim.x + threadIdx.x; i < (n); i += (i64)(nblk) * blockDim.x)

// for (i = each index of 0..n this thread covers), over a 1-D grid of any size
#define GRID_STRIDE(i, n) BLOCK_STRIDE(i, n, blockIdx.x, gridDim.x)

// Multi-tensor kernels (multi.rs) take a table of `count` tensors: tensor t has lens[t] > 0
// elements, K pointers ptrs[K t .. K t + K] and the grid blocks first_block[t] ..
// first_block[t + 1] (first_block[0] = 0, at least one block each). tensor_block gives this
// block's share: of tensor t, what block blk of a launch of nblk blocks over that tensor
// alone would cover (BLOCK_STRIDE(i, n, blk, nblk)).
struct TensorBlock {
    int t;
    i64 n, blk, nblk;
};

__device__ __forceinline__ TensorBlock tensor_block(const i64* first_block, const i64* lens, int count) {
    const i64 b = blockIdx.x;
    // the last t with first_block[t] <= b (strictly increasing, first_block[0] = 0 <= b)
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = lo + (hi - lo + 1) / 2;
        if (first_block[mid] <= b) lo = mid;
        else hi = mid - 1;
    }
    const i64 start = first_block[lo];
    return TensorBlock{lo, lens[lo], b - start, first_block[lo + 1] - start};
}
