#!/usr/bin/env python3
"""torch + PEFT on the CPU, the counterpart of `lema bench --device cpu --dtype f32`.

Builds a random-init model of a named shape (the table of lema's `bench::preset`) in f32
on the CPU, wraps it with PEFT LoRA (r, alpha = 2r as `lema bench` uses, all seven
projections for Llama, c_attn/c_proj/c_fc for GPT-2, no dropout), optionally enables
gradient checkpointing (non-reentrant, as transformers recommends), and times AdamW
(lr 1e-4) training steps on random tokens with labels = inputs, as `lema bench` does.
Uses every CPU torch sees (torch.set_num_threads(os.cpu_count())). Also measures torch's
own f32 GEMM rate on a large square product (best of several, GFLOP/s), so the report
says how fast this machine's best-tuned BLAS (MKL/oneDNN in torch's wheel) multiplies.
Prints one JSON object per configuration and one for the GEMM rate.

    $(scripts/python-env.sh) tools/bench/cpu_torch_baseline.py --configs 4x128,1x512 \
        --checkpointing both --steps 3
"""
import argparse, json, os, statistics, time

import torch

SHAPES = {
    # name: (gpt2, vocab, hidden, intermediate, layers, heads, kv_heads, max_pos, tied)
    "smollm2-135m": (False, 49152, 576, 1536, 30, 9, 3, 8192, True),
    "tinyllama-1.1b": (False, 32000, 2048, 5632, 22, 32, 4, 2048, False),
    "gpt2": (True, 50257, 768, 3072, 12, 12, 12, 1024, True),
    "tiny": (False, 256, 64, 128, 2, 4, 2, 512, False),
}


def gemm_gflops(n=2048, reps=5):
    """Best-of-`reps` f32 GFLOP/s of an n × n × n product through torch (MKL)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def build(shape, r, alpha, checkpointing):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    gpt2, vocab, hidden, inter, layers, heads, kv, max_pos, tied = SHAPES[shape]
    if gpt2:
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                         n_positions=max_pos, n_inner=inter, resid_pdrop=0, embd_pdrop=0,
                         attn_pdrop=0)
        cls, targets = GPT2LMHeadModel, ["c_attn", "c_proj", "c_fc"]
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, max_position_embeddings=max_pos,
                          tie_word_embeddings=tied, rms_norm_eps=1e-5)
        cls = LlamaForCausalLM
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = cls(cfg).float()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                      fan_in_fan_out=gpt2, task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    return model, vocab


def run(shape, batch, seq, steps, warmup, r, alpha, checkpointing):
    torch.manual_seed(0)
    model, vocab = build(shape, r, alpha, checkpointing)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq))
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(impl="torch+peft" + ("+checkpointing" if checkpointing else ""), shape=shape,
                batch=batch, seq=seq, steps=steps, gradient_checkpointing=checkpointing,
                step_seconds_median=med, step_seconds_all=times,
                tokens_per_second=batch * seq / med, final_loss=float(loss),
                threads=torch.get_num_threads(), torch=torch.__version__)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--configs", default="4x128,1x512", help="comma-separated BxT")
    ap.add_argument("--checkpointing", default="both", choices=["on", "off", "both"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=None, help="default: 2 × rank, as lema bench")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM-rate measurement")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    alpha = a.alpha if a.alpha is not None else 2.0 * a.rank
    if not a.no_gemm:
        print(json.dumps(dict(impl="torch-gemm", n=2048, gflops=gemm_gflops(),
                              threads=torch.get_num_threads())), flush=True)
    ckpts = {"on": [True], "off": [False], "both": [True, False]}[a.checkpointing]
    for ck in ckpts:
        for c in a.configs.split(","):
            b, t = (int(x) for x in c.split("x"))
            print(json.dumps(run(a.shape, b, t, a.steps, a.warmup, a.rank, alpha, ck)), flush=True)


if __name__ == "__main__":
    main()
