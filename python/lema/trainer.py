"""``LemaTrainer``: the optimizer step around the engine's layer-streamed forward and
backward, with a torch optimizer on the shared parameters or lema's own in the engine."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

from . import _arrays

TORCH_STATE = "torch_optimizer.safetensors"
TORCH_META = "torch_optimizer.json"

_TORCH_TO_ST = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16",
                "int64": "I64", "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def _current_stream(model: Any) -> Optional[int]:
    if model.device != "cuda":
        return None
    import torch

    return int(torch.cuda.current_stream(0).cuda_stream)


class LemaTrainer:
    """One model, one optimizer.

    optimizer: a torch optimizer over ``model.get_trainable_parameters()`` (its
        ``step()`` and ``zero_grad()`` run at the end of each optimizer step), or None
        for lema's AdamW (or SGD, ``engine_optimizer="sgd"``) inside the engine, with
        ``lr``, ``betas``, ``eps``, ``weight_decay`` (``momentum`` for SGD).
    gradient_accumulation_steps: micro-batches per optimizer step. The gradient is that
        of the mean loss over every counted token of the step's micro-batches, as one big
        batch would give (not a mean of per-batch means).
    max_grad_norm: clip the global gradient norm before each step (None: no clipping).
    lr_scheduler: a torch scheduler, stepped after each optimizer step.
    """

    def __init__(self, model: Any, optimizer: Any = None, *, gradient_accumulation_steps: int = 1,
                 max_grad_norm: Optional[float] = None, lr_scheduler: Any = None,
                 lr: float = 1e-4, engine_optimizer: str = "adamw", betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, momentum: float = 0.0) -> None:
        if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) \
                or gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be an integer >= 1, got {gradient_accumulation_steps!r}")
        if max_grad_norm is not None and not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        self.model = model
        self.optimizer = optimizer
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.lr_scheduler = lr_scheduler
        #: optimizer steps done
        self.global_step = 0
        #: gradient norm before clipping, of the last step
        self.last_grad_norm: Optional[float] = None
        self._micro = 0
        if optimizer is None:
            if engine_optimizer == "adamw":
                cfg = {"name": "adamw", "lr": lr, "beta1": betas[0], "beta2": betas[1], "eps": eps,
                       "weight_decay": weight_decay}
            elif engine_optimizer == "sgd":
                cfg = {"name": "sgd", "lr": lr, "momentum": momentum, "weight_decay": weight_decay}
            else:
                raise ValueError(f"engine_optimizer must be 'adamw' or 'sgd', got {engine_optimizer!r}")
            model._engine.set_optimizer(json.dumps(cfg))
        else:
            self._check_optimizer(optimizer)

    def _check_optimizer(self, optimizer: Any) -> None:
        if not hasattr(optimizer, "param_groups") or not hasattr(optimizer, "step"):
            raise TypeError(f"optimizer must be a torch optimizer (or None), got {type(optimizer).__name__}")
        # every parameter the optimizer updates must be one of the model's (a subset is
        # allowed: the others keep their values)
        ours = {p.data_ptr() for p in self.model.get_trainable_parameters("torch")}
        theirs = [p for g in optimizer.param_groups for p in g["params"]]
        if not theirs or any(p.data_ptr() not in ours for p in theirs):
            raise ValueError(
                "the optimizer's parameters are not this model's: build it from "
                "model.get_trainable_parameters() after initialize_lora()"
            )

    @property
    def external(self) -> bool:
        return self.optimizer is not None

    # ---- training ----------------------------------------------------------------
    def train_step(self, input_ids: Any, labels: Any = None, *, attention_mask: Any = None,
                   return_logits: bool = False) -> Tuple[Any, float]:
        """Forward and backward of one batch through the layer-streamed engine (the GIL
        released), then, every ``gradient_accumulation_steps`` calls, the optimizer step.

        Returns ``(logits, loss)``: ``loss`` is this batch's mean cross-entropy over its
        counted tokens (labels != -100; ``labels=None`` trains on the ids). ``logits`` is
        None unless ``return_logits=True``: the full ``[batch, seq, vocab]`` logits cost
        memory that the engine's chunked loss otherwise never allocates. Ctrl-C raises
        ``KeyboardInterrupt`` with the parameters unchanged (the step's accumulated
        micro-batches are dropped)."""
        ids, lab, b, t = _arrays.batch(input_ids, labels, attention_mask, device=self.model.device)
        stream = _current_stream(self.model)
        if self.external:
            self.model._attach_grads()
        try:
            total, count, logits = self.model._engine.accumulate(ids, lab, b, t, self.global_step,
                                                                 return_logits, stream)
        except BaseException:
            self._micro = 0
            raise
        self._micro += 1
        loss = total / count if count else float("nan")
        if self._micro >= self.gradient_accumulation_steps:
            self._optimizer_step(stream)
        if logits is not None:
            vocab = len(logits) // (4 * b * t)
            logits = _arrays.float_array(logits, (b, t, vocab), _arrays.is_torch(input_ids) or self.external,
                                         self.model.device)
        return logits, loss

    def _optimizer_step(self, stream: Optional[int]) -> None:
        self._micro = 0
        engine = self.model._engine
        try:
            norm = engine.clip(self.max_grad_norm, self.global_step, stream)
        except BaseException:
            engine.reset_accumulation()
            raise
        if self.external:
            self.optimizer.step()
            self.optimizer.zero_grad()
            engine.reset_accumulation()
        else:
            engine.optimizer_update(self._scheduled_lr())
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.global_step += 1
        self.last_grad_norm = norm

    def _scheduled_lr(self) -> Optional[float]:
        s = self.lr_scheduler
        if s is None:
            return None
        lrs = s.get_last_lr() if hasattr(s, "get_last_lr") else None
        return float(lrs[0]) if lrs else None

    # ---- evaluation --------------------------------------------------------------
    def evaluate(self, dataloader: Iterable[Any]) -> Dict[str, float]:
        """Mean loss over every counted token of the batches (dicts with ``input_ids`` and
        optional ``labels``/``attention_mask``, or ``(input_ids, labels)`` pairs), LoRA
        dropout off: ``{"loss", "perplexity", "tokens"}``."""
        total, count = 0.0, 0
        for batch in dataloader:
            ids, lab, mask = _unpack(batch)
            i, l, b, t = _arrays.batch(ids, lab, mask, device=self.model.device)
            s, c, _ = self.model._engine.evaluate(i, l, b, t)
            total, count = total + s, count + c
        if count == 0:
            raise ValueError("evaluate: the batches hold no counted tokens")
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}

    # ---- checkpoints -------------------------------------------------------------
    def save_checkpoint(self, directory: "str | os.PathLike[str]") -> None:
        """Write, atomically (a temporary folder renamed into place): the PEFT adapter,
        the optimizer state without pickle (safetensors + JSON; lema's own in lema's
        format), ``trainer_state.json`` and ``lema_config.json``. ``load_checkpoint`` on a
        trainer built the same way resumes exactly."""
        if self._micro:
            raise ValueError(
                f"save_checkpoint in the middle of an accumulated step ({self._micro} of "
                f"{self.gradient_accumulation_steps} micro-batches); save after the optimizer step"
            )
        directory = os.fspath(directory)
        files: List[Tuple[str, bytes]] = []
        if self.external:
            tensors, meta = _torch_state(self.optimizer, self.model)
            from . import _lema

            files.append((TORCH_STATE, bytes(_lema.save_safetensors(tensors))))
            files.append((TORCH_META, json.dumps(meta, indent=1).encode()))
        cfg_json = json.dumps(self.model.config.to_dict(), indent=2).encode()
        files.append(("lema_config.json", cfg_json))
        extra = {
            "python": {
                "global_step": self.global_step,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "optimizer_class": type(self.optimizer).__module__ + "." + type(self.optimizer).__qualname__
                if self.external else None,
                "lr_scheduler": _scheduler_state(self.lr_scheduler),
            }
        }
        self.model._engine.write_checkpoint(directory, self.global_step, self.max_grad_norm,
                                            json.dumps(extra), files)

    def load_checkpoint(self, directory: "str | os.PathLike[str]") -> None:
        """Resume from ``save_checkpoint``'s folder: the adapter values (in place: the
        parameters the optimizer holds stay the same tensors), the optimizer state, the
        step count and the scheduler."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no such checkpoint folder")
        has_torch = os.path.exists(os.path.join(directory, TORCH_META))
        if self.external != has_torch:
            made = "a torch optimizer" if has_torch else "lema's engine optimizer"
            want = "a torch optimizer" if self.external else "no optimizer (lema's own)"
            raise ValueError(f"{directory} was saved with {made}; build the trainer with {want} to resume it")
        state = json.loads(self.model._engine.resume(directory))
        if self.external:
            _load_torch_state(self.optimizer, self.model, directory)
        py = (state.get("extra") or {}).get("python") or {}
        self.global_step = int(py.get("global_step", state.get("step", 0)))
        self._micro = 0
        sched = py.get("lr_scheduler")
        if self.lr_scheduler is not None and sched is not None:
            self.lr_scheduler.load_state_dict(sched)


