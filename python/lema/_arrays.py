"""Token ids and labels from torch tensors, numpy arrays or (nested) lists, checked and
turned into the little-endian int64 bytes the engine reads; and the engine's float32
bytes back into arrays."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

try:  # torch is optional: without it the engine's own optimizer runs
    import torch
except ImportError:  # pragma: no cover - exercised by the no-torch test
    torch = None  # type: ignore[assignment]


def is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _as_int_matrix(x: Any, what: str, device: Optional[str]) -> np.ndarray:
    if is_torch(x):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{what} must hold integer token ids, got a tensor of {x.dtype}")
        if x.device.type == "cuda" and device is not None and device.startswith("cuda"):
            if x.device.index not in (None, 0):
                raise ValueError(f"{what} is on {x.device}, but the model is on cuda:0; move it with .to('cuda:0')")
        elif x.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{what} is on {x.device}; lema reads CPU or CUDA tensors")
        arr = x.detach().to("cpu", torch.int64).numpy()
    else:
        if isinstance(x, (str, bytes)):
            raise TypeError(f"{what} must be token ids (a tensor, array or list of ints), got {type(x).__name__}")
        try:
            arr = np.asarray(x)
        except ValueError as e:
            raise ValueError(f"{what}: rows of different lengths? pad them to one length ({e})") from None
        if arr.dtype == object:
            raise ValueError(f"{what}: rows of different lengths, or values that are not numbers; pad rows to one length")
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integer token ids, got values of type {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 1-D [seq] or 2-D [batch, seq], got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(arr.shape)})")
    return np.ascontiguousarray(arr, dtype="<i8")


def batch(input_ids: Any, labels: Any = None, attention_mask: Any = None,
          device: Optional[str] = None) -> Tuple[bytes, Optional[bytes], int, int]:
    """(ids bytes, labels bytes or None, batch, seq). Labels follow transformers: the
    label at t is the token at t (the engine shifts), -100 is ignored; None means the ids
    themselves. Positions where ``attention_mask`` is 0 count as ignored (right padding
    only: a row whose mask goes 0 then 1 is refused)."""
    ids = _as_int_matrix(input_ids, "input_ids", device)
    lab = None if labels is None else _as_int_matrix(labels, "labels", device)
    if lab is not None and lab.shape != ids.shape:
        raise ValueError(f"labels have shape {tuple(lab.shape)}, input_ids {tuple(ids.shape)}; they must match")
    if attention_mask is not None:
        mask = _as_int_matrix(attention_mask, "attention_mask", device)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}; they must match")
        if ((mask[:, 1:] != 0) & (mask[:, :-1] == 0)).any():
            raise ValueError("attention_mask has padding before real tokens (left padding); lema needs right padding")
        lab = np.where(mask != 0, ids if lab is None else lab, -100).astype("<i8")
    if (ids < 0).any():
        raise ValueError(f"input_ids hold {int(ids.min())}, which is not a token id (ids are 0 or more)")
    return ids.tobytes(), None if lab is None else lab.tobytes(), int(ids.shape[0]), int(ids.shape[1])


def float_array(data: bytes, shape: Tuple[int, ...], like_torch: bool, device: str) -> Any:
    arr = np.frombuffer(data, dtype="<f4").reshape(shape)
    if like_torch and torch is not None:
        t = torch.from_numpy(arr.copy())
        return t.to(device) if device != "cpu" else t
    return arr
