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
from .circuit import build_ansatz, circuit_parameters, product_circuit, readout_circuit
from .config import BASIS_FEATURES, PROBABILITY_INPUTS, PROBABILITY_SCALINGS


def basis_bits(n_states: int, n_qubits: int) -> torch.Tensor:
    """(n_states, n_qubits) matrix of ±1: entry (i, q) is +1 if bit q of i is set, else -1."""
    index = torch.arange(n_states).unsqueeze(1)
    bits = (index >> torch.arange(n_qubits)) & 1
    return bits.to(torch.float32) * 2 - 1


class BasisFeatures:
    """What the mapping sees of each chunk's basis state (``basis_features``):

    * ``"bits"``: the state's own ±1 bits (row i: the bits of i);
    * ``"shuffled"`` (the QPA authors' code): in a training generation, the bits of a random assignment of distinct
      basis states to the chunks, drawn from the seed and the step (a run reproduces and resumes); otherwise their
      expectation, zero (each bit is ±1 with equal probability), which for an affine mapping gives exactly the
      expected tensors, so eval, save, merge and export are deterministic;
    * ``"none"``: nothing (the mapping sees only the feature source's features)."""

    def __init__(self, kind: str = "bits", seed: int = 0):
        if kind not in BASIS_FEATURES:
            raise ValueError(f"basis_features must be one of {BASIS_FEATURES}, got {kind!r}.")
        self.kind, self.seed = kind, seed

    def width(self, n_qubits: int) -> int:
        return 0 if self.kind == "none" else n_qubits

    def matrix(self, bits: torch.Tensor, step: int, training: bool) -> torch.Tensor:
        """``(n_chunks, width)`` from the states' own ``bits`` (``basis_bits``)."""
        if self.kind == "bits":
            return bits
        if self.kind == "none":
            return bits[:, :0]
        if not training:
            return torch.zeros_like(bits)
        n_chunks, n_qubits = bits.shape
        rng = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**63)
        index = torch.randperm(2**n_qubits, generator=rng)[:n_chunks].to(bits.device)
        return ((index.unsqueeze(1) >> torch.arange(n_qubits, device=bits.device)) & 1).to(bits) * 2 - 1


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


def _simulated_dtype(angles: torch.Tensor) -> torch.Tensor:
    """A generator cast to half precision (autocast_adapter_dtype=False) still simulates in float32: complex half
    amplitudes are barely supported and 2^N probabilities need the precision."""
    return angles.float() if angles.dtype in (torch.float16, torch.bfloat16) else angles


def _backend_for(circuit: QuantumCircuit, make_backend: Optional[Callable]) -> tuple[nn.Module, Optional[nn.Module]]:
    """``(backend, interpolation or None)`` running ``circuit``: the configured one, or the exact simulator."""
    return (ExactBackend(circuit), None) if make_backend is None else make_backend(circuit)


def _backends_for(circuits: list[QuantumCircuit], make_backend: Optional[Callable], name: str) -> dict:
    """One backend per circuit (``name``, a ModuleList) and one GI network per circuit (``interpolation``, a
    ModuleList, or None without GI)."""
    pairs = [_backend_for(circuit, make_backend) for circuit in circuits]
    interpolations = [gi for _, gi in pairs]
    has_gi = all(gi is not None for gi in interpolations)
    return {name: nn.ModuleList([backend for backend, _ in pairs]),
            "interpolation": nn.ModuleList(interpolations) if has_gi else None}


def _run(backend: nn.Module, interpolation: Optional[nn.Module], angles: torch.Tensor, step: int) -> torch.Tensor:
    """One circuit's probabilities: the backend's, with GI filling the unobserved states when shots were drawn."""
    probs, counts = backend(angles, step)
    if interpolation is not None and counts is not None:
        probs = interpolation(probs, counts)
    return probs


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
        backend, interpolation = _backend_for(self.circuit, make_backend)
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
        return _run(generator.backend, generator.interpolation, _simulated_dtype(generator.angles), step)

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


