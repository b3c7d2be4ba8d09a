#!/usr/bin/env python3
"""Independent reference numbers for Gemma 3 270M (the base model, Q4_K_M GGUF of
scripts/fetch-gemma3.sh), computed with transformers' own GGUF loading of the same file lema
imports. Writes tests/data/gemma3_reference.json.

What is independent of lema, and what each part is:
  * the tokenizer: transformers builds it from the GGUF's vocabulary itself
    (`AutoTokenizer.from_pretrained(..., gguf_file=...)`: integrations/gguf/gguf_tokenizer_mapping.py,
    `gemma_tokenizer`: SentencePiece BPE, merges rebuilt from the order of the vocabulary, byte
    fallback, CONTROL tokens as special tokens);
  * the weights: transformers 5.24 sends gemma3 GGUF files through its legacy GGUF loader
    (modeling_gguf_pytorch_utils.load_gguf_checkpoint), which reads and dequantizes every tensor
    with llama.cpp's gguf-py (`gguf.GGUFReader`, `gguf.dequantize`) and maps the names, subtracting
    the 1 that llama.cpp's converter adds to every Gemma norm weight (Gemma2TensorProcessor); Q and
    K are copied as stored (llama.cpp permutes Q/K rows only for its llama family). The model is
    then transformers' own Gemma3ForCausalLM in float32 on the CPU, eager attention;
  * the config: built by transformers from the gemma3.* keys; what the file does not say comes from
    Gemma3TextConfig's defaults (layer_types: 5 sliding layers then 1 global, repeated; the local
    RoPE base 10000; query_pre_attn_scalar = 256; GELU-tanh; no soft-capping);
  * the chat template: the GGUF carries none (no tokenizer.chat_template key), so transformers'
    tokenizer for it has none either (recorded as `gguf_chat_template: null`). To still pin the
    rendering and the tokenization of a Gemma conversation, this script renders one with the
    template Google ships with the Gemma 3 instruction-tuned models (tokenizer_config.json of
    google/gemma-3-*-it), written out below as GEMMA3_IT_CHAT_TEMPLATE, through transformers'
    `apply_chat_template` (jinja2).

Run (CPU; 4 to 8 minutes on two cores, about 3 GB of memory):
    scripts/fetch-gemma3.sh
    $(tools/reference/env.sh) tools/reference/gemma3_reference.py
tools/reference/env.sh builds the reference venv (the project's pins of torch and transformers,
plus llama.cpp's gguf-py from tools/reference/requirements.txt); README.md there has the versions
of the committed file.
"""
import collections
import hashlib
import importlib.metadata
import json
import math
import pathlib
import platform
import sys
import time

import gguf
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.manual_seed(0)
torch.use_deterministic_algorithms(True)

root = pathlib.Path(__file__).resolve().parents[2]
cache = root / ".cache/models"
name = "gemma-3-270m-q4_k_m.gguf"
path = cache / name
if not path.is_file():
    sys.exit(f"{path} is absent: run scripts/fetch-gemma3.sh")

# Gemma 3's chat template, as in the tokenizer_config.json of google/gemma-3-*-it (the text-only
# model renders an image part as <start_of_image>; nothing here uses one).
GEMMA3_IT_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

GREEDY_NEW = 24
_t0 = time.time()


def stage(what):
    print(f"gemma3_reference: {what} ({time.time() - _t0:.0f} s)", file=sys.stderr, flush=True)


def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- the file itself (gguf-py)
reader = gguf.GGUFReader(path)
BIG_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
              "tokenizer.ggml.merges"}


def field_value(field):
    v = field.contents()
    return v.item() if isinstance(v, np.generic) else v


metadata = {}
for key, field in reader.fields.items():
    if key.startswith("GGUF.") or key in BIG_ARRAYS:
        continue
    metadata[key] = field_value(field)
arch = metadata["general.architecture"]
tokens = reader.fields["tokenizer.ggml.tokens"].contents()
token_types = reader.fields["tokenizer.ggml.token_type"].contents()
type_names = {t.value: t.name for t in gguf.TokenType}
tensors = reader.tensors


def tensor_entry(t):
    # shape as GGUF stores it: ne[0] (the contiguous axis, the input features of a linear) first
    return {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]}


suffix_types = collections.defaultdict(collections.Counter)
for t in tensors:
    if t.name.startswith("blk."):
        suffix_types[t.name.split(".", 2)[2]][t.tensor_type.name] += 1
raw = {t.name: t for t in tensors}

