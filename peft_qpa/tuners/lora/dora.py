"""QPA-DoRA: PEFT's DoRA math (``peft.tuners.lora.dora``) run on generated tensors.

PEFT keeps a DoRA magnitude as the ``weight`` parameter of a ``DoraLinearLayer`` / ``DoraEmbeddingLayer`` /
``DoraConv2dLayer`` and its LoRA factors as ``nn.Linear`` / ``nn.Conv2d`` modules. In QPA all of them are generated:
the magnitude is ``m0 + Δm`` (``m0`` the norm PEFT initializes the magnitude to, ``Δm`` generated, zero at the
start) and A/B come from the generator. The classes here are PEFT's own DoRA layers whose magnitude is handed in
per call (:meth:`apply`), and :class:`Factor` presents a generated A or B the way PEFT's DoRA code reads a LoRA
module (``.weight`` and a call). The forward formulas, the detached weight norm (DoRA paper, section 4.3), the
bias handling and the layouts (fan_in_fan_out, embeddings, conv kernels) are therefore PEFT's, unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from peft.tuners.lora.dora import DoraConv2dLayer, DoraEmbeddingLayer, DoraLinearLayer


class Factor:
    """A generated LoRA factor in the form PEFT's DoRA layers use: ``.weight`` and ``factor(x)``."""

    def __init__(self, weight: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.weight = weight
        self._fn = fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x, self.weight)


class _GeneratedMagnitude:
    """Mixin for PEFT's DoRA layers: the magnitude (PEFT's ``self.weight`` parameter) is passed to each call.

    PEFT's optional DoRA cache (``peft.tuners.lora.dora.ENABLE_DORA_CACHING``) keys on the adapter name only; the
    generated tensors change at every training step, so nothing is cached here."""

    _qpa_magnitude: Optional[torch.Tensor] = None

    @property
    def weight(self) -> torch.Tensor:
        if self._qpa_magnitude is None:
            raise RuntimeError("The QPA-DoRA magnitude is only available inside apply().")
        return self._qpa_magnitude

    def _cache_store(self, key: str, value: Any) -> None:
        pass

    def _cache_get(self, key: str, default: Optional[Any]) -> Optional[Any]:
        return default

    def apply(self, magnitude: torch.Tensor, *args: Any, **kwargs: Any):
        """PEFT's DoRA ``forward`` with ``magnitude`` as the layer's magnitude vector."""
        self._qpa_magnitude = magnitude
        try:
            return self.forward(*args, **kwargs)
        finally:
            self._qpa_magnitude = None

    def weight_norm(self, weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
        """PEFT's column-wise norm of ``weight + scaling * lora_weight`` (the layout is the layer class's)."""
        return self.get_weight_norm(weight, lora_weight, scaling)


class QPADoraLinearLayer(_GeneratedMagnitude, DoraLinearLayer):
    """PEFT's ``DoraLinearLayer`` (``nn.Linear``, and transformers' ``Conv1D`` with fan_in_fan_out)."""


class QPADoraEmbeddingLayer(_GeneratedMagnitude, DoraEmbeddingLayer):
    """PEFT's ``DoraEmbeddingLayer``."""


class QPADoraConv2dLayer(_GeneratedMagnitude, DoraConv2dLayer):
    """PEFT's ``DoraConv2dLayer``."""
