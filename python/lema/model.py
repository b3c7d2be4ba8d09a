"""``LemaModel``: a base model (memory-mapped, streamed through the device) with LoRA
adapters whose masters and gradients are engine memory shared with torch or numpy."""

from __future__ import annotations

import os
import warnings
from typing import Any, List, Optional, Sequence, Tuple, Union

from . import _arrays, _lema, hub
from .config import CONFIG_NAME, LemaConfig, engine_config


def _resolve_files(config: LemaConfig) -> Tuple[str, Optional[str], str]:
    """(weights file, config.json or None for the one beside it, tokenizer folder).

    The folder of ``model_name_or_path`` gives config.json and the tokenizer when it is a
    local folder that has them; otherwise they are the ones ``prepare`` wrote beside
    ``gbi_path``, and only when those are missing does a Hub id go to the Hub (for the
    config and tokenizer files alone)."""
    src = config.model_name_or_path
    weights = config.gbi_path
    local = src is not None and os.path.isdir(src)
    if src is not None and not local and os.path.exists(src):
        raise ValueError(f"model_name_or_path {src!r} is a file; give the folder with config.json "
                         f"(or a Hub id), and the monolithic .safetensors as gbi_path")
    if weights is None:
        prepared = os.path.join(src, "model.safetensors") if local else None
        if prepared and os.path.isfile(prepared) and os.path.isfile(os.path.join(src, "config.json")):
            weights = prepared
        else:
            raise ValueError(
                "LemaConfig: gbi_path is not set; prepare the monolithic file first with "
                f"lema.utils.model_utils.prepare_monolithic_safetensors({src!r}, 'model.safetensors') "
                "and pass gbi_path='model.safetensors'"
            )
    if not os.path.exists(weights):
        hint = f"; write it with prepare_monolithic_safetensors({src!r}, {weights!r})" if src else ""
        raise FileNotFoundError(f"gbi_path {weights}: no such file{hint}")
    beside = os.path.dirname(os.path.abspath(weights))
    if local and os.path.isfile(os.path.join(src, "config.json")):
        return weights, os.path.join(src, "config.json"), src
    if os.path.isfile(os.path.join(beside, "config.json")) or src is None or local:
        return weights, None, beside
    folder = hub.snapshot(src, revision=config.revision, weights=False)
    return weights, os.path.join(folder, "config.json"), folder


