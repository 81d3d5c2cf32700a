"""QPA tuner layers: LoRA (and DoRA) layers whose tensors come from the adapter's shared generator.

A layer holds no trainable parameter. Its snapshot buffers (``qpa_lora_A``/``qpa_lora_B``, for embeddings
``qpa_lora_embedding_A``/``qpa_lora_embedding_B``, and for DoRA ``qpa_magnitude_delta``) hold the last generated
tensors: they are saved with the adapter (so a reload reproduces outputs exactly and ``export_lora`` needs no
quantum software) and they serve every forward that needs no gradient while the generator's parameters are
unchanged. During training each forward uses the generator's live output, computed once per forward of the whole
model (see :class:`~peft_qpa.tuners.base.QPABaseModel`).

The shapes, forward, merge and ``get_delta_weight`` of each class are those of PEFT's LoRA layer for the same base
layer (``peft.tuners.lora.layer.Linear``, ``Embedding``, ``Conv2d``), so that the generated tensors are an ordinary
LoRA (or DoRA) adapter. QPA-DoRA runs PEFT's DoRA layers (``peft.tuners.lora.dora``) on the generated tensors, with
the magnitude ``m0 + Δm``: ``m0`` (``qpa_magnitude_base``, saved) is the norm PEFT initializes the magnitude to, and
``Δm`` is generated and starts at zero.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import _get_in_out_features, check_adapters_to_merge
from peft.utils.integrations import dequantize_module_weight, gather_params_ctx
from peft.utils.other import transpose
from torch import nn

from ..base import GeneratedTensor, QPABaseLayer
from .dora import Factor, QPADoraConv2dLayer, QPADoraEmbeddingLayer, QPADoraLinearLayer

MAGNITUDE = "magnitude_delta"


def _compute_dtype(dtype: torch.dtype, fallback: torch.dtype) -> torch.dtype:
    """The dtype a delta weight is computed in: float32 for half precision (slow or missing on CPUs), as PEFT."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype if dtype.is_floating_point else fallback


