// Expansion of NF4-stored frozen weights (bitsandbytes' layout) into plain weights (quant.rs).

// Element i = code[nibble i] * scale(i / bs), written as dt (0 = f32, 1 = f16, 2 = bf16); nibble i
// of byte i/2 is its high half for even i. scale = absmax[b] (f32), or with double quantization
// ncode[absmax[b] (u8)] * nabsmax[b / nbs] + offset. In f32 with each operation rounded on its
// own (no fused multiply-add, as bitsandbytes' two steps), then rounded once to dt.
extern "C" __global__ void nf4_dequant(void* out, int dt, const unsigned char* packed, const void* absmax,
                                       const float* code, int nested, const float* nabsmax, const float* ncode,
                                       float offset, i64 n, i64 bs, i64 nbs) {
    GRID_STRIDE(p, (n + 1) / 2) {
        const unsigned int byte = packed[p];
        for (int h = 0; h < 2; h++) {
            const i64 i = 2 * p + h;
            if (i >= n) break;
            const i64 b = i / bs;
            const float s = nested ? __fadd_rn(__fmul_rn(ncode[((const unsigned char*)absmax)[b]], nabsmax[b / nbs]), offset)
                                   : ((const float*)absmax)[b];
            const float v = __fmul_rn(code[h == 0 ? byte >> 4 : byte & 15u], s);
            if (dt == 0) ((float*)out)[i] = v;
            else if (dt == 1) ((u16*)out)[i] = f32_to_f16(v);
            else ((u16*)out)[i] = f32_to_bf16(v);
        }
    }
}
