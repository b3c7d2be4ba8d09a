"""Utilities of the guide: ``lema.utils.model_utils.prepare_monolithic_safetensors``."""

from .model_utils import prepare_monolithic_safetensors

__all__ = ["prepare_monolithic_safetensors"]
