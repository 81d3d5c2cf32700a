"""The shared parameter generator: circuit probabilities -> mapping MLP -> every adapted tensor.

One ``QPAGenerator`` per adapter serves all adapted layers. It is given a list of named tensor shapes
(:class:`TensorSpec`) and fills all of them from one flat vector of M numbers, so it is not tied to
LoRA's A/B: any method that needs named tensors (DoRA magnitudes, prefixes, bottleneck adapters) can
use it.

Zero delta at step 0, with gradients everywhere from the first step: each tensor is

    T(θ) = T_init + (f_T(θ) - f_T(θ_0))

where ``f`` is the raw generator output, θ_0 the initial trainable parameters and ``T_init`` the
method's usual initialization (LoRA: seeded Kaiming-uniform A, zero B). The constant
``T_init - f(θ_0)`` is stored once as the ``offset`` buffer. At step 0 the adapter is therefore exactly
LoRA at its initialization (B = 0, so the model equals the base model), while dL/dB is nonzero and
flows through f into the MLP and the circuit angles. A head initialized at zero instead would leave the
angles and hidden layers without gradient at the first step.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .circuit import build_ansatz, circuit_parameters, n_qubits_for
from .config import ACTIVATIONS, PROBABILITY_INPUTS, PROBABILITY_SCALINGS, GeneratorConfig

ACTIVATION_CLASSES = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
assert set(ACTIVATION_CLASSES) == set(ACTIVATIONS)

# Memory of large generators (Quantum-Train generates every weight of a network: M up to 10^7 and more). From
# BLOCKWISE_MIN_GENERATED numbers on, the mapping MLP runs over blocks of basis states, in the forward (no
# gradient kept) and again in the backward (recomputed block by block, see _BlockwiseGenerate), and the centring
# and offset are applied in place: one generation (forward + backward) then allocates the M generated numbers,
# their gradient (M, computed by the layers that use them) and one block's activations, at most
# max(BLOCK_ELEMENTS_MIN, M / BLOCK_FRACTION) numbers. Smaller generators keep the whole-MLP path (the MLP's
# activations are recomputed by torch's checkpoint), unchanged from earlier versions.
BLOCKWISE_MIN_GENERATED = 1 << 16
BLOCK_ELEMENTS_MIN = 1 << 17
BLOCK_FRACTION = 16


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


def basis_bits(n_states: int, n_qubits: int) -> torch.Tensor:
    """(n_states, n_qubits) matrix of ±1: entry (i, q) is +1 if bit q of i is set, else -1."""
    index = torch.arange(n_states).unsqueeze(1)
    bits = (index >> torch.arange(n_qubits)) & 1
    return bits.to(torch.float32) * 2 - 1


class QPAGenerator(nn.Module):
    """Generates M numbers (all adapted tensors of one adapter) from a parameterized circuit.

    Args:
        specs: the tensors to fill, in order. M = sum of their sizes.
        n_qubits, depth, ansatz: the circuit (see :func:`peft_qpa.circuit.build_ansatz`).
        chunk_size: numbers per basis state.
        hidden_sizes, activation: the mapping MLP.
        prob_gamma, prob_beta, prob_alpha, prob_eps: probability post-processing.
        make_backend: optional callable ``circuit -> (backend, interpolation or None)``: ``backend`` maps
            ``(angles, step)`` to ``(probs, counts or None)``; ``interpolation`` maps ``(probs, counts)`` to
            probs (generative interpolation). The exact torch statevector simulator when None.
            :meth:`from_config` builds the backend a :class:`GeneratorConfig` names.
        init_weights: start from the specs' init (True) or from the raw generator output (False).
        seed: seeds angles, MLP and the specs' random inits.
    """

    def __init__(
        self,
        specs: list[TensorSpec],
        *,
        depth: int,
        chunk_size: int,
        ansatz: str = "ry_cnot",
        hidden_sizes: tuple[int, ...] = (32, 64, 128, 128, 64, 32),
        activation: str = "gelu",
        prob_gamma: float = 0.1,
        prob_beta: float = 0.6,
        prob_alpha: float = 0.15,
        prob_eps: float = 1e-6,
        max_qubits: int = 24,
        dtype: torch.dtype = torch.float32,
        init_weights: bool = True,
        seed: int = 0,
        make_backend: Optional[Callable] = None,
        probability_input: str = "circuit",
        freeze_angles: bool = False,
        probability_scaling: str = "none",
    ):
        super().__init__()
        if not specs:
            raise ValueError("The generator needs at least one tensor to fill.")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("Tensor names given to the generator must be unique.")
        self.specs = list(specs)
        self.num_generated = sum(s.numel for s in specs)
        self.chunk_size = chunk_size
        self.n_chunks = math.ceil(self.num_generated / chunk_size)
        self.n_qubits = n_qubits_for(self.num_generated, chunk_size)
        if self.n_qubits > max_qubits:
            needed = math.ceil(self.num_generated / 2**max_qubits)
            raise ValueError(
                f"Generating {self.num_generated} numbers in chunks of {chunk_size} needs {self.n_qubits} qubits, "
                f"more than max_qubits={max_qubits} (a statevector of 2^{self.n_qubits} amplitudes). Raise "
                f"chunk_size to at least {needed}, or raise max_qubits if you have the memory."
            )
        self.depth = depth
        if probability_input not in PROBABILITY_INPUTS:
            raise ValueError(f"probability_input must be one of {PROBABILITY_INPUTS}, got {probability_input!r}.")
        # Controls for ablation studies (see docs/config.md, "Controls"): the MLP's probability input replaced by a
        # constant, and the circuit angles kept at their initial values.
        self.probability_input = probability_input
        if probability_scaling not in PROBABILITY_SCALINGS:
            raise ValueError(f"probability_scaling must be one of {PROBABILITY_SCALINGS}, got {probability_scaling!r}.")
        self.probability_scaling = probability_scaling
        self.freeze_angles = bool(freeze_angles)
        self.ansatz = ansatz
        self.prob_gamma, self.prob_beta, self.prob_alpha, self.prob_eps = prob_gamma, prob_beta, prob_alpha, prob_eps
        # The circuit, defined once in Qiskit terms; every backend runs this definition.
        self._circuit = build_ansatz(self.n_qubits, depth, ansatz)

        rng = torch.Generator().manual_seed(seed)
        # Circuit angles, uniform in [0, 2π): a random product-of-rotations start, no basis state favoured.
        self.angles = nn.Parameter(torch.rand(self._circuit.num_parameters, generator=rng, dtype=dtype) * 2 * math.pi)
        layers: list[nn.Module] = []
        width = self.n_qubits + 1
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden, dtype=dtype), ACTIVATION_CLASSES[activation]()]
            width = hidden
        layers.append(nn.Linear(width, chunk_size, dtype=dtype))
        self.mapping = nn.Sequential(*layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in self.mapping:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()

        if make_backend is None:
            from .backends import ExactBackend

            backend, interpolation = ExactBackend(self._circuit), None
        else:
            backend, interpolation = make_backend(self._circuit)
        self.backend = backend
        self.interpolation = interpolation
        # Row i of the mapping input: the ±1 bits of basis state i (only the first n_chunks states are used).
        self.register_buffer("basis_bits", basis_bits(self.n_chunks, self.n_qubits).to(dtype), persistent=False)
        # Training steps taken (seeds shot sampling; saved so a resumed run continues the sequence).
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("offset", torch.zeros(self.num_generated, dtype=dtype))
        if init_weights and not self.angles.is_meta:  # on meta (low_cpu_mem_usage) the checkpoint provides it
            with torch.no_grad():
                normal_rng = torch.Generator().manual_seed(seed)
                init = torch.cat([_init_tensor(s, rng, dtype, normal_rng).reshape(-1) for s in self.specs])
                self.offset.copy_(init - self._raw_output(step=0))

    @classmethod
    def from_config(cls, config: GeneratorConfig, specs: list[TensorSpec], init_weights: bool = True) -> "QPAGenerator":
        """The generator that ``config`` describes, filling ``specs`` (on the CPU; move it with ``.to``).

        Checks first, before anything is allocated, that it fits the memory budget (``ValueError`` naming the
        field to lower; see ``docs/config.md``, "Memory caps")."""
        from .backends import check_generator_memory, make_backend

        check_generator_memory(config, sum(s.numel for s in specs))
        dtype = torch.float64 if config.simulator_dtype == "float64" else torch.float32
        return cls(
            specs,
            depth=config.qnn_depth,
            chunk_size=config.chunk_size,
            ansatz=config.ansatz,
            hidden_sizes=tuple(config.mapping_hidden_sizes),
            activation=config.mapping_activation,
            prob_gamma=config.prob_gamma,
            prob_beta=config.prob_beta,
            prob_alpha=config.prob_alpha,
            prob_eps=config.prob_eps,
            max_qubits=config.max_qubits,
            dtype=dtype,
            init_weights=init_weights,
            seed=config.seed,
            make_backend=functools.partial(make_backend, config, dtype=dtype),
            probability_input=config.probability_input,
            freeze_angles=config.freeze_angles,
            probability_scaling=getattr(config, "probability_scaling", "none"),
        )

    # --- the pipeline -------------------------------------------------------------------------------
    def probabilities(self, step: Optional[int] = None) -> torch.Tensor:
        """The 2^N basis-state probabilities the generator maps (after interpolation, if any)."""
        step = int(self.step) if step is None else step
        angles = self.angles
        if angles.dtype in (torch.float16, torch.bfloat16):
            # A generator cast to half precision (autocast_adapter_dtype=False) still simulates in float32:
            # complex half amplitudes are barely supported and 2^N probabilities need the precision.
            angles = angles.float()
        probs, counts = self.backend(angles, step)
        if self.interpolation is not None and counts is not None:
            probs = self.interpolation(probs, counts)
        return probs

    def postprocess(self, probs: torch.Tensor) -> torch.Tensor:
        """x = (β tanh(γ 2^(N-1) p) + ε)^α - ε^α, centred over the states used; with
        ``probability_scaling="standardize"`` also divided by its standard deviation over those states.

        The ε keeps the derivative finite where p = 0 (exact zeros are common with shots). The published
        constants leave x with a standard deviation of about 0.14 across states (N = 6-12, depth 8), next to basis
        bits of ±1; standardizing
        gives the circuit's feature the bits' scale (``probs`` are the states used, so the statistics are theirs)."""
        scaled = self.prob_beta * torch.tanh(self.prob_gamma * 2 ** (self.n_qubits - 1) * probs)
        x = (scaled + self.prob_eps) ** self.prob_alpha - self.prob_eps**self.prob_alpha
        x = x - x.mean()
        if self.probability_scaling == "standardize" and x.numel() > 1:
            x = x / x.pow(2).mean().sqrt().clamp_min(1e-12)
        return x

    def _raw_output(self, step: int) -> torch.Tensor:
        """The M raw numbers (centred MLP output, without the offset)."""
        return self._output(step, None, (self.num_generated,))[0]

    def _output(self, step: int, offset: Optional[torch.Tensor], sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """The M generated numbers, centred, plus ``offset`` if given, cut into pieces of ``sizes``.

        The generator computes in its own dtype whatever autocast is active around it (TRL and the Trainer's bf16
        turn autocast on): in bfloat16 the offset would no longer cancel the initial output, so a fresh adapter
        would not equal the base model, and the saved snapshot would depend on whether the last forward ran under
        autocast."""
        with torch.autocast(self.angles.device.type, enabled=False):
            if self.num_generated >= BLOCKWISE_MIN_GENERATED:
                return self._blockwise_output(self._probability_column(step), offset, sizes)
            flat = self._raw_output_in_own_dtype(self._features(step))
            if offset is not None:
                flat = flat + offset
            return torch.split(flat, list(sizes)) if len(sizes) > 1 else (flat,)

    def _probability_column(self, step: int) -> torch.Tensor:
        """The post-processed probabilities of the basis states used, as a column (n_chunks x 1); a column of
        zeros (the centred constant) under the ``probability_input="constant"`` control, without running the
        circuit."""
        if self.probability_input == "constant":
            return torch.zeros(self.n_chunks, 1, dtype=self.basis_bits.dtype, device=self.basis_bits.device)
        probs = self.probabilities(step)[: self.n_chunks]
        return self.postprocess(probs).unsqueeze(1).to(self.basis_bits.dtype)

    def _features(self, step: int, column: Optional[torch.Tensor] = None, rows: slice = slice(None)) -> torch.Tensor:
        """The mapping MLP's input: row i = basis state i's ±1 bits and its post-processed probability (``rows`` of
        it, from ``column`` if given)."""
        column = self._probability_column(step) if column is None else column
        return torch.cat([self.basis_bits[rows], column[rows]], 1)

    def _raw_output_in_own_dtype(self, features: torch.Tensor) -> torch.Tensor:
        """Small generators (M < ``BLOCKWISE_MIN_GENERATED``): the whole MLP at once."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.mapping.parameters()):
            # Recompute the MLP's activations in the backward pass instead of keeping them: they are
            # n_chunks x (sum of widths) numbers, held from the start of the model's forward to the end
            # of its backward, and at N >= 12 they would outweigh the optimizer state QPA saves over LoRA.
            # The recomputation runs the same ops on the same inputs, so gradients are unchanged.
            chunks = checkpoint(self.mapping, features, use_reentrant=False)
        else:
            chunks = self.mapping(features)  # (n_chunks, chunk_size): row i is basis state i's chunk
        flat = chunks.reshape(-1)[: self.num_generated]
        return flat - flat.mean()

    # --- large generators: the MLP block by block, in place ------------------------------------------
    def block_rows(self) -> int:
        """Basis states (MLP rows) per block of the blockwise path: a block's activations (every layer's input and
        output) hold at most max(BLOCK_ELEMENTS_MIN, M / BLOCK_FRACTION) numbers."""
        widths = [m.out_features for m in self.mapping if isinstance(m, nn.Linear)]
        row = self.n_qubits + 1 + 2 * sum(widths[:-1]) + widths[-1]
        budget = max(BLOCK_ELEMENTS_MIN, self.num_generated // BLOCK_FRACTION)
        return max(1, min(self.n_chunks, budget // row))

    @torch.no_grad()
    def _blockwise_values(self, column: torch.Tensor, offset: Optional[torch.Tensor]) -> torch.Tensor:
        """The M numbers written block by block into one flat tensor, centred and offset in place: the only
        M-sized allocation is the result (each block's MLP input is built from ``column`` when it is needed)."""
        total, chunk = self.num_generated, self.chunk_size
        out = torch.empty(total, dtype=self.mapping[-1].weight.dtype, device=column.device)
        rows = self.block_rows()
        for start in range(0, self.n_chunks, rows):
            stop = min(start + rows, self.n_chunks)
            begin, end = start * chunk, min(stop * chunk, total)
            block = self.mapping(self._features(0, column, slice(start, stop)))
            out[begin:end] = block.reshape(-1)[: end - begin]
        out.sub_(out.mean())
        if offset is not None:
            out.add_(offset)
        return out

    def _blockwise_output(self, column, offset, sizes) -> tuple[torch.Tensor, ...]:
        params = tuple(self.mapping.parameters())
        if torch.is_grad_enabled() and (column.requires_grad or any(p.requires_grad for p in params)):
            return _BlockwiseGenerate.apply(weakref.ref(self), column, offset, tuple(sizes), *params)
        return torch.split(self._blockwise_values(column, offset), list(sizes))

    def generate(self) -> torch.Tensor:
        """The flat vector of M generated numbers (differentiable)."""
        return self._output(int(self.step), self.offset, (self.num_generated,))[0]

    def generate_pieces(self) -> dict[str, torch.Tensor]:
        """The generated tensors by name, as :meth:`split` of :meth:`generate` gives them. For large generators
        the backward then reads each piece's gradient where it lies: no M-sized concatenation of the gradients."""
        pieces = self._output(int(self.step), self.offset, tuple(spec.numel for spec in self.specs))
        return {spec.name: piece.view(spec.shape) for spec, piece in zip(self.specs, pieces)}

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut a flat vector into the named tensors (views).

        One ``split`` rather than a slice per tensor: its backward concatenates the pieces' gradients
        once, where each slice's backward would zero-fill and copy a gradient of all M numbers."""
        pieces = torch.split(flat, [spec.numel for spec in self.specs])
        return {spec.name: piece.view(spec.shape) for spec, piece in zip(self.specs, pieces)}

    # --- once per forward, cached in eval (plain attributes: never saved) ----------------------------
    def attach_snapshot(self, targets: dict[str, tuple[Any, str]]) -> None:
        """Where each generated tensor's snapshot lives: spec name -> (BufferDict, key in it)."""
        self._snapshot_targets = targets
        self._snapshot_state = None
        self._live = None

    def _fingerprint(self) -> tuple:
        """What the generated tensors depend on: the parameters' values (few: compared by content, so that edits
        through ``.data``, which no version counter sees, are caught too) and the buffers' identity and version
        (the offset holds M numbers; it only changes by loading or casting, which replace or bump it)."""
        buffers = tuple((b.data_ptr(), b._version, b.dtype) for b in self.buffers())
        params = [p.detach().reshape(-1) for p in self.parameters()]
        return buffers, torch.cat(params) if params else None

    def _unchanged_since(self, fingerprint: Optional[tuple]) -> bool:
        if fingerprint is None:
            return False
        buffers, params = self._fingerprint()
        old_buffers, old_params = fingerprint
        if buffers != old_buffers:
            return False
        if params is None or old_params is None:
            return params is old_params
        return params.dtype == old_params.dtype and params.device == old_params.device and torch.equal(params, old_params)

    def _versions(self) -> tuple:
        # In-place updates (optimizer steps, load_state_dict) bump a tensor's _version; replacing a tensor
        # changes its data_ptr. Cheap enough to check at every layer of a forward.
        return tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def begin_forward(self, training: bool = True, reentrant_checkpointing: bool = False) -> None:
        """Called at the start of every forward of the whole model: generate once for all layers.

        With gradients needed, the tensors are generated here, outside any gradient-checkpointed block,
        and every layer reads the same live tensors. Otherwise layers read the snapshot, which is
        regenerated only when the generator changed.

        Only a training forward (``training=True``) advances ``step``, which seeds shot sampling: in eval
        mode the output is the snapshot's, also when gradients are enabled (they still flow, as they do to
        LoRA weights in eval mode).

        Reentrant gradient checkpointing runs one nested backward per checkpointed block, and each would
        traverse (and free) the generator's graph. Then the layers read a detached leaf instead; its
        gradient is pushed through the generator (graph retained) at the end of each nested backward.
        """
        if not self._needs_grad():
            # Layers read the snapshot, checked once here for all of them (until end_forward). Live tensors of an
            # earlier forward are kept: its backward may still recompute checkpointed layers with them (e.g. TRL's
            # DPO runs a no-grad reference forward, adapter disabled, between the policy's forward and backward).
            self.refresh_snapshot()
            self._snapshot_checked = self._versions()
            return
        self._make_live(advance=training, reentrant_checkpointing=reentrant_checkpointing)

    def end_forward(self) -> None:
        """Called at the end of every forward of the whole model: a layer called on its own afterwards checks the
        snapshot again."""
        self._snapshot_checked = None

    def drop_live(self) -> None:
        """Release the live tensors and their graph (the adapter is being deleted)."""
        self._live = None

    def _make_live(self, advance: bool, reentrant_checkpointing: bool = False) -> None:
        self._report_non_finite()
        # Drop the previous forward's live tensors first: a pending backward keeps what it needs through its graph,
        # and holding them here too would put two generations (2 M numbers) in memory at once.
        self._live = None
        if reentrant_checkpointing:
            generated = self.generate()
            flat = generated.detach().requires_grad_(True)
            flat.register_hook(functools.partial(_queue_backward, generated))
            self._live = self.split(flat)
        else:
            # Once a backward has gone through them, the live tensors' graph is freed: a layer called on its
            # own after that (e.g. the decoder without the LM head) must get new ones.
            if self.num_generated >= BLOCKWISE_MIN_GENERATED:
                # One tensor per piece, each gradient read where it lies (no M-sized concatenation).
                self._live = self.generate_pieces()
                for piece in self._live.values():
                    piece.register_hook(functools.partial(_mark_live_consumed, weakref.ref(self)))
            else:
                flat = self.generate()
                flat.register_hook(functools.partial(_mark_live_consumed, weakref.ref(self)))
                self._live = self.split(flat)
        self._live_consumed = False
        if advance:
            with torch.no_grad():
                self.step += 1
        self._live_versions = self._versions()

    def __getstate__(self):
        # Live tensors belong to one forward's autograd graph: never copy or pickle them.
        state = self.__dict__.copy()
        state["_live"] = None
        return state

    def live_tensors(self, training: bool = True) -> Optional[dict[str, torch.Tensor]]:
        """The live (differentiable) tensors of this forward, or None when the snapshot is to be used
        (in which case it is made fresh first).

        Live tensors of an earlier forward are reused only while the generator is unchanged and no backward
        has consumed their graph; otherwise (a layer or submodule called on its own, outside a whole-model
        forward) they are generated anew, once for all layers of that call."""
        if not self._needs_grad():
            if getattr(self, "_snapshot_checked", None) != self._versions():
                self.refresh_snapshot()
            return None
        live = getattr(self, "_live", None)
        if live is not None and not self._live_consumed and self._live_versions == self._versions():
            return live
        self._make_live(advance=training)
        return self._live

    @torch.no_grad()
    def refresh_snapshot(self, force: bool = False) -> None:
        """Regenerate the snapshot buffers if the generator changed since they were written (always with
        ``force``: saving and exporting use it, as they are rare and must never write a stale snapshot)."""
        targets = getattr(self, "_snapshot_targets", None)
        if not targets or self.angles.is_meta:
            return
        if not force and self._unchanged_since(self._snapshot_state):
            return
        state = self._fingerprint()
        self._report_non_finite()
        tensors = self.split(self.generate())
        for name, (buffers, key) in targets.items():
            buffers[key].copy_(tensors[name])
        self._snapshot_state = state

    def mark_snapshot_fresh(self) -> None:
        """Declare the snapshot buffers authoritative for the current parameters (after a load)."""
        self._snapshot_state = self._fingerprint()

    @torch.no_grad()
    def snapshot_disagreement(self) -> tuple[float, float, int, int]:
        """Compare the snapshot buffers with a fresh generation, without writing anything.

        Returns ``(max |difference|, tolerance, numbers beyond it, numbers compared)``. The tolerance allows
        float rounding between machines (thread counts, compiled kernel or not): 1e-3 of the largest snapshot
        value in float32/float64, 1e-2 in half precision."""
        targets = getattr(self, "_snapshot_targets", None) or {}
        tensors = self.split(self.generate())
        pairs = [(buffers[key], tensors[name]) for name, (buffers, key) in targets.items()]
        if not pairs:
            return 0.0, 0.0, 0, 0
        scale = max(float(saved.detach().abs().max()) if saved.numel() else 0.0 for saved, _ in pairs)
        half = any(saved.dtype in (torch.float16, torch.bfloat16) for saved, _ in pairs)
        tolerance = (1e-2 if half else 1e-3) * max(scale, 1e-3)
        worst, beyond, total = 0.0, 0, 0
        for saved, fresh in pairs:
            diff = (saved.double() - fresh.to(saved.device).double()).abs()
            diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
            if diff.numel():
                worst = max(worst, float(diff.max()))
            beyond += int((diff > tolerance).sum())
            total += diff.numel()
        return worst, tolerance, beyond, total

    def _report_non_finite(self) -> None:
        """Warn once (until the parameters are finite again) when the parameters are NaN or inf (training diverged,
        or a corrupted file was loaded), in every mode: live tensors in training, snapshots in eval and under
        ``no_grad``. The warning names the member (``member``, set by its owner: ``QT``, ``QPA prefix-tuning``, ...)."""
        params = [p.detach().reshape(-1) for p in self.parameters()]
        if not params or self.angles.is_meta:
            return
        finite = bool(torch.isfinite(torch.cat(params)).all())
        if finite:
            self._warned_non_finite = False
            return
        if getattr(self, "_warned_non_finite", False):
            return
        self._warned_non_finite = True
        bad = [name for name, p in self.named_parameters() if not torch.isfinite(p.detach()).all()]
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        warnings.warn(
            f"{getattr(self, 'member', 'QPA')} adapter '{getattr(self, 'adapter_name', 'default')}': the generator's "
            f"parameters are not finite (NaN or inf in {shown}) at step {int(self.step)}, so every generated tensor "
            "and the model's outputs are NaN from here on. If training made them so, lower the learning rate or clip "
            "gradients (Trainer: max_grad_norm) and resume from the last checkpoint saved before this step; if a "
            "loaded adapter holds them, its weights file is damaged: load a good copy.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _apply(self, fn, recurse=True):
        # A dtype change (model.to(torch.bfloat16), .half(), ...) or a device change (the raw output differs in
        # the last bits between CPU and GPU kernels) re-anchors the offset where the generator now computes, so
        # the generated tensors keep their values up to rounding and a zero tensor (LoRA's B at init) stays
        # exactly zero, as it does for a LoRA adapter moved or cast the same way.
        angles = self._parameters.get("angles")
        if angles is None or angles.is_meta or "offset" not in self._buffers:
            return super()._apply(fn, recurse)
        probe = fn(torch.zeros((), dtype=angles.dtype, device=angles.device))
        same_place = probe.dtype == angles.dtype and probe.device == angles.device
        if same_place or probe.is_meta or not probe.dtype.is_floating_point:
            return super()._apply(fn, recurse)
        with torch.no_grad():
            current = self.generate()
        result = super()._apply(fn, recurse)
        with torch.no_grad():
            self.offset.copy_(current.to(self.offset.device, self.offset.dtype) - self._raw_output(int(self.step)))
        return result

    def circuit(self, bound: bool = True):
        """The Qiskit circuit: with the current angles bound (drawable: ``.circuit().draw()``), or with
        ``bound=False`` its parameterized definition, which every backend runs."""
        if not bound:
            return self._circuit
        values = self.angles.detach().cpu().double().tolist()
        return self._circuit.assign_parameters(dict(zip(circuit_parameters(self._circuit), values)))

    def requires_grad_(self, requires_grad: bool = True) -> "QPAGenerator":
        # Every path that makes an adapter trainable (get_peft_model, set_adapter, set_requires_grad, ...) ends here,
        # so the freeze_angles control holds through all of them.
        super().requires_grad_(requires_grad)
        if self.freeze_angles:
            self.angles.requires_grad_(False)
        return self

    def num_trainable(self) -> int:
        """Parameters the generator trains (the angles not counted under the ``freeze_angles`` control)."""
        return sum(p.numel() for name, p in self.named_parameters() if not (self.freeze_angles and name == "angles"))

    def summary(self, classical_parameters: Optional[int] = None, classical_name: str = "the classical twin") -> str:
        """Qubits, depth, M, the trainable parameters by part, and their ratio to ``classical_parameters`` (the
        parameters of ``classical_name``, the generated tensors trained directly)."""
        circuit_params = self.angles.numel()
        mlp_params = sum(p.numel() for p in self.mapping.parameters())
        gi_params = sum(p.numel() for p in self.interpolation.parameters()) if self.interpolation is not None else 0
        total = (0 if self.freeze_angles else circuit_params) + mlp_params + gi_params
        lines = [
            f"qubits N: {self.n_qubits} (2^N = {2**self.n_qubits} basis states, {self.n_chunks} used)",
            f"depth L: {self.depth} ({self.ansatz})",
            f"generated numbers M: {self.num_generated} in chunks of {self.chunk_size}",
            f"circuit parameters: {circuit_params}" + (" (frozen: the freeze_angles control)" if self.freeze_angles else ""),
            f"mapping MLP parameters: {mlp_params}",
        ]
        if gi_params:
            lines.append(f"interpolation network parameters: {gi_params}")
        if self.probability_input == "constant":
            lines.append("probability input: constant (control: the MLP sees only the basis bits)")
        lines.append(f"trainable total: {total}")
        if classical_parameters:
            lines.append(
                f"ratio to {classical_name}: {total / classical_parameters:.2%} ({total} / {classical_parameters})"
            )
        return "\n".join(lines)


class _BlockwiseGenerate(torch.autograd.Function):
    """The large-generator path: ``(probability column, offset, mapping parameters) -> pieces of the M numbers``.

    Forward: the MLP block by block with no activation kept, centred and offset in place (one M-sized tensor,
    returned as views ``pieces``). Backward: the gradient of the centring is g - mean(g); each block's rows are
    recomputed with gradients and backpropagated on their own, reading the pieces' gradients where they lie, and
    the parameter gradients are summed over blocks. Nothing M-sized is allocated in the backward."""

    @staticmethod
    def forward(ctx, generator_ref, column, offset, sizes, *params):
        generator = generator_ref()
        ctx.generator_ref = generator_ref  # weak: the graph must not keep a deleted adapter's generator alive
        ctx.sizes = sizes
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(column)
        out = generator._blockwise_values(column, offset)
        return tuple(torch.split(out, list(sizes)))

    @staticmethod
    def backward(ctx, *grads):
        generator = ctx.generator_ref()
        if generator is None:
            raise RuntimeError("The generator of these tensors was deleted before the backward pass.")
        (column,) = ctx.saved_tensors
        params = list(generator.mapping.parameters())
        need_features = ctx.needs_input_grad[1]
        need_params = list(ctx.needs_input_grad[4:])
        total, chunk = generator.num_generated, generator.chunk_size
        present = [g for g in grads if g is not None]
        if not present or not (need_features or any(need_params)):
            return (None, None, None, None, *[None] * len(params))
        mean = sum(g.sum() for g in present) / total
        starts, position = [], 0
        for size in ctx.sizes:
            starts.append(position)
            position += size

        def gradient(begin: int, end: int) -> torch.Tensor:  # the incoming gradient of numbers [begin, end)
            parts = []
            for start, size, g in zip(starts, ctx.sizes, grads):
                lo, hi = max(begin, start), min(end, start + size)
                if lo >= hi:
                    continue
                if g is None:
                    parts.append(torch.zeros(hi - lo, dtype=column.dtype, device=column.device))
                else:
                    parts.append(g.reshape(-1)[lo - start: hi - start])
            return (torch.cat(parts) if len(parts) > 1 else parts[0].clone()).sub_(mean)

        grad_column = torch.zeros_like(column) if need_features else None
        grad_params = [torch.zeros_like(p) if need else None for p, need in zip(params, need_params)]
        rows = generator.block_rows()
        with torch.enable_grad(), torch.autocast(column.device.type, enabled=False):
            for start in range(0, generator.n_chunks, rows):
                stop = min(start + rows, generator.n_chunks)
                begin, end = start * chunk, min(stop * chunk, total)
                block_column = column[start:stop].detach().requires_grad_(need_features)
                block_in = torch.cat([generator.basis_bits[start:stop], block_column], 1)
                block = generator.mapping(block_in).reshape(-1)[: end - begin]
                inputs = ([block_column] if need_features else []) + [p for p, need in zip(params, need_params) if need]
                got = list(torch.autograd.grad(block, inputs, gradient(begin, end), allow_unused=True))
                if need_features:
                    grad_column[start:stop] += got.pop(0)
                for i, need in enumerate(need_params):
                    if need:
                        g = got.pop(0)
                        if g is not None:
                            grad_params[i] += g
        return (None, grad_column, None, None, *grad_params)


def _mark_live_consumed(generator_ref: "weakref.ref[QPAGenerator]", grad: torch.Tensor) -> None:
    # A weak reference: a tensor hook is held by autograd (C++), out of reach of Python's cycle collector, so a
    # strong one would keep a deleted adapter's generator alive.
    generator = generator_ref()
    if generator is not None:
        generator._live_consumed = True


def _queue_backward(flat: torch.Tensor, grad: torch.Tensor) -> None:
    """Backpropagate ``grad`` through the generator's graph once the current backward pass ends."""
    torch.autograd.Variable._execution_engine.queue_callback(
        lambda: torch.autograd.backward(flat, grad, retain_graph=True)
    )