class LemaModel:
    """A model ready for LoRA training (the guide's ``LemaModel``)."""

    def __init__(self, config: LemaConfig) -> None:
        if not isinstance(config, LemaConfig):
            raise TypeError(f"LemaModel(config) takes a LemaConfig, got {type(config).__name__}")
        self.config = config
        weights, cfg_json, self._tokenizer_dir = _resolve_files(config)
        self._engine = _lema.Engine(engine_config(config, weights, cfg_json))
        # what the model's config asks that lema does not do (e.g. GPT-2's dropouts)
        for note in self._engine.model_notes:
            warnings.warn(note, stacklevel=2)
        self._tokenizer: Optional[Any] = None
        self._views: Optional[List[Tuple[str, Any, Any]]] = None
        self._views_kind: Optional[str] = None

    # ---- lifecycle ---------------------------------------------------------------
    def close(self) -> None:
        """Release the model. Its weights file, staging buffers and device memory are
        freed once no tensor from ``get_trainable_parameters()`` is alive any more."""
        self._views = None
        self._engine.close()

    def __enter__(self) -> "LemaModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"`` (what ``device="auto"`` chose)."""
        return self._engine.device

    @property
    def device_note(self) -> Optional[str]:
        return self._engine.device_note

    # ---- adapters ----------------------------------------------------------------
    def initialize_lora(self) -> None:
        """Fresh adapters as PEFT makes them (A kaiming-uniform from the seed, B zeros).
        Parameters taken earlier no longer belong to the model."""
        self._engine.initialize_lora()
        self._views = None

    def _tensors(self, framework: str) -> List[Tuple[str, Any, Any]]:
        if self._views is not None and self._views_kind == framework:
            return self._views
        bufs = self._engine.buffers()
        if not bufs:
            raise ValueError("LoRA is not initialised: call model.initialize_lora() first")
        views = []
        for name, _shape, param, grad in bufs:
            if framework == "torch":
                import torch

                p = torch.from_dlpack(param)
                p.requires_grad_(True)
                g = torch.from_dlpack(grad)
            else:
                import numpy as np

                p, g = np.from_dlpack(param), np.from_dlpack(grad)
            views.append((name, p, g))
        self._views, self._views_kind = views, framework
        return views

    def get_trainable_parameters(self, framework: Optional[str] = None) -> List[Any]:
        """The LoRA masters, in a fixed order: torch tensors (leaf, ``requires_grad``)
        when torch is installed, else numpy arrays (``framework="numpy"`` asks for them).
        They are the engine's memory: an optimizer's in-place update is the engine's."""
        if framework is None:
            framework = "torch" if _arrays.torch is not None else "numpy"
        if framework not in ("torch", "numpy"):
            raise ValueError(f"framework must be 'torch' or 'numpy', got {framework!r}")
        if framework == "torch" and _arrays.torch is None:
            raise ImportError("torch is not installed; use framework='numpy' (the engine's own optimizer)")
        return [p for _, p, _ in self._tensors(framework)]

    def named_parameters(self, framework: Optional[str] = None) -> List[Tuple[str, Any]]:
        """(PEFT key, parameter) pairs, in ``get_trainable_parameters()`` order."""
        params = self.get_trainable_parameters(framework)
        return [(n, p) for (n, _, _), p in zip(self._views or [], params)]

    def gradients(self, framework: Optional[str] = None) -> List[Any]:
        """The engine's gradient buffers (shared memory), in parameter order."""
        self.get_trainable_parameters(framework)
        return [g for _, _, g in self._views or []]

    def _attach_grads(self) -> None:
        """Make each torch parameter's ``.grad`` the engine's buffer again (an optimizer's
        ``zero_grad()`` sets it to None)."""
        if self._views_kind == "torch":
            for _, p, g in self._views or []:
                if p.grad is None or p.grad.data_ptr() != g.data_ptr():
                    p.grad = g

    def num_trainable_parameters(self) -> int:
        return self._engine.trainable_parameters()

    def get_trainer(self, optimizer: Any = None, **kwargs: Any) -> "Any":
        """A ``LemaTrainer`` over this model; ``optimizer`` None runs lema's own AdamW in
        the engine (keyword arguments: see ``LemaTrainer``)."""
        from .trainer import LemaTrainer

        return LemaTrainer(self, optimizer, **kwargs)

    # ---- saving ------------------------------------------------------------------
    def save_pretrained(self, directory: "str | os.PathLike[str]") -> None:
        """The adapter in PEFT's format (``adapter_model.safetensors``,
        ``adapter_config.json``; ``peft.PeftModel.from_pretrained`` loads it) and
        ``lema_config.json``."""
        self._engine.save_adapter(os.fspath(directory))
        self.config.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: "str | os.PathLike[str]", **overrides: Any) -> "LemaModel":
        """A model with the adapter saved by ``save_pretrained`` (or a checkpoint folder);
        keyword arguments override the saved ``LemaConfig`` (e.g. ``gbi_path`` when the
        model file moved, ``device``)."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no such folder")
        if not os.path.exists(os.path.join(directory, CONFIG_NAME)):
            if "gbi_path" not in overrides and "model_name_or_path" not in overrides:
                raise ValueError(f"{directory} has no {CONFIG_NAME}; pass gbi_path= (and model_name_or_path=) "
                                 "to say which base model the adapter belongs to")
            config = LemaConfig(**overrides, adapter_path=directory)
        else:
            config = LemaConfig.from_pretrained(directory, **overrides)
            config.adapter_path = directory
        return cls(config)

    # ---- inference ---------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (``encode``, ``decode``, ``eos_token_id``)."""
        if self._tokenizer is None:
            self._tokenizer = _lema.Tokenizer(self._tokenizer_dir)
        return self._tokenizer

    def generate(self, prompt: Union[str, Sequence[str], Any], max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: int = 0, stop_at_eos: bool = True) -> Any:
        """Continue a text (or a list of texts: returns str / list of str) or token ids
        (1-D or 2-D: returns a list of ids / a list of lists), greedily by default, with
        the adapter applied."""
        texts = [prompt] if isinstance(prompt, str) else prompt
        if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
            rows = [self.tokenizer.encode(t) for t in texts]
        else:
            ids, _, b, t = _arrays.batch(prompt, device=self.device)
            import numpy as np

            rows = np.frombuffer(ids, dtype="<i8").reshape(b, t).tolist()
            texts = None
        stop = [self.tokenizer.eos_token_id] if stop_at_eos and self._tokenizer_has_eos() else []
        out = self._engine.generate(rows, max_new_tokens, temperature, top_k, top_p, seed, stop)
        tokens = [t for t, _ in out]
        if texts is not None:
            decoded = [self.tokenizer.decode(t) for t in tokens]
            return decoded[0] if isinstance(prompt, str) else decoded
        one_d = (_arrays.is_torch(prompt) and prompt.dim() == 1) or (
            isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], (list, tuple))
        ) or getattr(prompt, "ndim", 2) == 1
        return tokens[0] if one_d else tokens

    def _tokenizer_has_eos(self) -> bool:
        try:
            return self.tokenizer.eos_token_id is not None
        except (FileNotFoundError, ValueError):
            return False

    def __repr__(self) -> str:
        state = "closed" if self._engine.closed else self.device
        return f"LemaModel({self.config.gbi_path or self.config.model_name_or_path}, {state})"

