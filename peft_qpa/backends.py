"""Choosing where probabilities come from, from a :class:`QPAConfig` (Aer backends live in :mod:`peft_qpa.aer`)."""

from __future__ import annotations

import torch
from qiskit import QuantumCircuit

from .circuit import n_qubits_for
from .config import QPAConfig, check_memory


def shots_for(config: QPAConfig, n_qubits: int) -> int:
    """Total shots per circuit: ``shots`` or ``shots_per_state * 2^N``.

    Raises ``ValueError`` (naming the field and N) if one Aer job of that many shots would not fit the
    memory budget (see ``docs/config.md``, "Memory caps"): ``shots_per_state`` is only turned into a
    number of shots here, once N is known."""
    from .aer import resolve_shots

    return resolve_shots(config.shots, config.shots_per_state, n_qubits)


def check_generator_memory(config: QPAConfig, num_generated: int) -> None:
    """Refuse, before anything is allocated, a generator for ``num_generated`` (M) numbers whose mapping MLP,
    generated numbers, GI network and Aer shot job would not fit the memory budget (``ValueError`` naming the
    field to lower; see ``docs/config.md``, "Memory caps").

    The config check (at ``QPAConfig(...)``) can only assume N = 1 and one chunk; this one uses the real N and
    chunk count. Call it before building ``QPAGenerator``."""
    n_qubits = n_qubits_for(num_generated, config.chunk_size)
    if n_qubits > config.max_qubits:
        return  # QPAGenerator refuses it with its own message (the smallest chunk_size that fits)
    shots = None
    if config.backend == "aer_shots":  # names shots/shots_per_state and N if the job alone is too big
        shots = shots_for(config, n_qubits)
    check_memory(config, num_generated=num_generated, shots=shots)


def make_probability_backend(config: QPAConfig, circuit: QuantumCircuit, dtype: torch.dtype = torch.float32):
    """``(backend, interpolation)`` for a non-default ``config.backend``."""
    from .aer import AerProbabilities

    shots = shots_for(config, circuit.num_qubits) if config.backend == "aer_shots" else None
    backend = AerProbabilities(
        circuit,
        method=config.backend,
        shots=shots,
        shot_gradient=config.shot_gradient,
        noise_model=config.noise_model,
        seed=config.seed,
        max_parallel_threads=config.aer_max_parallel_threads,
        dtype=dtype,
    )
    interpolation = None
    if config.generative_interpolation:
        from .interpolation import GenerativeInterpolation

        interpolation = GenerativeInterpolation(circuit.num_qubits, list(config.gi_hidden_sizes), seed=config.seed).to(dtype)
    return backend, interpolation
