"""The bottleneck tuners: :class:`QPABottleneckModel` (PEFT type ``QPA_BOTTLENECK``) and :class:`BottleneckModel`
(PEFT type ``BOTTLENECK``, the classical baseline). Neither can merge: the adapter is nonlinear."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner

from ..base import QPABaseModel, ReplacesTargets
from .adapter import MERGE_ERROR, resolve_settings
from .config import BottleneckConfig, QPABottleneckConfig
from .layer import BottleneckLayer, QPABottleneckLayer

# target_modules=None: the feed-forward block of each decoder layer, where it is a module named "mlp".
DEFAULT_TARGET_MODULES = {
    model_type: ["mlp"]
    for model_type in (
        "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2",
        "granite", "smollm3", "starcoder2", "gpt_neox",
    )
}


def _prepare_targets(peft_config, model_config):
    if peft_config.target_modules is None:
        model_type = model_config.get("model_type")
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"{type(peft_config).__name__}.target_modules must be set for model type {model_type!r} (defaults "
                f"exist for {sorted(DEFAULT_TARGET_MODULES)}: each decoder layer's 'mlp'). Name the modules after which "
                "an adapter goes, e.g. target_modules=['mlp'] for each decoder layer's feed-forward block."
            )
        peft_config.target_modules = set(DEFAULT_TARGET_MODULES[model_type])
    return peft_config


class _BlockTargets:
    """Whole blocks as targets (an ``mlp``, an attention block): ``BaseTuner._replace_module`` rebinds ``weight`` /
    ``bias`` when a layer is unloaded, which a block does not have; it is put back as it is."""

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        base = child.base_layer if hasattr(child, "base_layer") else child
        if hasattr(new_module, "base_layer") or isinstance(getattr(base, "weight", None), torch.Tensor):
            return super()._replace_module(parent, child_name, new_module, child)
        setattr(parent, child_name, new_module)  # unloading a block: the original module, untouched


class QPABottleneckModel(_BlockTargets, QPABaseModel):
    """QPA bottleneck (feed-forward) adapters: after each target, ``h + up(act(down(h)))`` (Houlsby et al., "Parameter-
    Efficient Transfer Learning for NLP", ICML 2019, arXiv:1902.00751) whose down/up weights and biases, for every
    target, come from one generator per adapter (QPA, arXiv:2410.09846).

    Example:
        ```py
        >>> import peft_qpa  # registers QPA_BOTTLENECK and BOTTLENECK with PEFT
        >>> from peft import get_peft_model
        >>> model = get_peft_model(llama, peft_qpa.QPABottleneckConfig(target_modules=["mlp"], bottleneck_size=16))
        >>> print(model.base_model.generator_summary())
        ```
    """

    prefix: str = "qpa_bottleneck_"
    tuner_layer_cls = QPABottleneckLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    classical_name = "the bottleneck adapters trained directly (BottleneckConfig)"
    card_tags = ("bottleneck-adapter",)
    card_classical_use = (
        "The generated tensors are saved with the adapter (the snapshot): after `import peft_qpa`,\n"
        "`PeftModel.from_pretrained` uses them as they are, and a forward without gradients runs no circuit simulation\n"
        "(loading simulates the circuit once, to check the loaded generator against the snapshot). A bottleneck adapter\n"
        "cannot be merged into the base weights (it is nonlinear): keep the adapter. To run it as a classical\n"
        "`peft_qpa.BottleneckConfig` adapter, copy the tensors over with `BottleneckModel.set_bottleneck_tensors`."
    )

    def card_description(self, config, targets) -> str:
        return (
            f"a bottleneck (feed-forward) adapter ({config.placement}, bottleneck size {config.bottleneck_size}, "
            f"{config.activation}; targets: {targets})"
        )

    def _prepare_adapter_config(self, peft_config, model_config):
        return _prepare_targets(peft_config, model_config)

    def _layer_kwargs(self, config: QPABottleneckConfig, target, current_key) -> dict:
        return {"settings": resolve_settings(config, target, current_key), "dropout": config.dropout,
                "inference_mode": config.inference_mode}

    def _check_merge_allowed(self):
        raise NotImplementedError(MERGE_ERROR)

    def bottleneck_tensors(self, adapter_name: str = "default") -> dict[str, dict[str, torch.Tensor]]:
        """The adapter's tensors by target (module name -> ``down_weight``, ``down_bias``, ``up_weight``,
        ``up_bias``), as the generator produces them now: what the classical baseline would hold
        (:meth:`BottleneckModel.set_bottleneck_tensors`)."""
        self.get_generator(adapter_name)  # a clear error for an unknown adapter
        return {
            name: {key: value.detach().clone() for key, value in layer.snapshot(adapter_name).items()}
            for name, layer in self._targeted_layers(adapter_name)
        }

    def classical_config(self, adapter_name: str = "default") -> BottleneckConfig:
        """A :class:`BottleneckConfig` with this adapter's targets and fields: the classical baseline."""
        return self.peft_config[adapter_name].classical_config()

    def generator_summary(self, adapter_name: str = "default") -> str:
        """Targets, bottleneck size, qubits, depth, M (every generated number), trainable parameters and their ratio to
        the classical bottleneck adapters with the same shapes (which train exactly the M numbers)."""
        layers = self._targeted_layers(adapter_name)
        config = self.peft_config[adapter_name]
        header = (
            f"QPA bottleneck adapters: {len(layers)} target(s), bottleneck size {config.bottleneck_size}, "
            f"{config.placement}, {config.activation}; M = {self.classical_parameter_count(adapter_name)}"
        )
        return header + "\n" + super().generator_summary(adapter_name)


