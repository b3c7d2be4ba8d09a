// Optimizer updates (optim.rs), elementwise over a parameter tensor, PyTorch semantics. Each
// update is one __device__ function of element i, shared by the kernel over one tensor and
// the kernel over a multi-tensor table (multi.rs), so both give the same bits.

// AdamW: p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= step_size * m / (sqrt(v) / bc2_sqrt + eps), step_size = lr / (1 - b1^t),
// bc2_sqrt = sqrt(1 - b2^t) (both computed on the host in f64).
__device__ __forceinline__ void adamw_at(float* p, const float* g, float* m, float* v, i64 i, float lr, float b1,
                                         float b2, float eps, float wd, float step_size, float bc2_sqrt) {
    float pi = p[i] * (1.f - lr * wd);
    const float gi = g[i];
    const float mi = b1 * m[i] + (1.f - b1) * gi;
    const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
}

extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, i64 n, float lr, float b1, float b2,
                                 float eps, float wd, float step_size, float bc2_sqrt) {
    GRID_STRIDE(i, n) { adamw_at(p, g, m, v, i, lr, b1, b2, eps, wd, step_size, bc2_sqrt); }
}

// adamw over every tensor of a table of (p, g, m, v) pointers (common.cuh).
extern "C" __global__ void adamw_multi(const i64* first_block, const i64* lens, const u64* ptrs, int count, float lr,
                                       float b1, float b2, float eps, float wd, float step_size, float bc2_sqrt) {
    const TensorBlock tb = tensor_block(first_block, lens, count);
    const u64* q = ptrs + 4 * (i64)tb.t;
    float* p = (float*)q[0];
    const float* g = (const float*)q[1];
    float* m = (float*)q[2];
    float* v = (float*)q[3];
    BLOCK_STRIDE(i, tb.n, tb.blk, tb.nblk) { adamw_at(p, g, m, v, i, lr, b1, b2, eps, wd, step_size, bc2_sqrt); }
}

// SGD with momentum: d = g + wd p; buf = first ? d : momentum buf + d; p -= lr buf.
__device__ __forceinline__ void sgd_at(float* p, const float* g, float* buf, i64 i, float lr, float momentum,
                                       float wd, int first) {
    const float d = g[i] + wd * p[i];
    const float b = first ? d : momentum * buf[i] + d;
    buf[i] = b;
    p[i] -= lr * b;
}

extern "C" __global__ void sgd(float* p, const float* g, float* buf, i64 n, float lr, float momentum, float wd,
                               int first) {
    GRID_STRIDE(i, n) { sgd_at(p, g, buf, i, lr, momentum, wd, first); }
}

// sgd over every tensor of a table of (p, g, buf) pointers (common.cuh).
extern "C" __global__ void sgd_multi(const i64* first_block, const i64* lens, const u64* ptrs, int count, float lr,
                                     float momentum, float wd, int first) {
    const TensorBlock tb = tensor_block(first_block, lens, count);
    const u64* q = ptrs + 3 * (i64)tb.t;
    float* p = (float*)q[0];
    const float* g = (const float*)q[1];
    float* buf = (float*)q[2];
    BLOCK_STRIDE(i, tb.n, tb.blk, tb.nblk) { sgd_at(p, g, buf, i, lr, momentum, wd, first); }
}
