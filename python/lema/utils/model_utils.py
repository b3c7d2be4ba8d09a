"""Model preparation (the guide's ``lema.utils.model_utils``)."""

from __future__ import annotations

import os
from typing import Optional

from .. import _lema, hub


def prepare_monolithic_safetensors(repo_id_or_path: "str | os.PathLike[str]", out_path: "str | os.PathLike[str]",
                                   device: str = "auto", *, dtype: Optional[str] = None,
                                   revision: Optional[str] = None, progress: bool = True) -> str:
    """Write the one non-sharded ``.safetensors`` file training reads, as ``lema prepare``
    does: from a Hugging Face Hub id (downloaded into the standard Hub cache, resumable),
    a local HF model folder (sharded or not) or a ``.gguf`` file. Tied weights are
    materialised; ``config.json`` and the tokenizer files go beside ``out_path``. The
    tensors stream through with bounded memory whatever the model's size, so ``device``
    (accepted for the guide's signature: ``"auto"``, ``"cpu"``, ``"cuda"``) changes
    nothing. ``dtype``: convert to ``"bf16"``, ``"f16"`` or ``"f32"`` (default: keep).
    Returns the report."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    src = os.fspath(repo_id_or_path)
    if not os.path.exists(src):
        src = hub.snapshot(src, revision=revision, weights=True, progress=progress)
    return _lema.prepare(src, os.fspath(out_path), dtype, progress)
