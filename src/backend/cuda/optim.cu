// Optimizer updates (optim.rs), elementwise over a parameter tensor, PyTorch semantics.

// AdamW: p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= step_size * m / (sqrt(v) / bc2_sqrt + eps), step_size = lr / (1 - b1^t),
// bc2_sqrt = sqrt(1 - b2^t) (both computed on the host in f64).
extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, i64 n, float lr, float b1, float b2,
                                 float eps, float wd, float step_size, float bc2_sqrt) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float pi = p[i] * (1.f - lr * wd);
        const float gi = g[i];
        const float mi = b1 * m[i] + (1.f - b1) * gi;
        const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

// SGD with momentum: d = g + wd p; buf = first ? d : momentum buf + d; p -= lr buf.
extern "C" __global__ void sgd(float* p, const float* g, float* buf, i64 n, float lr, float momentum, float wd,
                               int first) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float d = g[i] + wd * p[i];
        const float b = first ? d : momentum * buf[i] + d;
        buf[i] = b;
        p[i] -= lr * b;
    }
}
