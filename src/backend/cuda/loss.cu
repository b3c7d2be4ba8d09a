// Fused softmax / cross-entropy / dlogits over one row chunk of logits (loss.rs).
// x: [rows, V] logits; when want_grad, dl [rows, V] of type dl_dt (store_act: 0 = f32, x
// itself, overwritten; 1, 2 = f16, bf16: the head GEMM's operand, rounded once as it is
// stored, a separate buffer) gets dlogits = scale * (softmax - onehot(label)) (rows whose
// label is IGNORE_INDEX get zeros); row_loss[r] = lse - x[label] (0 for ignored rows). One
// block per row; max, sum and lse in f32. With cap > 0 the row holds soft-capped logits
// x = cap * tanh(z / cap) (softcap_fwd) and dlogits is taken with respect to z: times
// 1 - (x / cap)^2.
extern "C" __global__ void ce_fwd_bwd(float* x, void* dl, int dl_dt, float* row_loss, const int* labels, i64 v,
                                      float scale, int want_grad, float cap) {
    __shared__ float sh[32];
    const i64 r = blockIdx.x;
    float* xr = x + r * v;
    const int label = labels[r];
    float mx = -INF_F;
    for (i64 j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, xr[j]);
    mx = block_max(mx, sh);
    float s = 0.f;
    for (i64 j = threadIdx.x; j < v; j += blockDim.x) s += expf(xr[j] - mx);
    s = block_sum(s, sh);
    const float lse = mx + logf(s);
    const bool counted = label != IGNORE_INDEX;
    if (threadIdx.x == 0) row_loss[r] = counted ? lse - xr[label] : 0.f;
    if (!want_grad) return;
    __syncthreads();  // everyone has read xr[label] (thread 0) before it is overwritten
    for (i64 j = threadIdx.x; j < v; j += blockDim.x) {
        float g = 0.f;
        if (counted) g = scale * (expf(xr[j] - lse) - (j == label ? 1.f : 0.f));
        if (cap > 0.f) {
            const float y = xr[j] / cap;
            g *= 1.f - y * y;
        }
        store_act(dl, r * v + j, dl_dt, g);
    }
}

// x = cap * tanh(x / cap), elementwise over n values (Gemma's final logit soft-cap)
extern "C" __global__ void softcap_fwd(float* x, i64 n, float cap) {
    GRID_STRIDE(i, n) { x[i] = tanhf(x[i] / cap) * cap; }
}
