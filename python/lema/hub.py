"""Models from the Hugging Face Hub, in the standard cache shared with huggingface_hub."""

from __future__ import annotations

from typing import Optional

from . import _lema


def snapshot(repo_id: str, revision: Optional[str] = None, weights: bool = True, progress: bool = True) -> str:
    """The local snapshot folder of Hub repository ``repo_id`` (``org/name``, optionally
    ``@revision``), downloading what is missing: config, tokenizer files and, with
    ``weights``, the safetensors files. Honours HF_HOME, HF_HUB_CACHE, HF_ENDPOINT,
    HF_TOKEN and HF_HUB_OFFLINE."""
    fetch = getattr(_lema, "hub_snapshot", None)
    if fetch is None:
        raise FileNotFoundError(f"{repo_id}: no such file or folder (this build of lema cannot download from the Hub)")
    return fetch(repo_id, revision, weights, progress)
