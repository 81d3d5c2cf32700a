"""The delta weight, merge and unmerge of the QPA-LoRA layers: PEFT LoRA's (and DoRA's) on the generated tensors.

Kept apart from the layers' forward: merging reads the snapshot (never the live output) and records what it
added, so that unmerge subtracts exactly that, whatever the generator did in between.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge


def compute_dtype(dtype: torch.dtype, fallback: torch.dtype) -> torch.dtype:
    """The dtype a delta weight is computed in: float32 for half precision (slow or missing on CPUs), as PEFT."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype if dtype.is_floating_point else fallback


class LoraMerge:
    """Mixin of :class:`~.layer.QPALayer`: ``get_delta_weight``, ``merge`` and ``unmerge``. The layer classes give
    the layout (:meth:`_delta_in`, :meth:`_norm_layout`, :meth:`_dora_factor_view`)."""

    # --- per-class layout (overridden) -------------------------------------------------------------------
    def _delta_in(self, tensors: dict[str, torch.Tensor], adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout, computed in ``dtype``."""
        raise NotImplementedError

    def _norm_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """A delta weight in the layout PEFT's DoRA ``get_weight_norm`` adds to the base weight."""
        return delta

    def _dora_factor_view(self, factor: torch.Tensor) -> torch.Tensor:
        """magnitude / weight norm, shaped to scale the base weight (PEFT's merge)."""
        raise NotImplementedError

    def _check_mergeable(self) -> None:
        pass

    # --- the delta weight --------------------------------------------------------------------------------
    def _delta(self, lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        tensors = {self.A.name: lora_a, self.B.name: lora_b}
        dtype_in = compute_dtype(dtype, lora_a.dtype)
        return self._delta_in(tensors, adapter_name, dtype_in).to(dtype if dtype.is_floating_point else dtype_in)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout and dtype (for DoRA, as in PEFT, the LoRA part only)."""
        tensors = self.snapshot(adapter_name)
        return self._delta(tensors[self.A.name], tensors[self.B.name], adapter_name, self.get_base_layer().weight.dtype)

    # --- merging -----------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for active_adapter in adapter_names:
            if not self.has_qpa_adapter(active_adapter):
                continue
            self._check_mergeable()
            tensors = {name: t.detach().clone() for name, t in self.snapshot(active_adapter).items()}
            weight = self.get_base_weight()
            record: dict[str, Any] = {"tensors": tensors}
            if self.use_dora.get(active_adapter, False):
                # PEFT's DoRA merge: W' = (m / ||W + ΔW||) * (W + ΔW), the norm taken on the weight without the
                # adapters merged before (as forward computes it).
                delta = self._delta_in(tensors, active_adapter, compute_dtype(weight.dtype, torch.float32))
                unmerged = self._unmerged_weight(weight)
                helper = self._qpa_dora[active_adapter]
                weight_norm = helper.weight_norm(unmerged, self._norm_layout(delta), scaling=1).detach()
                record["weight_norm"] = weight_norm
                factor = self._dora_factor_view(self.magnitude(active_adapter, tensors) / weight_norm)
                merged = (factor * (weight + delta)).to(weight.dtype)
            else:
                dtype = self._sum_dtype(weight, tensors)
                delta = self._delta(tensors[self.A.name], tensors[self.B.name], active_adapter, dtype)
                if safe_merge or dtype != weight.dtype:
                    merged = weight.to(dtype) + delta
                else:
                    weight += delta
                    merged = weight
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {active_adapter} seems to be broken")
            self.set_base_weight(merged)
            self._qpa_merged[active_adapter] = record
            self.merged_adapters.append(active_adapter)

    def _undo(self, weight: torch.Tensor, adapter_name: str, record: Optional[dict], in_place: bool) -> torch.Tensor:
        """``weight`` without ``adapter_name``'s merge (PEFT's unmerge: subtract ΔW; DoRA: divide by the factor
        merge used, then subtract ΔW)."""
        if record is None:
            if self.use_dora.get(adapter_name, False):
                raise RuntimeError(
                    f"Cannot unmerge the DoRA adapter {adapter_name!r}: the weight norm it was merged with is unknown."
                )
            record = {"tensors": self.snapshot(adapter_name)}
        tensors = record["tensors"]
        if "weight_norm" in record:
            delta = self._delta_in(tensors, adapter_name, compute_dtype(weight.dtype, torch.float32))
            factor = self._dora_factor_view(self.magnitude(adapter_name, tensors) / record["weight_norm"])
            return (weight / factor - delta).to(weight.dtype)
        dtype = self._sum_dtype(weight, tensors)
        delta = self._delta(tensors[self.A.name], tensors[self.B.name], adapter_name, dtype)
        if in_place and dtype == weight.dtype:
            weight -= delta
            return weight
        return weight.to(dtype) - delta

    def _sum_dtype(self, weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.dtype:
        """The dtype a LoRA merge adds the delta in: the base weight's, as PEFT's LoRA; for a quantized base layer
        (bitsandbytes, HQQ, ...) the promotion of the dequantized weight's and the adapter's, as PEFT's quantized LoRA
        layers do before requantizing (bitsandbytes' CPU path dequantizes 4-bit weights to bfloat16, say)."""
        if self.quantization_backend is None:
            return weight.dtype
        return torch.promote_types(weight.dtype, tensors[self.A.name].dtype)

    def _unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight without the adapters merged so far (computed on a copy; the layer is not touched)."""
        weight = weight.detach().clone()
        for name in reversed(self.merged_adapters):
            weight = self._undo(weight, name, self._qpa_merged.get(name), in_place=True)
        return weight

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            active_adapter = self.merged_adapters.pop()
            record = self._qpa_merged.pop(active_adapter, None)
            if not self.has_qpa_adapter(active_adapter):
                continue
            self.set_base_weight(self._undo(self.get_base_weight(), active_adapter, record, in_place=True))
