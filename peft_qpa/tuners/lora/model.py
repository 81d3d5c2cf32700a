"""``QPAModel``: the QPA-LoRA (and QPA-DoRA) tuner: LoRA layers whose matrices come from the shared generator."""

from __future__ import annotations

import warnings

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..base import QPABaseModel
from .config import QPAConfig
from .layer import Conv2d, Embedding, Linear, QPALayer


class QPAModel(QPABaseModel):
    """Creates a Quantum Parameter Adaptation (QPA) model from a pretrained transformers model.

    QPA is LoRA whose A/B matrices are not trained directly: one generator per adapter (a parameterized
    quantum circuit simulated exactly or on Aer, plus a mapping MLP) produces all of them, for every
    adapted layer, at every training step. After training the generated matrices are an ordinary LoRA
    adapter (see :func:`peft_qpa.export_lora`).

    Example:
        ```py
        >>> import peft_qpa  # registers the QPA method with PEFT
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_qpa.QPAConfig(r=4, target_modules=["q_proj", "v_proj"]))
        >>> model.base_model.get_generator().n_qubits
        ```
    """

    prefix: str = "qpa_"
    tuner_layer_cls = QPALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    classical_name = "LoRA with the same r and targets"
    card_tags = ("lora",)
    card_classical_use = (
        "Without any quantum software: export the generated matrices once with\n"
        '`peft_qpa.export_lora(model, "lora-twin")`; the result is a standard LoRA adapter that plain `peft` loads\n'
        "with `PeftModel.from_pretrained`."
    )

    def card_description(self, config, targets) -> str:
        kind = "DoRA" if getattr(config, "use_dora", False) else "LoRA"
        return f"a {kind} adapter (r = {config.r}, targets: {targets})"

    def _layer_kwargs(self, qpa_config: QPAConfig, target, current_key) -> dict:
        return {
            "r": qpa_config.r,
            "lora_alpha": qpa_config.lora_alpha,
            "lora_dropout": qpa_config.lora_dropout,
            "use_dora": qpa_config.use_dora,
            "inference_mode": qpa_config.inference_mode,
        }

    def _create_new_module(self, qpa_config: QPAConfig, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        """The layer for the target's type; the layout and quantization settings concern a new layer only."""
        kwargs["fan_in_fan_out"] = qpa_config.fan_in_fan_out
        kwargs.update(get_quantization_kwargs(self))
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        quantized = resolve_quantization_backend(base, get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass"))
        # The same dispatch as PEFT's LoRA (peft.tuners.lora.layer.dispatch_default) for the layer types QPA supports.
        if isinstance(base, nn.Embedding):
            return Embedding(target, adapter_name, **kwargs)
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, **kwargs)
        if isinstance(base, nn.Linear) or (quantized is not None and quantized.layer_type == "linear"):
            if kwargs["fan_in_fan_out"]:
                warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting it to False.")
                kwargs["fan_in_fan_out"] = qpa_config.fan_in_fan_out = False
        elif isinstance(base, Conv1D):
            kwargs["is_target_conv_1d_layer"] = True
            if not kwargs["fan_in_fan_out"]:
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting it to True.")
                kwargs["fan_in_fan_out"] = qpa_config.fan_in_fan_out = True
        else:
            raise TypeError(
                f"Target module {target.__class__.__name__} ({target}) is not supported by QPA. Supported: "
                "`torch.nn.Linear` (optionally quantized), `transformers.pytorch_utils.Conv1D`, `torch.nn.Conv2d` and "
                "`torch.nn.Embedding`. Change `target_modules` so that it only matches such layers."
            )
        return Linear(target, adapter_name, **kwargs)

    def lora_parameter_count(self, adapter_name: str = "default") -> int:
        """Trainable parameters plain LoRA would have with the same r and targets (M)."""
        return self.classical_parameter_count(adapter_name)
