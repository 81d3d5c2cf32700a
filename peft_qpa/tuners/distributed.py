"""The shared generator under sharded data parallelism (FSDP2 ``fully_shard``, FSDP1, accelerate's FSDP plugin,
DeepSpeed ZeRO): it stays whole on every rank; under FSDP its gradients are averaged across ranks by the tuner.

Why whole: every adapted layer reads the generator's output, which is computed once per forward of the whole model
(``forward.py``), and outside any forward too: snapshots are regenerated for ``no_grad`` forwards, for every state
dict (``model.state_dict()``, ``get_model_state_dict``) and for ``peft_qpa.export``, often on one rank only (the main
process saves and exports). A sharded generator would need a collective at each of those points, and one called
on a single rank hangs. It is small (the circuit angles and a mapping MLP, kilobytes to a few megabytes), so
sharding it saves next to nothing.

How, without the user's help:

* :func:`keep_whole` marks each generator as torch's composable ``replicate`` API marks the modules it manages;
  ``fully_shard`` (FSDP2) and ``FullyShardedDataParallel`` (FSDP1) leave such subtrees out of their parameter
  groups (``torch.distributed.fsdp._fully_shard._fsdp_common._is_composable_with_fsdp`` and
  ``torch.distributed.fsdp._traversal_utils._composable``): the generator's parameters stay ordinary tensors,
  neither sharded nor moved, and FSDP does not reduce their gradients.
* At a forward, the tuner notices (:func:`is_fsdp_managed` on the wrapped model's modules) that FSDP manages the
  model in a process group of several ranks (:func:`multi_process`); :func:`attach` then moves each generator to the device the model computes on and broadcasts its
  parameters and buffers from rank 0 (as DistributedDataParallel does at construction).
* From then on, each backward that reaches a generator ends with one all-reduce (mean) of its gradients
  (:func:`queue_gradient_sync`, queued from a hook on the generated tensors, run after FSDP's own end-of-backward
  work), so the optimizer sees the same gradients, and the ranks keep the same generator, at every step.

A generator that FSDP shards anyway (a torch release that no longer honours the mark) is refused with an error
naming the fix (:func:`refuse_sharded`), never left to diverge.

DeepSpeed: ZeRO-1/2 keep parameters whole and reduce every gradient, the generator's too. ZeRO-3 partitions
parameters unless they are *persistent* (at most ``stage3_param_persistence_threshold`` numbers each).
:func:`refuse_partitioned` asks, at the first forward, for a persistence threshold that keeps every generator parameter
whole, and :func:`gather_persistent` gathers them there if ZeRO-3 has not yet (it re-gathers persistent parameters
after every optimizer step itself). ZeRO-3 also hooks every submodule's forward with collectives (it fetches, and
prefetches, parameters there), the generator's mapping included: under ZeRO-3 a generation outside a forward (saving,
exporting) must run on every rank, as every ZeRO-3 save does; :func:`zero3_gathered` gathers the generator for the
snapshot a ZeRO-3 checkpoint writes (DeepSpeed partitions even persistent parameters while it saves one).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import weakref
from typing import Any, Iterable, Optional

import torch
from torch import nn

# The name torch's composable ``replicate`` API registers on the modules it manages; FSDP skips such subtrees.
_REPLICATE = "replicate"


def _dist_available() -> bool:
    return torch.distributed.is_available()


def multi_process() -> bool:
    """A default process group with more than one rank."""
    return _dist_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def keep_whole(generator: nn.Module) -> None:
    """Mark ``generator`` so that FSDP (``fully_shard`` and ``FullyShardedDataParallel``) leaves it out of its
    parameter groups. Harmless without FSDP: only torch's composable distributed APIs read the mark."""
    if not _dist_available():
        return
    try:
        from torch.distributed._composable.contract import REGISTRY_KEY, RegistryItem
    except ImportError:  # a torch without the composable APIs has no FSDP2 either
        return
    registry = generator.__dict__.setdefault(REGISTRY_KEY, collections.OrderedDict())
    if isinstance(registry, dict):
        registry.setdefault(_REPLICATE, RegistryItem())


def fsdp_module_types() -> tuple[type, ...]:
    if not _dist_available():
        return ()
    types: list[type] = []
    try:
        from torch.distributed.fsdp import FSDPModule

        types.append(FSDPModule)
    except ImportError:
        pass
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:
        pass
    return tuple(types)


def is_fsdp_managed(module: nn.Module, fsdp_types: tuple[type, ...]) -> bool:
    """Whether FSDP manages ``module``: it is an FSDP module (``fully_shard`` applied to it, or an FSDP1 wrapper), or
    its parameters belong to an FSDP module above it (FSDP1 and FSDP2 flag every module they manage)."""
    return bool(getattr(module, "_is_fsdp_managed_module", False)) or (bool(fsdp_types) and isinstance(module, fsdp_types))


def is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor (FSDP2's sharded parameter) or an FSDP1 flat parameter (both need an initialized process group)."""
    if not (_dist_available() and torch.distributed.is_initialized()):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor) or bool(getattr(tensor, "_is_flat_param", False))


