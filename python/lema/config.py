"""``LemaConfig`` and ``MemoryStrategy``: what a model is built from, with the guide's
keyword arguments."""

from __future__ import annotations

import difflib
import enum
import json
import os
from typing import Any, Dict, Optional

CONFIG_NAME = "lema_config.json"


class MemoryStrategy(str, enum.Enum):
    """How the frozen base weights are kept between uses."""

    #: Disk -> pinned RAM -> VRAM, one layer at a time; the least memory (default).
    STREAMING = "streaming"
    #: Every layer decoded once into (pinned) host RAM, then copied to the device as needed.
    RESIDENT = "resident"
    #: As many layers as ``max_vram_gb`` allows stay on the GPU; the rest stream.
    BUDGET = "budget"


_DTYPES = {
    "bfloat16": "bf16", "bf16": "bf16",
    "float16": "f16", "f16": "f16", "half": "f16",
    "float32": "f32", "f32": "f32", "float": "f32",
}

# name -> default; the order is the signature's
_DEFAULTS: Dict[str, Any] = {
    "model_name_or_path": None,
    "gbi_path": None,
    "lora_rank": 16,
    "lora_alpha": 32.0,
    "lora_dropout": 0.0,
    "lora_target_modules": None,
    "use_rslora": False,
    "gradient_checkpointing": True,
    "strategy": MemoryStrategy.STREAMING,
    "device": "auto",
    "dtype": None,
    "max_vram_gb": None,
    "max_host_memory_gb": None,
    "weight_source": "auto",
    "prefetch_distance": 2,
    "offload_activations": False,
    "offload_activations_half": False,
    "offload_optimizer": False,
    "seq_tile": None,
    "step_graphs": True,
    "seed": 42,
    "revision": None,
    "adapter_path": None,
}


