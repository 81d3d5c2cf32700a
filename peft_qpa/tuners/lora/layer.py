"""QPA tuner layers: LoRA (and DoRA) layers whose tensors come from the adapter's shared generator.

A layer holds no trainable parameter. Its snapshot buffers (``qpa_lora_A``/``qpa_lora_B``, for embeddings
``qpa_lora_embedding_A``/``qpa_lora_embedding_B``, and for DoRA ``qpa_magnitude_delta``) hold the last generated
tensors: they are saved with the adapter (so a reload reproduces outputs exactly and ``export_lora`` needs no
quantum software) and they serve every forward that needs no gradient while the generator's parameters are
unchanged. During training each forward uses the generator's live output, computed once per forward of the whole
model (see :class:`~peft_qpa.tuners.base.QPABaseModel`).

The shapes, forward, merge and ``get_delta_weight`` of each class are those of PEFT's LoRA layer for the same base
layer (``peft.tuners.lora.layer.Linear``, ``Embedding``, ``Conv2d``), so that the generated tensors are an ordinary
LoRA (or DoRA) adapter; the delta weight, merge and unmerge are in ``merge.py``. QPA-DoRA runs PEFT's DoRA layers
(``peft.tuners.lora.dora``) on the generated tensors, with the magnitude ``m0 + Δm``: ``m0`` (``qpa_magnitude_base``,
saved) is the norm PEFT initializes the magnitude to, and ``Δm`` is generated and starts at zero.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import _get_in_out_features
from peft.utils.integrations import dequantize_module_weight, gather_params_ctx
from peft.utils.other import transpose
from torch import nn

from ..base import GeneratedTensor, QPABaseLayer, TensorNames
from .dora import Factor, QPADoraConv2dLayer, QPADoraEmbeddingLayer, QPADoraLinearLayer
from .merge import LoraMerge

# The member's generated tensors by role: the name in the layer and the generator, the snapshot buffer (the saved
# key) and PEFT LoRA's key in the exported adapter. Linear and Conv2d layers use A and B, Embedding layers PEFT's
# embedding names; DoRA adds the magnitude change (exported as PEFT's magnitude, m0 + Δm).
SNAPSHOTS = {
    "A": TensorNames("lora_A", "qpa_lora_A", "lora_A.weight"),
    "B": TensorNames("lora_B", "qpa_lora_B", "lora_B.weight"),
    "embedding_A": TensorNames("lora_embedding_A", "qpa_lora_embedding_A", "lora_embedding_A"),
    "embedding_B": TensorNames("lora_embedding_B", "qpa_lora_embedding_B", "lora_embedding_B"),
    "magnitude": TensorNames("magnitude_delta", "qpa_magnitude_delta", "lora_magnitude_vector"),
}


class QPALayer(LoraMerge, QPABaseLayer):
    """A LoRA layer whose factors (and, for DoRA, magnitude change) are generated. Subclasses set the shapes, the
    forward and the layout of the delta weight (merging: :class:`~.merge.LoraMerge`)."""

    SNAPSHOTS = SNAPSHOTS
    # The entries of SNAPSHOTS this class uses: its factors A and B (Embedding has its own) and DoRA's Δm.
    A, B, MAGNITUDE = SNAPSHOTS["A"], SNAPSHOTS["B"], SNAPSHOTS["magnitude"]
    other_param_names = QPABaseLayer.GENERIC_STATE + tuple(names.buffer for names in SNAPSHOTS.values()) + (
        "qpa_magnitude_base", "qpa_dropout", "r", "lora_alpha", "scaling", "use_dora", "_qpa_dora",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        QPABaseLayer.__init__(self, base_layer, **kwargs)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        # PEFT's DoRA layer per DoRA adapter, run with the generated magnitude (plain dict: holds no state to save).
        self._qpa_dora: dict[str, Any] = {}
        self.qpa_dropout = nn.ModuleDict({})
        # DoRA: m0 per adapter (not generated; saved with the adapter). Δm's snapshot is in SNAPSHOTS.
        self.qpa_magnitude_base = BufferDict({}, persistent=True)
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())

    # --- per-class layout (overridden) -------------------------------------------------------------------
    def _lora_tensors(self, r: int) -> list[GeneratedTensor]:
        """A (Kaiming start) and B (zero start), as PEFT's LoRA initializes them."""
        return [
            self.A.declare((r, self.in_features), "kaiming_uniform"),
            self.B.declare((self.out_features, r), "zeros"),
        ]

    def _new_dora_layer(self):
        raise NotImplementedError

    def _zero_lora_weight(self, helper, r: int, weight: torch.Tensor) -> torch.Tensor:
        """The LoRA weight PEFT's DoRA forward computes, for factors that are zero (its layout and memory order)."""
        raise NotImplementedError

    def peft_shapes(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B with the shapes PEFT's LoRA layer of this type has (the exported adapter's)."""
        return lora_a, lora_b

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
            tensors.append(self.MAGNITUDE.declare(magnitude.shape, "zeros"))
        else:
            self._qpa_dora.pop(adapter_name, None)
        self._finish_update(adapter_name, tensors, inference_mode=inference_mode)

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

    def magnitude(self, adapter_name: str, tensors: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The DoRA magnitude m0 + Δm (from ``tensors``, else the fresh snapshot), in at least float32 (PEFT keeps
        its magnitude parameter in float32 by default)."""
        if tensors is None:
            tensors = self.snapshot(adapter_name)
        base, delta = self.qpa_magnitude_base[adapter_name], tensors[self.MAGNITUDE.name]
        dtype = torch.promote_types(torch.promote_types(base.dtype, delta.dtype), torch.float32)
        return base.to(dtype) + delta.to(dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

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
        lora_a, lora_b = self._factors(tensors[self.A.name], tensors[self.B.name])
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
        x_cast = self._cast_input_dtype(x, tensors[self.A.name].dtype)
        if self.use_dora.get(adapter_name, False):
            return self._dora_forward(adapter_name, x_cast, result, tensors)
        lora_a = tensors[self.A.name].to(x_cast.dtype)
        lora_b = tensors[self.B.name].to(x_cast.dtype)
        dropout = self.qpa_dropout[adapter_name]
        return result + self._lora_forward(dropout(x_cast), lora_a, lora_b) * self.scaling[adapter_name]

    def __repr__(self) -> str:
        return "qpa." + nn.Module.__repr__(self)


class Linear(QPALayer, nn.Module):
    """QPA on ``torch.nn.Linear`` or transformers' ``Conv1D`` (with ``fan_in_fan_out``): A (r, in), B (out, r)."""

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
        nn.Module.__init__(self)
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
        lora_a, lora_b = tensors[self.A.name].to(dtype), tensors[self.B.name].to(dtype)
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


class Embedding(QPALayer, nn.Module):
    """QPA on ``torch.nn.Embedding``, with PEFT's layout: ``lora_embedding_A`` (r, num_embeddings) starts at zero,
    ``lora_embedding_B`` (embedding_dim, r) at a random (Kaiming) value. As in PEFT, ``lora_dropout`` is not applied
    to embeddings (their input is token indices)."""

    A, B = SNAPSHOTS["embedding_A"], SNAPSHOTS["embedding_B"]

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
        nn.Module.__init__(self)
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
        return [self.A.declare((r, self.in_features), "zeros"), self.B.declare((self.out_features, r), "kaiming_uniform")]

    def _new_dora_layer(self):
        return QPADoraEmbeddingLayer(fan_in_fan_out=True)

    def _zero_lora_weight(self, helper, r, weight):
        return helper.get_lora_weight(weight.new_zeros((self.in_features, r)), weight.new_zeros((r, self.out_features)))

    def _delta_in(self, tensors, adapter_name, dtype):
        lora_a, lora_b = tensors[self.A.name].to(dtype), tensors[self.B.name].to(dtype)
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
        embedding_a, embedding_b = tensors[self.A.name].T, tensors[self.B.name].T
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


class Conv2d(QPALayer, nn.Module):
    """QPA on ``torch.nn.Conv2d``, with PEFT's layout: A is a convolution with the base layer's kernel size, stride
    and padding (r output channels), B a 1x1 convolution (r -> out channels) with the base layer's groups.

    A and B are generated flat, as (r, in * kh * kw) and (out, r / groups), so that A's Kaiming start uses the
    kernel's true fan-in as PEFT's does; they are exported with PEFT's 4-d shapes."""

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
        nn.Module.__init__(self)
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
            self.A.declare((r, self.in_features * kh * kw), "kaiming_uniform"),
            self.B.declare((self.out_features, r // groups), "zeros"),
        ]

    def peft_shapes(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        weight_a, weight_b = self.peft_shapes(tensors[self.A.name].to(dtype), tensors[self.B.name].to(dtype))
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
        weight_a, weight_b = self.peft_shapes(lora_a, lora_b)

        def conv_a(x, weight):
            return F.conv2d(x, weight, stride=base.stride, padding=base.padding)

        def conv_b(x, weight):
            return F.conv2d(x, weight, groups=base.groups)

        return Factor(weight_a, conv_a), Factor(weight_b, conv_b)

    def _lora_forward(self, x, lora_a, lora_b):
        factor_a, factor_b = self._factors(lora_a, lora_b)
        return factor_b(factor_a(x))
