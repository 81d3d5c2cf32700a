"""What the QPA bottleneck adapter and its classical baseline share: the adapter's math, the target's width, the
forward around the target, and the refusal to merge.

One bottleneck on the target's output ``h`` (``placement="sequential"``, Houlsby et al.)::

    h + dropout(up(act(down(h))))      down: d -> b (weight b x d, bias b), up: b -> d (weight d x b, bias d)

or from the target's input ``x`` (``placement="parallel"``, He et al.): ``target(x) + dropout(up(act(down(x))))``.
Weights are in ``nn.Linear``'s layout (out x in). The QPA layer reads the four tensors from its generator, the
classical layer from its own ``nn.Linear`` modules; both call :func:`bottleneck_branch`, so that the two members
have the same architecture exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
PLACEMENTS = ("sequential", "parallel")
TENSOR_NAMES = ("down_weight", "down_bias", "up_weight", "up_bias")
_ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}

MERGE_ERROR = (
    "A bottleneck adapter cannot be merged into the base weights: it adds up(act(down(h))), a nonlinear function "
    "of the target's output h, and no change of the base model's weights computes that. Keep the adapter for "
    "inference (the PeftModel as it is, or save_pretrained and PeftModel.from_pretrained), or call unload() to get "
    "the base model back without it."
)


@dataclass(frozen=True)
class BottleneckSettings:
    """One adapter on one target: bottleneck width ``size``, the target's output width ``width``, the activation
    and the placement."""

    size: int
    width: int
    activation: str
    placement: str

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The four tensors' shapes, in ``nn.Linear``'s layout (weights out x in)."""
        return {
            "down_weight": (self.size, self.width),
            "down_bias": (self.size,),
            "up_weight": (self.width, self.size),
            "up_bias": (self.width,),
        }

    def numel(self) -> int:
        return 2 * self.size * self.width + self.size + self.width


def bottleneck_branch(
    x: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: Optional[torch.Tensor],
    up_weight: torch.Tensor,
    up_bias: Optional[torch.Tensor],
    activation: str,
    dropout: Optional[nn.Module] = None,
) -> torch.Tensor:
    """``dropout(up(act(down(x))))``: the adapter branch (without the residual), in the tensors' dtype (or the
    autocast dtype)."""
    x = x.to(down_weight.dtype)
    hidden = _ACTIVATION_FNS[activation](F.linear(x, down_weight, down_bias))
    out = F.linear(hidden.to(up_weight.dtype), up_weight, up_bias)
    return dropout(out) if dropout is not None else out


# --- the target's widths ---------------------------------------------------------------------------------------
def _own_widths(module: nn.Module) -> Optional[tuple[int, int]]:
    """(in, out) of a Linear or transformers' Conv1D (weight in x out), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def _linear_widths(module: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every Linear / Conv1D in ``module``, in registration order; an adapter layer of another method
    counts as its base layer (its own adapter modules are skipped)."""
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    own = _own_widths(module)
    if own is not None:
        return [own]
    found = []
    for child in module.children():
        found += _linear_widths(child)
    return found


