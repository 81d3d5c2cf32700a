"""QPA tuner layers: LoRA layers whose A/B come from the adapter's shared generator.

A layer holds no trainable parameter. Its ``qpa_lora_A``/``qpa_lora_B`` buffers are a snapshot of the
last generated matrices: they are saved with the adapter (so a reload reproduces outputs exactly and
``export_lora`` needs no quantum software) and they serve every forward that needs no gradient while
the generator's parameters are unchanged. During training each forward uses the generator's live
output, computed once per forward of the whole model (see :class:`~peft_qpa.tuners.base.QPABaseModel`).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import nn

from ..base import GeneratedTensor, QPABaseLayer


class QPALayer(QPABaseLayer):
    """A LoRA layer (A: r x in, B: out x r) whose A and B are generated."""

    other_param_names = QPABaseLayer.GENERIC_STATE + ("qpa_lora_A", "qpa_lora_B", "qpa_dropout", "r", "lora_alpha", "scaling")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        QPABaseLayer.__init__(self, base_layer, **kwargs)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.qpa_dropout = nn.ModuleDict({})
        self.qpa_lora_A = BufferDict({}, persistent=True)
        self.qpa_lora_B = BufferDict({}, persistent=True)
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, inference_mode: bool = False) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.qpa_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.add_generated(adapter_name, [
            GeneratedTensor("lora_A", (r, self.in_features), "kaiming_uniform", "qpa_lora_A"),
            GeneratedTensor("lora_B", (self.out_features, r), "zeros", "qpa_lora_B"),
        ])
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B for this forward: the generator's live output, or the (fresh) snapshot."""
        tensors = self.generated(adapter_name)
        return tensors["lora_A"], tensors["lora_B"]

    def _delta(self, lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        compute_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        if not compute_dtype.is_floating_point:
            compute_dtype = lora_a.dtype
        delta = transpose(lora_b.to(compute_dtype) @ lora_a.to(compute_dtype), self.fan_in_fan_out)
        return (delta * self.scaling[adapter_name]).to(dtype if dtype.is_floating_point else compute_dtype)

    def _snapshot(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = self.snapshot(adapter_name)
        return tensors["lora_A"], tensors["lora_B"]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout (transposed for fan_in_fan_out) and dtype."""
        lora_a, lora_b = self._snapshot(adapter_name)
        return self._delta(lora_a, lora_b, adapter_name, self.get_base_layer().weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # The delta is exactly rank r: peft.convert_to_lora recovers the generated LoRA.
        return True


class Linear(nn.Module, QPALayer):
    """QPA on ``torch.nn.Linear`` or transformers' ``Conv1D`` (with ``fan_in_fan_out``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 4,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        is_target_conv_1d_layer: bool = False,
        inference_mode: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        QPALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, inference_mode=inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for active_adapter in adapter_names:
            if not self.has_qpa_adapter(active_adapter):
                continue
            lora_a, lora_b = (t.detach().clone() for t in self._snapshot(active_adapter))
            weight = self.get_base_weight()
            delta = self._delta(lora_a, lora_b, active_adapter, weight.dtype)
            if safe_merge:
                merged = weight.clone() + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {active_adapter} seems to be broken")
                self.set_base_weight(merged)
            else:
                weight += delta
                self.set_base_weight(weight)
            self._qpa_merged[active_adapter] = (lora_a, lora_b)
            self.merged_adapters.append(active_adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            active_adapter = self.merged_adapters.pop()
            merged = self._qpa_merged.pop(active_adapter, None)
            if not self.has_qpa_adapter(active_adapter):
                continue
            lora_a, lora_b = merged if merged is not None else self._snapshot(active_adapter)
            weight = self.get_base_weight()
            weight -= self._delta(lora_a, lora_b, active_adapter, weight.dtype)
            self.set_base_weight(weight)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        torch_result_dtype = result.dtype
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for active_adapter in self.active_adapters:
            if not self.has_qpa_adapter(active_adapter):
                continue
            lora_a, lora_b = self._lora_weights(active_adapter)
            dropout = self.qpa_dropout[active_adapter]
            x_cast = self._cast_input_dtype(x, lora_a.dtype)
            lora_a, lora_b = lora_a.to(x_cast.dtype), lora_b.to(x_cast.dtype)
            delta = nn.functional.linear(nn.functional.linear(dropout(x_cast), lora_a), lora_b)
            result = result + delta * self.scaling[active_adapter]
        return result.to(torch_result_dtype)

    def __repr__(self) -> str:
        return "qpa." + super().__repr__()
