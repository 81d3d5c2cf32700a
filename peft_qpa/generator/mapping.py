"""Mappings: the model that turns each basis state's input row into its chunk of ``chunk_size`` numbers.

A mapping is an ``nn.Module`` from ``(rows, in_features)`` to ``(rows, chunk_size)``, registered on the generator as
``mapping`` (its parameters are saved as ``mapping.*``). Its constructor takes ``(in_features, chunk_size, dtype,
seed, **options)``, ``options_from_config(config)`` gives those options from a ``GeneratorConfig``, and
``row_numbers()`` the activations one row holds in a forward (every layer's input and output), which sizes the
blocks of large generators; ``output_dtype`` is the dtype it produces. Adding a mapping is one class here and one
entry in :data:`MAPPINGS`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import compiled
from .config import ACTIVATIONS, MAPPINGS_OPTIONS

# "none": an identity between the layers (the whole mapping is affine, as in the QPA authors' code); it keeps the
# layer indices, so the saved keys (mapping.0, mapping.2, ...) have the same layout for every activation.
ACTIVATION_CLASSES = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "none": nn.Identity}
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

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # nn.Sequential's forward, compiled where PEFT_QPA_COMPILE_MAPPING asks for it (compiled.py; off by default)
        return compiled.call(self, rows, nn.Sequential.forward)

    def prepare_compiled(self, device, dtype) -> None:
        """Compile the forward now if ``PEFT_QPA_COMPILE_MAPPING`` asks for it (see :mod:`.compiled`)."""
        compiled.prepare(self, nn.Sequential.forward, self[0].in_features, device, dtype)

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


class MPSMapping(nn.Module):
    """The tensor-network mapping of Liu, Lin and Chen, "Quantum-Train with Tensor Network Mapping Model and
    Distributed Circuit Ansatz" (ICASSP 2025, arXiv:2409.06992): a matrix product state (tensor train) over the
    input columns, with an output core of ``chunk_size`` legs.

    Every input column is one site (the N basis bits, then each feature column, as in the authors' code, where the
    probability is the last site). Site s embeds its value x as the local vector [1, x] (an invertible linear change
    of the authors' [x, 1 - x]: the same model) and contracts it with its core, a (left bond, 2, right bond)
    tensor, into a matrix; the matrices left of the output core are multiplied into a vector L, those right of it
    into R, and chunk[o] = sum_lm L[l] O[l, m, o] R[m]. The output core sits in the middle of the chain (the
    authors' library's default) so that each chunk is bilinear in both halves. Bonds are at most ``bond_dim`` (χ)
    and at most the dimension of the smaller side (2^k after k sites): larger ones add parameters, not functions.
    Parameters: sum over sites of 2 * (left bond) * (right bond), plus (left bond) * (right bond) * chunk_size for
    the output core (:meth:`parameter_count`): O(S χ^2 + χ^2 chunk) against the MLP's O(hidden^2 + hidden chunk).

    Initialization, from ``seed`` alone (the caller's RNG is neither used nor advanced): every core is the identity
    on its x^0 leg plus Gaussian noise on its x^1 leg of variance 1 / (bond * S), so a bond vector's squared norm
    grows by at most a factor (1 + 1/S) per site, e in all, whatever the number of sites S; the output core is
    Gaussian with standard deviation 0.1, the initial output scale of the default MLP. Every entry gets a gradient
    at the first step (a near-zero noise, the authors' library's default, leaves all but one entry of each core
    without one)."""

    OUTPUT_SCALE = 0.1
    SEED_TAG = 0x6D7073  # "mps": the cores' random stream is not the one the circuit angles are drawn from

    def __init__(self, in_features: int, chunk_size: int, dtype: torch.dtype, seed: int, bond_dim: int = 8):
        super().__init__()
        if isinstance(bond_dim, bool) or not isinstance(bond_dim, int) or bond_dim < 1:
            raise ValueError(f"mps_bond_dim must be an integer >= 1, got {bond_dim!r}.")
        if in_features < 1 or chunk_size < 1:
            raise ValueError(f"An MPS mapping needs in_features >= 1 and chunk_size >= 1, got {in_features}, {chunk_size}.")
        self.in_features, self.chunk_size, self.bond_dim = in_features, chunk_size, bond_dim
        self.output_site, shapes, output_shape = self._shapes(in_features, chunk_size, bond_dim)
        state = np.random.SeedSequence([int(seed), self.SEED_TAG]).generate_state(2, dtype=np.uint32)
        rng = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
        cores = []
        for s, (left, right) in enumerate(shapes):
            grown = right if s < self.output_site else left  # the bond the contraction moves to at this site
            core = torch.zeros(left, 2, right, dtype=torch.float64)
            core[:, 0] = torch.eye(left, right, dtype=torch.float64)
            core[:, 1] = torch.randn(left, right, generator=rng, dtype=torch.float64) / (grown * in_features) ** 0.5
            cores.append(nn.Parameter(core.to(dtype)))
        self.cores = nn.ParameterList(cores)
        output = torch.randn(output_shape, generator=rng, dtype=torch.float64) * self.OUTPUT_SCALE
        self.output_core = nn.Parameter(output.to(dtype))
        self.summary_name = f"MPS (bond dimension {bond_dim})"

    @staticmethod
    def _shapes(in_features: int, chunk_size: int, bond_dim: int):
        """(output site p, [(left, right) bond of each site's core], output core shape). The output core sits
        between sites p - 1 and p; bond k of the left part is min(χ, 2^k), of the right part min(χ, 2^(S - k))."""
        p = in_features // 2
        left = [min(bond_dim, 2**k) for k in range(p + 1)]
        right = [min(bond_dim, 2 ** (in_features - k)) for k in range(p, in_features + 1)]
        shapes = [(left[k], left[k + 1]) for k in range(p)] + [(right[k], right[k + 1]) for k in range(len(right) - 1)]
        return p, shapes, (left[-1], right[0], chunk_size)

    @classmethod
    def parameter_count(cls, in_features: int, chunk_size: int, bond_dim: int) -> int:
        """Parameters of the mapping for these sizes (without building it)."""
        _, shapes, (left, right, chunk) = cls._shapes(in_features, chunk_size, bond_dim)
        return sum(2 * a * b for a, b in shapes) + left * right * chunk

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        single = rows.dim() == 1
        if single:
            rows = rows.unsqueeze(0)
        if rows.shape[-1] != self.in_features:
            raise ValueError(f"The MPS mapping takes rows of {self.in_features} numbers, got shape {tuple(rows.shape)}.")
        n, p = rows.shape[0], self.output_site
        left = right = rows.new_ones(n, 1)
        for s in range(p):  # left to right: L <- L (A_s[:, 0] + x_s A_s[:, 1])
            core = self.cores[s]
            t = (left @ core.reshape(core.shape[0], -1)).view(n, 2, core.shape[2])
            left = torch.addcmul(t[:, 0], rows[:, s : s + 1], t[:, 1])
        for s in range(self.in_features - 1, p - 1, -1):  # right to left: R <- (A_s[:, 0] + x_s A_s[:, 1]) R
            core = self.cores[s]
            t = (right @ core.permute(2, 1, 0).reshape(core.shape[2], -1)).view(n, 2, core.shape[0])
            right = torch.addcmul(t[:, 0], rows[:, s : s + 1], t[:, 1])
        bonds = (left.unsqueeze(2) * right.unsqueeze(1)).reshape(n, -1)
        chunks = bonds @ self.output_core.reshape(-1, self.chunk_size)
        return chunks[0] if single else chunks

    def row_numbers(self) -> int:
        """Numbers of activation one input row holds: its input, at each site the core's product (two bond vectors)
        and the new bond vector, the outer product of the two halves, and the chunk."""
        sites = sum(3 * (core.shape[2] if s < self.output_site else core.shape[0]) for s, core in enumerate(self.cores))
        return self.in_features + sites + self.output_core.shape[0] * self.output_core.shape[1] + self.chunk_size

    @classmethod
    def options_from_config(cls, config) -> dict:
        """The mapping's own settings from a ``GeneratorConfig`` (constructor keyword arguments)."""
        return {"bond_dim": config.mps_bond_dim}

    @property
    def output_dtype(self) -> torch.dtype:
        return self.output_core.dtype

    def extra_repr(self) -> str:
        return (f"sites={self.in_features}, chunk_size={self.chunk_size}, bond_dim={self.bond_dim}, "
                f"output_site={self.output_site}")


MAPPINGS = {"mlp": MLPMapping, "mps": MPSMapping}
assert tuple(MAPPINGS) == MAPPINGS_OPTIONS