def infer_widths(module: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """(input width, output width) of a target: its own for a Linear / Conv1D, else the input width of the first and
    the output width of the last Linear / Conv1D inside it (e.g. Llama's ``mlp``: gate_proj's input, down_proj's
    output). (None, None) when it contains none."""
    widths = _linear_widths(module)
    if not widths:
        return None, None
    return widths[0][0], widths[-1][1]


def resolve_settings(config, target: nn.Module, key: str) -> BottleneckSettings:
    """The settings of one target, its width inferred (or ``config.hidden_size``); clear errors otherwise."""
    cls = type(config).__name__
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if next(iter(base.parameters()), None) is None:
        raise ValueError(
            f"{cls}: target `{key}` ({type(base).__name__}) has no parameters, so the adapter would have no device or "
            "dtype to follow: target the module that contains it (e.g. the whole MLP block) instead."
        )
    in_width, out_width = infer_widths(base)
    if config.hidden_size is not None:
        width, in_width = config.hidden_size, None  # set by the user: the forward checks the real widths
    else:
        if out_width is None:
            raise ValueError(
                f"{cls}: cannot find the output width of target `{key}` ({type(base).__name__}): it neither is nor "
                "contains a torch.nn.Linear or transformers Conv1D. Set "
                f"{cls}.hidden_size to the width of its output (for a decoder layer's sub-block, the model config's "
                "hidden_size), or target another module."
            )
        width = out_width
    if config.placement == "parallel" and in_width is not None and in_width != width:
        raise ValueError(
            f"{cls}.placement='parallel' needs targets whose input and output widths agree (the adapter reads the "
            f"target's input and adds to its output), but `{key}` ({type(base).__name__}) maps {in_width} to {width} "
            "features. Use placement='sequential' or target a module such as a whole MLP block or an attention "
            "block."
        )
    return BottleneckSettings(config.bottleneck_size, width, config.activation, config.placement)


def _module_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for name in ("hidden_states", "x", "input", "inputs"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    raise TypeError(
        "placement='parallel' reads the target's input, but the target was called without a tensor as its first "
        "argument or as hidden_states=...: use placement='sequential' for this target."
    )


class BottleneckForwardMixin:
    """The forward shared by the QPA layer and the classical layer, around the base layer (a layer lists this mixin
    before its tuner layer class and ``nn.Module``, so that this forward is the one that runs). A layer provides
    ``bottleneck_settings`` (adapter -> :class:`BottleneckSettings`), :meth:`_bottleneck_tensors` and
    :meth:`_bottleneck_dropout`.

    Several active adapters: sequential ones are stacked in the order of the active adapters (each reads the
    previous one's output); parallel ones all read the target's input and their branches are summed."""

    bottleneck_settings: dict[str, BottleneckSettings]

    def _bottleneck_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _bottleneck_dropout(self, adapter_name: str) -> Optional[nn.Module]:
        raise NotImplementedError

    def _set_features(self, settings: BottleneckSettings) -> None:
        """``in_features`` / ``out_features`` as PEFT's layers expose them: the target's input width (inferred, else
        the adapter's width) and the adapter's width."""
        in_width, _ = infer_widths(self.get_base_layer())
        self.in_features = in_width if in_width is not None else settings.width
        self.out_features = settings.width

    def _has_bottleneck(self, adapter_name: str) -> bool:
        return adapter_name in self.bottleneck_settings

    def forward(self, *args: Any, **kwargs: Any):
        output = self.base_layer(*args, **kwargs)
        if self.disable_adapters:
            return output
        active = [name for name in self.active_adapters if self._has_bottleneck(name)]
        if not active:
            return output
        sequence = isinstance(output, (tuple, list))
        hidden = output[0] if sequence else output
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(
                f"A bottleneck adapter needs a target that returns a tensor (or a tuple whose first element is one); "
                f"{type(self.get_base_layer()).__name__} returned {type(hidden).__name__}. Target another module."
            )
        result, source = hidden, None
        for name in active:
            settings = self.bottleneck_settings[name]
            if settings.placement == "parallel":
                source = _module_input(args, kwargs) if source is None else source
                branch_input = source
            else:
                branch_input = result
            if hidden.shape[-1] != settings.width or branch_input.shape[-1] != settings.width:
                raise ValueError(
                    f"Bottleneck adapter '{name}' was built for width {settings.width} (hidden_size, inferred from the "
                    f"target's last Linear / Conv1D unless set), but {type(self.get_base_layer()).__name__} gives "
                    f"{hidden.shape[-1]} output features (input {branch_input.shape[-1]}). Set hidden_size in the "
                    "config to the target's output width."
                )
            tensors = self._bottleneck_tensors(name)
            branch = bottleneck_branch(
                branch_input, tensors["down_weight"], tensors["down_bias"], tensors["up_weight"], tensors["up_bias"],
                settings.activation, self._bottleneck_dropout(name),
            )
            result = result + branch.to(result.dtype)
        if not sequence:
            return result
        if isinstance(output, list):
            return [result, *output[1:]]
        return (result,) + tuple(output[1:])

    # --- merging: impossible for a nonlinear adapter ------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def unmerge(self) -> None:
        warnings.warn("Already unmerged. Nothing to do (a bottleneck adapter is never merged).")

    def get_delta_weight(self, adapter_name: str):
        raise NotImplementedError(MERGE_ERROR)

    # --- a whole block as target: device and dtype from its first parameter -------------------------------------
    def _get_base_layer_device_and_dtype(self, base_layer):
        device, dtype = super()._get_base_layer_device_and_dtype(base_layer)
        if device is None:
            parameter = next(iter(base_layer.parameters()), None)
            if parameter is not None:
                device, dtype = parameter.device, parameter.dtype
        return device, dtype
