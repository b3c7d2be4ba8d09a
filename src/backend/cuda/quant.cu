// Expansion of NF4-stored frozen weights (bitsandbytes' layout) into plain weights (quant.rs).

// Element i = code[nibble i] * scale(i >> bs_shift), written as dt (0 = f32, 1 = f16, 2 = bf16);
// nibble i of byte i/2 is its high half for even i. scale = absmax[b] (f32), or with double
// quantization ncode[absmax[b] (u8)] * nabsmax[b >> nbs_shift] + offset. In f32 with each
// operation rounded on its own (no fused multiply-add, as bitsandbytes' two steps), then rounded
// once to dt. Block sizes are powers of two of at least 16 (bitsandbytes': 32 ... 4096; 256 for the
// nested level), so each thread expands 16 elements of one block: 8 bytes in, 32 or 64 bytes out.
__device__ __forceinline__ float nf4_scale(const void* absmax, int nested, const float* nabsmax,
                                           const float* ncode, float offset, i64 b, int nbs_shift) {
    if (!nested) return ((const float*)absmax)[b];
    return __fadd_rn(__fmul_rn(ncode[((const unsigned char*)absmax)[b]], nabsmax[b >> nbs_shift]), offset);
}

__device__ __forceinline__ void nf4_store(void* out, int dt, i64 i, float v) {
    if (dt == 0) ((float*)out)[i] = v;
    else if (dt == 1) ((u16*)out)[i] = f32_to_f16(v);
    else ((u16*)out)[i] = f32_to_bf16(v);
}

extern "C" __global__ void nf4_dequant(void* out, int dt, const unsigned char* packed, const void* absmax,
                                       const float* code, int nested, const float* nabsmax, const float* ncode,
                                       float offset, i64 n, int bs_shift, int nbs_shift) {
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
    __syncthreads();
    GRID_STRIDE(g, (n + 15) / 16) {
        const i64 i0 = g * 16;
        const float s = nf4_scale(absmax, nested, nabsmax, ncode, offset, i0 >> bs_shift, nbs_shift);
        if (i0 + 16 <= n) {
            const uint2 q = ((const uint2*)packed)[g];  // 8 bytes: elements i0 .. i0 + 15
            float v[16];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const unsigned int byte = ((k < 4 ? q.x : q.y) >> (8 * (k & 3))) & 0xffu;
                v[2 * k] = __fmul_rn(table[byte >> 4], s);
                v[2 * k + 1] = __fmul_rn(table[byte & 15u], s);
            }
            if (dt == 0) {
                float4* o = (float4*)out + g * 4;
#pragma unroll
                for (int k = 0; k < 4; k++) o[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
            } else {
                u32 h[8];
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    const u32 a = dt == 1 ? f32_to_f16(v[2 * k]) : f32_to_bf16(v[2 * k]);
                    const u32 b = dt == 1 ? f32_to_f16(v[2 * k + 1]) : f32_to_bf16(v[2 * k + 1]);
                    h[k] = a | (b << 16);
                }
                uint4* o = (uint4*)out + g * 2;
                o[0] = make_uint4(h[0], h[1], h[2], h[3]);
                o[1] = make_uint4(h[4], h[5], h[6], h[7]);
            }
        } else {
            for (i64 i = i0; i < n; i++) {
                const unsigned int byte = packed[i / 2];
                nf4_store(out, dt, i, __fmul_rn(table[(i & 1) == 0 ? byte >> 4 : byte & 15u], s));
            }
        }
    }
}
