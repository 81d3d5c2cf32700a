"""The bottleneck adapter layers: :class:`QPABottleneckLayer` (tensors from the adapter's generator) and
:class:`BottleneckLayer` (the classical baseline: the same tensors as ``nn.Linear`` parameters). Both wrap a target
(a Linear, an MLP block, an attention block, ...) and run :class:`~.adapter.BottleneckForwardMixin`'s forward."""

from __future__ import annotations

import math
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..base import QPABaseLayer, TensorNames
from .adapter import TENSOR_NAMES, BottleneckForwardMixin, BottleneckSettings

# How the generator initialises each tensor with init_weights=True (see QPAGenerator: T_init + f(θ) - f(θ_0)).
# "kaiming_uniform" has bound 1/sqrt(last dim) = 1/sqrt(d) for the down weight (b x d): nn.Linear's default.
GENERATED_INIT = {"down_weight": "kaiming_uniform", "down_bias": "zeros", "up_weight": "zeros", "up_bias": "zeros"}


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p=p) if p > 0 else nn.Identity()


class QPABottleneckLayer(BottleneckForwardMixin, QPABaseLayer, nn.Module):
    """A target followed by QPA bottleneck adapters: ``down_weight``, ``down_bias``, ``up_weight``, ``up_bias`` are
    declared to the adapter's generator; their snapshots (``qpa_bottleneck_<name>``) are saved with the adapter and
    serve every forward that needs no gradient."""

    # The generated tensors (their names are also the keys of bottleneck_tensors()) and their snapshot buffers.
    SNAPSHOTS = {name: TensorNames(name, f"qpa_bottleneck_{name}") for name in TENSOR_NAMES}
    other_param_names = QPABaseLayer.GENERIC_STATE + tuple(names.buffer for names in SNAPSHOTS.values()) + (
        "qpa_bottleneck_dropout",
        "bottleneck_settings",
    )

    def __init__(self, base_layer: nn.Module, adapter_name: str, settings: BottleneckSettings, dropout: float = 0.0,
                 inference_mode: bool = False, **kwargs) -> None:
        nn.Module.__init__(self)
        QPABaseLayer.__init__(self, base_layer, **kwargs)
        self.qpa_bottleneck_dropout = nn.ModuleDict({})
        self.bottleneck_settings: dict[str, BottleneckSettings] = {}
        self._active_adapter = adapter_name
        self._set_features(settings)
        self.update_layer(adapter_name, settings, dropout=dropout, inference_mode=inference_mode)

    def update_layer(self, adapter_name: str, settings: BottleneckSettings, dropout: float = 0.0,
                     inference_mode: bool = False) -> None:
        self.bottleneck_settings[adapter_name] = settings
        self.qpa_bottleneck_dropout[adapter_name] = _dropout(dropout)
        shapes = settings.shapes()
        tensors = [self.SNAPSHOTS[name].declare(shape, GENERATED_INIT[name]) for name, shape in shapes.items()]
        self._finish_update(adapter_name, tensors, inference_mode=inference_mode)

    def _has_bottleneck(self, adapter_name: str) -> bool:
        return self.has_qpa_adapter(adapter_name)

    def _bottleneck_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return self.generated(adapter_name)

    def _bottleneck_dropout(self, adapter_name: str) -> Optional[nn.Module]:
        return self.qpa_bottleneck_dropout[adapter_name]

    def __repr__(self) -> str:
        return "qpa_bottleneck." + super().__repr__()


class BottleneckLayer(BottleneckForwardMixin, BaseTunerLayer, nn.Module):
    """A target followed by classical bottleneck adapters: ``bottleneck_down[adapter]`` (``nn.Linear(d, b)``) and
    ``bottleneck_up[adapter]`` (``nn.Linear(b, d)``), trained directly."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_dropout", "bottleneck_settings")

    def __init__(self, base_layer: nn.Module, adapter_name: str, settings: BottleneckSettings, dropout: float = 0.0,
                 init_weights: bool = True, inference_mode: bool = False, **kwargs) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict({})
        self.bottleneck_up = nn.ModuleDict({})
        self.bottleneck_dropout = nn.ModuleDict({})
        self.bottleneck_settings: dict[str, BottleneckSettings] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self._active_adapter = adapter_name
        self._set_features(settings)
        self.update_layer(adapter_name, settings, dropout=dropout, init_weights=init_weights,
                          inference_mode=inference_mode)

    def update_layer(self, adapter_name: str, settings: BottleneckSettings, dropout: float = 0.0,
                     init_weights: bool = True, inference_mode: bool = False) -> None:
        self.bottleneck_settings[adapter_name] = settings
        self.bottleneck_dropout[adapter_name] = _dropout(dropout)
        down = nn.Linear(settings.width, settings.size)
        up = nn.Linear(settings.size, settings.width)
        if init_weights:
            # as the QPA member: nn.Linear's Kaiming-uniform down weight (bound 1/sqrt(d)), everything else zero
            with torch.no_grad():
                nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _bottleneck_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        down, up = self.bottleneck_down[adapter_name], self.bottleneck_up[adapter_name]
        return {"down_weight": down.weight, "down_bias": down.bias, "up_weight": up.weight, "up_bias": up.bias}

    def _bottleneck_dropout(self, adapter_name: str) -> Optional[nn.Module]:
        return self.bottleneck_dropout[adapter_name]

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()
