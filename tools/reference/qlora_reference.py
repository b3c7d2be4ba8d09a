#!/usr/bin/env python3
"""PEFT + bitsandbytes QLoRA on tests/fixtures/bnb4_tiny, as the reference for lema's training
on an NF4 base (tests/quantized.rs).

Loads tests/fixtures/bnb4_tiny/ (transformers' own 4-bit save, nf4 + double quantization) with
transformers on the CPU, with the checkpoint's own quantization_config, except that the 4-bit
linears compute in float32 (`Linear4bit.compute_dtype`; the checkpoint says bfloat16, which
would round every activation to bf16). `peft.prepare_model_for_kbit_training` casts the bf16
embeddings, norms and head to float32 (exact), as the QLoRA recipe does. Then PEFT LoRA (r 4,
alpha 8, the seven projections, dropout 0), lora_B = randn * 0.1 from a fixed generator, one
forward/backward on a fixed batch, and 3 AdamW steps.

What bitsandbytes 0.50.2 computes on the CPU in training mode (checked here, see README.md):
the forward is `bitsandbytes::gemm_4bit`'s default kernel, `linear(x, dequantize_4bit(..., dtype
= x.dtype))`: with float32 compute, `code * absmax` in float32, *not* rounded to the quant
state's bf16; the backward (MatMul4Bit.backward) multiplies by `dequantize_4bit(B, quant_state)`,
which *is* rounded to bf16 (quant_state.dtype), then cast to float32. lema expands to bf16 for
both (what bitsandbytes' own `dequantize_4bit` gives, tests/quantized.rs). So the script also
runs the same PEFT model with each 4-bit linear's forward replaced by a dense float32 linear on
the bf16 dequantization (`twin.*`): lema's arithmetic, and bitsandbytes' backward, in torch.

Writes tests/fixtures/bnb4_tiny/qlora/:
    adapter/                 PEFT save_pretrained (adapter_model.safetensors, adapter_config.json)
    reference.safetensors    input_ids, labels, logits, loss, grad_norm, grad.<adapter key>,
                             losses_adamw (the loss before each of 3 steps), after_adamw.<key>;
                             the same under twin.* (bf16-rounded forward weights)
    meta.json                versions, settings, what was checked, bnb vs twin differences

Run: $(tools/reference/env.sh) tools/reference/qlora_reference.py     (~10 s, CPU, 1 thread)
Deterministic: a rerun writes the same bytes.
"""
import json, os, pathlib, platform, shutil, sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

torch.set_num_threads(1)

import bitsandbytes
import bitsandbytes.functional as F
import peft
import safetensors
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

root = pathlib.Path(__file__).resolve().parents[2]
FIXTURE = root / "tests/fixtures/bnb4_tiny"
OUT = FIXTURE / "qlora"
SEED = 4011
BATCH, SEQ, VOCAB = 2, 11, 96
IGNORED = [(1, 0), (1, 1), (1, 2), (0, 6)]  # labels set to -100
ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
N_STEPS = 3
LORA_B_STD = 0.1
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False, fan_in_fan_out=False, bias="none",
            target_modules=TARGETS, task_type="CAUSAL_LM")


def load_base():
    """The fixture as transformers loads it, 4-bit linears computing in float32, the rest f32."""
    model = AutoModelForCausalLM.from_pretrained(FIXTURE, device_map="cpu", attn_implementation="eager")
    qc = model.config.quantization_config
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"], qc
    n = 0
    for _, mod in model.named_modules():
        if isinstance(mod, bitsandbytes.nn.Linear4bit):
            assert mod.compute_dtype == torch.bfloat16  # the checkpoint's bnb_4bit_compute_dtype
            mod.compute_dtype = torch.float32
            mod.compute_type_is_set = True
            qs = mod.weight.quant_state
            assert qs.dtype == torch.bfloat16 and qs.nested and qs.quant_type == "nf4", qs
            n += 1
    assert n == 7, n
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for name, p in model.named_parameters():
        assert p.dtype in (torch.float32, torch.uint8), (name, p.dtype)
    return model, qc


