"""The Python path's step time and peak GPU memory, against `lema bench` on the same model
file: the same configuration (rank 16, alpha 32, all-linear, AdamW at 1e-4, streaming),
the same warm-up and timed steps, the median reported, peak device memory read from the
driver after every step as `lema bench` does.

    lema bench --shape llama2-7b --batch 1 --seq 512 --device cuda --prefetch 1 \\
        --offload-activations --offload-optimizer --workdir W --json lema.json
    python tools/bench/python_step.py --model W/model.safetensors --batch 1 --seq 512 \\
        --prefetch 1 --offload-activations --offload-optimizer --optimizer engine

--optimizer engine: lema's AdamW in the engine (what `lema bench` runs); torch: torch's
AdamW (foreach) on the shared parameters, its moments in GPU memory (compare with a
`lema bench` run without --offload-optimizer).
"""

import argparse
import json
import statistics
import time

import numpy as np

from lema import LemaConfig, LemaModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--offload-activations", action="store_true")
    ap.add_argument("--offload-optimizer", action="store_true")
    ap.add_argument("--optimizer", choices=["engine", "torch"], default="engine")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    a = ap.parse_args()
    cfg = LemaConfig(gbi_path=a.model, lora_rank=16, lora_alpha=32, lora_target_modules=["all-linear"],
                     device=a.device, prefetch_distance=a.prefetch, offload_activations=a.offload_activations,
                     offload_optimizer=a.offload_optimizer)
    model = LemaModel(cfg)
    model.initialize_lora()
    if a.optimizer == "torch":
        import torch

        opt = torch.optim.AdamW(model.get_trainable_parameters(), lr=1e-4)
        trainer = model.get_trainer(opt)
    else:
        trainer = model.get_trainer(None, lr=1e-4)
    vocab = model._engine.model_summary()[1]
    ids = np.random.default_rng(2).integers(0, vocab, size=(a.batch, a.seq))
    for _ in range(a.warmup):
        trainer.train_step(ids)
    times, peak = [], model._engine.device_memory_used() or 0
    loss = float("nan")
    for _ in range(a.steps):
        t = time.perf_counter()
        _, loss = trainer.train_step(ids)
        times.append(time.perf_counter() - t)
        peak = max(peak, model._engine.device_memory_used() or 0)
    report = {"device": model._engine.device_name, "optimizer": a.optimizer, "batch": a.batch, "seq": a.seq,
              "step_seconds_median": statistics.median(times), "step_seconds_all": times,
              "peak_vram_bytes": peak, "loss": loss}
    if a.optimizer == "torch":
        # what torch itself allocated (its AdamW moments and foreach temporaries), apart from
        # the engine's pool and the CUDA context
        report["torch_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        report["torch_optimizer_state_bytes"] = sum(
            t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    print(json.dumps(report))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