class QPALayer(QPABaseLayer):
    """A LoRA layer whose factors (and, for DoRA, magnitude change) are generated. Subclasses set the shapes, the
    forward and the layout of the delta weight."""

    other_param_names = QPABaseLayer.GENERIC_STATE + (
        "qpa_lora_A", "qpa_lora_B", "qpa_lora_embedding_A", "qpa_lora_embedding_B", "qpa_magnitude_base",
        "qpa_magnitude_delta", "qpa_dropout", "r", "lora_alpha", "scaling", "use_dora", "_qpa_dora",
    )
    # The names of this class's A and B (generated tensors and, with the qpa_ prefix, snapshot buffers).
    A_NAME, B_NAME = "lora_A", "lora_B"

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        QPABaseLayer.__init__(self, base_layer, **kwargs)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        # PEFT's DoRA layer per DoRA adapter, run with the generated magnitude (plain dict: holds no state to save).
        self._qpa_dora: dict[str, Any] = {}
        self.qpa_dropout = nn.ModuleDict({})
        self.qpa_lora_A = BufferDict({}, persistent=True)
        self.qpa_lora_B = BufferDict({}, persistent=True)
        self.qpa_lora_embedding_A = BufferDict({}, persistent=True)
        self.qpa_lora_embedding_B = BufferDict({}, persistent=True)
        # DoRA: m0 per adapter (not generated; saved with the adapter) and the snapshot of the generated Δm.
        self.qpa_magnitude_base = BufferDict({}, persistent=True)
        self.qpa_magnitude_delta = BufferDict({}, persistent=True)
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    # --- per-class layout (overridden) -------------------------------------------------------------------
    def _lora_tensors(self, r: int) -> list[GeneratedTensor]:
        """A (Kaiming start) and B (zero start), as PEFT's LoRA initializes them."""
        return [
            GeneratedTensor("lora_A", (r, self.in_features), "kaiming_uniform", "qpa_lora_A"),
            GeneratedTensor("lora_B", (self.out_features, r), "zeros", "qpa_lora_B"),
        ]

    def _new_dora_layer(self):
        raise NotImplementedError

    def _zero_lora_weight(self, helper, r: int, weight: torch.Tensor) -> torch.Tensor:
        """The LoRA weight PEFT's DoRA forward computes, for factors that are zero (its layout and memory order)."""
        raise NotImplementedError

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

    # --- adapters ------------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        use_dora: bool = False,
        inference_mode: bool = False,
    ) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self._check_rank(r)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        self.use_dora[adapter_name] = bool(use_dora)
        self.qpa_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        tensors = self._lora_tensors(r)
        if use_dora:
            helper = self._new_dora_layer()
            magnitude = self._initial_magnitude(helper, r, self.scaling[adapter_name])
            self._qpa_dora[adapter_name] = helper
            self.qpa_magnitude_base[adapter_name] = magnitude
            tensors.append(GeneratedTensor(MAGNITUDE, tuple(magnitude.shape), "zeros", "qpa_magnitude_delta"))
        else:
            self._qpa_dora.pop(adapter_name, None)
        self.add_generated(adapter_name, tensors)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _check_rank(self, r: int) -> None:
        pass

    @torch.no_grad()
    def _initial_magnitude(self, helper, r: int, scaling: float) -> torch.Tensor:
        """m0: the magnitude PEFT initializes DoRA with (``get_weight_norm`` of the base weight plus the zero LoRA
        weight), computed by the same code, in the same dtype and memory order, as the norm of every forward, so
        that m0 / norm is exactly 1 at the start."""
        base_layer = self.get_base_layer()
        with gather_params_ctx(base_layer.parameters()):
            weight = dequantize_module_weight(base_layer)
            lora_weight = self._zero_lora_weight(helper, r, weight)
            return helper.weight_norm(weight, lora_weight, scaling).detach().clone()

    def _lora_weights(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B for this forward: the generator's live output, or the (fresh) snapshot."""
        tensors = self.generated(adapter_name)
        return tensors[self.A_NAME], tensors[self.B_NAME]

    def _snapshot(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = self.snapshot(adapter_name)
        return tensors[self.A_NAME], tensors[self.B_NAME]

    def magnitude(self, adapter_name: str, tensors: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The DoRA magnitude m0 + Δm (from ``tensors``, else the fresh snapshot), in at least float32 (PEFT keeps
        its magnitude parameter in float32 by default)."""
        if tensors is None:
            tensors = self.snapshot(adapter_name)
        base, delta = self.qpa_magnitude_base[adapter_name], tensors[MAGNITUDE]
        dtype = torch.promote_types(torch.promote_types(base.dtype, delta.dtype), torch.float32)
        return base.to(dtype) + delta.to(dtype)

    def _delta(self, lora_a: torch.Tensor, lora_b: torch.Tensor, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        tensors = {self.A_NAME: lora_a, self.B_NAME: lora_b}
        compute_dtype = _compute_dtype(dtype, lora_a.dtype)
        return self._delta_in(tensors, adapter_name, compute_dtype).to(dtype if dtype.is_floating_point else compute_dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout and dtype (for DoRA, as in PEFT, the LoRA part only)."""
        lora_a, lora_b = self._snapshot(adapter_name)
        return self._delta(lora_a, lora_b, adapter_name, self.get_base_layer().weight.dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    # --- merging ---------------------------------------------------------------------------------------------
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
                delta = self._delta_in(tensors, active_adapter, _compute_dtype(weight.dtype, torch.float32))
                unmerged = self._unmerged_weight(weight)
                helper = self._qpa_dora[active_adapter]
                weight_norm = helper.weight_norm(unmerged, self._norm_layout(delta), scaling=1).detach()
                record["weight_norm"] = weight_norm
                factor = self._dora_factor_view(self.magnitude(active_adapter, tensors) / weight_norm)
                merged = (factor * (weight + delta)).to(weight.dtype)
            else:
                delta = self._delta(tensors[self.A_NAME], tensors[self.B_NAME], active_adapter, weight.dtype)
                if safe_merge:
                    merged = weight.clone() + delta
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
            delta = self._delta_in(tensors, adapter_name, _compute_dtype(weight.dtype, torch.float32))
            factor = self._dora_factor_view(self.magnitude(adapter_name, tensors) / record["weight_norm"])
            return (weight / factor - delta).to(weight.dtype)
        delta = self._delta(tensors[self.A_NAME], tensors[self.B_NAME], adapter_name, weight.dtype)
        if in_place:
            weight -= delta
            return weight
        return weight - delta

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

    # --- forward ---------------------------------------------------------------------------------------------
    def _lora_forward(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[Factor, Factor]:
        raise NotImplementedError

    def _dora_forward(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, tensors: dict) -> torch.Tensor:
        """PEFT's DoRA variant forward (``DoraLinearVariant`` / ``_DoraConvNdVariant``) on the generated tensors."""
        dropout = self.qpa_dropout[adapter_name]
        if isinstance(dropout, nn.Identity) or not self.training:
            base_result = result
        else:
            x = dropout(x)
            base_result = None
        lora_a, lora_b = self._factors(tensors[self.A_NAME], tensors[self.B_NAME])
        return result + self._qpa_dora[adapter_name].apply(
            self.magnitude(adapter_name, tensors),
            x,
            lora_A=lora_a,
            lora_B=lora_b,
            scaling=self.scaling[adapter_name],
            base_layer=self.get_base_layer(),
            base_result=base_result,
        )

    def _add_adapter_output(self, adapter_name, x, result, tensors):
        x_cast = self._cast_input_dtype(x, tensors[self.A_NAME].dtype)
        if self.use_dora.get(adapter_name, False):
            return self._dora_forward(adapter_name, x_cast, result, tensors)
        lora_a = tensors[self.A_NAME].to(x_cast.dtype)
        lora_b = tensors[self.B_NAME].to(x_cast.dtype)
        dropout = self.qpa_dropout[adapter_name]
        return result + self._lora_forward(dropout(x_cast), lora_a, lora_b) * self.scaling[adapter_name]

    def __repr__(self) -> str:
        return "qpa." + nn.Module.__repr__(self)


class Linear(nn.Module, QPALayer):
    """QPA on ``torch.nn.Linear`` or transformers' ``Conv1D`` (with ``fan_in_fan_out``): A (r, in), B (out, r)."""

    forward = QPALayer.forward  # nn.Module (first base) would shadow it
    __repr__ = QPALayer.__repr__

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 4,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        is_target_conv_1d_layer: bool = False,
        use_dora: bool = False,
        inference_mode: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        QPALayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_dora=use_dora, inference_mode=inference_mode)

    def _new_dora_layer(self):
        return QPADoraLinearLayer(fan_in_fan_out=self.fan_in_fan_out)

    def _zero_lora_weight(self, helper, r: int, weight: torch.Tensor) -> torch.Tensor:
        zeros_a = weight.new_zeros((r, self.in_features))
        zeros_b = weight.new_zeros((self.out_features, r))
        return helper.get_lora_weight(*self._factors(zeros_a, zeros_b))

    def _delta_in(self, tensors, adapter_name, dtype):
        lora_a, lora_b = tensors[self.A_NAME].to(dtype), tensors[self.B_NAME].to(dtype)
        return transpose(lora_b @ lora_a, self.fan_in_fan_out) * self.scaling[adapter_name]

    def _norm_layout(self, delta):
        return transpose(delta, self.fan_in_fan_out)

    def _dora_factor_view(self, factor):
        return transpose(factor.view(-1, 1), self.fan_in_fan_out)

    def _factors(self, lora_a, lora_b):
        return Factor(lora_a, F.linear), Factor(lora_b, F.linear)

    def _lora_forward(self, x, lora_a, lora_b):
        return F.linear(F.linear(x, lora_a), lora_b)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # The LoRA delta is exactly rank r: peft.convert_to_lora recovers the generated LoRA. A DoRA update also
        # rescales the base weight, which a LoRA on the unchanged base cannot express exactly.
        return not self.use_dora.get(adapter_name, False)


class Embedding(nn.Module, QPALayer):
    """QPA on ``torch.nn.Embedding``, with PEFT's layout: ``lora_embedding_A`` (r, num_embeddings) starts at zero,
    ``lora_embedding_B`` (embedding_dim, r) at a random (Kaiming) value. As in PEFT, ``lora_dropout`` is not applied
    to embeddings (their input is token indices)."""

    forward = QPALayer.forward  # nn.Module (first base) would shadow it
    __repr__ = QPALayer.__repr__

    A_NAME, B_NAME = "lora_embedding_A", "lora_embedding_B"

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 4,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_dora: bool = False,
        inference_mode: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        kwargs.pop("fan_in_fan_out", None)  # the embedding's layout is fixed (PEFT transposes B @ A)
        QPALayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        if base.max_norm is not None:
            raise ValueError(
                f"Embedding layers with max_norm (here {base.max_norm}) are not supported by QPA: F.embedding "
                "renormalizes, in place, the rows of the weight it is given, which PEFT's LoRA applies to "
                "lora_embedding_A; the generated tensors cannot be modified in place. Exclude this module."
            )
        self.fan_in_fan_out = True
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_dora=use_dora, inference_mode=inference_mode)

    def _lora_tensors(self, r):
        return [
            GeneratedTensor("lora_embedding_A", (r, self.in_features), "zeros", "qpa_lora_embedding_A"),
            GeneratedTensor("lora_embedding_B", (self.out_features, r), "kaiming_uniform", "qpa_lora_embedding_B"),
        ]

    def _new_dora_layer(self):
        return QPADoraEmbeddingLayer(fan_in_fan_out=True)

    def _zero_lora_weight(self, helper, r, weight):
        return helper.get_lora_weight(weight.new_zeros((self.in_features, r)), weight.new_zeros((r, self.out_features)))

    def _delta_in(self, tensors, adapter_name, dtype):
        lora_a, lora_b = tensors[self.A_NAME].to(dtype), tensors[self.B_NAME].to(dtype)
        return transpose(lora_b @ lora_a, True) * self.scaling[adapter_name]

    def _norm_layout(self, delta):
        return delta.T

    def _dora_factor_view(self, factor):
        return factor.view(1, -1)

    def _embed(self, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """PEFT's ``Embedding._embed``: the base layer's lookup options on another weight. ``sparse`` is not
        forwarded (a sparse gradient cannot flow into the generator); the values are the same."""
        base_layer = self.get_base_layer()
        return F.embedding(
            input,
            weight,
            padding_idx=base_layer.padding_idx,
            max_norm=base_layer.max_norm,
            norm_type=base_layer.norm_type,
            scale_grad_by_freq=base_layer.scale_grad_by_freq,
        )

    def _add_adapter_output(self, adapter_name, x, result, tensors):
        # Embeddings that scale their output (e.g. Gemma's) scale the adapter's contribution too, as in PEFT.
        embed_scale = self._get_embed_scale()
        embedding_a, embedding_b = tensors[self.A_NAME].T, tensors[self.B_NAME].T
        scaling = self.scaling[adapter_name]
        if self.use_dora.get(adapter_name, False):
            # PEFT's DoraEmbeddingVariant.forward
            mag_norm_scale, dora_result = self._qpa_dora[adapter_name].apply(
                self.magnitude(adapter_name, tensors),
                x,
                lora_A=embedding_a,
                lora_B=embedding_b,
                scaling=scaling,
                base_layer=self.get_base_layer(),
                embed_fn=self._embed,
            )
            if embed_scale is not None:
                dora_result = dora_result * embed_scale.to(dora_result.dtype)
            return mag_norm_scale * result + dora_result
        adapter_output = (self._embed(x, embedding_a) @ embedding_b) * scaling
        if embed_scale is not None:
            adapter_output = adapter_output * embed_scale.to(adapter_output.dtype)
        return result + adapter_output


class Conv2d(nn.Module, QPALayer):
    """QPA on ``torch.nn.Conv2d``, with PEFT's layout: A is a convolution with the base layer's kernel size, stride
    and padding (r output channels), B a 1x1 convolution (r -> out channels) with the base layer's groups.

    A and B are generated flat, as (r, in * kh * kw) and (out, r / groups), so that A's Kaiming start uses the
    kernel's true fan-in as PEFT's does; they are exported with PEFT's 4-d shapes."""

    forward = QPALayer.forward  # nn.Module (first base) would shadow it
    __repr__ = QPALayer.__repr__

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 4,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_dora: bool = False,
        inference_mode: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        kwargs.pop("fan_in_fan_out", None)
        QPALayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        if base.weight.dim() != 4:
            raise ValueError(f"Conv2d layer kernel must have 4 dimensions, not {base.weight.dim()}")
        if tuple(base.dilation) != (1, 1):
            raise ValueError(
                f"Conv2d layers with dilation {tuple(base.dilation)} are not supported by QPA: PEFT's LoRA builds "
                "lora_A without dilation, so its output is not that of the merged weight. Exclude this module."
            )
        if base.padding_mode != "zeros":
            raise ValueError(
                f"Conv2d layers with padding_mode={base.padding_mode!r} are not supported by QPA: PEFT's LoRA pads "
                "lora_A's input with zeros, so its output is not that of the merged weight. Exclude this module."
            )
        if base.groups > 1:
            warnings.warn("QPA adapter added to a Conv2d layer with groups > 1. Merging is not supported (as in PEFT).")
        self.fan_in_fan_out = False
        self._kernel_size = tuple(base.kernel_size)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_dora=use_dora, inference_mode=inference_mode)

    def _check_rank(self, r):
        groups = self.get_base_layer().groups
        if r % groups != 0:
            raise ValueError(
                f"Targeting a Conv2d with groups={groups} and rank {r}: the rank must be divisible by groups (as in "
                "PEFT's LoRA). Choose another r or do not target this layer."
            )

    def _lora_tensors(self, r):
        kh, kw = self._kernel_size
        groups = self.get_base_layer().groups
        return [
            GeneratedTensor("lora_A", (r, self.in_features * kh * kw), "kaiming_uniform", "qpa_lora_A"),
            GeneratedTensor("lora_B", (self.out_features, r // groups), "zeros", "qpa_lora_B"),
        ]

    def conv_shapes(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B with PEFT's shapes: (r, in, kh, kw) and (out, r / groups, 1, 1)."""
        return lora_a.reshape(lora_a.shape[0], self.in_features, *self._kernel_size), lora_b.reshape(*lora_b.shape, 1, 1)

    def _new_dora_layer(self):
        return QPADoraConv2dLayer(fan_in_fan_out=False)

    def _zero_lora_weight(self, helper, r, weight):
        groups = self.get_base_layer().groups
        zeros_a = weight.new_zeros((r, self.in_features * self._kernel_size[0] * self._kernel_size[1]))
        zeros_b = weight.new_zeros((self.out_features, r // groups))
        return helper.get_lora_weight(*self._factors(zeros_a, zeros_b)).reshape(weight.shape)

    def _check_mergeable(self):
        if self.get_base_layer().groups > 1:
            raise NotImplementedError("Merging is not supported for Conv2d layers with groups > 1 (as in PEFT).")

    def _delta_in(self, tensors, adapter_name, dtype):
        # PEFT's _ConvNd.get_delta_weight
        weight_a, weight_b = self.conv_shapes(tensors[self.A_NAME].to(dtype), tensors[self.B_NAME].to(dtype))
        scaling = self.scaling[adapter_name]
        if tuple(self.get_base_layer().weight.size()[2:4]) == (1, 1):
            return (weight_b.squeeze(3).squeeze(2) @ weight_a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
        output = F.conv2d(weight_a.transpose(0, 1), weight_b)
        if self.get_base_layer().groups > 1:
            return output * scaling
        return output.transpose(0, 1) * scaling

    def _dora_factor_view(self, factor):
        return factor.view(-1, 1, 1, 1)

    def _factors(self, lora_a, lora_b):
        base = self.get_base_layer()
        weight_a, weight_b = self.conv_shapes(lora_a, lora_b)

        def conv_a(x, weight):
            return F.conv2d(x, weight, stride=base.stride, padding=base.padding)

        def conv_b(x, weight):
            return F.conv2d(x, weight, groups=base.groups)

        return Factor(weight_a, conv_a), Factor(weight_b, conv_b)

    def _lora_forward(self, x, lora_a, lora_b):
        factor_a, factor_b = self._factors(lora_a, lora_b)
        return factor_b(factor_a(x))