class BottleneckModel(_BlockTargets, ReplacesTargets, BaseTuner):
    """The classical bottleneck (feed-forward) adapter, the baseline of :class:`QPABottleneckModel`: the same
    placement, activation, initialisation and forward, with the down/up weights and biases trained directly.

    Example:
        ```py
        >>> import peft_qpa
        >>> from peft import get_peft_model
        >>> model = get_peft_model(llama, peft_qpa.BottleneckConfig(target_modules=["mlp"], bottleneck_size=16))
        ```
    """

    prefix: str = "bottleneck_"
    tuner_layer_cls = BottleneckLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _prepare_adapter_config(self, peft_config, model_config):
        return _prepare_targets(peft_config, model_config)

    def _layer_kwargs(self, config: BottleneckConfig, target, current_key) -> dict:
        return {"settings": resolve_settings(config, target, current_key), "dropout": config.dropout,
                "init_weights": config.init_weights, "inference_mode": config.inference_mode}

    def _check_merge_allowed(self):
        raise NotImplementedError(MERGE_ERROR)

    def _targeted_layers(self, adapter_name: str) -> list[tuple[str, BottleneckLayer]]:
        return [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, BottleneckLayer) and adapter_name in module.bottleneck_down
        ]

    def bottleneck_parameter_count(self, adapter_name: str = "default") -> int:
        """The adapter's parameters (all trained): 2 d b + b + d per target."""
        return sum(layer.bottleneck_settings[adapter_name].numel() for _, layer in self._targeted_layers(adapter_name))

    @torch.no_grad()
    def set_bottleneck_tensors(self, tensors: dict[str, dict[str, torch.Tensor]], adapter_name: str = "default") -> None:
        """Copy tensors by target (as :meth:`QPABottleneckModel.bottleneck_tensors` returns them) into the adapter's
        parameters. Every target of the adapter must be given, with the same shapes."""
        layers = dict(self._targeted_layers(adapter_name))
        if set(layers) != set(tensors):
            raise ValueError(
                f"set_bottleneck_tensors: the targets differ: adapter '{adapter_name}' has {sorted(layers)}, the "
                f"tensors are for {sorted(tensors)}. Build the classical adapter with the same config (e.g. "
                "QPABottleneckModel.classical_config())."
            )
        for name, layer in layers.items():
            own = layer._bottleneck_tensors(adapter_name)
            for key, parameter in own.items():
                value = tensors[name][key]
                if tuple(value.shape) != tuple(parameter.shape):
                    raise ValueError(f"set_bottleneck_tensors: {name}.{key} has shape {tuple(value.shape)}, expected "
                                     f"{tuple(parameter.shape)}.")
                parameter.copy_(value.to(parameter.device, parameter.dtype))

    def bottleneck_tensors(self, adapter_name: str = "default") -> dict[str, dict[str, torch.Tensor]]:
        """The adapter's tensors by target (module name -> ``down_weight``, ``down_bias``, ``up_weight``, ``up_bias``)."""
        return {
            name: {key: value.detach().clone() for key, value in layer._bottleneck_tensors(adapter_name).items()}
            for name, layer in self._targeted_layers(adapter_name)
        }
