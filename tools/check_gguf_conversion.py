#!/usr/bin/env python3
"""Check a `lema prepare` GGUF conversion against the gguf-py reference (independent of lema).

Usage: python tools/check_gguf_conversion.py MODEL.gguf OUT/model.safetensors
Needs `pip install gguf` (brings numpy). Every tensor of the safetensors output must equal
gguf-py's dequantization of the GGUF tensor, reshaped to the HF shape and, for q_proj /
k_proj, with convert_hf_to_gguf.py's row permutation undone (in numpy here). Comparison
is after rounding the reference to the output dtype. Prints one line per tensor kind and
exits non-zero on any mismatch.
"""
import json
import struct
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = np.asarray(data[a:b])
        if info["dtype"] == "F32":
            v = raw.view(np.float32)
        elif info["dtype"] == "F16":
            v = raw.view(np.float16).astype(np.float32)
        elif info["dtype"] == "BF16":
            v = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            raise SystemExit(f"{name}: unexpected dtype {info['dtype']}")
        out[name] = (info["dtype"], v.reshape(info["shape"]))
    return out


def to_dtype(x, dtype):
    x = x.astype(np.float32)
    if dtype == "F32":
        return x
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    # bf16, round to nearest even
    u = x.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def unpermute(w, n_head):
    # inverse of w.reshape(n_head, 2, rows//n_head//2, *rest).swapaxes(1, 2).reshape(w.shape)
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(g):
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if g in fixed:
        return fixed[g]
    _, layer, mod, suffix = g.split(".")
    return f"model.layers.{layer}.{NAMES[mod]}.{suffix}"


def main():
    gguf_path, st_path = sys.argv[1], sys.argv[2]
    r = GGUFReader(gguf_path)
    field = lambda k: r.fields[k].parts[r.fields[k].data[0]][0]
    n_head = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv"))
    out = load_safetensors(st_path)
    bad = 0
    checked = {}
    seen = set()
    for t in r.tensors:
        name = hf_name(t.name)
        ref = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape.tolist())])
        if ".q_proj." in name:
            ref = unpermute(ref, n_head)
        elif ".k_proj." in name:
            ref = unpermute(ref, n_kv)
        targets = [name] + (["lm_head.weight"] if name == "model.embed_tokens.weight" and "output.weight" not in [x.name for x in r.tensors] else [])
        for target in targets:
            dtype, got = out[target]
            want = to_dtype(ref, dtype)
            seen.add(target)
            if got.shape != want.shape or not np.array_equal(got, want):
                diff = np.max(np.abs(got - want)) if got.shape == want.shape else "shape"
                print(f"MISMATCH {target}: {t.tensor_type.name} max|diff| = {diff}")
                bad += 1
            kind = target.split(".")[-2] if "layers" in target else target
            checked[(kind, t.tensor_type.name)] = checked.get((kind, t.tensor_type.name), 0) + 1
    missing = set(out) - seen
    for (kind, ty), n in sorted(checked.items()):
        print(f"ok {n:3d} x {kind} ({ty})")
    if missing:
        print("output tensors with no GGUF source:", sorted(missing))
        bad += 1
    print(f"{len(seen)} tensors compared, {bad} problems")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
