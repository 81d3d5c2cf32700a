"""``QPAModel``: the PEFT tuner that injects QPA layers and owns one shared generator per adapter."""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import (
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    get_quantization_kwargs,
    resolve_quantization_backend,
)
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging

from .config import QPAConfig
from .generator import QPAGenerator
from .layer import Linear, QPALayer

logger = logging.get_logger(__name__)

GENERATOR_ATTR = "qpa_generator"


def build_generator(config: QPAConfig, specs, device=None) -> QPAGenerator:
    """The generator an adapter with ``config`` needs to fill ``specs``."""
    from .backends import check_generator_memory

    check_generator_memory(config, sum(s.numel for s in specs))  # before allocating anything user-sized
    dtype = torch.float64 if config.simulator_dtype == "float64" else torch.float32
    make_backend = None
    if config.backend != "statevector":
        from .backends import make_probability_backend

        make_backend = functools.partial(make_probability_backend, config, dtype=dtype)
    generator = QPAGenerator(
        specs,
        depth=config.qnn_depth,
        chunk_size=config.chunk_size,
        ansatz=config.ansatz,
        hidden_sizes=tuple(config.mapping_hidden_sizes),
        activation=config.mapping_activation,
        prob_gamma=config.prob_gamma,
        prob_beta=config.prob_beta,
        prob_alpha=config.prob_alpha,
        prob_eps=config.prob_eps,
        max_qubits=config.max_qubits,
        dtype=dtype,
        init_weights=config.init_weights,
        seed=config.seed,
        make_backend=make_backend,
    )
    return generator.to(device) if device is not None else generator


