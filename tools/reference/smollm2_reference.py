#!/usr/bin/env python3
"""Independent reference numbers for SmolLM2-135M-Instruct, computed with transformers'
own GGUF loader (its own dequantization, Q/K un-permutation and tokenizer conversion) from
the same GGUF file lema imports. Writes tests/data/smollm2_reference.json, which
tests/smollm2.rs compares against.

Needs torch, transformers, gguf (CPU is enough):
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers gguf
    scripts/fetch-smollm2.sh && /tmp/ref/bin/python tools/reference/smollm2_reference.py
"""
import json, math, pathlib

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

root = pathlib.Path(__file__).resolve().parents[2]
cache = root / ".cache/models"
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(cache, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(cache, gguf_file=gguf, torch_dtype=torch.float32)
model.eval()

passage = (root / "tests/data/passage.txt").read_text()
ids = tok(passage, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
ppl = math.exp(out.loss.item())

samples = ["Hello world!", "In 2024, it's 37°C.", "naïve café", "The quick brown fox jumps over the lazy dog."]
chat = [{"role": "user", "content": "What is the capital of France?"}]
prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False)
new = gen[0, len(prompt_ids):].tolist()

ref = {
    "source": "transformers GGUF loader, float32 dequantized weights",
    "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    "passage_tokens": len(ids),
    "passage_perplexity": ppl,
    "passage_ids": ids,
    "encodings": {s: tok(s, add_special_tokens=False)["input_ids"] for s in samples},
    "chat_prompt": prompt,
    "chat_prompt_ids": prompt_ids,
    "greedy_new_ids": new,
    "greedy_text": tok.decode(new),
}
(root / "tests/data/smollm2_reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
print(json.dumps({k: ref[k] for k in ("passage_tokens", "passage_perplexity", "greedy_text")}, ensure_ascii=False))