class MultiReadoutFeatures(CircuitFeatures):
    """The circuit measured in K bases: K features per chunk instead of one.

    With one probability per state and an affine mapping, the chunk grid (n_chunks x chunk_size) has rank <= 2: the
    circuit sets one direction of it. Readout k runs the shared body (``angles``, the usual ansatz) followed by its own
    layer of RY(φ_k,q) on every qubit (``readout_angles[k]``), measured in the computational basis: K different
    bases, so K columns of features, and the circuit sets a rank up to K + 1.

    The readout circuit is defined once (:func:`~peft_qpa.generator.circuit.readout_circuit`, the body plus the RY
    layer) and every readout runs it through its own backend (``readout_backends[k]``, with GI per readout in
    ``interpolation[k]`` when the config asks for it), with angles ``[angles, readout_angles[k]]``. Cost: K full
    simulations per step (K Aer jobs under shots), not one body plus K cheap layers; the definition every backend
    runs stays the one Qiskit circuit."""

    def __init__(self, n_qubits: int, depth: int, ansatz: str, n_chunks: int, postprocessing: PostProcessing,
                 frozen: bool = False, readout_settings: int = 2):
        super().__init__(n_qubits, depth, ansatz, n_chunks, postprocessing, frozen)
        if isinstance(readout_settings, bool) or not isinstance(readout_settings, int) or readout_settings < 2:
            raise ValueError(f"readout_settings must be an integer >= 2, got {readout_settings!r}.")
        self.readout_settings = readout_settings
        self.width = readout_settings
        self.description = f"probability input: multi_readout (the circuit measured in {readout_settings} trainable bases)"
        self.readout_circuit = readout_circuit(self.circuit)

    @classmethod
    def options_from_config(cls, config) -> dict:
        return {"readout_settings": config.readout_settings}

    def create_parameters(self, rng: torch.Generator, dtype: torch.dtype) -> dict[str, nn.Parameter]:
        """``angles`` drawn as the circuit source draws them, then ``readout_angles`` (K x N) from the same stream:
        uniform in [0, 2π), so the K bases differ from the start."""
        parameters = super().create_parameters(rng, dtype)
        shape = (self.readout_settings, self.n_qubits)
        parameters["readout_angles"] = nn.Parameter(torch.rand(shape, generator=rng, dtype=dtype) * 2 * math.pi)
        return parameters

    def create_modules(self, make_backend: Optional[Callable]) -> dict[str, Optional[nn.Module]]:
        """``readout_backends`` (one backend per readout setting, each running the readout circuit) and
        ``interpolation`` (one GI network per readout, or None)."""
        return _backends_for([self.readout_circuit] * self.readout_settings, make_backend, "readout_backends")

    @property
    def frozen_parameters(self) -> tuple[str, ...]:
        return ("angles", "readout_angles") if self.frozen else ()

    def summary_lines(self, generator: nn.Module) -> list[str]:
        frozen = " (frozen: the freeze_angles control)" if self.frozen else ""
        return [
            f"circuit parameters: {generator.angles.numel()} body + {generator.readout_angles.numel()} readout "
            f"({self.readout_settings} settings x {self.n_qubits} qubits){frozen}",
            f"circuit runs per step: {self.readout_settings} (one per readout setting)",
        ]

    def bound_circuit(self, generator: nn.Module, bound: bool = True) -> QuantumCircuit:
        """The shared body, bound (or parameterized), as the circuit source gives it: one complete circuit to draw or
        simulate, the part every readout has in common. :meth:`readout_bound_circuit` gives readout k, and
        ``readout_circuit`` the parameterized definition the backends run."""
        return super().bound_circuit(generator, bound)

    def readout_angle_vector(self, generator: nn.Module, k: int) -> torch.Tensor:
        """The readout circuit's parameter values for setting k: the body's angles, then readout k's."""
        return torch.cat([generator.angles, generator.readout_angles[k]])

    def readout_bound_circuit(self, generator: nn.Module, k: int, bound: bool = True) -> QuantumCircuit:
        """Readout k's circuit (body + its RY layer), with the current angles bound or (``bound=False``)
        parameterized (the same definition for every k)."""
        if not bound:
            return self.readout_circuit
        values = self.readout_angle_vector(generator, k).detach().cpu().double().tolist()
        return self.readout_circuit.assign_parameters(dict(zip(circuit_parameters(self.readout_circuit), values)))

    def probabilities(self, generator: nn.Module, step: int) -> torch.Tensor:
        """(K, 2^N): row k is readout k's probabilities (after its GI, if any).

        Under shots, readout k samples with the step ``step * K + k``: each (step, readout) pair gets its own
        seed, so the K readouts' shot noise is not drawn from one stream."""
        gi = generator.interpolation
        return torch.stack([
            _run(backend, gi[k] if gi is not None else None, _simulated_dtype(self.readout_angle_vector(generator, k)),
                 step * self.readout_settings + k)
            for k, backend in enumerate(generator.readout_backends)
        ])

    def features(self, generator: nn.Module, step: int) -> torch.Tensor:
        """(n_chunks, K): column k is readout k's post-processed probabilities of the states used."""
        probs = generator.probabilities(step)[:, : self.n_chunks]
        columns = [self.postprocessing(row, self.n_qubits) for row in probs]
        return torch.stack(columns, 1).to(generator.basis_bits.dtype)


