"""Bottleneck (feed-forward) adapters: the QPA member (``QPABottleneckConfig``, PEFT type ``QPA_BOTTLENECK``: the
adapter tensors generated) and its classical baseline (``BottleneckConfig``, PEFT type ``BOTTLENECK``). See
``docs/bottleneck.md``."""

from .adapter import ACTIVATIONS, MERGE_ERROR, PLACEMENTS, BottleneckSettings, bottleneck_branch, infer_widths
from .config import BottleneckConfig, QPABottleneckConfig
from .layer import BottleneckLayer, QPABottleneckLayer
from .model import BottleneckModel, QPABottleneckModel

__all__ = [
    "ACTIVATIONS",
    "MERGE_ERROR",
    "PLACEMENTS",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckModel",
    "BottleneckSettings",
    "QPABottleneckConfig",
    "QPABottleneckLayer",
    "QPABottleneckModel",
    "bottleneck_branch",
    "infer_widths",
]
