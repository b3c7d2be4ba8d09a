#!/usr/bin/env python3
"""bitsandbytes' own NF4 codec on the CPU, as the reference for lema's (src/quant/).

Writes
* tests/data/nf4_reference.safetensors: for each case, the input (in its dtype), and for
  double quantization off (`dq0`) and on (`dq1`) what `bitsandbytes.functional.quantize_4bit
  (quant_type="nf4", blocksize=64, compress_statistics=...)` returns: the packed bytes, the
  absmax (f32; with dq1 the 8-bit codes, the f32 nested absmax and the offset), and what
  `dequantize_4bit` gives back, in the input's dtype (`out`) and in float32 (`out_f32`); also
  the tables (`quant_map`, bitsandbytes' NF4 values; `nested_quant_map`, its signed dynamic
  map) and one `QuantState.as_dict(packed=True)` per case and mode, the layout transformers
  saves (`<case>.<mode>.layout.*`).
* tests/data/nf4_reference.json: the versions and the machine facts the numbers depend on.
* tests/fixtures/bnb4_tiny/: a tiny random Llama (bf16) quantized by transformers with
  BitsAndBytesConfig(load_in_4bit, nf4, double quant) on the CPU and saved with
  save_pretrained (config.json, model.safetensors), plus reference.safetensors: the bf16
  weights it was quantized from (`<name>.original`) and bitsandbytes' dequantization of each
  quantized weight (`<name>.dequantized`, bf16).

Run with the reference environment: $(tools/reference/env.sh) tools/reference/nf4_reference.py
Deterministic for a given machine class: see the README for what the numbers depend on.
"""
import json, pathlib, platform, shutil, sys, tempfile

import numpy as np
import torch

torch.set_num_threads(1)  # bnb's absmax mean is torch's sum: its order depends on threads

import bitsandbytes
import bitsandbytes.functional as F
import safetensors
import safetensors.torch
import transformers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

root = pathlib.Path(__file__).resolve().parents[2]
NF4 = F.get_4bit_type("nf4", device="cpu")
MIDPOINTS = ((NF4[:-1] + NF4[1:]) / 2).tolist()


def randn(gen, shape, scale):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * scale


def ties(gen):
    """1000 values (15 full blocks and a short one of 40): blocks whose absmax is a power of
    two, so that scaling is exact, filled with the exact midpoints between NF4 codes (the tie
    rule), their f32 neighbours, exact zeros (both signs) and +-absmax; one all-zero block."""
    blocks = []
    for b in range(16):
        scale = 2.0 ** (b % 5 - 2)
        vals = [1.0, -1.0, 0.0, -0.0]
        for m in MIDPOINTS:
            mf = np.float32(m)
            vals += [mf, np.nextafter(mf, np.float32(2)), np.nextafter(mf, np.float32(-2)), -mf]
        v = torch.tensor(vals[:64], dtype=torch.float32) * scale
        v = v[torch.randperm(64, generator=gen)]
        blocks.append(v)
    blocks[6] = torch.zeros(64)
    return torch.cat(blocks)[:1000]


def zero_tail(gen):
    """200 values: three random blocks, the third made all zeros, then a short last block of
    8 zeros (bitsandbytes clamps a short block's absmax to 1e-38, a full one's stays 0)."""
    x = randn(gen, (200,), 0.05)
    x[128:] = 0.0
    return x


def const_absmax(gen):
    """Every block's absmax is 0.5, so absmax minus its mean is all zeros: the nested
    (8-bit) quantization sees an all-zero block."""
    x = randn(gen, (32, 64), 0.1).clamp(-0.45, 0.45)
    x[:, 5] = 0.5
    return x


def cases():
    gen = torch.Generator().manual_seed(20260511)
    return {
        # 192 blocks, one nested block; last dim a multiple of 64 (bnb's AVX-512 dequant path;
        # no 2-D case has a last dim that is a multiple of 16 but not of 64: see the README)
        "w2d_f32": randn(gen, (96, 128), 0.02),
        # 304 full blocks and one of 44; 2 nested blocks, the last of 49; bf16 input
        "w_big_bf16": randn(gen, (150, 130), 0.03).to(torch.bfloat16),
        # 259 elements: odd (the packed tail's low nibble is padding), odd last dim
        "w_odd_f32": randn(gen, (7, 37), 1.0),
        "ties_f32": ties(gen),
        "zero_tail_f16": zero_tail(gen).to(torch.float16),
        "const_absmax_f32": const_absmax(gen),
        # bf16 with a heavy tail (outliers set the block absmax) and a short last block
        "heavy_bf16": (randn(gen, (5, 100), 0.01) * randn(gen, (5, 100), 1.0).exp()).to(torch.bfloat16),
    }


