"""Feature sources: the per-chunk features the mapping sees beside each basis state's own features.

A source yields an ``(n_chunks, width)`` matrix: row i is what distinguishes chunk i besides its basis bits (for the
published method, basis state i's post-processed probability). Sources are small strategy objects: each declares
the parameters and modules it needs, and the generator registers them on itself under the declared names, so that
they move, cast and save with it and the saved keys stay those of earlier versions (``angles``, ``backend``,
``interpolation.*``). Adding a source is one class here, one entry in :data:`FEATURE_SOURCES` and its value in
``GeneratorConfig.probability_input``.

The post-processing of probabilities (:class:`PostProcessing`) and the basis features (:func:`basis_bits`) are parts
of their own, shared by every source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from qiskit import QuantumCircuit
from torch import nn

from .backends import ExactBackend
from .circuit import build_ansatz, circuit_parameters
from .config import PROBABILITY_INPUTS, PROBABILITY_SCALINGS


def basis_bits(n_states: int, n_qubits: int) -> torch.Tensor:
    """(n_states, n_qubits) matrix of ±1: entry (i, q) is +1 if bit q of i is set, else -1."""
    index = torch.arange(n_states).unsqueeze(1)
    bits = (index >> torch.arange(n_qubits)) & 1
    return bits.to(torch.float32) * 2 - 1


@dataclass(frozen=True)
class PostProcessing:
    """x = (β tanh(γ 2^(N-1) p) + ε)^α - ε^α, centred over the states used; with ``scaling="standardize"`` also
    divided by its standard deviation over those states.

    The ε keeps the derivative finite where p = 0 (exact zeros are common with shots). The published constants leave
    x with a standard deviation of about 0.14 across states (N = 6-12, depth 8), next to basis bits of ±1;
    standardizing gives the circuit's feature the bits' scale (``probs`` are the states used, so the statistics are
    theirs)."""

    gamma: float = 0.1
    beta: float = 0.6
    alpha: float = 0.15
    eps: float = 1e-6
    scaling: str = "none"

    def __post_init__(self):
        if self.scaling not in PROBABILITY_SCALINGS:
            raise ValueError(f"probability_scaling must be one of {PROBABILITY_SCALINGS}, got {self.scaling!r}.")

    def __call__(self, probs: torch.Tensor, n_qubits: int) -> torch.Tensor:
        scaled = self.beta * torch.tanh(self.gamma * 2 ** (n_qubits - 1) * probs)
        x = (scaled + self.eps) ** self.alpha - self.eps**self.alpha
        x = x - x.mean()
        if self.scaling == "standardize" and x.numel() > 1:
            x = x / x.pow(2).mean().sqrt().clamp_min(1e-12)
        return x


class CircuitFeatures:
    """The method's source: the circuit's 2^N probabilities (from its backend, after generative interpolation if
    any), post-processed, one column. Parameters: ``angles``, uniform in [0, 2π) (a random product-of-rotations
    start, no basis state favoured). ``frozen=True`` is the frozen-angles control: the angles keep their seeded
    values."""

    width = 1
    description = ""

    def __init__(self, n_qubits: int, depth: int, ansatz: str, n_chunks: int, postprocessing: PostProcessing,
                 frozen: bool = False):
        # The circuit, defined once in Qiskit terms; every backend runs this definition.
        self.circuit = build_ansatz(n_qubits, depth, ansatz)
        self.n_qubits = n_qubits
        self.n_chunks = n_chunks
        self.postprocessing = postprocessing
        self.frozen = bool(frozen)

    @classmethod
    def options_from_config(cls, config) -> dict:
        """The source's own settings from a ``GeneratorConfig`` (keyword arguments of the constructor beyond the
        shared ones); none for the circuit."""
        return {}

    def create_parameters(self, rng: torch.Generator, dtype: torch.dtype) -> dict[str, nn.Parameter]:
        return {"angles": nn.Parameter(torch.rand(self.circuit.num_parameters, generator=rng, dtype=dtype) * 2 * math.pi)}

    def create_modules(self, make_backend: Optional[Callable]) -> dict[str, Optional[nn.Module]]:
        """``backend`` (``(angles, step) -> (probs, counts or None)``) and ``interpolation`` (GI, or None)."""
        if make_backend is None:
            return {"backend": ExactBackend(self.circuit), "interpolation": None}
        backend, interpolation = make_backend(self.circuit)
        return {"backend": backend, "interpolation": interpolation}

    @property
    def frozen_parameters(self) -> tuple[str, ...]:
        return ("angles",) if self.frozen else ()

    def summary_lines(self, generator: nn.Module) -> list[str]:
        """The source's lines of ``QPAGenerator.summary``: its parameters."""
        frozen = " (frozen: the freeze_angles control)" if self.frozen else ""
        return [f"circuit parameters: {generator.angles.numel()}{frozen}"]

    def bound_circuit(self, generator: nn.Module, bound: bool = True) -> QuantumCircuit:
        """The Qiskit circuit, with the generator's current angles bound or (``bound=False``) parameterized."""
        if not bound:
            return self.circuit
        values = generator.angles.detach().cpu().double().tolist()
        return self.circuit.assign_parameters(dict(zip(circuit_parameters(self.circuit), values)))

    def probabilities(self, generator: nn.Module, step: int) -> torch.Tensor:
        angles = generator.angles
        if angles.dtype in (torch.float16, torch.bfloat16):
            # A generator cast to half precision (autocast_adapter_dtype=False) still simulates in float32:
            # complex half amplitudes are barely supported and 2^N probabilities need the precision.
            angles = angles.float()
        probs, counts = generator.backend(angles, step)
        if generator.interpolation is not None and counts is not None:
            probs = generator.interpolation(probs, counts)
        return probs

    def features(self, generator: nn.Module, step: int) -> torch.Tensor:
        probs = generator.probabilities(step)[: self.n_chunks]
        return self.postprocessing(probs, self.n_qubits).unsqueeze(1).to(generator.basis_bits.dtype)


class ConstantFeatures(CircuitFeatures):
    """The constant control: the mapping sees only the basis bits (the centred constant column is zero) and the
    circuit is not run. The circuit's parameters and modules are kept, so the adapter saves and loads as the
    method's."""

    description = "probability input: constant (control: the MLP sees only the basis bits)"

    def features(self, generator: nn.Module, step: int) -> torch.Tensor:
        bits = generator.basis_bits
        return torch.zeros(self.n_chunks, self.width, dtype=bits.dtype, device=bits.device)


FEATURE_SOURCES = {"circuit": CircuitFeatures, "constant": ConstantFeatures}
assert tuple(FEATURE_SOURCES) == PROBABILITY_INPUTS
