"""Export a QPA adapter as its classical twin, a plain PEFT adapter: inference then needs no quantum software.

:func:`export` is the one entry point for every member: QPA-LoRA/QPA-DoRA -> a LoRA (DoRA) adapter
(:func:`export_lora`), QPA prefix tuning -> a prefix-tuning adapter (:func:`export_prefix`). Members without a
plain-PEFT equivalent (Quantum-Train, bottleneck adapters) raise ``ValueError``."""

from __future__ import annotations

import json
import os

import torch
from peft import LoraConfig, PrefixTuningConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ..peft_types import BOTTLENECK, QPA, QPA_BOTTLENECK, QPA_PREFIX_TUNING, QT
from ..tuners.lora.layer import QPALayer
from ..tuners.prefix.model import GENERATOR_KEY, PROMPT_EMBEDDINGS_KEY, QPAPrefixEncoder, is_qpa_prefix
from ..tuners.saving import staged_directory

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"


def _method(config) -> str:
    """The adapter's type in peft_qpa's terms (``QPA_PREFIX_TUNING`` for ours, whose ``peft_type`` is PEFT's)."""
    kind = getattr(config, "qpa_peft_type", None) or getattr(config, "peft_type", None)
    return str(getattr(kind, "value", kind))


def export(model, save_directory: str, adapter_name: str = "default"):
    """Write the adapter's classical twin as a plain PEFT adapter, which ``peft`` loads without ``peft_qpa``.

    * QPA-LoRA / QPA-DoRA (``QPAConfig``): a LoRA adapter (a DoRA adapter for ``use_dora=True``), see
      :func:`export_lora`;
    * QPA prefix tuning (``QPAPrefixTuningConfig``): a prefix-tuning adapter (``PrefixTuningConfig``) whose prompt
      embeddings are the generated prefixes, see :func:`export_prefix`.

    Returns the PEFT config written. Raises ``ValueError`` for a member without a plain-PEFT equivalent:
    Quantum-Train (use ``merge_and_unload()``) and bottleneck adapters.
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        names = list(configs) if isinstance(configs, dict) else []
        raise ValueError(f"No adapter named {adapter_name!r} to export; adapters: {names}.")
    method = _method(configs[adapter_name])
    if method == QPA:
        return export_lora(model, save_directory, adapter_name=adapter_name)
    if method == QPA_PREFIX_TUNING:
        return export_prefix(model, save_directory, adapter_name=adapter_name)
    if method == QT:
        raise ValueError(
            f"Adapter {adapter_name!r} is Quantum-Train (QT): it generates the full weight update of its targets, which "
            "has no plain-PEFT adapter type. Use merge_and_unload() to get a classical model with the trained weights "
            "(save it with save_pretrained)."
        )
    if method in (QPA_BOTTLENECK, BOTTLENECK):
        raise ValueError(
            f"Adapter {adapter_name!r} is a bottleneck adapter ({method}): there is no plain-PEFT equivalent (PEFT has "
            "no bottleneck adapter type), so it cannot be exported. Keep it as it is (peft_qpa loads it), or use "
            "merge_and_unload() where the adapter supports merging."
        )
    raise ValueError(f"Adapter {adapter_name!r} is a {method} adapter, not a peft_qpa member: there is nothing to export.")


def export_prefix(peft_model, save_directory: str, adapter_name: str = "default") -> PrefixTuningConfig:
    """Write a QPA prefix-tuning adapter as a plain PEFT prefix-tuning adapter (``peft_type: PREFIX_TUNING``).

    ``prompt_embeddings`` (PEFT's key for prefix tuning's table, ``num_virtual_tokens`` x ``num_layers * 2 *
    token_dim``) holds the generated prefixes as they are now, in float32; the config is the same prefix tuning
    (``prefix_projection=False``, the same ``num_virtual_tokens``, ``token_dim``, ``num_layers``, heads, task type).
    Plain ``peft`` loads it with ``PeftModel.from_pretrained`` and gives the same logits in the forward. Its
    ``generate()`` is then PEFT's own, with PEFT's behaviour. Entries of ``modules_to_save`` are exported too.
    Returns the ``PrefixTuningConfig`` written."""
    config = peft_model.peft_config.get(adapter_name)
    encoders = getattr(peft_model, "prompt_encoder", None)
    encoder = encoders[adapter_name] if encoders is not None and adapter_name in encoders else None
    if config is None or not is_qpa_prefix(config) or not isinstance(encoder, QPAPrefixEncoder):
        raise ValueError(f"{adapter_name!r} is not a QPA prefix-tuning adapter of this model.")
    _refuse_to_overwrite_another_adapter(save_directory, expected="PREFIX_TUNING")
    state_dict = {}
    for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items():
        if not key.startswith(GENERATOR_KEY):
            state_dict[key] = value.detach().clone().contiguous()
    state_dict[PROMPT_EMBEDDINGS_KEY] = encoder.adapter_state_dict()[PROMPT_EMBEDDINGS_KEY]
    prefix_config = PrefixTuningConfig(
        task_type=config.task_type,
        num_virtual_tokens=config.num_virtual_tokens,
        token_dim=config.token_dim,
        num_transformer_submodules=config.num_transformer_submodules,
        num_attention_heads=config.num_attention_heads,
        num_layers=config.num_layers,
        encoder_hidden_size=config.encoder_hidden_size,
        prefix_projection=False,
        modules_to_save=config.modules_to_save,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    _write_adapter(save_directory, state_dict, prefix_config)
    return prefix_config


def export_lora(peft_model, save_directory: str, adapter_name: str = "default") -> LoraConfig:
    """Write the adapter's generated tensors as a plain LoRA adapter (``peft_type: LORA``).

    Every target is written under PEFT LoRA's own names and shapes: ``lora_A.weight``/``lora_B.weight`` (Linear,
    Conv1D; 4-d kernels for Conv2d), ``lora_embedding_A``/``lora_embedding_B`` (Embedding). A QPA-DoRA adapter is
    written as a DoRA adapter (``use_dora=True``) whose ``lora_magnitude_vector`` is the trained magnitude m0 + Δm.
    Plain ``peft`` (without ``peft_qpa``) loads the result with ``PeftModel.from_pretrained`` and gives the same
    logits. Modules in ``modules_to_save`` and trained biases are exported too. Returns the ``LoraConfig`` written.
    """
    tuner = peft_model.base_model
    config = peft_model.peft_config.get(adapter_name)
    if config is None or not hasattr(tuner, "get_generator"):
        raise ValueError(f"{adapter_name!r} is not a QPA adapter of this model; adapters: {list(peft_model.peft_config)}.")
    _refuse_to_overwrite_another_adapter(save_directory)
    tuner.generated_cache(adapter_name).refresh(force=True)

    state_dict = {}
    target_modules = []
    for name, module in tuner.model.named_modules():
        if not isinstance(module, QPALayer) or not module.has_qpa_adapter(adapter_name):
            continue
        target_modules.append(name)
        state_dict.update(_layer_entries(module, f"base_model.model.{name}", adapter_name))
    if not target_modules:
        raise ValueError(f"Adapter {adapter_name!r} has no QPA layers to export.")
    # modules_to_save and biases: method-agnostic entries of the adapter's own state dict
    for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False).items():
        if f".{tuner.prefix}" not in key and tuner.generator_attr not in key:
            state_dict[key] = value.detach().clone().contiguous()

    lora_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        target_modules=target_modules,
        lora_dropout=config.lora_dropout,
        fan_in_fan_out=config.fan_in_fan_out,
        use_dora=bool(getattr(config, "use_dora", False)),
        bias="lora_only" if config.bias == "qpa_only" else config.bias,
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    _write_adapter(save_directory, state_dict, lora_config)
    return lora_config


def _write_adapter(save_directory, state_dict: dict, config) -> None:
    """A plain PEFT adapter (weights in float32, then its config), published whole through a staged directory."""
    with staged_directory(save_directory) as staging:
        save_file({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()},
                  os.path.join(staging, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(staging)


def _layer_entries(module: QPALayer, key: str, adapter_name: str) -> dict:
    """One layer's tensors under PEFT LoRA's state-dict names (from the fresh snapshot): the buffers and PEFT's
    keys are those of the layer's table (``QPALayer.SNAPSHOTS``)."""
    lora_a, lora_b = (getattr(module, names.buffer)[adapter_name].detach() for names in (module.A, module.B))
    lora_a, lora_b = module.peft_shapes(lora_a, lora_b)
    entries = {f"{key}.{module.A.twin_key}": lora_a, f"{key}.{module.B.twin_key}": lora_b}
    if module.use_dora.get(adapter_name, False):
        entries[f"{key}.{module.MAGNITUDE.twin_key}"] = module.magnitude(adapter_name).detach()
    return {k: v.clone().contiguous() for k, v in entries.items()}


def _refuse_to_overwrite_another_adapter(save_directory, expected: str = "LORA") -> None:
    """Exporting over a QPA adapter (or any adapter of another type than ``expected``) would destroy it: refuse."""
    config_path = os.path.join(os.fspath(save_directory), "adapter_config.json")
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path, encoding="utf-8") as f:
            peft_type = json.load(f).get("peft_type")
    except (OSError, ValueError):
        peft_type = "unreadable"
    if peft_type != expected:
        kind = "a QPA adapter" if peft_type == "QPA" else f"an adapter of type {peft_type!r}"
        twin = "LoRA" if expected == "LORA" else "prefix-tuning"
        raise ValueError(
            f"{save_directory} holds {kind}; exporting the {twin} twin there would overwrite it (as a QPA adapter, its "
            "generator would be lost). Export into another directory, e.g. f'{save_directory}-lora'."
        )
