// Rotary position embedding of x [N, heads, D], HF rotate-half layout: element j pairs with
// j + D/2 (rope.rs). Angles pos * inv_freq and their cos/sin in f32 with the accurate
// cosf/sinf, as HF computes them for an f32 model. sign = -1 applies the inverse rotation
// (the backward). The result goes to out, of type dt (store_act: 0 = f32, in place when out
// is x; 2 = bf16, an attention operand rounded once as it is stored). Each thread reads its
// pair before it writes it, so in place is safe.
extern "C" __global__ void rope(void* out, int dt, const float* x, const u32* pos, const float* inv_freq, i64 n,
                                i64 heads, i64 d, float sign) {
    const i64 half = d / 2;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n * heads * half; i += (i64)gridDim.x * blockDim.x) {
        const i64 j = i % half;
        const i64 row = i / half;  // token * heads + head
        const i64 tok = row / heads;
        const float a = (float)pos[tok] * inv_freq[j];
        const float c = cosf(a), s = sign * sinf(a);
        const float* p = x + row * d;
        const float x1 = p[j], x2 = p[j + half];
        store_act(out, row * d + j, dt, x1 * c - x2 * s);
        store_act(out, row * d + j + half, dt, x2 * c + x1 * s);
    }
}
