"""The machinery every QPA method's tuner shares, whatever tensors its layers need.

* :class:`QPABaseLayer`: a tuner layer with no trainable parameter of its own. It declares the tensors it
  needs as :class:`GeneratedTensor` records (name, shape, initialization, and the ``BufferDict`` holding its
  snapshot); in a forward it reads them with :meth:`QPABaseLayer.generated`, live from the generator while
  training, from the snapshot otherwise.
* :class:`QPABaseModel`: a ``BaseTuner`` that owns one shared generator per adapter (a ``ModuleDict`` saved
  under ``<prefix>generator``), builds it from every layer's declarations once the adapter is injected,
  generates once per forward of the whole model, keeps snapshots fresh for saving, cross-checks them on
  load, and overrides the trainability, casting and deletion hooks that PEFT's generic code applies to
  per-layer weights only.

* :class:`ReplacesTargets`: ``_create_and_replace`` as every member's tuner (QPA or classical) does it.

A method (``lora/``, ``qt/``, ...) subclasses both: its layers name their snapshots in one table
(:attr:`QPABaseLayer.SNAPSHOTS`), declare their tensors and implement forward, merge and unmerge; its model
says how to build its layers (``_layer_kwargs``, ``_create_new_module``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import resolve_quantization_backend
from torch import nn
from transformers.utils import logging

from ..generator import QPAGenerator, TensorSpec
from . import distributed
from .cache import GeneratedCache
from .forward import ForwardHooksMixin
from .state import GENERATOR_SUFFIX, AdapterStateMixin

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class GeneratedTensor:
    """One tensor a layer needs from its adapter's generator.

    ``name`` is the tensor's name within the layer (e.g. ``"lora_A"``); ``init`` its initialization (see
    :class:`~peft_qpa.generator.TensorSpec`); ``snapshot`` the name of the layer's ``BufferDict`` that holds
    its snapshot, keyed by adapter name (saved with the adapter)."""

    name: str
    shape: tuple[int, ...]
    init: str
    snapshot: str


@dataclass(frozen=True)
class TensorNames:
    """The names of one generated tensor, written once per member (its layer's ``SNAPSHOTS`` table) so that the
    layer, the saved keys and the export agree: ``name`` in the layer and the generator, ``buffer`` the layer's
    ``BufferDict`` holding its snapshot (the saved key), ``twin_key`` its key in the classical twin's adapter
    (PEFT's name, for the members that export one)."""

    name: str
    buffer: str
    twin_key: Optional[str] = None

    def declare(self, shape: tuple[int, ...], init: str) -> GeneratedTensor:
        return GeneratedTensor(self.name, tuple(shape), init, self.buffer)


class QPABaseLayer(BaseTunerLayer):
    """Base of every QPA tuner layer. Subclasses name their generated tensors in :attr:`SNAPSHOTS` (the base
    creates the snapshot ``BufferDict`` of each), end ``update_layer`` with :meth:`_finish_update` and list the
    snapshot buffers in ``other_param_names`` (after :attr:`GENERIC_STATE`).

    A concrete layer lists its tuner layer class before ``nn.Module`` (``class Linear(QPALayer, nn.Module)``),
    so that the layer's forward and ``__repr__`` are not shadowed by ``nn.Module``'s."""

    # No per-layer trainable weights: the trainable state lives in the tuner's shared generator.
    adapter_layer_names: tuple[str, ...] = ()
    # Per-adapter state that delete_adapter must drop too: the declarations, the generator reference, the
    # declared tensors' names in the generator, and what a merge added to the base weight.
    GENERIC_STATE = ("_qpa_declared", "_qpa_caches", "_qpa_tensor_names", "_qpa_merged")
    other_param_names: tuple[str, ...] = GENERIC_STATE
    # The member's one table of generated tensors, by role: their names in the layer and the generator, their
    # snapshot buffers (saved keys) and, where exported, the classical twin's keys.
    SNAPSHOTS: dict[str, TensorNames] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, nn.Module) and cls.forward is nn.Module.forward:
            raise TypeError(
                f"{cls.__qualname__}: list the tuner layer class before nn.Module in the bases; nn.Module's forward "
                "would shadow the layer's."
            )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        for names in self.SNAPSHOTS.values():
            setattr(self, names.buffer, BufferDict({}, persistent=True))
        # Quantized base layers (bitsandbytes, HQQ, torchao): merge/unmerge read and write the base weight
        # through PEFT's backend, as VeRA and LoRA do.
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        self._qpa_declared: dict[str, list[GeneratedTensor]] = {}
        # Plain dicts, so that the generator (reached through its cache) is not registered (and saved) once per layer.
        self._qpa_caches: dict[str, GeneratedCache] = {}
        self._qpa_tensor_names: dict[str, dict[str, str]] = {}  # adapter -> tensor name -> name in the generator
        self._qpa_merged: dict[str, Any] = {}  # adapter -> what merge() added (unmerge subtracts exactly that)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

    # --- declaring and reading generated tensors ---------------------------------------------------------
    def add_generated(self, adapter_name: str, tensors: list[GeneratedTensor]) -> None:
        """Declare the tensors ``adapter_name`` needs and create zero placeholders for their snapshots (the
        generator, built once every layer of the adapter exists, writes the first snapshot)."""
        self._qpa_declared[adapter_name] = list(tensors)
        for tensor in tensors:
            getattr(self, tensor.snapshot)[adapter_name] = torch.zeros(tensor.shape)

    def _finish_update(self, adapter_name: str, tensors: list[GeneratedTensor], inference_mode: bool = False) -> None:
        """The end of every member's ``update_layer``, as PEFT's layers end theirs: declare the tensors, follow the
        base layer's device and dtype, and keep the active adapters (and their trainability) as they are."""
        self.add_generated(adapter_name, tensors)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def declared(self, adapter_name: str) -> list[GeneratedTensor]:
        return self._qpa_declared.get(adapter_name, [])

    def has_qpa_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self._qpa_declared

    def generated(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The declared tensors for this forward, by name: the generator's live (differentiable) output while
        gradients are needed, else the snapshot (regenerated first if the generator changed)."""
        cache = self._qpa_caches.get(adapter_name)
        if cache is not None:
            live = cache.live(training=self.training)
            if live is not None:
                return {name: live[full] for name, full in self._qpa_tensor_names[adapter_name].items()}
        return self._snapshot_tensors(adapter_name)

    def snapshot(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The declared tensors as the generator produces them now (regenerated if it changed in any way)."""
        cache = self._qpa_caches.get(adapter_name)
        if cache is not None:
            cache.refresh()
        return self._snapshot_tensors(adapter_name)

    def _snapshot_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {t.name: getattr(self, t.snapshot)[adapter_name] for t in self.declared(adapter_name)}

    # --- the forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output with each active adapter's term added (:meth:`_add_adapter_output`); the base
        layer alone while adapters are disabled (unmerging first) or merged. A method whose adapter is not an
        additive term of one layer (e.g. bottleneck adapters) defines its own forward."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter_name in self.active_adapters:
            if self.has_qpa_adapter(adapter_name):
                result = self._add_adapter_output(adapter_name, x, result, self.generated(adapter_name))
        return result.to(result_dtype)

    def _add_adapter_output(
        self, adapter_name: str, x: torch.Tensor, result: torch.Tensor, tensors: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``result`` (the output so far) with ``adapter_name``'s term, computed from its ``tensors``."""
        raise NotImplementedError




class ReplacesTargets:
    """``_create_and_replace`` (PEFT's ``BaseTuner`` calls it for each matched target) written once for every
    member's tuner, QPA or classical: a target that already is one of the member's layers
    (``tuner_layer_cls``) gets the adapter added by its ``update_layer``; any other module is wrapped in a new
    layer, frozen unless its adapter is active. A tuner says what its layers take (:meth:`_layer_kwargs`) and,
    unless ``tuner_layer_cls`` is itself the one layer class to build, which layer wraps a target
    (:meth:`_create_new_module`)."""

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        layer_kwargs = self._layer_kwargs(config, target, current_key)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, **layer_kwargs)
            return
        new_module = self._create_new_module(config, adapter_name, target, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _layer_kwargs(self, config, target: nn.Module, current_key: str) -> dict[str, Any]:
        """The keyword arguments of the layer's ``update_layer`` for ``target`` (a new layer is built with them too)."""
        raise NotImplementedError

    def _create_new_module(self, config, adapter_name: str, target: nn.Module, **layer_kwargs: Any) -> nn.Module:
        """The layer that wraps ``target``."""
        return self.tuner_layer_cls(target, adapter_name, **layer_kwargs)


class QPABaseModel(ReplacesTargets, AdapterStateMixin, ForwardHooksMixin, BaseTuner):
    """Base of every QPA tuner: one generator per adapter, shared by all the adapter's layers.

    Subclasses set ``prefix``, ``tuner_layer_cls`` (a :class:`QPABaseLayer` subclass), ``target_module_mapping``,
    ``classical_name`` and implement :meth:`~ReplacesTargets._layer_kwargs` (and ``_create_new_module`` where
    several layer classes exist)."""

    uses_shared_state: bool = True
    # What the generated numbers replace (generator_summary's ratio line, the model card), and how to use the
    # trained result without quantum software (the model card).
    classical_name: str = "the classical adapter with the same shapes"
    card_classical_use: str = ""
    card_tags: tuple[str, ...] = ()  # the method's model-card tags, besides qpa, quantum, peft-qpa

    def card_description(self, config, targets) -> str:
        """The model card's "This adapter is ..." phrase."""
        return f"an adapter (targets: {targets})"

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, **kwargs):
        new = config[adapter_name] if isinstance(config, dict) else config
        existing = getattr(model, "peft_config", {}).get(adapter_name)
        if existing is not None and existing.peft_type != new.peft_type:
            raise ValueError(
                f"The model already carries a {getattr(existing.peft_type, 'value', existing.peft_type)} adapter named "
                f"{adapter_name!r} (added with inject_adapter_in_model); give this one another name (adapter_name=...): "
                "under one name PEFT would replace that adapter's config and save its weights as this adapter's."
            )
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, **kwargs)
        # Generate once per forward of the whole model, before any (checkpointed) layer runs.
        self._forward_hook_handle = self.model.register_forward_pre_hook(self._begin_forward, with_kwargs=True)
        self._forward_end_hook_handle = self.model.register_forward_hook(self._end_forward)
        # Make the saved snapshot match the current generator whenever a state dict is taken.
        self.register_state_dict_pre_hook(self._refresh_before_state_dict)
        # After a load, check that the loaded generator reproduces the loaded snapshot.
        self.register_load_state_dict_post_hook(self._after_load)

    # --- shared state ----------------------------------------------------------------------------------
    @property
    def generator_attr(self) -> str:
        """The tuner attribute holding the generators, e.g. ``qpa_generator`` (it contains PEFT's prefix)."""
        return f"{self.prefix}{GENERATOR_SUFFIX}"

    def _generators(self) -> nn.ModuleDict:
        if self.generator_attr not in self._modules:
            self.add_module(self.generator_attr, nn.ModuleDict())
        return self._modules[self.generator_attr]

    def _caches(self) -> dict[str, GeneratedCache]:
        """Adapter name -> its :class:`GeneratedCache` (a plain dict: the cache holds no state to save)."""
        if "_qpa_cache_dict" not in self.__dict__:
            self.__dict__["_qpa_cache_dict"] = {}
        return self.__dict__["_qpa_cache_dict"]

    def generated_cache(self, adapter_name: str = "default") -> GeneratedCache:
        """The adapter's generated tensors: ``.refresh(force=True)`` regenerates its snapshots now,
        ``.disagreement()`` compares them with the generator's output, ``.drop_live()`` releases the live ones."""
        self.get_generator(adapter_name)  # a clear error for an unknown adapter
        return self._caches()[adapter_name]

    def get_generator(self, adapter_name: str = "default") -> QPAGenerator:
        """The generator module of an adapter: ``.n_qubits``, ``.circuit()``, ``.probabilities()``, ``.generate()``."""
        generators = self._generators()
        if adapter_name not in generators:
            raise ValueError(f"No {self.peft_type_name} adapter named {adapter_name!r}; adapters: {list(generators.keys())}.")
        return generators[adapter_name]

    @property
    def peft_type_name(self) -> str:
        config = next(iter(self.peft_config.values()), None)
        peft_type = getattr(config, "peft_type", None)
        return str(getattr(peft_type, "value", peft_type or "QPA"))

    def _targeted_layers(self, adapter_name: str) -> list[tuple[str, QPABaseLayer]]:
        return [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, QPABaseLayer) and module.has_qpa_adapter(adapter_name)
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
        for module_name, layer in layers:
            names = {}
            for tensor in layer.declared(adapter_name):
                full = f"{module_name}.{tensor.name}"
                specs.append(TensorSpec(full, tuple(tensor.shape), tensor.init))
                targets[full] = (getattr(layer, tensor.snapshot), adapter_name)
                names[tensor.name] = full
            layer._qpa_tensor_names[adapter_name] = names
        generator = QPAGenerator.from_config(config, specs, init_weights=getattr(config, "init_weights", True))
        # FSDP must leave the generator whole on every rank (tuners/distributed.py)
        distributed.keep_whole(generator)
        device = _base_parameter(layers[0][1]).device
        # Under low_cpu_mem_usage (accelerate's init_empty_weights) the parameters are created on the meta device
        # and only materialized by the checkpoint that is loaded next; like PEFT's layers, leave them there.
        on_meta = any(p.is_meta for p in generator.parameters())
        if device.type != "meta" and not on_meta:
            generator = generator.to(device)
        cache = GeneratedCache(generator, targets, member=self.peft_type_name, adapter_name=adapter_name)
        self._generators()[adapter_name] = generator
        self._caches()[adapter_name] = cache
        for _, layer in layers:
            layer._qpa_caches[adapter_name] = cache
        generator.requires_grad_(adapter_name in self.active_adapters and not config.inference_mode)
        if not on_meta:
            cache.refresh()
        from .model_card import TAGS, card_facts

        config._model_card_facts = card_facts(config, generator, self.classical_parameter_count(adapter_name), self)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(list(TAGS) + list(self.card_tags))
        logger.info("%s adapter %r:\n%s", self.peft_type_name, adapter_name, self.generator_summary(adapter_name))


    # --- shared-state overrides (the generic code only sees per-layer weights) ---------------------------
    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for name, generator in self._generators().items():
            config = self.peft_config.get(name)
            generator.requires_grad_(name in self.active_adapters and config is not None and not config.inference_mode)

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
        cache = self._caches().pop(adapter_name, None)
        if cache is not None:
            cache.drop_live()
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
        dtype = _base_parameter(layers[0][1]).dtype
        if dtype.is_floating_point:
            self._generators()[adapter_name].to(dtype)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        self._forward_hook_handle.remove()
        self._forward_end_hook_handle.remove()
        return model


    # --- reporting --------------------------------------------------------------------------------------
    def classical_parameter_count(self, adapter_name: str = "default") -> int:
        """Trainable parameters of the classical twin (the generated tensors trained directly): M."""
        return self.get_generator(adapter_name).num_generated

    def generator_summary(self, adapter_name: str = "default") -> str:
        """Qubits, depth, circuit/MLP parameters, M, and the ratio of trainable parameters to the classical twin's."""
        return self.get_generator(adapter_name).summary(self.classical_parameter_count(adapter_name), self.classical_name)


def _base_parameter(layer: QPABaseLayer) -> torch.Tensor:
    """The target's weight, or its first parameter for a target without one (e.g. a whole MLP block)."""
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return next(base.parameters())
