"""QPA tuner layers: LoRA layers whose A/B come from the adapter's shared generator.

A layer holds no trainable parameter. Its ``qpa_lora_A``/``qpa_lora_B`` buffers are a snapshot of the
last generated matrices: they are saved with the adapter (so a reload reproduces outputs exactly and
``export_lora`` needs no quantum software) and they serve every forward that needs no gradient while
the generator's parameters are unchanged. During training each forward uses the generator's live
output, computed once per forward of the whole model (see :class:`~peft_qpa.model.QPAModel`).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import resolve_quantization_backend
from peft.utils.other import transpose
from torch import nn

from .generator import TensorSpec


class QPALayer(BaseTunerLayer):
    # No per-layer trainable weights: the trainable state lives in the tuner's shared generator.
    adapter_layer_names: tuple[str, ...] = ()
    # Per-adapter state that delete_adapter must drop too (the generator reference, the layer's name in it,
    # and the matrices a merge added to the base weight).
    other_param_names = (
        "qpa_lora_A", "qpa_lora_B", "qpa_dropout", "r", "lora_alpha", "scaling",
        "_qpa_generators", "_qpa_module_name", "_qpa_merged",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        # Quantized base layers (bitsandbytes, HQQ, torchao): merge/unmerge read and write the base weight
        # through PEFT's backend, as VeRA and LoRA do.
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.qpa_dropout = nn.ModuleDict({})
        self.qpa_lora_A = BufferDict({}, persistent=True)
        self.qpa_lora_B = BufferDict({}, persistent=True)
        # adapter name -> the generator that fills this layer (set by QPAModel after injection). Kept in a
        # plain dict so the generator is not registered (and saved) once per layer.
        self._qpa_generators: dict[str, Any] = {}
        self._qpa_module_name: dict[str, str] = {}
        # adapter name -> (A, B) added to the base weight by merge(): unmerge subtracts exactly these, whatever
        # the generator produces by then.
        self._qpa_merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, inference_mode: bool = False) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.qpa_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        # Placeholders until the generator (built once all layers exist) writes its first snapshot.
        self.qpa_lora_A[adapter_name] = torch.zeros(r, self.in_features)
        self.qpa_lora_B[adapter_name] = torch.zeros(self.out_features, r)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def tensor_specs(self, adapter_name: str, module_name: str) -> list[TensorSpec]:
        """What this layer needs from the generator: LoRA's A (r, in) and B (out, r)."""
        r = self.r[adapter_name]
        return [
            TensorSpec(f"{module_name}.lora_A", (r, self.in_features), "kaiming_uniform"),
            TensorSpec(f"{module_name}.lora_B", (self.out_features, r), "zeros"),
        ]

    def _lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B for this forward: the generator's live output, or the (fresh) snapshot."""
        generator = self._qpa_generators.get(adapter_name)
        if generator is not None:
            live = generator.live_tensors(training=self.training)
            if live is not None:
                name = self._qpa_module_name[adapter_name]
                return live[f"{name}.lora_A"], live[f"{name}.lora_B"]
        return self.qpa_lora_A[adapter_name], self.qpa_lora_B[adapter_name]

    def _delta(self, lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        compute_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        if not compute_dtype.is_floating_point:
            compute_dtype = lora_a.dtype
        delta = transpose(lora_b.to(compute_dtype) @ lora_a.to(compute_dtype), self.fan_in_fan_out)
        return (delta * self.scaling[adapter_name]).to(dtype if dtype.is_floating_point else compute_dtype)

    def _snapshot(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's A and B as the generator produces them now (regenerated if it changed in any way)."""
        generator = self._qpa_generators.get(adapter_name)
        if generator is not None:
            generator.refresh_snapshot()
        return self.qpa_lora_A[adapter_name], self.qpa_lora_B[adapter_name]

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
            if active_adapter not in self.qpa_lora_A:
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
            if active_adapter not in self.qpa_lora_A:
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
            if active_adapter not in self.qpa_lora_A:
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