def _refuse_distributed_reentrant_checkpointing() -> None:
    """Reentrant checkpointing pushes the generator's gradient through it after each nested backward, outside
    the backward that DistributedDataParallel synchronises: the ranks' generators would drift apart silently."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() <= 1:
        return
    raise RuntimeError(
        "QPA does not support reentrant gradient checkpointing in distributed (DDP) training: the generator's "
        "gradients would not be synchronised across ranks. Use non-reentrant checkpointing instead: "
        "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}), or with the "
        "HF Trainer, TrainingArguments(gradient_checkpointing=True, "
        "gradient_checkpointing_kwargs={'use_reentrant': False})."
    )


class QPAModel(BaseTuner):
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

    uses_shared_state: bool = True
    prefix: str = "qpa_"
    tuner_layer_cls = QPALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, **kwargs):
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        # Generate once per forward of the whole model, before any (checkpointed) layer runs.
        self._forward_hook_handle = self.model.register_forward_pre_hook(self._begin_forward)
        self._forward_end_hook_handle = self.model.register_forward_hook(self._end_forward)
        # Make the saved snapshot match the current generator whenever a state dict is taken.
        self.register_state_dict_pre_hook(self._refresh_before_state_dict)
        # After a load, check that the loaded generator reproduces the loaded snapshot.
        self.register_load_state_dict_post_hook(self._after_load)

    # --- shared state ----------------------------------------------------------------------------------
    def _generators(self) -> nn.ModuleDict:
        if GENERATOR_ATTR not in self._modules:
            self.add_module(GENERATOR_ATTR, nn.ModuleDict())
        return self._modules[GENERATOR_ATTR]

    def get_generator(self, adapter_name: str = "default") -> QPAGenerator:
        """The generator module of an adapter: ``.n_qubits``, ``.circuit()``, ``.probabilities()``, ``.generate()``."""
        generators = self._generators()
        if adapter_name not in generators:
            raise ValueError(f"No QPA adapter named {adapter_name!r}; adapters: {list(generators.keys())}.")
        return generators[adapter_name]

    def _targeted_layers(self, adapter_name: str) -> list[tuple[str, QPALayer]]:
        return [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, QPALayer) and adapter_name in module.qpa_lora_A
        ]

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, state_dict=None):
        # PeftModel.add_adapter / load_adapter call this directly (skipping _pre_injection_hook), so the
        # generator is built here, once every target of the adapter has its layer.
        # Adding an adapter must not change the trainability of the existing ones (BaseTuner.inject_adapter restores
        # it for parameters inside the model; the generators live on the tuner, so restore theirs here).
        existing = [(p, p.requires_grad) for generator in self._generators().values() for p in generator.parameters()]
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        for parameter, requires_grad in existing:
            parameter.requires_grad = requires_grad
        self._build_generator(adapter_name)

    def _build_generator(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        layers = self._targeted_layers(adapter_name)
        if not layers:
            return  # BaseTuner.inject_adapter already raised for a config that matched nothing
        specs, targets = [], {}
        for name, layer in layers:
            layer._qpa_module_name[adapter_name] = name
            for spec in layer.tensor_specs(adapter_name, name):
                specs.append(spec)
                suffix = spec.name.rsplit(".", 1)[1]
                targets[spec.name] = (layer.qpa_lora_A if suffix == "lora_A" else layer.qpa_lora_B, adapter_name)
        device = layers[0][1].get_base_layer().weight.device
        if device.type == "meta":
            device = None
        generator = build_generator(config, specs)
        # Under low_cpu_mem_usage (accelerate's init_empty_weights) the parameters are created on the meta device
        # and only materialized by the checkpoint that is loaded next; like PEFT's layers, leave them there.
        on_meta = any(p.is_meta for p in generator.parameters())
        if device is not None and not on_meta:
            generator = generator.to(device)
        generator.attach_snapshot(targets)
        generator.adapter_name = adapter_name
        self._generators()[adapter_name] = generator
        for _, layer in layers:
            layer._qpa_generators[adapter_name] = generator
        requires_grad = adapter_name in self.active_adapters and not config.inference_mode
        generator.requires_grad_(requires_grad)
        if not on_meta:
            generator.refresh_snapshot()
        from .model_card import TAGS, card_facts

        config._model_card_facts = card_facts(config, generator)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(list(TAGS))
        lora_params = sum(s.numel for s in specs)
        logger.info("QPA adapter %r:\n%s", adapter_name, generator.summary(lora_params))

    def _after_load(self, module, incompatible_keys) -> None:
        """After ``load_state_dict``: loaded snapshots are authoritative (bit-exact outputs after a reload), and an
        adapter whose generator was loaded too is cross-checked: a generator that does not reproduce its
        snapshot (a corrupted file, or an edited config field that keeps the shapes) is reported."""
        missing = incompatible_keys.missing_keys
        for adapter_name, generator in self._generators().items():
            if any(k.endswith(f".qpa_lora_A.{adapter_name}") or k.endswith(f".qpa_lora_B.{adapter_name}") for k in missing):
                continue  # this adapter's snapshot was not in the loaded state dict
            if any(p.is_meta for p in generator.parameters()):
                continue
            generator_loaded = not any(f"{GENERATOR_ATTR}.{adapter_name}." in k for k in missing)
            if generator_loaded:
                worst, tolerance, beyond, total = generator.snapshot_disagreement()
                if beyond:
                    config = self.peft_config.get(adapter_name)
                    warnings.warn(
                        f"QPA adapter '{adapter_name}': the loaded LoRA snapshot and the output regenerated from the "
                        f"loaded generator disagree (max |difference| {worst:.3g} in {beyond} of {total} numbers; "
                        f"rounding allows {tolerance:.2g}). The adapter's files changed after it was saved: a "
                        "corrupted adapter_model.safetensors, or an edited adapter_config.json field that keeps the "
                        "shapes (prob_*, mapping_activation, ansatz, backend, ...; now "
                        f"backend={getattr(config, 'backend', None)!r}, ansatz={getattr(config, 'ansatz', None)!r}). "
                        "Inference uses the saved snapshot; training would continue from the generator, whose output "
                        "differs. Re-save the adapter from the model that trained it, or restore the original config.",
                        UserWarning,
                        stacklevel=2,
                    )
            generator.mark_snapshot_fresh()

    def _begin_forward(self, module, args):
        generators = self._generators()
        active = [name for name in self.active_adapters if name in generators]
        if not active:
            return
        disabled, merged, reentrant = self._forward_state()
        if disabled:
            return  # the layers read nothing (e.g. a reference-model forward with the adapter disabled)
        training = self.model.training
        reentrant = reentrant and training and torch.is_grad_enabled()
        if reentrant:
            _refuse_distributed_reentrant_checkpointing()
        for adapter_name in active:
            # A merged adapter is already in the base weights: its layers read nothing, and drawing new shots or
            # advancing the step here would make unmerge subtract something else.
            if adapter_name not in merged:
                generators[adapter_name].begin_forward(training=training, reentrant_checkpointing=reentrant)

    def _end_forward(self, module, args, output):
        for generator in self._generators().values():
            generator.end_forward()

    def _forward_state(self) -> tuple[bool, set, bool]:
        """One pass over the model: whether the QPA layers are disabled, the adapters merged into any layer, and
        whether transformers' gradient (activation) checkpointing is on with ``use_reentrant=True``.

        Checkpointing is read from the checkpointed modules themselves (``gradient_checkpointing`` and the
        ``_gradient_checkpointing_func`` partial that transformers sets on them), not from the model's deprecated
        ``is_gradient_checkpointing`` property."""
        disabled, merged, reentrant = None, set(), None
        for module in self.model.modules():
            if isinstance(module, QPALayer):
                if disabled is None:
                    disabled = module.disable_adapters
                merged.update(module.merged_adapters)
            elif reentrant is None and getattr(module, "gradient_checkpointing", False) is True:
                func = getattr(module, "_gradient_checkpointing_func", None)
                if func is not None:
                    reentrant = bool(getattr(func, "keywords", {}).get("use_reentrant", True))
        return bool(disabled), merged, bool(reentrant)

    def _uses_reentrant_checkpointing(self) -> bool:
        """Whether transformers' gradient checkpointing is on with ``use_reentrant=True``."""
        return self._forward_state()[2]

    def _refresh_before_state_dict(self, module, prefix, keep_vars):
        for generator in self._generators().values():
            generator.refresh_snapshot(force=True)

    # --- injection -------------------------------------------------------------------------------------
    def _create_and_replace(self, qpa_config: QPAConfig, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        layer_kwargs = {
            "r": qpa_config.r,
            "lora_alpha": qpa_config.lora_alpha,
            "lora_dropout": qpa_config.lora_dropout,
            "fan_in_fan_out": qpa_config.fan_in_fan_out,
        }
        layer_kwargs.update(get_quantization_kwargs(self))
        if isinstance(target, QPALayer):
            target.update_layer(
                adapter_name, qpa_config.r, qpa_config.lora_alpha, qpa_config.lora_dropout,
                inference_mode=qpa_config.inference_mode,
            )
        else:
            new_module = self._create_new_module(qpa_config, adapter_name, target, **layer_kwargs)
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(qpa_config: QPAConfig, adapter_name: str, target: nn.Module, **kwargs) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        quantized = resolve_quantization_backend(base, get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass"))
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
                "`torch.nn.Linear` (optionally quantized) and `transformers.pytorch_utils.Conv1D`. Change `target_modules` so that it only "
                "matches such layers."
            )
        return Linear(target, adapter_name, inference_mode=qpa_config.inference_mode, **kwargs)

    # --- shared-state overrides (the generic code only sees per-layer weights) ---------------------------
    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._set_generator_grads()

    def _set_generator_grads(self) -> None:
        for name, generator in self._generators().items():
            config = self.peft_config.get(name)
            trainable = name in self.active_adapters and config is not None and not config.inference_mode
            generator.requires_grad_(trainable)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        for name, generator in self._generators().items():
            generator.requires_grad_(name in names and not inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        for name in names:
            if name in self._generators():
                self._generators()[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        generators = self._generators()
        if adapter_name in generators:
            generators[adapter_name].drop_live()
        super().delete_adapter(adapter_name)
        if adapter_name in generators:
            del generators[adapter_name]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        # The generator is created in simulator_dtype (float32 or float64). That is PEFT's autocast rule (adapter
        # weights in at least float32), so it stays there by default. With autocast_adapter_dtype=False, PEFT
        # adapters take the base layers' dtype: so does the generator.
        if autocast_adapter_dtype or adapter_name not in self._generators():
            return
        layers = self._targeted_layers(adapter_name)
        if not layers:
            return
        dtype = layers[0][1].get_base_layer().weight.dtype
        if dtype.is_floating_point:
            self._generators()[adapter_name].cast_(dtype)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        self._forward_hook_handle.remove()
        self._forward_end_hook_handle.remove()
        return model

    # --- state dict -------------------------------------------------------------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{GENERATOR_ATTR}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{GENERATOR_ATTR}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    # --- reporting --------------------------------------------------------------------------------------
    def lora_parameter_count(self, adapter_name: str = "default") -> int:
        """Trainable parameters plain LoRA would have with the same r and targets."""
        return self.get_generator(adapter_name).num_generated

    def generator_summary(self, adapter_name: str = "default") -> str:
        """Qubits, depth, circuit/MLP parameters, M, and the ratio to plain LoRA."""
        return self.get_generator(adapter_name).summary(self.lora_parameter_count(adapter_name))