def refuse_sharded(generator: nn.Module, member: str, adapter_name: str) -> None:
    """Raise if any parameter of ``generator`` is sharded by FSDP: the ranks would have to gather it at every
    generation, and a rank that saves, exports or evaluates alone would hang."""
    sharded = [name for name, p in generator.named_parameters() if is_sharded(p)]
    if not sharded:
        return
    raise RuntimeError(
        f"{member} adapter '{adapter_name}': FSDP sharded the generator's parameters ({', '.join(sharded[:3])}"
        f"{' ...' if len(sharded) > 3 else ''}). The generator must stay whole on every rank: every adapted layer reads "
        "its output, and saving, exporting and evaluating regenerate from it, often on one rank. peft_qpa marks it so "
        "that FSDP leaves it out; this torch version did not honour the mark. Exclude the generator explicitly: "
        "fully_shard(model, ignored_params=set(model.base_model.qpa_generator.parameters())) with FSDP2, "
        "FullyShardedDataParallel(model, ignored_modules=[model.base_model.qpa_generator]) with FSDP1 (use the "
        "generator attribute of your method, e.g. qt_generator). peft_qpa then averages its gradients across ranks."
    )


def refuse_partitioned(generator: nn.Module, member: str, adapter_name: str) -> None:
    """Raise if DeepSpeed ZeRO-3 partitions any parameter of ``generator`` (a ZeRO parameter that is not persistent)."""
    partitioned = [(name, int(getattr(p, "ds_numel", p.numel()))) for name, p in generator.named_parameters()
                   if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False)]
    if not partitioned:
        return
    largest = max(int(getattr(p, "ds_numel", p.numel())) for p in generator.parameters())
    names = ", ".join(name for name, _ in partitioned[:3]) + (" ..." if len(partitioned) > 3 else "")
    raise RuntimeError(
        f"{member} adapter '{adapter_name}': DeepSpeed ZeRO-3 partitions the generator's parameters ({names}). The "
        "generator must stay whole on every rank: every adapted layer reads its output, and saving, exporting and "
        "evaluating regenerate from it, often on one rank. ZeRO-3 keeps a parameter whole when it is persistent: set "
        f'"zero_optimization": {{"stage3_param_persistence_threshold": {largest}}} or more in the DeepSpeed config '
        f"(the largest generator parameter has {largest} numbers; the HF Trainer's \"auto\" gives 10 x hidden_size), "
        "or train with ZeRO-2 or FSDP."
    )


def zero3_managed(generator: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 manages the generator's parameters."""
    return any(hasattr(p, "ds_id") for p in generator.parameters())


def _not_available(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") and getattr(getattr(p, "ds_status", None), "name", "") == "NOT_AVAILABLE"


@contextlib.contextmanager
def zero3_gathered(generator: nn.Module):
    """Under DeepSpeed ZeRO-3: the generator's parameters that are partitioned right now gathered for the block
    (DeepSpeed partitions even persistent parameters while it saves a checkpoint, and its state dict is taken then).
    A collective, as the checkpoint save that needs it; a no-op when every parameter is whole."""
    missing = [p for p in generator.parameters() if _not_available(p)]
    if not missing:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(missing):
        yield


def gather_persistent(generator: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3 (persistent parameters, checked by :func:`refuse_partitioned`): gather the generator's
    parameters that are not yet available on this rank (before its first forward). A collective: called at a forward,
    which every rank runs. Once gathered, ZeRO-3 keeps persistent parameters whole and current."""
    missing = [p for p in generator.parameters() if _not_available(p)]
    if missing:
        missing[0].all_gather(param_list=missing)


def input_device(args: Iterable[Any], kwargs: Optional[dict] = None) -> Optional[torch.device]:
    """The device of the first tensor among a forward's arguments (where the batch, and so the computation, is)."""
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, torch.Tensor) and not value.is_meta:
            return value.device
    return None


@torch.no_grad()
def attach(generator: nn.Module, device: Optional[torch.device], group=None) -> None:
    """Make ``generator`` a replica: on the device the model computes on, with rank 0's parameters and buffers."""
    if device is not None:
        reference = next(iter(generator.parameters()), None)
        if reference is not None and not reference.is_meta and reference.device != device:
            generator.to(device)
    for tensor in (*generator.parameters(), *generator.buffers()):
        if tensor.is_meta:
            continue
        torch.distributed.broadcast(tensor.data, src=_global_rank_zero(group), group=group)


def _global_rank_zero(group) -> int:
    if group is None:
        return 0
    return torch.distributed.get_global_rank(group, 0)


def queue_gradient_sync(cache_ref: "weakref.ref", grad: torch.Tensor) -> None:
    """A hook on the generated tensors: once per backward, queue :func:`_sync_gradients` for the end of it, when the
    generator's gradients are complete (and after FSDP's own end-of-backward callback, queued earlier)."""
    cache = cache_ref()
    if cache is None or cache._sync_queued:
        return
    cache._sync_queued = True
    torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_sync_gradients, cache_ref))


def _sync_gradients(cache_ref: "weakref.ref") -> None:
    cache = cache_ref()
    if cache is None:
        return
    cache._sync_queued = False
    average_gradients(cache.generator, cache._sync_group, cache.member, cache.adapter_name)


@torch.no_grad()
def average_gradients(generator: nn.Module, group, member: str = "QPA", adapter_name: str = "default") -> None:
    """All-reduce (mean) the gradients of the generator's trainable parameters, one collective per dtype.

    Averaging accumulated gradients is exact too: the part accumulated before is already equal on every rank."""
    refuse_sharded(generator, member, adapter_name)
    params = [p for p in generator.parameters() if p.requires_grad]
    if not params:
        return
    world = torch.distributed.get_world_size(group)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype, group_params in by_dtype.items():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group_params])
        torch.distributed.all_reduce(flat, group=group)  # SUM: gloo has no AVG
        flat.div_(world)
        offset = 0
        for p in group_params:
            piece = flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.copy_(piece)
