#!/usr/bin/env python3
"""Loss and perplexity of lema's adapters as PEFT computes them, over the transformers model.

    python tools/python/peft_eval.py CASES.json    (tests/peft_roundtrip.rs runs it)

CASES.json is a list of cases:
    {"name": str, "adapter": folder of adapter_config.json + adapter_model.safetensors,
     "base": model folder (config.json + model.safetensors) or null,
     (with "adapter" null: the base model alone, from "base")
     "input_ids": [[int]], "labels": [[int]]  (-100 = not scored)}
With "base" null the base model is the one the adapter names (`base_model_name_or_path`),
loaded by `peft.AutoPeftModelForCausalLM`, so that what lema writes there is checked too;
otherwise `transformers.AutoModelForCausalLM.from_pretrained(base)` and
`peft.PeftModel.from_pretrained`. Either way in float32, eager attention, on the CPU; the
loss is transformers' own (labels shifted by one, mean over scored tokens of the batch).
Prints one JSON object on stdout: {name: {"loss", "perplexity", "tokens",
"target_modules", "base_model_name_or_path", "base_loaded_from", "lora_modules"}}.
"""
import json
import math
import sys

import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
kw = dict(dtype=torch.float32, attn_implementation="eager")
out = {}
for case in json.load(open(sys.argv[1])):
    if case["adapter"] is None:
        config = {"target_modules": None, "base_model_name_or_path": None}
        model = AutoModelForCausalLM.from_pretrained(case["base"], **kw)
    elif case["base"] is None:
        config = json.load(open(f"{case['adapter']}/adapter_config.json"))
        model = AutoPeftModelForCausalLM.from_pretrained(case["adapter"], **kw)
    else:
        config = json.load(open(f"{case['adapter']}/adapter_config.json"))
        base = AutoModelForCausalLM.from_pretrained(case["base"], **kw)
        model = PeftModel.from_pretrained(base, case["adapter"])
    model.eval()
    lora_modules = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A.default"))
    if case["adapter"] is None:
        model.get_base_model = lambda: model
    ids = torch.tensor(case["input_ids"], dtype=torch.long)
    labels = torch.tensor(case["labels"], dtype=torch.long)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss.item()
    out[case["name"]] = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": int((labels[:, 1:] != -100).sum()),
        "target_modules": config["target_modules"],
        "base_model_name_or_path": config["base_model_name_or_path"],
        "base_loaded_from": model.get_base_model().config._name_or_path,
        "lora_modules": lora_modules,
    }
print(json.dumps(out))