stage("GGUF read")
# ---------------------------------------------------------------- transformers
tok = AutoTokenizer.from_pretrained(cache, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(cache, gguf_file=name, dtype=torch.float32,
                                             attn_implementation="eager")
model.eval()
cfg = model.config

# The facts the importer relies on, checked here rather than assumed: the Gemma norms are stored
# as 1 + w (transformers subtracts 1), every other tensor is the dequantized GGUF tensor as stored
# (no Q/K row permutation), and the head is tied to the embedding.
sd = model.state_dict()
norm_pairs = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
linear_pairs = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
name_map = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
for i in range(cfg.num_hidden_layers):
    for g, h in {**norm_pairs, **linear_pairs}.items():
        name_map[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
assert set(name_map) == set(raw), sorted(set(raw) ^ set(name_map))
norm_offset_err, linear_err = 0.0, 0.0
for g, h in name_map.items():
    t = raw[g]
    deq = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32))
    ours = sd[h].float()
    assert deq.shape == ours.shape, (g, deq.shape, ours.shape)
    if "norm" in g:
        norm_offset_err = max(norm_offset_err, (deq - 1 - ours).abs().max().item())
    else:
        linear_err = max(linear_err, (deq - ours).abs().max().item())
assert norm_offset_err == 0.0 and linear_err == 0.0, (norm_offset_err, linear_err)
assert "output.weight" not in raw and cfg.tie_word_embeddings
assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

stage("model loaded, weights checked")
# ---------------------------------------------------------------- tokenizer
samples = [
    # the SmolLM2 reference's
    "Hello world!", "In 2024, it's 37°C.", "naïve café", "The quick brown fox jumps over the lazy dog.",
    # non-ASCII
    "Größe: 5 µm — «très» bien", "日本語のテキストと中文。", "Привет, мир!", "emoji 🙂🚀 and ∑x²",
    # code and whitespace
    "def add(a, b):\n    return a + b\n", "fn main() {\n\tprintln!(\"{}\", 1 << 3);\n}",
    "  two  spaces   three    four\n\n\nend ", "<start_of_turn>user\nHi<end_of_turn>\n",
]
encodings = {s: tok(s, add_special_tokens=False)["input_ids"] for s in samples}
encodings_special = {s: tok(s)["input_ids"] for s in samples}
decodings = {s: tok.decode(ids) for s, ids in encodings.items()}

# ---------------------------------------------------------------- chat template
conversation = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]
chat_prompt = tok.apply_chat_template(conversation, chat_template=GEMMA3_IT_CHAT_TEMPLATE,
                                      tokenize=False, add_generation_prompt=True)
chat_prompt_ids = tok(chat_prompt, add_special_tokens=False)["input_ids"]
chat_train = tok.apply_chat_template(conversation[:2], chat_template=GEMMA3_IT_CHAT_TEMPLATE,
                                     tokenize=False, add_generation_prompt=False)
chat_train_ids = tok(chat_train, add_special_tokens=False)["input_ids"]


stage("tokenizer and chat template")
# ---------------------------------------------------------------- perplexity and logits
def perplexity(ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
    return math.exp(out.loss.item()), out.logits[0, -1]


passage = (root / "tests/data/passage.txt").read_text()
passage_ids = tok(passage)["input_ids"]  # with <bos>, as the tokenizer adds it by default
ppl, last = perplexity(passage_ids)
ppl_no_bos, _ = perplexity(passage_ids[1:])
# longer than the sliding window (512): the passage three times after one <bos>
long_ids = [tok.bos_token_id] + 3 * passage_ids[1:]
assert len(long_ids) > cfg.sliding_window
ppl_long, last_long = perplexity(long_ids)


stage("perplexities")
# ---------------------------------------------------------------- greedy decoding
def greedy(prompt_ids):
    """model.generate (greedy, through transformers' KV cache: a sliding-window cache for the local
    layers), checked token by token against full forwards without a cache."""
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=GREEDY_NEW, do_sample=False,
                             top_p=None, top_k=None, temperature=None)
    new = gen[0, len(prompt_ids):].tolist()
    seq, margins = list(prompt_ids), []
    with torch.no_grad():
        for want in new:
            logits = model(input_ids=torch.tensor([seq]), use_cache=False, logits_to_keep=1).logits[0, -1]
            top = torch.topk(logits, 2)
            assert top.indices[0].item() == want, (top.indices.tolist(), want)
            margins.append((top.values[0] - top.values[1]).item())
            seq.append(want)
    # margins: at each step, the greedy token's logit minus the runner-up's (a small one is where
    # rounding elsewhere, e.g. bf16 weights, may pick the other token)
    return {"prompt_ids": list(prompt_ids), "new_ids": new, "text": tok.decode(new),
            "top2_margins": margins}


