"""lema: LoRA fine-tuning of large language models whose frozen weights stream through
the GPU one layer at a time (disk -> pinned host memory -> device memory).

The API of the LEMA user guide::

    from lema import LemaConfig, LemaModel, LemaTrainer, MemoryStrategy

The engine is Rust (``lema._lema``); the LoRA parameters that
``LemaModel.get_trainable_parameters()`` returns *are* the engine's memory (DLPack), so a
torch optimizer updates them in place.
"""

from ._lema import __version__
from .config import LemaConfig, MemoryStrategy
from .model import LemaModel
from .trainer import LemaTrainer
from . import utils

__all__ = ["LemaConfig", "LemaModel", "LemaTrainer", "MemoryStrategy", "utils", "__version__"]
