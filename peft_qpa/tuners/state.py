"""What a QPA tuner saves and loads beyond PEFT's generic handling: the snapshots made fresh whenever a state dict is
taken (and written fresh into one taken without the hooks, e.g. DeepSpeed ZeRO-3's consolidated state dict), the load
cross-check, adapters saved without their generated tensors, and the generator's key names.

:class:`AdapterStateMixin` is part of :class:`~peft_qpa.tuners.base.QPABaseModel`; it relies on the tuner's
``get_generator``, ``_caches``, ``_targeted_layers``, ``generator_attr`` and ``peft_config``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..generator import QPAGenerator
from . import distributed
from .cache import on_meta

GENERATOR_SUFFIX = "generator"


class AdapterStateMixin:
    """Saving and loading of the tuner's generated state (see the module docstring)."""

    def _snapshot_keys(self, adapter_name: str) -> list[str]:
        """State-dict keys (relative to the wrapped model) of the adapter's snapshots."""
        return [
            f"{module_name}.{tensor.snapshot}.{adapter_name}"
            for module_name, layer in self._targeted_layers(adapter_name)
            for tensor in layer.declared(adapter_name)
        ]

    def _after_load(self, module, incompatible_keys) -> None:
        """After ``load_state_dict``: loaded snapshots are authoritative (bit-exact outputs after a reload), and an
        adapter whose generator was loaded too is cross-checked: a generator that does not reproduce its
        snapshot (a corrupted file, or an edited config field that keeps the shapes) is reported."""
        missing = incompatible_keys.missing_keys
        for adapter_name, generator in self._generators().items():
            config = self.peft_config.get(adapter_name)
            snapshot_keys = self._snapshot_keys(adapter_name)
            if any(k.endswith(key) for k in missing for key in snapshot_keys):
                # This adapter's snapshot was not in the loaded state dict: nothing to check. An adapter saved with
                # save_generated_tensors=False regenerates it from the loaded generator.
                if not getattr(config, "save_generated_tensors", True) and self._generator_loaded(adapter_name, missing):
                    self._regenerate_after_load(adapter_name)
                    # Not missing: regenerated (the list may be edited in place; PEFT warns about what remains).
                    offset_key = f"{self.generator_attr}.{adapter_name}.offset"
                    missing[:] = [k for k in missing if not (k.endswith(offset_key)
                                                             or any(k.endswith(key) for key in snapshot_keys))]
                continue
            if on_meta(generator):
                continue  # nothing can be generated yet (parameters or buffers still on meta): the next use refreshes
            generator_loaded = not any(f"{self.generator_attr}.{adapter_name}." in k for k in missing)
            cache = self._caches()[adapter_name]
            if generator_loaded:
                cache.warn_if_loaded_disagrees("snapshot", (
                    "a corrupted adapter_model.safetensors, or an edited adapter_config.json field that keeps the "
                    "shapes (prob_*, mapping_activation, ansatz, backend, ...; now "
                    f"backend={getattr(config, 'backend', None)!r}, ansatz={getattr(config, 'ansatz', None)!r})"
                ))
            cache.mark_fresh()

    def _generator_loaded(self, adapter_name: str, missing: list[str]) -> bool:
        """Whether every parameter of the adapter's generator was in the loaded state dict."""
        marker = f"{self.generator_attr}.{adapter_name}."
        names = {name for name, _ in self.get_generator(adapter_name).named_parameters()}
        return not any(marker in k and k.split(marker, 1)[1] in names for k in missing)

    def _regenerate_after_load(self, adapter_name: str) -> None:
        """An adapter saved without its generated tensors (``save_generated_tensors=False``): the offset is the one its
        config and seed give (computed here if the generator was built on the meta device), and the snapshots are
        generated from the loaded generator."""
        generator = self.get_generator(adapter_name)
        if any(p.is_meta for p in generator.parameters()):
            return
        if generator.offset_pending or generator.offset.is_meta:
            config = self.peft_config[adapter_name]
            fresh = QPAGenerator.from_config(config, generator.specs, init_weights=getattr(config, "init_weights", True))
            device = next(generator.parameters()).device
            generator.offset = fresh.offset.to(device=device, dtype=generator.offset.dtype)
            generator.offset_pending = False
        self._caches()[adapter_name].refresh(force=True)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's selection of the adapter's entries; with ``save_generated_tensors=False`` without the generated
        tensors' snapshots and the generator's offset, which loading regenerates from the generator and the seed."""
        to_return = super()._get_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        tuner = getattr(model, "base_model", model)
        if getattr(config, "save_generated_tensors", True) or not hasattr(tuner, "_snapshot_keys"):
            return to_return
        dropped = {f".{key}" for key in tuner._snapshot_keys(adapter_name)}
        dropped.add(f".{tuner.generator_attr}.{adapter_name}.offset")
        return {k: v for k, v in to_return.items() if not any(f".{k}".endswith(end) for end in dropped)}

    def freshen_state_dict(self, state_dict: dict) -> None:
        """Write fresh snapshots into ``state_dict``, a state dict of the model taken without its state-dict hooks
        (DeepSpeed ZeRO-3's consolidated one, which the HF Trainer saves): its snapshot entries may be older than its
        generator. ``PeftModel.save_pretrained`` calls this when it is given a ``state_dict``; entries keep their dtype
        and device.

        The snapshots are generated from the generator entries of ``state_dict`` itself. Under DeepSpeed ZeRO-3 by a
        copy of the generator built from the adapter's config (the model's own runs ZeRO-3's collective hooks, and
        this is called on the main process alone); otherwise by the model's generator, when ``state_dict`` holds its
        current parameters (it was taken from this model, now)."""
        for adapter_name, cache in self._caches().items():
            generator = self.get_generator(adapter_name)
            values = self._generator_entries(state_dict, adapter_name)
            if values is None or on_meta(generator):
                continue
            if distributed.zero3_managed(generator):
                tensors = self._generate_from(adapter_name, values)
            else:
                if not all(torch.equal(values[name].to(p.device, p.dtype), p.detach())
                           for name, p in generator.named_parameters()):
                    continue
                cache.refresh(force=True)
                tensors = {name: buffers[key] for name, (buffers, key) in cache.targets.items()}
            fresh = {}
            for module_name, layer in self._targeted_layers(adapter_name):
                for tensor in layer.declared(adapter_name):
                    fresh[f"{module_name}.{tensor.snapshot}.{adapter_name}"] = tensors[f"{module_name}.{tensor.name}"]
            for key, value in list(state_dict.items()):
                tail = _matching_tail(key, fresh)
                if tail is not None and isinstance(value, torch.Tensor) and value.shape == fresh[tail].shape:
                    state_dict[key] = fresh[tail].detach().to(device=value.device, dtype=value.dtype).clone()

    def _generator_entries(self, state_dict: dict, adapter_name: str) -> Optional[dict]:
        """The adapter's generator entries of ``state_dict`` (parameters and saved buffers, by their name in the
        generator), or None unless every parameter is there with its shape."""
        marker = f"{self.generator_attr}.{adapter_name}."
        generator = self.get_generator(adapter_name)
        shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in generator.named_parameters()}
        values = {}
        for key, value in state_dict.items():
            if marker in key and isinstance(value, torch.Tensor):
                values[key.split(marker, 1)[1]] = value.detach()
        if not shapes or any(name not in values or tuple(values[name].shape) != shape for name, shape in shapes.items()):
            return None
        return values

    @torch.no_grad()
    def _generate_from(self, adapter_name: str, values: dict) -> dict:
        """The generated tensors of a generator holding ``values``: a copy built from the adapter's config, on the CPU."""
        config = self.peft_config[adapter_name]
        generator = self.get_generator(adapter_name)
        copy = QPAGenerator.from_config(config, generator.specs, init_weights=getattr(config, "init_weights", True))
        dtype = next(iter(copy.parameters())).dtype
        copy.load_state_dict({k: v.to("cpu", v.dtype if not v.is_floating_point() else dtype) for k, v in values.items()},
                             strict=False)
        return copy.split(copy.generate())

    def _refresh_before_state_dict(self, module, prefix, keep_vars):
        for cache in self._caches().values():
            cache.refresh(force=True)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{cls.prefix}{GENERATOR_SUFFIX}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{cls.prefix}{GENERATOR_SUFFIX}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


def _matching_tail(key: str, tails: dict) -> Optional[str]:
    """The entry of ``tails`` that ``key`` ends with at a dot boundary (``base_model.model.<tail>``), if any."""
    if key in tails:
        return key
    start = key.find(".")
    while start != -1:
        tail = key[start + 1:]
        if tail in tails:
            return tail
        start = key.find(".", start + 1)
    return None