# Standard deviation over the states of each term of the twin's initial log-probabilities (fields; couplings).
TWIN_INIT_SPREAD = 1.5


def pairwise_log_weights(fields: torch.Tensor, couplings: torch.Tensor) -> torch.Tensor:
    """Unnormalised log-probabilities of all 2^N basis states, f(b) = Σ_q h_q b_q + ½ Σ_k (u_k·b)² up to a
    constant, in basis-state order (b as :func:`basis_bits` gives it); ``fields`` is h (N), ``couplings`` the u_k
    (rows of a (K, N) matrix, K may be 0).

    Built one qubit at a time from f(b) = Σ_q b_q (h_q + Σ_{i<q} J_iq b_i), J = UᵀU: placing qubit q doubles the
    table and the fields of the qubits not yet placed. About 4·2^N additions, no (2^N, N) bit matrix, and the
    backward keeps nothing of size 2^N (concatenations and additions save no inputs): cheap at N = 20."""
    coupling_matrix = couplings.t() @ couplings
    log_weights = fields.new_zeros(1)
    pending = fields.unsqueeze(0)  # (2^q, N - q): field on each qubit not yet placed, per state of those placed
    for q in range(fields.numel()):
        field = pending[:, 0]
        log_weights = torch.cat([log_weights - field, log_weights + field])
        rest, coupling = pending[:, 1:], coupling_matrix[q, q + 1:]
        pending = torch.cat([rest - coupling, rest + coupling])
    return log_weights


