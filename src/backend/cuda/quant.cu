// Expansion of quantized frozen weights into plain weights (quant.rs): NF4 (bitsandbytes' layout)
// and FP8 E4M3 with 128 x 128 block scales.

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

__device__ __forceinline__ void quant_store(void* out, int dt, i64 i, float v) {
    if (dt == 0) ((float*)out)[i] = v;
    else if (dt == 1) ((u16*)out)[i] = f32_to_f16(v);
    else ((u16*)out)[i] = f32_to_bf16(v);
}

// Elements 16g .. 16g + 15 of out (dt: 0 = f32, 1 = f16, 2 = bf16) = v, each rounded once:
// four 16-byte stores of f32 or two of half values.
__device__ __forceinline__ void store16(void* out, int dt, i64 g, const float* v) {
    if (dt == 0) {
        float4* o = (float4*)out + g * 4;
#pragma unroll
        for (int k = 0; k < 4; k++) o[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
        return;
    }
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
            store16(out, dt, g, v);
        } else {
            for (i64 i = i0; i < n; i++) {
                const unsigned int byte = packed[i / 2];
                quant_store(out, dt, i, __fmul_rn(table[(i & 1) == 0 ? byte >> 4 : byte & 15u], s));
            }
        }
    }
}

// FP8 E4M3 ("fn") to f32 as torch widens it (c10's fp8e4m3fn_to_fp32_value; quant/fp8.rs).
__device__ __forceinline__ float e4m3_to_f32(unsigned int b) {
    const u32 w = b << 24;
    const u32 sign = w & 0x80000000u;
    const u32 nonsign = w & 0x7fffffffu;
    u32 shift = (u32)__clz(nonsign);
    shift = shift > 4 ? shift - 4 : 0;
    const u32 inf_nan = (u32)((int)(nonsign + 0x01000000u) >> 8) & 0x7f800000u;
    const u32 zero = (u32)((int)(nonsign - 1) >> 31);
    return __uint_as_float(sign | ((((nonsign << shift) >> 4) + ((0x78u - shift) << 23)) | inf_nan) & ~zero);
}

// FP8 E4M3 weight [rows, cols] with one f32 scale per 128 x 128 block (scale [ceil(rows/128),
// ceil(cols/128)]): element (i, j) = e4m3(codes[i, j]) * scale[i/128, j/128], one f32 multiply,
// rounded once to dt (0 = f32, 1 = f16, 2 = bf16). 16 elements a thread: when a row holds whole
// groups of 16 (cols % 16 == 0) a group lies in one row and one block column (128 = 8 groups),
// so it is one 16-byte load, one scale and 32 or 64 bytes of stores; otherwise element by element.
extern "C" __global__ void fp8_dequant(void* out, int dt, const unsigned char* codes, const float* scale, i64 rows,
                                       i64 cols) {
    const i64 n = rows * cols;
    const i64 bc = (cols + 127) >> 7;
    GRID_STRIDE(g, (n + 15) / 16) {
        const i64 i0 = g * 16;
        if ((cols & 15) == 0) {
            const i64 r = i0 / cols, c = i0 - r * cols;
            const float s = scale[(r >> 7) * bc + (c >> 7)];
            const uint4 q = ((const uint4*)codes)[g];
            const u32 words[4] = {q.x, q.y, q.z, q.w};
            float v[16];
#pragma unroll
            for (int k = 0; k < 16; k++) v[k] = __fmul_rn(e4m3_to_f32((words[k >> 2] >> (8 * (k & 3))) & 0xffu), s);
            store16(out, dt, g, v);
        } else {
            const i64 end = i0 + 16 < n ? i0 + 16 : n;
            for (i64 i = i0; i < end; i++) {
                const i64 r = i / cols, c = i - r * cols;
                quant_store(out, dt, i, __fmul_rn(e4m3_to_f32(codes[i]), scale[(r >> 7) * bc + (c >> 7)]));
            }
        }
    }
}
