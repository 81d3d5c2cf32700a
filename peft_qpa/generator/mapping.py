"""Mappings: the model that turns each basis state's input row into its chunk of ``chunk_size`` numbers.

A mapping is an ``nn.Module`` from ``(rows, in_features)`` to ``(rows, chunk_size)``, registered on the generator as
``mapping`` (its parameters are saved as ``mapping.*``). Its constructor takes ``(in_features, chunk_size, dtype,
seed, **options)``, ``options_from_config(config)`` gives those options from a ``GeneratorConfig``, and
``row_numbers()`` the activations one row holds in a forward (every layer's input and output), which sizes the
blocks of large generators; ``output_dtype`` is the dtype it produces. Adding a mapping is one class here and one
entry in :data:`MAPPINGS`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ACTIVATIONS

ACTIVATION_CLASSES = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
assert set(ACTIVATION_CLASSES) == set(ACTIVATIONS)


class MLPMapping(nn.Sequential):
    """The QPA paper's mapping: ``Linear`` layers of the given hidden widths with an activation between them, then
    a ``Linear`` to ``chunk_size``. Its layers are initialized from ``seed`` alone (the caller's RNG is not used for
    the values, though building the layers advances it, as it always has)."""

    def __init__(self, in_features: int, chunk_size: int, dtype: torch.dtype, seed: int,
                 hidden_sizes: tuple[int, ...] = (32, 64, 128, 128, 64, 32), activation: str = "gelu"):
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden, dtype=dtype), ACTIVATION_CLASSES[activation]()]
            width = hidden
        layers.append(nn.Linear(width, chunk_size, dtype=dtype))
        super().__init__(*layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in self:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()

    def row_numbers(self) -> int:
        """Numbers of activation one input row holds: its input, each hidden layer's output before and after the
        activation, and the chunk."""
        widths = [m.out_features for m in self if isinstance(m, nn.Linear)]
        return self[0].in_features + 2 * sum(widths[:-1]) + widths[-1]

    @classmethod
    def options_from_config(cls, config) -> dict:
        """The mapping's own settings from a ``GeneratorConfig`` (constructor keyword arguments)."""
        return {"hidden_sizes": tuple(config.mapping_hidden_sizes), "activation": config.mapping_activation}

    @property
    def output_dtype(self) -> torch.dtype:
        return self[-1].weight.dtype


MAPPINGS = {"mlp": MLPMapping}