def dense_weights(model):
    """Per Linear4bit: the float32 weight its forward uses and the bf16 one its backward uses."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bitsandbytes.nn.Linear4bit):
            qs = mod.weight.quant_state
            b = mod.weight.data.view(-1, 1)
            absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
                qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32) + qs.offset
            w32 = torch.ops.bitsandbytes.dequantize_4bit.default(b, absmax, qs.blocksize, qs.quant_type, qs.shape,
                                                                torch.float32)
            wbf = F.dequantize_4bit(b, qs)
            assert wbf.dtype == torch.bfloat16
            out[name] = (mod, w32, wbf)
    return out


def check_compute_path(weights):
    """bitsandbytes' forward multiplies by the float32 dequantization, its backward by the bf16
    one (both exactly, not to rounding); each NF4 weight's bf16 dequantization is the fixture's."""
    ref = {}
    with safe_open(FIXTURE / "reference.safetensors", framework="pt") as f:
        for k in f.keys():
            ref[k] = f.get_tensor(k)
    g = torch.Generator().manual_seed(SEED + 7)
    facts = {}
    for name, (mod, w32, wbf) in weights.items():
        assert torch.equal(wbf, ref[name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight.dequantized"]), name
        assert mod.training
        x = torch.randn((5, w32.shape[1]), generator=g, requires_grad=True)
        y = mod(x)
        gy = torch.randn(y.shape, generator=g)
        y.backward(gy)
        assert torch.equal(y, torch.nn.functional.linear(x, w32)), f"{name}: forward is not x @ w_f32^T"
        assert torch.equal(x.grad, gy @ wbf.float()), f"{name}: backward is not g @ w_bf16"
        facts[name] = float((w32 - wbf.float()).norm() / wbf.float().norm())
    return facts


def lora_params(model):
    out = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert ".lora_A.default." in n or ".lora_B.default." in n, n
            out.append((n.replace(".default.", "."), p))
    return out


def step_once(model, params, batch):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch[0], labels=batch[1], use_cache=False)
    out.loss.backward()
    return out


def run(model, params, start, batch):
    """Logits, loss, grads of the first step; the losses of N_STEPS AdamW steps; the weights after."""
    with torch.no_grad():
        for k, p in params:
            p.copy_(start[k])
    out = step_once(model, params, batch)
    res = {
        "logits": out.logits.detach().float().clone(),
        "loss": out.loss.detach().reshape(1).float().clone(),
    }
    grads = {k: p.grad.detach().clone() for k, p in params}
    assert all(torch.isfinite(t).all() and t.abs().max() > 0 for t in grads.values())
    res["grad_norm"] = torch.sqrt(sum(t.double().pow(2).sum() for t in grads.values())).reshape(1).float()
    for k, t in grads.items():
        res[f"grad.{k}"] = t
    # the loss convention: shift by one, -100 ignored, mean over the counted tokens
    sl = res["logits"][:, :-1].reshape(-1, VOCAB).double()
    manual = torch.nn.functional.cross_entropy(sl, batch[1][:, 1:].reshape(-1), ignore_index=-100)
    assert abs(float(manual) - float(res["loss"])) < 1e-5
    with torch.no_grad():
        for k, p in params:
            p.copy_(start[k])
    opt = torch.optim.AdamW([p for _, p in params], **ADAMW)
    losses = []
    for _ in range(N_STEPS):
        losses.append(step_once(model, params, batch).loss.detach().clone())
        opt.step()
    res["losses_adamw"] = torch.stack(losses).float()
    assert float(res["losses_adamw"][0]) == float(res["loss"][0])
    assert float(res["losses_adamw"][-1]) < float(res["losses_adamw"][0]), res["losses_adamw"]
    for k, p in params:
        res[f"after_adamw.{k}"] = p.detach().clone()
    with torch.no_grad():
        for k, p in params:
            p.copy_(start[k])
    return res


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main():
    torch.manual_seed(SEED)  # PEFT's lora_A init (kaiming-uniform) draws from the global generator
    model, qc = load_base()
    model = get_peft_model(model, LoraConfig(**LORA))
    model.train()
    wrapped = sorted(n for n, m in model.named_modules() if type(m).__module__ == "peft.tuners.lora.bnb")
    assert len(wrapped) == 7 and all(type(m).__name__ == "Linear4bit" for n, m in model.named_modules()
                                     if n in wrapped), wrapped
    params = lora_params(model)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for k, p in params:
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * LORA_B_STD)
    start = {k: p.detach().clone() for k, p in params}
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g, dtype=torch.int64)
    labels = input_ids.clone()
    for r, c in IGNORED:
        labels[r, c] = -100
    batch = (input_ids, labels)

    weights = dense_weights(model)
    fwd_vs_bf16 = check_compute_path(weights)
    bnb = run(model, params, start, batch)

    # the same model with each 4-bit forward on the bf16 dequantization (lema's arithmetic)
    for name, (mod, _, wbf) in weights.items():
        mod.forward = (lambda w: lambda x: torch.nn.functional.linear(x.float(), w))(wbf.float())
    twin = run(model, params, start, batch)
    for _, (mod, _, _) in weights.items():
        del mod.forward

    ref = {"input_ids": input_ids, "labels": labels}
    ref.update(bnb)
    ref.update({f"twin.{k}": v for k, v in twin.items()})
    ref = {k: v.contiguous().clone() for k, v in ref.items()}
    diffs = {k: rel(bnb[k], twin[k]) for k in ("logits", "loss", "grad_norm", "losses_adamw")}
    diffs["grad_max"] = max(rel(bnb[k], twin[k]) for k in bnb if k.startswith("grad."))
    diffs["after_adamw_max"] = max(rel(bnb[k], twin[k]) for k in bnb if k.startswith("after_adamw."))

    if OUT.exists():
        shutil.rmtree(OUT)
    adapter_dir = OUT / "adapter"
    model.save_pretrained(adapter_dir, save_embedding_layers=False)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's model-card boilerplate
    acfg_path = adapter_dir / "adapter_config.json"
    acfg = json.loads(acfg_path.read_text())
    acfg["target_modules"] = sorted(acfg["target_modules"])  # written from a set
    acfg["base_model_name_or_path"] = "tests/fixtures/bnb4_tiny"  # not this machine's path
    acfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(start), sorted(set(f.keys()) ^ set(start))
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), start[k]), k
    save_file(ref, OUT / "reference.safetensors", metadata={"format": "pt"})

    # the written adapter on a fresh load reproduces the logits
    fresh, _ = load_base()
    fresh = PeftModel.from_pretrained(fresh, adapter_dir, is_trainable=True)
    fresh.train()
    with torch.no_grad():
        again = fresh(input_ids=input_ids, labels=labels, use_cache=False)
    assert torch.equal(again.logits, bnb["logits"]), "reloaded adapter: logits differ"

    meta = {
        "source": "PEFT LoRA on transformers' 4-bit load of tests/fixtures/bnb4_tiny (bitsandbytes nf4, "
                  "double quantization), CPU, float32 compute, one thread",
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "safetensors": safetensors.__version__,
        },
        "machine": {"platform": platform.machine(),
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": 1},
        "quantization_config": qc,
        "compute": {
            "bnb_4bit_compute_dtype": "float32 (Linear4bit.compute_dtype set after loading; the checkpoint "
                                      "says bfloat16)",
            "other_parameters": "float32 (peft.prepare_model_for_kbit_training, use_gradient_checkpointing=False)",
            "forward": "bitsandbytes::gemm_4bit default kernel: linear(x, dequantize_4bit(dtype=float32)): "
                       "code * absmax in float32, not rounded to bf16 (checked exactly per linear)",
            "backward": "MatMul4Bit.backward: grad @ dequantize_4bit(B, quant_state).to(float32): the bf16 "
                        "dequantization (checked exactly per linear)",
            "relative_difference_f32_vs_bf16_forward_weight": fwd_vs_bf16,
            "twin": "twin.*: the same with each 4-bit forward = linear(x, bf16 dequantization as float32)",
            "relative_difference_bnb_vs_twin": diffs,
        },
        "lora": dict(LORA, lora_B_init=f"randn * {LORA_B_STD} (generator seed {SEED}, after PEFT init)",
                     scaling=LORA["lora_alpha"] / LORA["r"], wrapped_modules=wrapped),
        "batch": {"batch": BATCH, "seq": SEQ, "vocab": VOCAB,
                  "input_ids": "torch.randint from the same generator, after lora_B",
                  "labels_ignored (row, position)": IGNORED},
        "optimizers": {"adamw": dict(ADAMW, steps=N_STEPS)},
        "results": {"loss": float(bnb["loss"]), "grad_norm": float(bnb["grad_norm"]),
                    "losses_adamw": bnb["losses_adamw"].tolist(), "twin_losses_adamw": twin["losses_adamw"].tolist()},
        "note": "losses_adamw: the loss before each step; after_adamw: the LoRA weights after the last step; "
                "the twin.* keys repeat every other key for the bf16-forward model",
    }
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(json.dumps(diffs), file=sys.stderr)
    print("losses", bnb["losses_adamw"].tolist(), "twin", twin["losses_adamw"].tolist(), file=sys.stderr)


if __name__ == "__main__":
    main()
