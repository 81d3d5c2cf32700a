"""Export a QPA adapter as a standard PEFT LoRA adapter: inference then needs no quantum software."""

from __future__ import annotations

import json
import os

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ..tuners.lora.layer import Conv2d, Embedding, QPALayer
from ..tuners.saving import staged_directory

SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"


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
    generator = tuner.get_generator(adapter_name)
    generator.refresh_snapshot(force=True)

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
        if ".qpa_" not in key and f"{tuner.prefix}generator" not in key:
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
    with staged_directory(save_directory) as staging:
        save_file({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()},
                  os.path.join(staging, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        lora_config.save_pretrained(staging)
    return lora_config


def _layer_entries(module: QPALayer, key: str, adapter_name: str) -> dict:
    """One layer's tensors under PEFT LoRA's state-dict names (from the fresh snapshot)."""
    lora_a = getattr(module, f"qpa_{module.A_NAME}")[adapter_name].detach()
    lora_b = getattr(module, f"qpa_{module.B_NAME}")[adapter_name].detach()
    if isinstance(module, Embedding):
        entries = {f"{key}.lora_embedding_A": lora_a, f"{key}.lora_embedding_B": lora_b}
    else:
        if isinstance(module, Conv2d):
            lora_a, lora_b = module.conv_shapes(lora_a, lora_b)
        entries = {f"{key}.lora_A.weight": lora_a, f"{key}.lora_B.weight": lora_b}
    if module.use_dora.get(adapter_name, False):
        entries[f"{key}.lora_magnitude_vector"] = module.magnitude(adapter_name).detach()
    return {k: v.clone().contiguous() for k, v in entries.items()}


def _refuse_to_overwrite_another_adapter(save_directory) -> None:
    """Exporting over a QPA adapter (or any non-LoRA adapter) would destroy its generator: refuse."""
    config_path = os.path.join(os.fspath(save_directory), "adapter_config.json")
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path, encoding="utf-8") as f:
            peft_type = json.load(f).get("peft_type")
    except (OSError, ValueError):
        peft_type = "unreadable"
    if peft_type != "LORA":
        kind = "a QPA adapter" if peft_type == "QPA" else f"an adapter of type {peft_type!r}"
        raise ValueError(
            f"{save_directory} holds {kind}; exporting the LoRA twin there would overwrite it (as a QPA adapter, its "
            "generator would be lost). Export into another directory, e.g. f'{save_directory}-lora'."
        )
