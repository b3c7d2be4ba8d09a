#!/usr/bin/env python3
"""torch's float8_e4m3fn casts and transformers' FineGrainedFP8 block quantization, as the
reference for lema's FP8 codec (src/quant/fp8.rs).

Writes tests/data/fp8_reference.safetensors:
* `cast.input` (f32) and `cast.codes` (u8: the bits of `input.to(torch.float8_e4m3fn)`):
  every E4M3 value, the ties between neighbours and one f32 ulp either side, subnormals,
  values around 448 (the largest), 464 and 480 (torch 2.15 saturates), infinities, NaN, and
  random values over the whole range;
* per quantization case `<case>.input` (the weight, in its dtype), `<case>.codes` (u8),
  `<case>.scale_inv` (f32, [ceil(out/128), ceil(in/128)]) as transformers' `Fp8Quantize`
  makes them, and `<case>.dequantized.<dtype>` as its `Fp8Dequantize` expands them (bf16 and
  f32). transformers quantizes only weights whose sides are multiples of 128; a case with a
  short edge block is zero-padded to whole blocks first (zeros change no block's amax), then
  cropped: the layout DeepSeek-V3's checkpoints have.

Run with the reference environment: $(tools/reference/env.sh) tools/reference/fp8_reference.py
"""
import pathlib

import torch
import safetensors.torch
import transformers
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

root = pathlib.Path(__file__).resolve().parents[2]
g = torch.Generator().manual_seed(11)


class Quantizer:
    quantization_config = FineGrainedFP8Config()  # weight_block_size (128, 128)


def cast_inputs():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = codes[~codes.isnan()].unique()  # sorted, -448 .. 448
    mids = (vals[:-1].double() + vals[1:].double()) / 2
    mids = mids.float()  # exact: 4 significant bits + 1
    up = torch.nextafter(mids, torch.full_like(mids, float("inf")))
    down = torch.nextafter(mids, torch.full_like(mids, float("-inf")))
    edges = torch.tensor(
        [447.0, 448.0, 449.0, 463.9, 464.0, 464.1, 479.9, 480.0, 481.0, 500.0, 1e6,
         2.0**-9, 2.0**-10, 3 * 2.0**-10, 2.0**-11, 1e-30, 0.0, -0.0,
         float("inf"), float("-inf"), float("nan")]
    )
    edges = torch.cat([edges, -edges])
    rand = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-14, 10, (4096,), generator=g).float())
    return torch.cat([vals, mids, up, down, edges, rand]).float()


def quantize(w):
    """transformers' Fp8Quantize of w (zero-padded to whole 128 x 128 blocks, then cropped)."""
    rows, cols = w.shape
    pr, pc = -rows % 128, -cols % 128
    padded = torch.nn.functional.pad(w.float(), (0, pc, 0, pr)).to(w.dtype)
    out = Fp8Quantize(Quantizer())._quantize_one("x.weight", padded)
    q, s = out["x.weight"], out["x.weight_scale_inv"]
    assert s.shape == ((rows + 127) // 128, (cols + 127) // 128), s.shape
    return q[:rows, :cols].contiguous(), s


def dequantize(q, s, dtype):
    rows, cols = q.shape
    pr, pc = -rows % 128, -cols % 128
    padded = torch.nn.functional.pad(q.view(torch.uint8), (0, pc, 0, pr)).view(torch.float8_e4m3fn)
    d = Fp8Dequantize(Quantizer())._dequantize_one(padded, s, output_dtype=dtype)
    return d[:rows, :cols].contiguous()


def cases():
    full = torch.randn(256, 384, generator=g) * 0.02
    full[3, 5] = 0.9  # an outlier: its block's other values go subnormal
    full[200, 300] = -1e-3
    edge = (torch.randn(200, 130, generator=g) * 0.05).to(torch.bfloat16)  # short edge blocks
    zero = torch.randn(130, 256, generator=g) * 3.0
    zero[:128, :128] = 0.0  # an all-zero block: scale 1
    tiny = torch.randn(56, 32, generator=g) * 1e-4  # one short block, small values
    return {"full": full, "edge": edge, "zero": zero, "tiny": tiny}


def main():
    out = {}
    x = cast_inputs()
    out["cast.input"] = x
    out["cast.codes"] = x.to(torch.float8_e4m3fn).view(torch.uint8)
    for name, w in cases().items():
        q, s = quantize(w)
        out[f"{name}.input"] = w
        out[f"{name}.codes"] = q.view(torch.uint8)
        out[f"{name}.scale_inv"] = s
        for dt, label in [(torch.bfloat16, "bf16"), (torch.float32, "f32")]:
            out[f"{name}.dequantized.{label}"] = dequantize(q, s, dt)
    path = root / "tests/data/fp8_reference.safetensors"
    meta = {"torch": torch.__version__, "transformers": transformers.__version__}
    safetensors.torch.save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=meta)
    print(f"wrote {path} ({len(out)} tensors; torch {torch.__version__}, transformers {transformers.__version__})")


if __name__ == "__main__":
    main()