def _unpack(batch: Any) -> Tuple[Any, Any, Any]:
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise ValueError(f"a batch dict needs 'input_ids' (got keys {sorted(batch)})")
        return batch["input_ids"], batch.get("labels"), batch.get("attention_mask")
    if isinstance(batch, (list, tuple)) and len(batch) in (1, 2):
        return batch[0], batch[1] if len(batch) == 2 else None, None
    return batch, None, None


def _scheduler_state(s: Any) -> Any:
    if s is None:
        return None
    st = s.state_dict()
    try:
        json.dumps(st)
    except TypeError:
        raise ValueError(f"the state of {type(s).__name__} does not serialise to JSON; "
                         "lema saves checkpoints without pickle") from None
    return st


def _tensor_bytes(t: Any) -> Tuple[str, List[int], bytes]:
    import torch

    t = t.detach().to("cpu").contiguous()
    name = str(t.dtype).replace("torch.", "")
    if name not in _TORCH_TO_ST:
        raise ValueError(f"optimizer state of dtype {t.dtype} cannot be saved")
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return _TORCH_TO_ST[name], list(t.shape), raw.numpy().tobytes()


def _torch_state(optimizer: Any, model: Any) -> Tuple[List[Any], Dict[str, Any]]:
    """A torch optimizer's state_dict as safetensors tensors (``state.<i>.<name>``) and
    JSON (param_groups, non-tensor state, the PEFT key of each parameter index)."""
    import torch

    sd = optimizer.state_dict()
    names = [n for n, _ in model.named_parameters("torch")]
    tensors, scalars = [], {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                dt, shape, raw = _tensor_bytes(v)
                tensors.append((f"state.{idx}.{k}", dt, shape, raw))
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = []
    for g in sd["param_groups"]:
        g2 = {}
        for k, v in g.items():
            g2[k] = float(v) if isinstance(v, torch.Tensor) else (list(v) if isinstance(v, tuple) else v)
        groups.append(g2)
    meta = {"class": type(optimizer).__module__ + "." + type(optimizer).__qualname__,
            "param_groups": groups, "scalar_state": scalars, "param_names": names}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise ValueError(f"the optimizer's state holds values that do not serialise to JSON ({e})") from None
    return tensors, meta


def _load_torch_state(optimizer: Any, model: Any, directory: str) -> None:
    import torch
    from . import _lema

    with open(os.path.join(directory, TORCH_META), encoding="utf-8") as f:
        meta = json.load(f)
    cls = type(optimizer).__module__ + "." + type(optimizer).__qualname__
    if meta.get("class") != cls:
        raise ValueError(f"{directory} holds the state of {meta.get('class')}; this trainer's optimizer is {cls}")
    names = [n for n, _ in model.named_parameters("torch")]
    if meta.get("param_names") != names:
        raise ValueError(f"{directory}: the optimizer state is for other parameters (another model or adapter)")
    tensors, _ = _lema.load_safetensors(os.path.join(directory, TORCH_STATE))
    dtypes = {v: getattr(torch, k) for k, v in _TORCH_TO_ST.items()}
    state: Dict[int, Dict[str, Any]] = {}
    for name, dt, shape, raw in tensors:
        _, idx, key = name.split(".", 2)
        t = torch.frombuffer(bytearray(raw), dtype=dtypes[dt]) if raw else torch.empty(0, dtype=dtypes[dt])
        state.setdefault(int(idx), {})[key] = t.reshape(shape).clone()
    for idx, sc in meta.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})

