"""Choosing where probabilities come from, from a :class:`QPAConfig` (Aer backends live in :mod:`peft_qpa.aer`)."""

from __future__ import annotations


import torch
from qiskit import QuantumCircuit

from .config import QPAConfig


def shots_for(config: QPAConfig, n_qubits: int) -> int:
    """Total shots per circuit: ``shots`` or ``shots_per_state * 2^N``."""
    if config.shots is not None:
        return config.shots
    return config.shots_per_state * 2**n_qubits


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
