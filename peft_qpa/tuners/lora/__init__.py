"""QPA-LoRA and QPA-DoRA: LoRA (and DoRA) adapters whose tensors are generated."""

from .config import QPAConfig
from .layer import QPALayer
from .model import QPAModel

__all__ = ["QPAConfig", "QPALayer", "QPAModel"]