def twin_start(n_qubits: int, rank: int, rng: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A twin's seeded start: N fields, then ``rank`` coupling vectors of N numbers, drawn normal and scaled so that
    each of the two terms of the log-probability spreads over the states with a standard deviation of about
    :data:`TWIN_INIT_SPREAD`."""
    fields = torch.randn(n_qubits, generator=rng, dtype=dtype) * (TWIN_INIT_SPREAD / math.sqrt(n_qubits))
    # (u·b)²/2 with u ~ N(0, s²/N) over uniform b: u·b ~ N(0, s²), so one term spreads by s²/√2 and K terms by
    # s²·√(K/2); s² = spread·√(2/K) gives the wanted spread.
    scale = math.sqrt(TWIN_INIT_SPREAD * math.sqrt(2 / rank) / n_qubits) if rank else 0.0
    couplings = torch.randn(rank * n_qubits, generator=rng, dtype=dtype) * scale
    return torch.cat([fields, couplings])


def twin_distribution(weights: torch.Tensor, n_qubits: int, rank: int) -> torch.Tensor:
    """The 2^N probabilities of a twin whose ``weights`` are laid out as :func:`twin_start` draws them."""
    couplings = weights[n_qubits: n_qubits * (1 + rank)].view(rank, n_qubits)
    return torch.softmax(pairwise_log_weights(weights[:n_qubits], couplings), 0)


def twin_rank(n_qubits: int, circuit_parameters: int) -> int:
    """The most coupling vectors that, with the N fields, fit in the circuit's parameter count (L - 1 for N·L)."""
    if circuit_parameters < n_qubits:
        raise ValueError(f"The classical twin needs at least N = {n_qubits} parameters; the circuit has "
                         f"{circuit_parameters}.")
    return circuit_parameters // n_qubits - 1


class TwinSource:
    """What every classical twin shares (mixed in before the feature source whose circuit it replaces): its
    ``twin_weights`` are its only parameters, frozen by ``freeze_angles``; it runs no circuit, so it has no backend
    or interpolation and no angles to bind."""

    input_name = "classical_twin"  # the probability_input value, for messages
    stands_for = "circuit"  # what circuit(bound=False) gives

    def create_modules(self, make_backend: Optional[Callable]) -> dict[str, Optional[nn.Module]]:
        """No backend and no interpolation: nothing is simulated or sampled."""
        return {"backend": None, "interpolation": None}

    @property
    def frozen_parameters(self) -> tuple[str, ...]:
        return ("twin_weights",) if self.frozen else ()

    def bound_circuit(self, generator: nn.Module, bound: bool = True) -> QuantumCircuit:
        """The parameterized circuit the twin stands in for (``bound=False``): it runs no circuit, so there are no
        angles to bind, and a bound circuit is refused."""
        if not bound:
            return self.circuit
        raise ValueError(
            f"probability_input={self.input_name!r} runs no circuit: there are no angles to bind. circuit(bound=False) "
            f"gives the parameterized {self.stands_for} whose parameter count the twin matches."
        )


class ClassicalTwinFeatures(TwinSource, CircuitFeatures):
    """A control: a classical model of the 2^N probabilities with as many trainable numbers as the circuit it
    replaces, to tell "the quantum circuit matters" from "a trainable distribution of this size matters".

    The twin is a Boltzmann distribution over the N bits with low-rank pairwise couplings,
    p(b) = softmax_b(Σ_q h_q b_q + ½ Σ_k (u_k·b)²), k = 1..K: N fields h and K coupling vectors u_k of N numbers.
    With K = L - 1 that is N·L numbers, the circuit's count exactly, layer for layer (the first rotation layer
    against the fields, each further layer against one coupling vector); for an ansatz whose count were not a
    multiple of N, K is the largest that fits and the rest is reported. It is exact over all 2^N states
    (normalised by a softmax), differentiable, and costs about 4·2^N additions (:func:`pairwise_log_weights`).

    It matches the circuit's size, not its family. The twin's log-probability is pairwise (an Ising model, couplings
    of rank at most L - 1; fields only at L = 1). The depth-1 circuit's is pairwise too (a product state, which the
    CNOT chain turns into nearest-neighbour couplings), but deeper circuits have interactions of every order (at
    N = 6, depth 8, 50-80 % of the variance of log p over the states is beyond pairwise, over 5 seeds).

    Parameters: ``twin_weights`` (laid out as the angles: the N fields, then the coupling vectors), a seeded
    normal start whose log-probabilities spread over the states about as a random circuit's do (standard deviation
    about 1.9 against 2.2-2.3 at N = 6-12, depth >= 8; post-processed, 0.13-0.14 for both; :data:`TWIN_INIT_SPREAD`),
    so that the frozen twin and the frozen circuit are comparable controls. ``frozen=True``
    (``freeze_angles``) keeps them: the frozen random twin. The same post-processing and features as the circuit.
    No circuit runs, so there is no backend (``backend`` and ``interpolation`` are None) and no shots to sample
    (the config refuses any backend but ``"statevector"``); :meth:`bound_circuit` gives the parameterized circuit the
    twin stands in for and refuses a bound one."""

    description = "probability input: classical_twin (control: a classical distribution as large as the circuit; no circuit runs)"

    def __init__(self, n_qubits: int, depth: int, ansatz: str, n_chunks: int, postprocessing: PostProcessing,
                 frozen: bool = False):
        super().__init__(n_qubits, depth, ansatz, n_chunks, postprocessing, frozen)
        self.depth = depth
        self.circuit_parameters = self.circuit.num_parameters
        self.rank = twin_rank(n_qubits, self.circuit_parameters)
        self.num_parameters = n_qubits * (1 + self.rank)

    def create_parameters(self, rng: torch.Generator, dtype: torch.dtype) -> dict[str, nn.Parameter]:
        """``twin_weights``: fields and couplings as :func:`twin_start` draws them."""
        return {"twin_weights": nn.Parameter(twin_start(self.n_qubits, self.rank, rng, dtype))}

    def summary_lines(self, generator: nn.Module) -> list[str]:
        frozen = " (frozen: the freeze_angles control, a frozen random twin)" if self.frozen else ""
        unused = self.circuit_parameters - self.num_parameters
        rest = f"; {unused} of the circuit's not matched" if unused else ""
        return [
            f"classical twin parameters: {generator.twin_weights.numel()}, the circuit's N·L = {self.n_qubits}·"
            f"{self.depth} = {self.circuit_parameters} it replaces{rest}{frozen}",
            f"classical twin: Boltzmann distribution over {self.n_qubits} bits, {self.n_qubits} fields + rank-"
            f"{self.rank} pairwise couplings",
        ]

    def probabilities(self, generator: nn.Module, step: int) -> torch.Tensor:
        """The twin's 2^N probabilities (exact: they sum to 1; ``step`` is unused, nothing is sampled)."""
        weights = _simulated_dtype(generator.twin_weights)  # 2^N probabilities need at least float32
        return twin_distribution(weights, self.n_qubits, self.rank)


class MultiReadoutTwinFeatures(ClassicalTwinFeatures):
    """The classical twin of :class:`MultiReadoutFeatures` (a control, ``probability_input='multi_readout_twin'``):
    K classical distributions with as many trainable numbers as the K-readout circuit, N·L (body) + K·N (readout
    layers).

    Readout k's distribution is the twin's Boltzmann distribution with its own fields added,
    p_k(b) = softmax_b(Σ_q (h_q + g_kq) b_q + ½ Σ_j (u_j·b)²): the shared fields h and coupling vectors u_j play
    the circuit body (N·L numbers, as :class:`ClassicalTwinFeatures` matches them), and each readout's N fields g_k
    play its RY layer. ``twin_weights`` holds h, the u_j, then g_1..g_K; the readout fields start normal with the
    spread of the shared fields, so the K distributions differ from the start as the K random readout bases do.
    The same post-processing and K feature columns as the circuit."""

    description = ("probability input: multi_readout_twin (control: K classical distributions as large as the "
                   "K-readout circuit; no circuit runs)")

    def __init__(self, n_qubits: int, depth: int, ansatz: str, n_chunks: int, postprocessing: PostProcessing,
                 frozen: bool = False, readout_settings: int = 2):
        super().__init__(n_qubits, depth, ansatz, n_chunks, postprocessing, frozen)
        if isinstance(readout_settings, bool) or not isinstance(readout_settings, int) or readout_settings < 2:
            raise ValueError(f"readout_settings must be an integer >= 2, got {readout_settings!r}.")
        self.readout_settings = readout_settings
        self.width = readout_settings
        self.body_parameters = self.num_parameters
        self.num_parameters += readout_settings * n_qubits

    @classmethod
    def options_from_config(cls, config) -> dict:
        return {"readout_settings": config.readout_settings}

    def create_parameters(self, rng: torch.Generator, dtype: torch.dtype) -> dict[str, nn.Parameter]:
        body = super().create_parameters(rng, dtype)["twin_weights"].data
        n, k = self.n_qubits, self.readout_settings
        readout = torch.randn(k * n, generator=rng, dtype=dtype) * (TWIN_INIT_SPREAD / math.sqrt(n))
        return {"twin_weights": nn.Parameter(torch.cat([body, readout]))}

    def summary_lines(self, generator: nn.Module) -> list[str]:
        frozen = " (frozen: the freeze_angles control, a frozen random twin)" if self.frozen else ""
        n, k = self.n_qubits, self.readout_settings
        return [
            f"classical twin parameters: {generator.twin_weights.numel()}, the K-readout circuit's N·L + K·N = "
            f"{self.circuit_parameters} + {k}·{n} it replaces{frozen}",
            f"classical twin: {k} Boltzmann distributions over {n} bits sharing rank-{self.rank} pairwise couplings, "
            f"each with its own {n} fields",
        ]

    def probabilities(self, generator: nn.Module, step: int) -> torch.Tensor:
        """(K, 2^N): row k is distribution k (exact; ``step`` is unused)."""
        weights = _simulated_dtype(generator.twin_weights)
        n, k = self.n_qubits, self.readout_settings
        fields = weights[:n]
        couplings = weights[n: n * (1 + self.rank)].view(self.rank, n)
        readout = weights[self.body_parameters:].view(k, n)
        return torch.stack([torch.softmax(pairwise_log_weights(fields + readout[j], couplings), 0) for j in range(k)])

    def features(self, generator: nn.Module, step: int) -> torch.Tensor:
        """(n_chunks, K), as :meth:`MultiReadoutFeatures.features`."""
        return MultiReadoutFeatures.features(self, generator, step)


class DistributedFeatures(CircuitFeatures):
    """The distributed circuit ansatz of Liu, Lin and Chen, "Quantum-Train with Tensor Network Mapping Model and
    Distributed Circuit Ansatz" (ICASSP 2025, arXiv:2409.06992): G = ``circuit_groups`` small circuits instead of one
    N-qubit circuit, each small enough for its own small device (or simulated on its own: G statevectors of
    2^(N/G) amplitudes instead of one of 2^N).

    The N qubits split into G groups of contiguous qubits (sizes differ by at most one, the larger groups first;
    group 0 holds the lowest bits of a basis-state index). Group g runs the usual ansatz (``ansatz``, depth L) on its
    n_g qubits. No gate joins two groups, so the N-qubit state is the tensor product of the groups' states and the
    probability of basis state i is the product of each group's probability of its own bits of i:
    p(i) = prod_g p_g((i >> start_g) mod 2^n_g), the probabilities of the product circuit (:attr:`circuit`), which
    every one of the 2^N states gets. They are post-processed as the circuit's: one column.

    Parameters: ``group_angles``, every group's angles in one vector (group 0's first, each in its circuit's order:
    L * N in all, as many as the one circuit has), uniform in [0, 2π). Modules: ``group_backends`` (one backend per
    group, running that group's circuit) and ``interpolation`` (GI per group under shots, or None). Under shots group
    g samples with the step ``step * G + g``, so the groups' shot noise is not drawn from one stream."""

    def __init__(self, n_qubits: int, depth: int, ansatz: str, n_chunks: int, postprocessing: PostProcessing,
                 frozen: bool = False, circuit_groups: int = 2):
        if isinstance(circuit_groups, bool) or not isinstance(circuit_groups, int) or circuit_groups < 2:
            raise ValueError(f"circuit_groups must be an integer >= 2, got {circuit_groups!r}.")
        if circuit_groups > n_qubits:
            raise ValueError(
                f"circuit_groups={circuit_groups} needs at least {circuit_groups} qubits (one per sub-circuit), but "
                f"this generator has N = {n_qubits} (N follows from the numbers to generate and chunk_size). Use "
                f"circuit_groups <= {n_qubits}, or a smaller chunk_size for more qubits."
            )
        base, extra = divmod(n_qubits, circuit_groups)
        self.group_sizes = tuple(base + (g < extra) for g in range(circuit_groups))
        # Each group's circuit, defined once in Qiskit terms; its backend runs this definition.
        self.group_circuits = [build_ansatz(size, depth, ansatz) for size in self.group_sizes]
        self.group_parameters = tuple(qc.num_parameters for qc in self.group_circuits)
        # The N-qubit circuit the groups make together (what bound_circuit gives and the tests compare with).
        self.circuit = product_circuit(self.group_circuits)
        self.circuit_groups = circuit_groups
        self.n_qubits = n_qubits
        self.n_chunks = n_chunks
        self.postprocessing = postprocessing
        self.frozen = bool(frozen)
        self.description = (
            f"probability input: distributed ({circuit_groups} sub-circuits of {list(self.group_sizes)} qubits; "
            "each state's probability is the product of theirs)"
        )

    @classmethod
    def options_from_config(cls, config) -> dict:
        return {"circuit_groups": config.circuit_groups}

    def create_parameters(self, rng: torch.Generator, dtype: torch.dtype) -> dict[str, nn.Parameter]:
        angles = torch.rand(sum(self.group_parameters), generator=rng, dtype=dtype) * 2 * math.pi
        return {"group_angles": nn.Parameter(angles)}

    def create_modules(self, make_backend: Optional[Callable]) -> dict[str, Optional[nn.Module]]:
        """``group_backends`` (one backend per group) and ``interpolation`` (one GI network per group, or None)."""
        return _backends_for(list(self.group_circuits), make_backend, "group_backends")

    @property
    def frozen_parameters(self) -> tuple[str, ...]:
        return ("group_angles",) if self.frozen else ()

    def summary_lines(self, generator: nn.Module) -> list[str]:
        frozen = " (frozen: the freeze_angles control)" if self.frozen else ""
        return [f"circuit parameters: {generator.group_angles.numel()} in {self.circuit_groups} sub-circuits of "
                f"{list(self.group_sizes)} qubits{frozen}"]

    def bound_circuit(self, generator: nn.Module, bound: bool = True) -> QuantumCircuit:
        """The product circuit of the groups, with the current angles bound or (``bound=False``) parameterized."""
        if not bound:
            return self.circuit
        values = generator.group_angles.detach().cpu().double().tolist()
        return self.circuit.assign_parameters(dict(zip(circuit_parameters(self.circuit), values)))

    def group_probabilities(self, generator: nn.Module, step: int) -> list[torch.Tensor]:
        """Group g's 2^n_g probabilities (after its GI, if any), for every g."""
        gi = generator.interpolation
        parts = torch.split(_simulated_dtype(generator.group_angles), self.group_parameters)
        return [_run(backend, gi[g] if gi is not None else None, part, step * self.circuit_groups + g)
                for g, (backend, part) in enumerate(zip(generator.group_backends, parts))]

    def probabilities(self, generator: nn.Module, step: int) -> torch.Tensor:
        """The 2^N probabilities: the outer product of the groups' (group 0 varying fastest)."""
        marginals = self.group_probabilities(generator, step)
        joint = marginals[-1]
        for probs in reversed(marginals[:-1]):
            joint = (joint.unsqueeze(1) * probs.unsqueeze(0)).reshape(-1)
        return joint


class DistributedTwinFeatures(TwinSource, DistributedFeatures):
    """The classical twin of :class:`DistributedFeatures` (a control, ``probability_input='distributed_twin'``): each
    of the G sub-circuits replaced by a classical twin with as many trainable numbers as that sub-circuit (the
    Boltzmann distribution of :class:`ClassicalTwinFeatures` over its n_g bits: n_g fields and L - 1 coupling vectors,
    n_g·L numbers), so N·L in all, the distributed circuit's count exactly. As for the circuit, each state's
    probability is the product of the groups' probabilities of its bits: a Boltzmann distribution whose couplings
    never join two groups.

    ``twin_weights`` holds group 0's numbers first, each group's laid out as :func:`twin_start` draws them (the same
    seeded start, per group, as the one-circuit twin). No circuit runs: no backend, no shots, no noise (the config
    refuses any backend but ``"statevector"``); ``freeze_angles`` gives the frozen random twin."""

    input_name, stands_for = "distributed_twin", "product circuit"

    def __init__(self, n_qubits: int, depth: int, ansatz: str, n_chunks: int, postprocessing: PostProcessing,
                 frozen: bool = False, circuit_groups: int = 2):
        super().__init__(n_qubits, depth, ansatz, n_chunks, postprocessing, frozen, circuit_groups)
        self.depth = depth
        self.circuit_parameters = sum(self.group_parameters)
        self.group_ranks = tuple(twin_rank(n, p) for n, p in zip(self.group_sizes, self.group_parameters))
        self.group_twin_parameters = tuple(n * (1 + r) for n, r in zip(self.group_sizes, self.group_ranks))
        self.num_parameters = sum(self.group_twin_parameters)
        self.description = (
            f"probability input: distributed_twin (control: {circuit_groups} classical distributions over "
            f"{list(self.group_sizes)} bits, each as large as its sub-circuit; no circuit runs)"
        )

    def create_parameters(self, rng: torch.Generator, dtype: torch.dtype) -> dict[str, nn.Parameter]:
        return {"twin_weights": nn.Parameter(torch.cat([twin_start(n, r, rng, dtype)
                                                        for n, r in zip(self.group_sizes, self.group_ranks)]))}

    def summary_lines(self, generator: nn.Module) -> list[str]:
        frozen = " (frozen: the freeze_angles control, a frozen random twin)" if self.frozen else ""
        unused = self.circuit_parameters - self.num_parameters
        rest = f"; {unused} of the circuits' not matched" if unused else ""
        return [
            f"classical twin parameters: {generator.twin_weights.numel()}, the {self.circuit_groups} sub-circuits' "
            f"{self.circuit_parameters} it replaces{rest}{frozen}",
            f"classical twin: {self.circuit_groups} Boltzmann distributions over {list(self.group_sizes)} bits, each "
            f"with its fields + rank-{self.group_ranks[0]} pairwise couplings; their product over the 2^N states",
        ]

    def group_probabilities(self, generator: nn.Module, step: int) -> list[torch.Tensor]:
        """Group g's twin distribution over its 2^n_g states, for every g (exact; ``step`` is unused)."""
        parts = torch.split(_simulated_dtype(generator.twin_weights), self.group_twin_parameters)
        return [twin_distribution(w, n, r) for w, n, r in zip(parts, self.group_sizes, self.group_ranks)]


FEATURE_SOURCES = {"circuit": CircuitFeatures, "constant": ConstantFeatures, "multi_readout": MultiReadoutFeatures,
                   "classical_twin": ClassicalTwinFeatures, "distributed": DistributedFeatures,
                   "multi_readout_twin": MultiReadoutTwinFeatures, "distributed_twin": DistributedTwinFeatures}
assert tuple(FEATURE_SOURCES) == PROBABILITY_INPUTS
