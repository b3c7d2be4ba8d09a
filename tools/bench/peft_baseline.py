#!/usr/bin/env python3
"""PEFT + gradient-checkpointing baseline for `lema bench`, on the same GPU and shape.

Builds a random-init model of a named shape (the same table as lema's `bench::preset`)
directly on the GPU in bf16, wraps it with PEFT LoRA (r, alpha, all seven projections for
Llama, c_attn/c_proj/c_fc for GPT-2), enables gradient checkpointing, and times AdamW
training steps on random tokens. Prints one JSON object per configuration:
median step seconds, tokens/s, peak VRAM as the driver reports it (context included) and
torch's own peak allocation.

    python3 tools/bench/peft_baseline.py --shape llama2-7b --configs 1x512 --steps 10
    python3 tools/bench/peft_baseline.py --shape llama2-7b --configs 1x512 --qlora   # QLoRA (bitsandbytes)
    python3 tools/bench/peft_baseline.py --shape llama2-7b --configs 8x512 --no-checkpointing
"""
import argparse, json, statistics, subprocess, time

import torch

SHAPES = {
    # name: (gpt2, vocab, hidden, intermediate, layers, heads, kv_heads, max_pos, tied)
    "llama2-7b": (False, 32000, 4096, 11008, 32, 32, 32, 4096, False),
    "llama3-8b": (False, 128256, 4096, 14336, 32, 32, 8, 8192, False),
    "tinyllama-1.1b": (False, 32000, 2048, 5632, 22, 32, 4, 2048, False),
    "smollm2-135m": (False, 49152, 576, 1536, 30, 9, 3, 8192, True),
    "gpt2": (True, 50257, 768, 3072, 12, 12, 12, 1024, True),
    "gpt2-xl": (True, 50257, 1600, 6400, 48, 25, 25, 1024, True),
}


def driver_used_mib():
    """GPU memory in use on device 0 as nvidia-smi reports it (all processes, context included)."""
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[0])


def quantize_linears_nf4(model):
    """QLoRA's base: every nn.Linear but the head replaced by bitsandbytes' Linear4bit (NF4,
    double quantization, bf16 compute), quantized on the GPU, as BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16) loads a model."""
    import bitsandbytes as bnb
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and cname != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True,
                                      quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4").cuda()
                setattr(mod, cname, q)
    torch.cuda.empty_cache()


def build(shape, r, alpha, qlora=False, checkpointing=True):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    gpt2, vocab, hidden, inter, layers, heads, kv, max_pos, tied = SHAPES[shape]
    if gpt2:
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                         n_positions=max_pos, n_inner=inter, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        cls, targets = GPT2LMHeadModel, ["c_attn", "c_proj", "c_fc"]
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                          max_position_embeddings=max_pos, tie_word_embeddings=tied)
        cls = LlamaForCausalLM
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = cls(cfg)
    torch.set_default_dtype(torch.float32)
    if qlora:
        quantize_linears_nf4(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                      fan_in_fan_out=gpt2, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    # LoRA masters in f32, as lema keeps them
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, vocab


def run(shape, batch, seq, steps, warmup, r, alpha, qlora=False, checkpointing=True):
    torch.manual_seed(0)
    model, vocab = build(shape, r, alpha, qlora, checkpointing)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times, peak_driver = [], 0.0
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
        peak_driver = max(peak_driver, driver_used_mib())
    med = statistics.median(times)
    impl = "peft+bitsandbytes-nf4" if qlora else "peft"
    res = dict(impl=impl + ("+checkpointing" if checkpointing else ""), shape=shape, batch=batch, seq=seq, steps=steps,
               step_seconds_median=med, tokens_per_second=batch * seq / med,
               peak_vram_driver_gb=peak_driver * 2**20 / 1e9,
               peak_vram_torch_allocated_gb=torch.cuda.max_memory_allocated() / 1e9,
               final_loss=float(loss), device=torch.cuda.get_device_name(0))
    del model, opt
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--configs", default="1x512,1x2048,8x512", help="comma-separated BxT")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--qlora", action="store_true",
                    help="QLoRA: the base's linears in bitsandbytes NF4 (double quant, bf16 compute)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                    help="keep every layer's activations (no gradient checkpointing)")
    a = ap.parse_args()
    for c in a.configs.split(","):
        b, t = (int(x) for x in c.split("x"))
        print(json.dumps(run(a.shape, b, t, a.steps, a.warmup, a.rank, a.alpha, a.qlora, a.checkpointing)), flush=True)


if __name__ == "__main__":
    main()
