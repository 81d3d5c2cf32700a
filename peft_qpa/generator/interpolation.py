"""Generative interpolation (GI) of unobserved basis states.

With c·2^N shots many basis states get zero counts (about e^{-c} of them when probabilities are near
uniform), and a zero frequency is not the state's probability. GI estimates each unobserved state's
probability with a small network F from the probabilities of its N Hamming-distance-1 neighbours
(indices ``i ^ (1 << q)``). F is trained jointly with the circuit and the mapping by the task loss; no
pre-trained generative model and no extra sampling are needed.

Choices (documented in docs/backends.md):

* F works in units of the uniform probability: its inputs are ``2^N · p_neighbour`` and its output,
  after a softplus (so estimates are positive), is divided by 2^N. This keeps F's scale independent of N.
* F's last layer starts with small weights and a bias giving an estimate of 0.5 / 2^N (half a uniform
  state's probability: an unobserved state is more likely below than above average).
* After interpolation the vector is renormalised to sum 1 by one global division, so observed states
  keep their frequencies' ratios to each other and the interpolated states take their share of the mass.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


class GenerativeInterpolation(nn.Module):
    """``forward(probs, counts)``: fill the zero-count states of ``probs`` (2^N) from their neighbours."""

    def __init__(self, n_qubits: int, hidden_sizes: list[int], seed: int, init_estimate: float = 0.5):
        super().__init__()
        if n_qubits < 1:
            raise ValueError(f"n_qubits must be >= 1, got {n_qubits}.")
        if any(int(h) < 1 for h in hidden_sizes):
            raise ValueError(f"gi_hidden_sizes must be positive integers, got {hidden_sizes}.")
        if init_estimate <= 0:
            raise ValueError(f"init_estimate must be > 0, got {init_estimate}.")
        self.n_qubits = n_qubits
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        dim = 2**n_qubits
        index = torch.arange(dim)
        neighbours = index[:, None] ^ (1 << torch.arange(n_qubits))[None, :]  # (2^N, N)
        self.register_buffer("neighbours", neighbours, persistent=False)

        # Deterministic init from `seed`, without touching the global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = []
            width = n_qubits
            for h in self.hidden_sizes:
                layers += [nn.Linear(width, h), nn.SiLU()]
                width = h
            last = nn.Linear(width, 1)
            with torch.no_grad():
                last.weight.mul_(0.01)
                # softplus(b) = init_estimate  <=>  b = log(exp(init_estimate) - 1)
                last.bias.fill_(math.log(math.expm1(init_estimate)))
            layers.append(last)
            self.net = nn.Sequential(*layers)

    def estimate(self, probs: torch.Tensor) -> torch.Tensor:
        """F's estimate for every state (2^N), from its neighbours' probabilities."""
        dim = probs.shape[-1]
        inputs = probs[self.neighbours] * dim  # (2^N, N), in units of the uniform probability
        weight_dtype = self.net[-1].weight.dtype
        out = nn.functional.softplus(self.net(inputs.to(weight_dtype))).squeeze(-1)
        return out.to(probs.dtype) / dim

    def forward(self, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dim = 2**self.n_qubits
        if probs.shape != (dim,) or counts.shape != (dim,):
            raise ValueError(
                f"GenerativeInterpolation for {self.n_qubits} qubits needs probs and counts of shape "
                f"({dim},), got {tuple(probs.shape)} and {tuple(counts.shape)}."
            )
        unobserved = counts == 0
        filled = torch.where(unobserved, self.estimate(probs), probs)
        return filled / filled.sum()

    def extra_repr(self) -> str:
        return f"n_qubits={self.n_qubits}, hidden_sizes={self.hidden_sizes}"
