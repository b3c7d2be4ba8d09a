// Rotary position embedding in place on x [N, heads, D], HF rotate-half layout: element j
// pairs with j + D/2 (rope.rs). Angles pos * inv_freq and their cos/sin in f32 with the
// accurate cosf/sinf, as HF computes them for an f32 model. sign = -1 applies the inverse
// rotation (the backward).
extern "C" __global__ void rope(float* x, const u32* pos, const float* inv_freq, i64 n, i64 heads, i64 d,
                                float sign) {
    const i64 half = d / 2;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n * heads * half; i += (i64)gridDim.x * blockDim.x) {
        const i64 j = i % half;
        const i64 row = i / half;  // token * heads + head
        const i64 tok = row / heads;
        const float a = (float)pos[tok] * inv_freq[j];
        const float c = cosf(a), s = sign * sinf(a);
        float* p = x + row * d;
        const float x1 = p[j], x2 = p[j + half];
        p[j] = x1 * c - x2 * s;
        p[j + half] = x2 * c + x1 * s;
    }
}
