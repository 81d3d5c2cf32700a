"""The tensors a generator fills (:class:`TensorSpec`) and the values they start from.

The zero start: each generated tensor is ``T(θ) = T_init + (f_T(θ) - f_T(θ_0))``, with ``f`` the raw generator
output, θ_0 the initial parameters and ``T_init`` the method's usual initialization (LoRA: seeded Kaiming-uniform A,
zero B). The generator stores ``T_init - f(θ_0)`` once as its ``offset`` buffer; :func:`initial_values` gives the
``T_init`` part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor the generator fills, with the initialization it starts from.

    ``init`` is ``"zeros"``, ``"kaiming_uniform"`` (LoRA's A: bound 1/sqrt(fan_in), fan_in = last dim),
    ``"ones"`` (e.g. a DoRA magnitude relative to the base norm) or ``"normal"`` (standard normal N(0, 1), as
    ``torch.nn.Embedding`` initializes its weight, e.g. PEFT's prefix-tuning embedding). The ``"normal"`` tensors
    are drawn in float32, in order, from a stream of their own seeded with the generator's seed alone: the first
    equals ``torch.manual_seed(seed); torch.randn(shape)``, whatever the circuit and the other tensors are.
    """

    name: str
    shape: tuple[int, ...]
    init: str = "zeros"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _init_tensor(
    spec: TensorSpec, generator: torch.Generator, dtype: torch.dtype, normal_generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.init == "kaiming_uniform":
        # nn.init.kaiming_uniform_(a=sqrt(5)) as LoRA does: bound = 1 / sqrt(fan_in)
        bound = 1.0 / math.sqrt(spec.shape[-1])
        return (torch.rand(spec.shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).to(dtype)
    if spec.init == "normal":
        # nn.Embedding's init (normal_ on a float32 tensor), from the stream seeded with the seed alone
        return torch.randn(spec.shape, generator=normal_generator, dtype=torch.float32).to(dtype)
    raise ValueError(f"Unknown init {spec.init!r} for tensor {spec.name!r}.")


def initial_values(specs: list[TensorSpec], rng: torch.Generator, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The specs' initial values, flat and in order. Random inits draw from ``rng`` (which has already drawn the
    feature source's parameters, so that adapters saved by earlier versions keep their values) and, for
    ``"normal"``, from a stream seeded with ``seed`` alone."""
    normal_rng = torch.Generator().manual_seed(seed)
    return torch.cat([_init_tensor(s, rng, dtype, normal_rng).reshape(-1) for s in specs])
