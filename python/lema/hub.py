"""Models from the Hugging Face Hub, in the standard cache shared with huggingface_hub."""

from __future__ import annotations

from typing import Optional

from . import _lema


def snapshot(repo_id: str, revision: Optional[str] = None, weights: bool = True, progress: bool = True) -> str:
    """The local snapshot folder of Hub repository ``repo_id`` (``org/name``, optionally
    ``@revision``), downloading what is missing: config, tokenizer files and, with
    ``weights``, the safetensors files. Honours HF_HOME, HF_HUB_CACHE, HF_ENDPOINT,
    HF_TOKEN and HF_HUB_OFFLINE."""
    return str(_lema.hub_snapshot(repo_id, revision, weights, progress))
