"""``QTModel``: the Quantum-Train tuner: every targeted layer's full weight update comes from the shared generator."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D as TransformersConv1D

from ..base import QPABaseModel
from .config import QTConfig
from .layer import SUPPORTED, Conv1D, Conv2d, Embedding, Linear, QTLayer


class QTModel(QPABaseModel):
    """Quantum-Train (Liu et al., arXiv:2405.11304): a circuit plus a mapping MLP generates the full weight update
    of every targeted layer, M numbers in all, from polylog(M) trainable parameters.

    The base weights stay frozen; the adapter starts at ΔW = 0 (``init_weights=True``). After training,
    ``merge_and_unload()`` returns the plain network with ``W + ΔW``: a classical model that needs no quantum
    software.

    Example:
        ```py
        >>> import peft_qpa  # registers QT with PEFT
        >>> from peft import get_peft_model
        >>> model = get_peft_model(cnn, peft_qpa.QTConfig(target_modules=["conv1", "conv2", "fc"]))
        >>> print(model.base_model.generator_summary())
        >>> classical = model.merge_and_unload()  # a plain torch module
        ```
    """

    prefix: str = "qt_"
    tuner_layer_cls = QTLayer
    # No default targets: Quantum-Train generates every weight of what it targets, so the choice is the user's.
    target_module_mapping: dict = {}
    classical_name = "the target weights trained directly"
    card_tags = ("quantum-train",)
    card_classical_use = (
        "Without any quantum software: merge the generated update into the weights once with\n"
        "`model.merge_and_unload()`; the result is the plain network (the same class as the base model), which\n"
        "`save_pretrained` / `torch.save` store as usual."
    )

    def card_description(self, config, targets) -> str:
        what = "weight and bias updates" if getattr(config, "bias_update", False) else "weight updates"
        return f"a Quantum-Train adapter generating the full {what} (targets: {targets})"

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            raise ValueError(
                f"{type(peft_config).__name__}.target_modules must be set: Quantum-Train generates every weight of "
                "the modules it targets, so it has no default (e.g. target_modules=['conv1', 'fc'] for named layers, "
                "or 'all-linear')."
            )
        return peft_config

    def _layer_kwargs(self, qt_config: QTConfig, target, current_key) -> dict:
        return {"bias_update": qt_config.bias_update, "inference_mode": qt_config.inference_mode}

    def _create_new_module(self, qt_config: QTConfig, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear):
            return Linear(target, adapter_name, **kwargs)
        if isinstance(base, TransformersConv1D):
            return Conv1D(target, adapter_name, **kwargs)
        if isinstance(base, nn.Conv2d):
            return Conv2d(target, adapter_name, **kwargs)
        if isinstance(base, nn.Embedding):
            return Embedding(target, adapter_name, **kwargs)
        raise TypeError(
            f"Target module {base.__class__.__name__} ({base}) is not supported by Quantum-Train (QTConfig). "
            f"Supported: {SUPPORTED}. Change `target_modules` (or add `exclude_modules`) so that it only matches "
            "such layers."
        )

    def generator_summary(self, adapter_name: str = "default") -> str:
        """Target layers, qubits, depth, M (every generated weight), the trainable parameters and their ratio to M."""
        layers = self._targeted_layers(adapter_name)
        header = f"Quantum-Train: full updates of {len(layers)} layer(s), M = {self.classical_parameter_count(adapter_name)}"
        return header + "\n" + super().generator_summary(adapter_name)
