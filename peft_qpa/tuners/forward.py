"""Once per forward of the whole model: a forward pre-hook on the wrapped model asks each active adapter's cache to
generate (or check its snapshot) before any layer, gradient-checkpointed or not, runs; a forward hook ends it.

The pre-hook also notices FSDP (several ranks, the model managed by ``fully_shard`` or ``FullyShardedDataParallel``)
and makes each generator a replica whose gradients are averaged across ranks, and refuses a generator that DeepSpeed
ZeRO-3 partitions (``distributed.py``).

:class:`ForwardHooksMixin` is part of :class:`~peft_qpa.tuners.base.QPABaseModel`; it relies on the tuner's
``_generators``, ``_caches``, ``tuner_layer_cls``, ``active_adapters`` and ``model``.
"""

from __future__ import annotations

import torch

from . import distributed


class ForwardHooksMixin:
    """The forward hooks (see the module docstring)."""

    def _begin_forward(self, module, args, kwargs=None):
        generators = self._generators()
        active = [name for name in self.active_adapters if name in generators]
        if not active:
            return
        for adapter_name in active:  # DeepSpeed ZeRO-3 must not partition a generator (cheap: a few attributes)
            cache = self._caches().get(adapter_name)
            if cache is not None:
                distributed.refuse_partitioned(generators[adapter_name], cache.member, adapter_name)
                distributed.gather_persistent(generators[adapter_name])
        check_fsdp = distributed.multi_process() and not all(c.syncs_gradients for c in self._caches().values())
        disabled, merged, reentrant, fsdp = self._forward_state(check_fsdp=check_fsdp)
        if fsdp:
            self._replicate_generators(distributed.input_device(args, kwargs))
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
                self._caches()[adapter_name].begin_forward(training=training, reentrant_checkpointing=reentrant)

    def _end_forward(self, module, args, output):
        for cache in self._caches().values():
            cache.end_forward()

    def _forward_state(self, check_fsdp: bool = False) -> tuple[bool, set, bool, bool]:
        """One pass over the model: whether the QPA layers are disabled, the adapters merged into any layer, whether
        transformers' gradient (activation) checkpointing is on with ``use_reentrant=True``, and (with
        ``check_fsdp``) whether FSDP manages the model or any of its modules.

        Checkpointing is read from the checkpointed modules themselves (``gradient_checkpointing`` and the
        ``_gradient_checkpointing_func`` partial that transformers sets on them), not from the model's deprecated
        ``is_gradient_checkpointing`` property."""
        disabled, merged, reentrant, fsdp = None, set(), None, False
        fsdp_types = distributed.fsdp_module_types() if check_fsdp else ()
        for module in self.model.modules():
            if check_fsdp and not fsdp:
                fsdp = distributed.is_fsdp_managed(module, fsdp_types)
            if isinstance(module, self.tuner_layer_cls):
                if disabled is None:
                    disabled = module.disable_adapters
                merged.update(module.merged_adapters)
            elif reentrant is None and getattr(module, "gradient_checkpointing", False) is True:
                func = getattr(module, "_gradient_checkpointing_func", None)
                if func is not None:
                    reentrant = bool(getattr(func, "keywords", {}).get("use_reentrant", True))
        return bool(disabled), merged, bool(reentrant), fsdp

    def _replicate_generators(self, device) -> None:
        """FSDP manages the model, in a process group of several ranks: make every generator not yet attached a
        replica (whole, on ``device``, rank 0's values) whose gradients each backward averages across the ranks. Runs
        at a forward, which under FSDP every rank runs at the same time."""
        caches = self._caches()
        for adapter_name, generator in self._generators().items():
            cache = caches.get(adapter_name)
            if cache is None or cache.syncs_gradients:
                continue
            distributed.refuse_sharded(generator, cache.member, adapter_name)
            distributed.attach(generator, device)
            cache.sync_gradients()


def _refuse_distributed_reentrant_checkpointing() -> None:
    """Reentrant checkpointing pushes the generator's gradient through it after each nested backward, outside
    the backward that DistributedDataParallel synchronises: the ranks' generators would drift apart silently."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() <= 1:
        return
    raise RuntimeError(
        "QPA does not support reentrant gradient checkpointing in distributed (DDP, FSDP, DeepSpeed) training: the "
        "generator's gradients would not be synchronised across ranks. Use non-reentrant checkpointing instead: "
        "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}), or with the "
        "HF Trainer, TrainingArguments(gradient_checkpointing=True, "
        "gradient_checkpointing_kwargs={'use_reentrant': False})."
    )