def quantize(x, nested):
    packed, qs = F.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type="nf4")
    out = F.dequantize_4bit(packed, qs, quant_type="nf4")
    qs32 = F.QuantState(
        absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
        quant_type=qs.quant_type, dtype=torch.float32, offset=qs.offset, state2=qs.state2,
    )
    out_f32 = F.dequantize_4bit(packed, qs32, quant_type="nf4")
    # the CPU kernel returns a 1-D tensor's values as [1, n]
    out, out_f32 = out.reshape(x.shape), out_f32.reshape(x.shape)
    assert out.dtype == x.dtype and out_f32.dtype == torch.float32
    return packed, qs, out, out_f32


def reference_tensors():
    tensors = {"quant_map": NF4.clone(), "nested_quant_map": F.create_dynamic_map(signed=True)}
    described = {}
    for name, x in cases().items():
        tensors[f"{name}.input"] = x.contiguous()
        described[name] = {"dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape)}
        for nested in (False, True):
            mode = f"{name}.dq{int(nested)}"
            packed, qs, out, out_f32 = quantize(x, nested)
            tensors[f"{mode}.packed"] = packed
            tensors[f"{mode}.out"] = out.contiguous()
            tensors[f"{mode}.out_f32"] = out_f32.contiguous()
            tensors[f"{mode}.absmax"] = qs.absmax
            if nested:
                assert torch.equal(qs.state2.code, tensors["nested_quant_map"])
                tensors[f"{mode}.nested_absmax"] = qs.state2.absmax
                tensors[f"{mode}.offset"] = qs.offset.reshape(1)
            assert torch.equal(qs.code, NF4)
            for key, value in qs.as_dict(packed=True).items():
                tensors[f"{mode}.layout.{key}"] = value.contiguous()
    # torch's f32 mean (bnb's offset: `absmax.mean()`), alone, over lengths that reach each
    # branch of its summation order (scalar below 8 values, 8-wide vectors, the cascade levels)
    gen = torch.Generator().manual_seed(5)
    for n in (1, 3, 7, 8, 13, 100, 1000, 4099, 9000):
        x = torch.rand((n,), generator=gen, dtype=torch.float32) * 0.1
        tensors[f"mean_{n}.input"] = x
        tensors[f"mean_{n}.mean"] = x.mean().reshape(1)
    # bnb's 8-bit blockwise quantization (the nested step) alone: 32 blocks of 256, scales
    # from 1e-4 to 1e2, and its dequantization
    x = torch.randn((32, 256), generator=gen) * torch.logspace(-4, 2, 32).reshape(32, 1)
    codes, st = F.quantize_blockwise(x.reshape(-1), blocksize=256)
    tensors["blockwise.input"] = x.reshape(-1)
    tensors["blockwise.codes"] = codes
    tensors["blockwise.absmax"] = st.absmax
    tensors["blockwise.out"] = F.dequantize_blockwise(codes, st)
    return tensors, described


def tiny_llama(out_dir):
    """transformers' own 4-bit save of a tiny random Llama; returns what it holds."""
    torch.manual_seed(7)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        qconf = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        q = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qconf, device_map="cpu", dtype=torch.bfloat16)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    q.save_pretrained(out_dir)
    for extra in ("generation_config.json",):
        (out_dir / extra).unlink(missing_ok=True)
    ref = {}
    quantized = []
    for mod_name, module in q.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            w = module.weight
            name = f"{mod_name}.weight"
            ref[f"{name}.original"] = originals[name]
            ref[f"{name}.dequantized"] = F.dequantize_4bit(w.data, w.quant_state, quant_type="nf4").contiguous()
            quantized.append(name)
    safetensors.torch.save_file(ref, out_dir / "reference.safetensors")
    return sorted(quantized)


def main():
    tensors, described = reference_tensors()
    data = root / "tests/data"
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # no shared storage
    safetensors.torch.save_file(tensors, data / "nf4_reference.safetensors")
    quantized = tiny_llama(root / "tests/fixtures/bnb4_tiny")
    meta = {
        "source": "bitsandbytes.functional.quantize_4bit / dequantize_4bit, nf4, blocksize 64, CPU",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "machine": {
            "platform": platform.machine(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
        },
        "cases": described,
        "bnb4_tiny_quantized": quantized,
    }
    (data / "nf4_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (data / "nf4_reference.safetensors").stat().st_size
    print(f"wrote {len(tensors)} tensors ({size} bytes), {len(quantized)} quantized linears in bnb4_tiny", file=sys.stderr)


if __name__ == "__main__":
    main()