eos = model.generation_config.eos_token_id
# three prompts: code after <bos> (every step's margin above 0.2), the two-turn chat prompt, and 600
# tokens of the long sequence (past the sliding window, so the local layers' cache drops keys)
greedy_runs = {
    "text": greedy(tok("def fibonacci(n):")["input_ids"]),
    "chat": greedy(chat_prompt_ids),
    "long": greedy(long_ids[: cfg.sliding_window + 88]),
}

stage("greedy decoding")
# ---------------------------------------------------------------- write
config_keys = [
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "rms_norm_eps",
    "hidden_activation", "sliding_window", "layer_types", "rope_parameters", "max_position_embeddings",
    "final_logit_softcapping", "attn_logit_softcapping", "attention_bias", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
]
ref = {
    "source": "transformers' GGUF loading (legacy loader: gguf-py dequantization), Gemma3ForCausalLM, "
              "float32 on the CPU, eager attention",
    "versions": {"python": platform.python_version(),
                 **{p: importlib.metadata.version(p) for p in ("torch", "transformers", "gguf", "accelerate",
                                                              "tokenizers", "numpy")}},
    "gguf": {
        "file": name, "bytes": path.stat().st_size, "sha256": sha256(path),
        "architecture": arch,
        "metadata": {k: v for k, v in metadata.items() if k.startswith(arch + ".") or k.startswith("general.")},
        "tokenizer_metadata": {k: v for k, v in metadata.items() if k.startswith("tokenizer.")},
        "vocab_size": len(tokens),
        "token_type_counts": {type_names.get(int(k), str(k)): int(v)
                              for k, v in sorted(collections.Counter(int(x) for x in token_types).items())},
        "tensor_count": len(tensors),
        "types_present": dict(sorted(collections.Counter(t.tensor_type.name for t in tensors).items())),
        "types_by_block_tensor": {k: dict(sorted(v.items())) for k, v in sorted(suffix_types.items())},
        "tensors_block0_and_non_block": {t.name: tensor_entry(t) for t in tensors
                                         if not t.name.startswith("blk.") or t.name.startswith("blk.0.")},
        "has_output_weight": "output.weight" in raw,
    },
    "gguf_chat_template": metadata.get("tokenizer.chat_template"),
    "checks": {
        "norm_weights_stored_as_one_plus_w": "every *norm.weight in the GGUF equals transformers' weight + 1 "
                                             "exactly (max error 0.0), q_norm and k_norm included",
        "linear_and_embedding_weights_as_stored": "every other tensor equals gguf.dequantize of the stored "
                                                  "tensor exactly, shape [ne1, ne0] (no Q/K row permutation)",
        "tied_head": "no output.weight; lm_head shares the embedding",
    },
    "hf_config": {k: getattr(cfg, k, None) for k in config_keys},
    "embed_scale": model.model.embed_tokens.embed_scale.item(),
    "tokenizer": {"class": type(tok).__name__, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                  "pad_token_id": tok.pad_token_id, "unk_token_id": tok.unk_token_id,
                  "adds_bos": tok("a")["input_ids"][0] == tok.bos_token_id,
                  "chat_template": tok.chat_template},
    "encodings": encodings,
    "encodings_with_special_tokens": encodings_special,
    "decodings": decodings,
    "chat_template_used": GEMMA3_IT_CHAT_TEMPLATE,
    "chat_conversation": conversation,
    "chat_prompt": chat_prompt,
    "chat_prompt_ids": chat_prompt_ids,
    "chat_train_text": chat_train,
    "chat_train_ids": chat_train_ids,
    "passage_tokens": len(passage_ids),
    "passage_ids": passage_ids,
    "passage_perplexity": ppl,
    "passage_perplexity_without_bos": ppl_no_bos,
    "passage_last_logits_first8": last[:8].tolist(),
    "passage_last_top5": torch.topk(last, 5).indices.tolist(),
    "long_tokens": len(long_ids),
    "long_perplexity": ppl_long,
    "long_last_logits_first8": last_long[:8].tolist(),
    "greedy_new_tokens": GREEDY_NEW,
    "generation_eos_token_id": eos,
    "greedy": greedy_runs,
}
out = root / "tests/data/gemma3_reference.json"
out.write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
print(json.dumps({
    "passage_tokens": len(passage_ids), "passage_perplexity": ppl, "without_bos": ppl_no_bos,
    "long_tokens": len(long_ids), "long_perplexity": ppl_long,
    "greedy": {k: (v["text"], round(min(v["top2_margins"]), 4)) for k, v in greedy_runs.items()},
}, ensure_ascii=False, indent=1))
