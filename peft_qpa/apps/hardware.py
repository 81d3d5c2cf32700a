"""The hardware path: attach a Qiskit sampler primitive to an adapter with ``backend="sampler"``, estimate what a run
costs in device time, and refuse a run over its budget.

* :func:`use_sampler` attaches any ``qiskit.primitives.BaseSamplerV2`` (``qiskit_ibm_runtime.SamplerV2`` or its
  client-side successor ``qiskit_ibm_runtime.executor_sampler.Sampler`` on an IBM device or a fake one,
  ``qiskit_aer.primitives.SamplerV2``, another provider's) to every sampler backend of an
  adapter's generator (one, or one per readout setting or sub-circuit), re-anchors an untrained generator's zero
  start on the device's step-0 result, and records the device's name in the adapter config.
* :func:`estimate_cost` gives the circuits, jobs, shots and estimated device seconds of a number of steps
  (:class:`~peft_qpa.generator.backends.sampler.CostEstimate`).
* :class:`CostGuardCallback` refuses, at the start of a ``transformers.Trainer`` run, a run whose estimate exceeds
  ``max_device_seconds``; ``use_sampler(..., max_steps=...)`` refuses at attach time, and the backend itself refuses
  the job that would exceed the limit.

See ``docs/backends.md``, "Sampler primitives: the hardware path".
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ..generator import QPAGenerator
from ..generator.backends.sampler import (
    CostEstimate,
    DeviceBudget,
    DeviceBudgetError,
    SamplerJobError,
    SamplerNotAttachedError,
    SamplerResultError,
    estimate_backends,
    sampler_backend_name,
    sampler_backends,
)

logger = logging.get_logger(__name__)

__all__ = [
    "CostEstimate",
    "CostGuardCallback",
    "DeviceBudgetError",
    "SamplerJobError",
    "SamplerNotAttachedError",
    "SamplerResultError",
    "estimate_cost",
    "use_sampler",
]


def _all_generators(model) -> list[tuple[Optional[str], object, QPAGenerator, object]]:
    """``(adapter name, config or None, generator, cache or None)`` for every QPA generator of ``model`` (a PeftModel,
    a QPA tuner, or a bare QPAGenerator)."""
    if isinstance(model, QPAGenerator):
        return [(None, None, model, None)]
    tuner = getattr(model, "base_model", model)
    configs = getattr(model, "peft_config", None) or getattr(tuner, "peft_config", None) or {}
    found = []
    generators = getattr(tuner, "_generators", None)
    if callable(generators):
        caches = tuner._caches()
        for name, generator in generators().items():
            found.append((name, configs.get(name), generator, caches.get(name)))
    encoders = getattr(model, "prompt_encoder", None)
    if isinstance(encoders, nn.ModuleDict):
        for name, encoder in encoders.items():
            generator = getattr(encoder, "generator", None)
            if isinstance(generator, QPAGenerator):
                found.append((name, configs.get(name), generator, getattr(encoder, "cache", None)))
    return found


def _sampler_adapters(model, adapter_name: Optional[str], required: bool = True):
    """The entries of :func:`_all_generators` with sampler backends (only ``adapter_name``'s when given)."""
    entries = _all_generators(model)
    names = [name for name, *_ in entries]
    if adapter_name is not None:
        entries = [e for e in entries if e[0] == adapter_name]
        if not entries:
            raise ValueError(f"No QPA adapter named {adapter_name!r}; adapters: {names}.")
    chosen = [e for e in entries if sampler_backends(e[2])]
    if not chosen and required:
        which = f"Adapter {adapter_name!r} has" if adapter_name is not None else f"None of the adapters {names} has"
        raise ValueError(f"{which} backend='sampler': set backend='sampler' (with shots or shots_per_state) in its "
                         "config to run its circuit through a sampler primitive.")
    return chosen


def _limit(config, backends) -> Optional[float]:
    limit = getattr(config, "max_device_seconds", None) if config is not None else backends[0].max_device_seconds
    return None if limit is None else float(limit)


def _label(adapter_name: Optional[str]) -> str:
    return "the generator" if adapter_name is None else f"adapter {adapter_name!r}"


def _refuse_over_budget(estimate: CostEstimate, limit: Optional[float], label: str, where: str) -> None:
    if limit is not None and estimate.total_device_seconds > limit:
        raise DeviceBudgetError(
            f"QPA sampler ({label}): {where}: {estimate.steps} steps would use about "
            f"{estimate.total_device_seconds:.4g} s of device time ({estimate.device_seconds_per_step:.4g} s per step: "
            f"{estimate.jobs_per_step} job(s), {estimate.circuits_per_step} circuit(s), {estimate.shots_per_step} "
            f"shots; estimated from {estimate.method}), over max_device_seconds={limit:g}. Raise max_device_seconds "
            "(the adapter config), or train fewer steps, with fewer shots (shots/shots_per_state) or with "
            "shot_gradient='exact' (one circuit per job instead of 2P+1)."
        )


def use_sampler(model, sampler, adapter_name: Optional[str] = None, max_steps: Optional[int] = None) -> list:
    """Run the circuits of ``model``'s ``backend="sampler"`` adapters on ``sampler`` (a
    ``qiskit.primitives.BaseSamplerV2``); returns the names of the adapters it was attached to.

    ``adapter_name``: that adapter only (default: every adapter with ``backend="sampler"``). Each of its sampler
    backends (one per circuit: K with ``multi_readout``, G with ``distributed``) gets the sampler, its circuit
    transpiled once to the sampler's device; a device with fewer qubits than a circuit is refused. The sampler is
    not saved; the config's ``sampler_backend_name`` records its device's name.

    An untrained generator (step 0, never run on a device) re-anchors its zero start here: the step-0 job runs now
    (with the shifted circuits when the gradient is parameter shift) and the first training step reuses it, so the
    model still starts exactly at the base model.

    ``max_steps``: refuse (``DeviceBudgetError``, before anything runs) when ``max_steps`` steps would exceed the
    adapter's ``max_device_seconds``."""
    entries = _sampler_adapters(model, adapter_name)
    name = sampler_backend_name(sampler)
    prepared = []
    for adapter, config, generator, cache in entries:
        backends = sampler_backends(generator)
        attachments = [backend.prepare(sampler) for backend in backends]  # refuses a too-small device
        limit = _limit(config, backends)
        if max_steps is not None:
            estimate = estimate_backends(backends, max_steps, not generator.freeze_angles,
                                         [att.timing for att in attachments], [adapter])
            _refuse_over_budget(estimate, limit, _label(adapter), f"use_sampler(max_steps={max_steps})")
        prepared.append((adapter, config, generator, cache, backends, attachments, limit))
    attached = []
    for adapter, config, generator, cache, backends, attachments, limit in prepared:
        untrained = int(generator.step) == 0 and not any(b.has_device_result for b in backends)
        if untrained:  # the output the placeholder gave: the method's initial values
            with torch.no_grad():
                start = generator.generate()
        old = backends[0].attachment
        budget = old.budget if old is not None else DeviceBudget(label=_label(adapter))
        budget.limit_s = limit
        for backend, attachment in zip(backends, attachments):
            backend.attach(attachment, budget)
        if untrained:
            trainable = any(p.requires_grad for p in generator.parameters())
            generator.anchor_offset(start, with_gradient=trainable)
            if cache is not None:
                cache.refresh()
        if config is not None:
            config.sampler_backend_name = name
            facts = getattr(config, "_model_card_facts", None)
            if isinstance(facts, dict):
                facts["sampler_backend_name"] = name
        attached.append(adapter)
        logger.info("QPA %s runs on %s: %s", _label(adapter), name,
                    estimate_backends(backends, 1, not generator.freeze_angles).line())
    return attached


def estimate_cost(model, steps: int, adapter_name: Optional[str] = None) -> CostEstimate:
    """Circuits, jobs, shots and estimated device seconds of ``steps`` training steps (training forwards: with
    gradient accumulation, each micro-batch is one) of ``model``'s ``backend="sampler"`` adapters (``adapter_name``'s
    only, if given; else all of them, summed).

    Device seconds per circuit = shots × seconds per shot. With a sampler attached whose device Target reports gate
    and readout durations, a shot is the ISA circuit scheduled as soon as possible with those durations plus the
    device's default repetition delay; otherwise (no sampler yet, a simulator, or no durations) the default model:
    circuit depth × 0.5 µs + 5 µs readout + 250 µs repetition delay (``DEFAULT_LAYER_SECONDS``,
    ``DEFAULT_READOUT_SECONDS``, ``DEFAULT_REP_DELAY_SECONDS`` in ``peft_qpa.generator.backends.sampler``). Queueing,
    compilation and per-job overheads of a service are not included. ``method`` says which was used."""
    entries = _sampler_adapters(model, adapter_name)
    parts = [estimate_backends(sampler_backends(generator), steps, not generator.freeze_angles, adapters=[adapter])
             for adapter, _, generator, _ in entries]
    return CostEstimate(
        steps=parts[0].steps,
        circuits_per_step=sum(p.circuits_per_step for p in parts),
        jobs_per_step=sum(p.jobs_per_step for p in parts),
        shots_per_step=sum(p.shots_per_step for p in parts),
        device_seconds_per_step=sum(p.device_seconds_per_step for p in parts),
        total_device_seconds=sum(p.total_device_seconds for p in parts),
        method="; ".join(sorted({p.method for p in parts})),
        adapters=[a for p in parts for a in p.adapters],
    )


class CostGuardCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that refuses, in ``on_train_begin``, a run whose estimated device time
    exceeds an adapter's ``max_device_seconds``: the steps left (``state.max_steps - state.global_step``, times
    ``gradient_accumulation_steps`` training forwards each) times the per-step estimate of :func:`estimate_cost`.
    The error (``DeviceBudgetError``) stops ``Trainer.train`` before any job is submitted.

    Evaluation and checkpoint saves may run further jobs (one circuit each); the backend's running total refuses any
    job that would exceed the limit."""

    def __init__(self, adapter_name: Optional[str] = None):
        self.adapter_name = adapter_name

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return control
        steps = max(0, int(state.max_steps) - int(state.global_step)) * int(getattr(args, "gradient_accumulation_steps", 1))
        for adapter, config, generator, _ in _sampler_adapters(model, self.adapter_name, required=False):
            backends = sampler_backends(generator)
            estimate = estimate_backends(backends, steps, not generator.freeze_angles, adapters=[adapter])
            _refuse_over_budget(estimate, _limit(config, backends), _label(adapter),
                                f"Trainer run of {state.max_steps} steps from step {state.global_step}")
            logger.info("QPA %s: this run's estimate: %s", _label(adapter), estimate)
        return control
