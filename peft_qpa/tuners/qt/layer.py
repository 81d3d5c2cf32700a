"""Quantum-Train layers: the full weight update ΔW (and optionally the bias update Δb) of a layer, generated.

A layer holds no trainable parameter. It declares ``delta_weight`` (the base weight's shape, starting at zero)
and, with ``bias_update``, ``delta_bias``; the adapter's shared generator fills them. Their snapshots
(``qt_delta_weight``, ``qt_delta_bias``) are saved with the adapter and serve every forward that needs no
gradient.

Forward: ``base_layer(x) + op(x, ΔW, Δb)`` where ``op`` is the base layer's own operation (``F.linear``,
``x @ ΔW`` for GPT-2's ``Conv1D``, the base's ``conv2d`` with its stride, padding, dilation and groups,
``F.embedding`` with its ``padding_idx``). By linearity this equals the layer with ``W + ΔW`` and ``b + Δb``,
without materialising ``W + ΔW`` (another M numbers) in the autograd graph.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import _get_in_out_features, check_adapters_to_merge
from torch import nn

from ..base import QPABaseLayer, TensorNames

SUPPORTED = "`torch.nn.Linear`, `transformers.pytorch_utils.Conv1D`, `torch.nn.Conv2d` and `torch.nn.Embedding`"


class QTLayer(QPABaseLayer):
    """Base of the QT layers: declares ΔW (and Δb), merges and unmerges exactly."""

    SNAPSHOTS = {
        "delta_weight": TensorNames("delta_weight", "qt_delta_weight"),
        "delta_bias": TensorNames("delta_bias", "qt_delta_bias"),
    }
    other_param_names = QPABaseLayer.GENERIC_STATE + tuple(names.buffer for names in SNAPSHOTS.values()) + (
        "bias_update",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        QPABaseLayer.__init__(self, base_layer, **kwargs)
        self.bias_update: dict[str, bool] = {}
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, bias_update: bool = False, inference_mode: bool = False) -> None:
        base = self.get_base_layer()
        tensors = [self.SNAPSHOTS["delta_weight"].declare(base.weight.shape, "zeros")]
        with_bias = bool(bias_update) and getattr(base, "bias", None) is not None
        self.bias_update[adapter_name] = with_bias
        if with_bias:
            tensors.append(self.SNAPSHOTS["delta_bias"].declare(base.bias.shape, "zeros"))
        self._finish_update(adapter_name, tensors, inference_mode=inference_mode)

    # --- the update ------------------------------------------------------------------------------------
    def _delta_forward(self, x: torch.Tensor, delta_weight: torch.Tensor, delta_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The base layer's operation applied with ΔW and Δb (no other term)."""
        raise NotImplementedError

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the base weight's layout and dtype (the snapshot: the generator's current output)."""
        delta = self.snapshot(adapter_name)["delta_weight"]
        return delta.to(self.get_base_layer().weight.dtype)

    def get_delta_bias(self, adapter_name: str) -> Optional[torch.Tensor]:
        """Δb in the base bias's dtype, or None without ``bias_update`` (or without a bias)."""
        if not self.bias_update.get(adapter_name, False):
            return None
        return self.snapshot(adapter_name)["delta_bias"].to(self.get_base_layer().bias.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add ΔW (and Δb) to the base layer. The weights before the merge are kept (references, no copy: the merged
        weight is a new tensor), so that :meth:`unmerge` restores them bit for bit."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for active_adapter in adapter_names:
            if not self.has_qpa_adapter(active_adapter):
                continue
            weight = self.get_base_weight()
            merged = weight + self.get_delta_weight(active_adapter).to(weight.device)
            delta_bias = self.get_delta_bias(active_adapter)
            bias = base.bias.data if delta_bias is not None else None
            merged_bias = bias + delta_bias.to(bias.device) if delta_bias is not None else None
            if safe_merge and not (
                torch.isfinite(merged).all() and (merged_bias is None or torch.isfinite(merged_bias).all())
            ):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {active_adapter} seems to be broken")
            self.set_base_weight(merged)
            if merged_bias is not None:
                base.bias.data = merged_bias
            self._qpa_merged[active_adapter] = (weight, bias)
            self.merged_adapters.append(active_adapter)

    def unmerge(self) -> None:
        """Restore the base weights as they were before each merge, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            active_adapter = self.merged_adapters.pop()
            saved = self._qpa_merged.pop(active_adapter, None)
            if not self.has_qpa_adapter(active_adapter):
                continue
            if saved is None:  # not merged by this layer's merge(): subtract the current update
                weight = self.get_base_weight()
                self.set_base_weight(weight - self.get_delta_weight(active_adapter).to(weight.device))
                delta_bias = self.get_delta_bias(active_adapter)
                if delta_bias is not None:
                    base.bias.data = base.bias.data - delta_bias.to(base.bias.device)
                continue
            weight, bias = saved
            self.set_base_weight(weight)
            if bias is not None:
                base.bias.data = bias

    def _add_adapter_output(self, adapter_name, x, result, tensors):
        delta = self._delta_forward(x, tensors["delta_weight"], tensors.get("delta_bias"))
        return result + delta.to(result.dtype)

    def __repr__(self) -> str:
        return "qt." + super().__repr__()


class _Module(QTLayer, nn.Module):
    def __init__(self, base_layer: nn.Module, adapter_name: str, bias_update: bool = False,
                 inference_mode: bool = False, **kwargs) -> None:
        nn.Module.__init__(self)
        QTLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self._check_base(self.get_base_layer())
        self.update_layer(adapter_name, bias_update=bias_update, inference_mode=inference_mode)

    def _check_base(self, base: nn.Module) -> None:
        pass

    def _input(self, x: torch.Tensor, delta_weight: torch.Tensor) -> torch.Tensor:
        return self._cast_input_dtype(x, delta_weight.dtype)


class Linear(_Module):
    """QT on ``torch.nn.Linear`` (weight: out x in): ``F.linear(x, ΔW, Δb)``."""

    def _delta_forward(self, x, delta_weight, delta_bias):
        return F.linear(self._input(x, delta_weight), delta_weight, delta_bias)


class Conv1D(_Module):
    """QT on transformers' ``Conv1D`` (GPT-2; weight: in x out): ``x @ ΔW + Δb``."""

    def _delta_forward(self, x, delta_weight, delta_bias):
        return F.linear(self._input(x, delta_weight), delta_weight.t(), delta_bias)


class Conv2d(_Module):
    """QT on ``torch.nn.Conv2d``: the base's convolution (stride, padding and its mode, dilation, groups) with ΔW, Δb."""

    def _delta_forward(self, x, delta_weight, delta_bias):
        return self.get_base_layer()._conv_forward(self._input(x, delta_weight), delta_weight, delta_bias)


class Embedding(_Module):
    """QT on ``torch.nn.Embedding``: ``F.embedding(x, ΔW)`` with the base's ``padding_idx`` (whose row of ΔW then
    gets no gradient and stays zero), times the embedding scale of scaled embeddings (e.g. Gemma's)."""

    def _check_base(self, base: nn.Module) -> None:
        if base.max_norm is not None:
            raise TypeError(
                f"QT cannot adapt an Embedding with max_norm={base.max_norm}: the renormalisation of W + ΔW is not "
                "the base's output plus an update. Set max_norm=None on the embedding, or leave it out of "
                "target_modules."
            )

    def _delta_forward(self, x, delta_weight, delta_bias):
        base = self.get_base_layer()
        # sparse=False whatever the base uses: the generator needs ΔW's gradient dense
        delta = F.embedding(x, delta_weight, base.padding_idx, None, base.norm_type, base.scale_grad_by_freq, False)
        scale = self._get_embed_scale()
        if scale is not None:
            delta = delta * scale.to(delta.dtype)
        return delta
