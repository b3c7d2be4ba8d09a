// RMSNorm and LayerNorm over rows of x [N, C] (norm.rs). One block per row; all sums in f32.
// Weights (w, b) are frozen and may be stored as f32, f16 or bf16 (wdt, see load_w).

// out = x * rstd * (woff + w), rstd = 1 / sqrt(mean(x^2) + eps); woff is 0, or 1 for Gemma's (1 + w).
// out is stored as odt (store_act): f32, or the half type of the GEMMs that read it.
extern "C" __global__ void rms_norm_fwd(void* out, int odt, float* rstd, const float* x, const void* w, int wdt,
                                        float woff, i64 c, float eps) {
    __shared__ float sh[32];
    const i64 r = blockIdx.x;
    const float* xr = x + r * c;
    float ss = 0.f;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss, sh);
    const float rs = 1.f / sqrtf(ss / (float)c + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) store_act(out, r * c + j, odt, xr[j] * rs * (woff + load_w(w, j, wdt)));
}

// y = x * rstd * w'  =>  dx = rstd * g - x * rstd^3 * mean(g * x), g = dout * w', w' = woff + w
extern "C" __global__ void rms_norm_bwd(float* dx, const float* dout, const float* x, const void* w, int wdt,
                                        float woff, const float* rstd, i64 c, int acc) {
    __shared__ float sh[32];
    const i64 r = blockIdx.x;
    const float* xr = x + r * c;
    const float* dr = dout + r * c;
    const float rs = rstd[r];
    float dot = 0.f;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) dot += dr[j] * (woff + load_w(w, j, wdt)) * xr[j];
    dot = block_sum(dot, sh) / (float)c;
    const float k = rs * rs * rs * dot;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        float v = rs * dr[j] * (woff + load_w(w, j, wdt)) - xr[j] * k;
        dx[r * c + j] = acc ? dx[r * c + j] + v : v;
    }
}

// out = (x - mean) * rstd * w + b; mean, rstd saved. Two passes (mean, then variance).
extern "C" __global__ void layer_norm_fwd(float* out, float* mean, float* rstd, const float* x, const void* w,
                                          const void* b, int wdt, i64 c, float eps) {
    __shared__ float sh[32];
    const i64 r = blockIdx.x;
    const float* xr = x + r * c;
    float s = 0.f;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) s += xr[j];
    const float mu = block_sum(s, sh) / (float)c;
    float v = 0.f;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        float d = xr[j] - mu;
        v += d * d;
    }
    const float rs = 1.f / sqrtf(block_sum(v, sh) / (float)c + eps);
    if (threadIdx.x == 0) {
        mean[r] = mu;
        rstd[r] = rs;
    }
    for (i64 j = threadIdx.x; j < c; j += blockDim.x)
        out[r * c + j] = (xr[j] - mu) * rs * load_w(w, j, wdt) + load_w(b, j, wdt);
}

// xhat = (x - mean) * rstd, g = dout * w  =>  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
extern "C" __global__ void layer_norm_bwd(float* dx, const float* dout, const float* x, const void* w, int wdt,
                                          const float* mean, const float* rstd, i64 c, int acc) {
    __shared__ float sh[32];
    const i64 r = blockIdx.x;
    const float* xr = x + r * c;
    const float* dr = dout + r * c;
    const float mu = mean[r], rs = rstd[r];
    float sg = 0.f, sgx = 0.f;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        float g = dr[j] * load_w(w, j, wdt);
        sg += g;
        sgx += g * (xr[j] - mu) * rs;
    }
    const float mg = block_sum(sg, sh) / (float)c;
    const float mgx = block_sum(sgx, sh) / (float)c;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        float g = dr[j] * load_w(w, j, wdt);
        float v = rs * (g - mg - (xr[j] - mu) * rs * mgx);
        dx[r * c + j] = acc ? dx[r * c + j] + v : v;
    }
}