def _dtype_name(dtype: Any) -> Optional[str]:
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(
            f"dtype {dtype!r} is not supported; use 'bfloat16', 'float16' or 'float32'"
        )
    return {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[_DTYPES[name]]


class LemaConfig:
    """Everything a ``LemaModel`` is built from.

    model_name_or_path: a Hugging Face Hub id (``org/name``) or a local folder holding
        ``config.json`` and the tokenizer files; optional when they lie beside ``gbi_path``.
    gbi_path: the monolithic ``.safetensors`` file that
        ``lema.utils.model_utils.prepare_monolithic_safetensors`` (or ``lema prepare``) wrote.
    lora_rank, lora_alpha, lora_dropout, lora_target_modules, use_rslora: the adapter, with
        PEFT's semantics; ``lora_target_modules=None`` takes the architecture's default
        (Llama: ``["q_proj", "v_proj"]``, GPT-2: ``["c_attn"]``); ``["all-linear"]`` adapts
        every linear of every block.
    gradient_checkpointing: re-run each block's forward in the backward (the memory of one
        block instead of all); ``False`` keeps every block's activations; ``"auto"`` keeps
        those of as many blocks as the free (GPU, or on the CPU host) memory holds and
        re-runs the rest: the speed of ``False`` when the model fits, and still training
        when it does not.
    strategy: a ``MemoryStrategy`` (or its name).
    device: ``"auto"`` (CUDA when usable, else the CPU), ``"cuda"`` or ``"cpu"``.
    dtype: the GPU's compute type for weights stored as float32 (``"bfloat16"``, ...).
    max_vram_gb: ``MemoryStrategy.BUDGET``: GPU memory (GB, 10^9 bytes) for resident layers.
    max_host_memory_gb: the most host memory (GB) the process may use, besides its cgroup
        limit and what the system has available (which always count). STREAMING keeps
        the layers that do not fit in the file and reads them from disk at each use;
        RESIDENT and pinned allocations that would exceed it are refused.
    weight_source: where STREAMING takes the frozen layers from on the host: ``"auto"``
        (the mapped file when they fit the host budget, else RAM for as many as fit and
        disk for the rest), ``"mapped"`` or ``"disk"`` (all through the staging ring).
    prefetch_distance: layers copied ahead of the one in use (CUDA).
    offload_activations, offload_optimizer: keep the saved block inputs / the engine
        optimizer's moments in pinned host memory instead of on the GPU.
    offload_activations_half: with ``offload_activations``, park the block inputs in the
        weights' half type (bf16/f16) instead of float32: half the host memory; the
        backward re-runs each block from its rounded input.
    seq_tile: tokens per sequence tile: a block's norms, projections, RoPE, MLP and
        residual run over this many tokens at a time (attention over the whole sequence),
        so their memory is one tile's; ``None``: on a GPU 8192 tokens, fewer when the
        free GPU memory asks (sequences up to 8192 tokens untiled); ``0`` never tiles.
        Same results up to float rounding of the LoRA gradients' sums.
    step_graphs: on CUDA with every layer on the GPU, capture a training step as a CUDA
        graph once its shape repeats and replay it for the next steps (the same results,
        one launch a step); ``False`` runs every step eagerly (so does the environment
        variable ``LEMA_CUDA_GRAPHS=0``).
    seed: seeds the LoRA initialisation and the dropout masks.
    revision: the Hub revision (branch, tag or commit) of ``model_name_or_path``.
    adapter_path: start from this PEFT adapter folder instead of a fresh initialisation.
    """

    __slots__ = tuple(_DEFAULTS)

    def __init__(self, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in _DEFAULTS:
                close = difflib.get_close_matches(key, list(_DEFAULTS), n=1, cutoff=0.5)
                hint = f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(_DEFAULTS)}"
                raise TypeError(f"LemaConfig() got an unexpected keyword argument '{key}'{hint}")
        for key, default in _DEFAULTS.items():
            value = kwargs.get(key, default)
            if isinstance(default, list):
                value = list(value)
            object.__setattr__(self, key, value)
        self._validate()

    def _validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"LemaConfig: {msg}")

        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"LemaConfig: {name} must be an integer, got {type(v).__name__}")
            need(v >= low, f"{name} must be at least {low}, got {v}")

        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"LemaConfig: {name} must be a number, got {type(v).__name__}")
            return float(v)

        def flag(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LemaConfig: {name} must be True or False")

        for name in ("model_name_or_path", "gbi_path", "adapter_path", "revision"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise TypeError(f"LemaConfig: {name} must be a path or string, got {type(v).__name__}")
            if isinstance(v, os.PathLike):
                object.__setattr__(self, name, os.fspath(v))
        need(self.model_name_or_path is not None or self.gbi_path is not None,
             "give gbi_path (the monolithic .safetensors file) and/or model_name_or_path")
        integer("lora_rank", 1)
        need(number("lora_alpha") > 0, f"lora_alpha must be positive, got {self.lora_alpha}")
        need(0.0 <= number("lora_dropout") < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        t = self.lora_target_modules
        if t is not None:
            if isinstance(t, str):
                t = [t]
            if not isinstance(t, (list, tuple)) or not all(isinstance(x, str) for x in t) or not t:
                raise TypeError("LemaConfig: lora_target_modules must be a non-empty list of module names")
            object.__setattr__(self, "lora_target_modules", list(t))
        for name in ("use_rslora", "offload_activations", "offload_activations_half",
                     "offload_optimizer", "step_graphs"):
            flag(name)
        g = self.gradient_checkpointing
        if isinstance(g, str) and g.lower() == "auto":
            object.__setattr__(self, "gradient_checkpointing", "auto")
        elif not isinstance(g, bool):
            raise TypeError(
                f"LemaConfig: gradient_checkpointing must be True, False or \"auto\", got {g!r}")
        try:
            object.__setattr__(self, "strategy", MemoryStrategy(getattr(self.strategy, "value", self.strategy)))
        except ValueError:
            raise ValueError(
                f"LemaConfig: strategy {self.strategy!r} is not one of "
                f"{', '.join(s.name for s in MemoryStrategy)}"
            ) from None
        need(self.device in ("auto", "cuda", "cpu") or str(self.device) in ("cuda:0",),
             f"device must be 'auto', 'cuda' or 'cpu', got {self.device!r}")
        object.__setattr__(self, "device", str(self.device).replace("cuda:0", "cuda"))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if self.max_vram_gb is not None:
            need(number("max_vram_gb") > 0, f"max_vram_gb must be positive, got {self.max_vram_gb}")
        if self.max_host_memory_gb is not None:
            need(number("max_host_memory_gb") > 0,
                 f"max_host_memory_gb must be positive, got {self.max_host_memory_gb}")
        need(self.weight_source in ("auto", "mapped", "disk"),
             f"weight_source must be 'auto', 'mapped' or 'disk', got {self.weight_source!r}")
        integer("prefetch_distance", 1)
        if self.seq_tile is not None:
            integer("seq_tile", 0)
        integer("seed", 0)

    def __setattr__(self, key: str, value: Any) -> None:
        if key not in _DEFAULTS:
            close = difflib.get_close_matches(key, list(_DEFAULTS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise AttributeError(f"LemaConfig has no field '{key}'{hint}")
        old = getattr(self, key)
        object.__setattr__(self, key, value)
        try:
            self._validate()
        except Exception:
            object.__setattr__(self, key, old)
            raise

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain JSON values (the strategy by its value)."""
        d = {k: getattr(self, k) for k in _DEFAULTS}
        d["strategy"] = self.strategy.value
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LemaConfig":
        return cls(**d)

    def save_pretrained(self, directory: "str | os.PathLike[str]") -> str:
        """Write ``lema_config.json`` into ``directory`` (atomically); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, path: "str | os.PathLike[str]", **overrides: Any) -> "LemaConfig":
        """Read ``lema_config.json`` from a folder (or the file itself); keyword arguments
        override its fields."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: no {CONFIG_NAME} (written by LemaConfig.save_pretrained)")
        with open(file, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{file}: not a LemaConfig (a JSON object is expected)")
        d.update(overrides)
        return cls(**d)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LemaConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in _DEFAULTS if getattr(self, k) != _DEFAULTS[k])
        return f"LemaConfig({fields})"


def _signature() -> Any:
    import inspect

    params = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in _DEFAULTS.items()]
    return inspect.Signature(params)


LemaConfig.__init__.__signature__ = _signature()  # type: ignore[attr-defined]


def engine_config(config: LemaConfig, model_path: str, config_path: Optional[str]) -> str:
    """The engine's configuration (lema's Rust ``LemaConfig``) as JSON."""
    d: Dict[str, Any] = {
        "model_path": model_path,
        "config_path": config_path,
        "gbi_path": None,
        "lora_rank": config.lora_rank,
        "lora_alpha": float(config.lora_alpha),
        "lora_dropout": float(config.lora_dropout),
        "lora_target_modules": config.lora_target_modules,
        "use_rslora": config.use_rslora,
        "strategy": config.strategy.value,
        "gradient_checkpointing": config.gradient_checkpointing,
        "dtype": _DTYPES[config.dtype] if config.dtype else None,
        "device": config.device,
        "seed": config.seed,
        "adapter_path": config.adapter_path,
        "max_vram": int(config.max_vram_gb * 1e9) if config.max_vram_gb is not None else None,
        "max_host_memory": (int(config.max_host_memory_gb * 1e9)
                            if config.max_host_memory_gb is not None else None),
        "weight_source": config.weight_source,
        "prefetch_depth": config.prefetch_distance,
        "offload_activations": config.offload_activations,
        "offload_activations_half": config.offload_activations_half,
        "offload_optimizer": config.offload_optimizer,
        "seq_tile": config.seq_tile,
        "step_graphs": config.step_graphs,
        "profile": False,
    }
    return json.dumps(d)

