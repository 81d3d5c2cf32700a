"""The shared parameter generator: feature source -> mapping -> every adapted tensor.

One ``QPAGenerator`` per adapter serves all adapted layers. It is given a list of named tensor shapes
(:class:`TensorSpec`) and fills all of them from one flat vector of M numbers, so it is not tied to LoRA's A/B: any
method that needs named tensors (DoRA magnitudes, prefixes, bottleneck adapters) can use it.

It composes parts with one job each: a *feature source* (:mod:`.features`: the circuit on its backend, or a control)
yields each chunk's features; the mapping input pairs them with the chunk's *basis features* (the ±1 bits of its
basis state); the *mapping* (:mod:`.mapping`) turns each row into ``chunk_size`` numbers; the centred result plus
the *zero-start offset* (:mod:`.specs`) are the generated tensors. Large generators run the mapping block by block
(:mod:`.blockwise`). The generator is a module whose forward (:meth:`generate`) returns tensors: it keeps no cache
and writes nothing outside itself; the tuner that owns it keeps the generated tensors (``peft_qpa.tuners.cache``).

Zero delta at step 0, with gradients everywhere from the first step: the offset makes each tensor start at the
method's usual initialization (LoRA: B = 0, so the model equals the base model), while dL/dB is nonzero and flows
through the mapping into the circuit angles. A head initialized at zero instead would leave the angles and hidden
layers without gradient at the first step.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backends import check_generator_memory, make_backend as make_config_backend
from . import blockwise
from .circuit import n_qubits_for
from .config import GeneratorConfig
from .features import FEATURE_SOURCES, BasisFeatures, PostProcessing, basis_bits
from .mapping import MAPPINGS
from .specs import TensorSpec, initial_values

__all__ = ["QPAGenerator", "TensorSpec", "basis_bits"]


class QPAGenerator(nn.Module):
    """Generates M numbers (all adapted tensors of one adapter) from a feature source and a mapping.

    Args:
        specs: the tensors to fill, in order. M = sum of their sizes.
        depth, ansatz: the circuit (see :func:`peft_qpa.generator.circuit.build_ansatz`); N follows from M.
        chunk_size: numbers per basis state.
        hidden_sizes, activation: the mapping MLP.
        prob_gamma, prob_beta, prob_alpha, prob_eps, probability_scaling: probability post-processing.
        make_backend: optional callable ``circuit -> (backend, interpolation or None)``; the exact torch statevector
            simulator when None. :meth:`from_config` builds the backend a :class:`GeneratorConfig` names.
        init_weights: start from the specs' init (True) or from the raw generator output (False).
        seed: seeds the source's parameters, the mapping and the specs' random inits.
        probability_input, freeze_angles: the feature source and its frozen-angles control (``docs/config.md``);
            ``source_options`` its own settings.
        basis_features: what the mapping sees of each chunk's basis state (:meth:`basis_matrix`).
        mapping, mapping_options: the mapping (:data:`~peft_qpa.generator.mapping.MAPPINGS`) and its own settings
            (for ``"mlp"``, ``hidden_sizes`` and ``activation`` by default).
    """

    def __init__(self, specs: list[TensorSpec], *, depth: int, chunk_size: int, ansatz: str = "ry_cnot",
                 hidden_sizes: tuple[int, ...] = (32, 64, 128, 128, 64, 32), activation: str = "gelu",
                 prob_gamma: float = 0.1, prob_beta: float = 0.6, prob_alpha: float = 0.15, prob_eps: float = 1e-6,
                 max_qubits: int = 24, dtype: torch.dtype = torch.float32, init_weights: bool = True, seed: int = 0,
                 make_backend: Optional[Callable] = None, probability_input: str = "circuit",
                 freeze_angles: bool = False, probability_scaling: str = "none", source_options: Optional[dict] = None,
                 mapping: str = "mlp", mapping_options: Optional[dict] = None, basis_features: str = "bits"):
        super().__init__()
        _check_specs(specs)
        self.specs, self.chunk_size = list(specs), chunk_size
        self.num_generated = sum(s.numel for s in specs)
        self.n_chunks = math.ceil(self.num_generated / chunk_size)
        self.n_qubits = _qubits(self.num_generated, chunk_size, max_qubits)
        if probability_input not in FEATURE_SOURCES:
            raise ValueError(f"probability_input must be one of {tuple(FEATURE_SOURCES)}, got {probability_input!r}.")
        self.depth, self.ansatz, self.probability_input = depth, ansatz, probability_input
        self.basis = BasisFeatures(basis_features, seed)
        postprocessing = PostProcessing(prob_gamma, prob_beta, prob_alpha, prob_eps, probability_scaling)
        self.source = FEATURE_SOURCES[probability_input](self.n_qubits, depth, ansatz, self.n_chunks, postprocessing,
                                                         freeze_angles, **(source_options or {}))
        # Parts keep their state here, under the names they declare (the saved keys of earlier versions), in the
        # order earlier versions registered it: the source's parameters, the mapping, the source's modules.
        rng = torch.Generator().manual_seed(seed)
        for name, parameter in self.source.create_parameters(rng, dtype).items():
            self.register_parameter(name, parameter)
        in_features = self.basis.width(self.n_qubits) + self.source.width
        self.mapping = _mapping(mapping, in_features, chunk_size, dtype, seed,
                                {"hidden_sizes": tuple(hidden_sizes), "activation": activation}, mapping_options)
        for name, module in self.source.create_modules(make_backend).items():
            setattr(self, name, module)
        # Row i of the mapping input: the ±1 bits of basis state i (only the first n_chunks states are used).
        self.register_buffer("basis_bits", basis_bits(self.n_chunks, self.n_qubits).to(dtype), persistent=False)
        # Training steps taken (seeds shot sampling; saved so a resumed run continues the sequence).
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("offset", torch.zeros(self.num_generated, dtype=dtype))
        # On meta (low_cpu_mem_usage) the checkpoint provides the offset, or, for an adapter saved without it, the
        # tuner computes it after the load (``offset_pending``).
        self.offset_pending = init_weights and any(p.is_meta for p in self.parameters())
        if init_weights and not self.offset_pending:
            with torch.no_grad():
                self.offset.copy_(initial_values(self.specs, rng, seed, dtype) - self._raw_output(step=0))

    @classmethod
    def from_config(cls, config: GeneratorConfig, specs: list[TensorSpec], init_weights: bool = True) -> "QPAGenerator":
        """The generator that ``config`` describes, filling ``specs`` (on the CPU; move it with ``.to``).

        Checks first, before anything is allocated, that it fits the memory budget (``ValueError`` naming the
        field to lower; see ``docs/config.md``, "Memory caps")."""
        check_generator_memory(config, sum(s.numel for s in specs))
        return cls(specs, init_weights=init_weights, **_config_kwargs(config))

    # --- the parts' settings, as earlier versions exposed them ------------------------------------------------
    @property
    def freeze_angles(self) -> bool:
        return self.source.frozen

    @property
    def probability_scaling(self) -> str:
        return self.source.postprocessing.scaling

    # --- the pipeline -------------------------------------------------------------------------------------------
    def probabilities(self, step: Optional[int] = None) -> torch.Tensor:
        """The 2^N basis-state probabilities the circuit gives (after interpolation, if any); with
        ``probability_input="multi_readout"`` a (K, 2^N) matrix, one row per readout setting."""
        return self.source.probabilities(self, int(self.step) if step is None else step)

    def postprocess(self, probs: torch.Tensor) -> torch.Tensor:
        """The post-processed, centred probabilities (see :class:`~peft_qpa.generator.features.PostProcessing`)."""
        return self.source.postprocessing(probs, self.n_qubits)

    def features(self, step: int) -> torch.Tensor:
        """The feature source's ``(n_chunks, width)`` matrix at ``step``."""
        return self.source.features(self, step)

    def basis_matrix(self, step: int, training: bool = False) -> torch.Tensor:
        """Every chunk's basis features at ``step`` (see :class:`~peft_qpa.generator.features.BasisFeatures`)."""
        return self.basis.matrix(self.basis_bits, step, training)

    def mapping_input(self, features: torch.Tensor, rows: slice = slice(None), bits_rows: Optional[slice] = None,
                      bits: Optional[torch.Tensor] = None):
        """The mapping's input rows: each chunk's basis features (rows ``bits_rows``, default ``rows``, of ``bits``,
        default the state's own bits) beside its features (rows ``rows`` of ``features``)."""
        bits = self.basis_bits if bits is None else bits
        return torch.cat([bits[rows if bits_rows is None else bits_rows], features[rows]], 1)

    def _output(self, step: int, offset: Optional[torch.Tensor], sizes: tuple[int, ...],
                training: bool = False) -> tuple[torch.Tensor, ...]:
        """The M generated numbers, centred, plus ``offset`` if given, cut into pieces of ``sizes``.

        The generator computes in its own dtype whatever autocast is active around it (TRL and the Trainer's bf16
        turn autocast on): in bfloat16 the offset would no longer cancel the initial output, so a fresh adapter
        would not equal the base model, and the saved snapshot would depend on whether the last forward ran under
        autocast."""
        with torch.autocast(self.offset.device.type, enabled=False):
            prepare = getattr(self.mapping, "prepare_compiled", None)
            if prepare is not None:  # the optional torch.compile of the mapping (compiled.py), outside any checkpoint
                prepare(self.offset.device, self.mapping.output_dtype)
            bits = self.basis_matrix(step, training)
            if self.num_generated >= blockwise.BLOCKWISE_MIN_GENERATED:
                return blockwise.blockwise_output(self, self.features(step), offset, sizes, bits)
            flat = self._mapped(self.mapping_input(self.features(step), bits=bits))
            if offset is not None:
                flat = flat + offset
            return torch.split(flat, list(sizes)) if len(sizes) > 1 else (flat,)

    def _mapped(self, rows: torch.Tensor) -> torch.Tensor:
        """Small generators (M < ``blockwise.BLOCKWISE_MIN_GENERATED``): the whole mapping at once, centred."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.mapping.parameters()):
            # Recompute the mapping's activations in the backward pass instead of keeping them: they are
            # n_chunks x (sum of widths) numbers, held from the start of the model's forward to the end of its
            # backward, and at N >= 12 they would outweigh the optimizer state QPA saves over LoRA. The
            # recomputation runs the same ops on the same inputs, so gradients are unchanged.
            chunks = checkpoint(self.mapping, rows, use_reentrant=False)
        else:
            chunks = self.mapping(rows)  # (n_chunks, chunk_size): row i is basis state i's chunk
        flat = chunks.reshape(-1)[: self.num_generated]
        return flat - flat.mean()

    def _raw_output(self, step: int) -> torch.Tensor:
        """The M raw numbers (centred mapping output, without the offset)."""
        return self._output(step, None, (self.num_generated,))[0]

    @torch.no_grad()
    def anchor_offset(self, target: torch.Tensor, with_gradient: bool = False) -> None:
        """Move the zero start: set the offset so that the output at the current step is ``target`` (the raw output
        is computed again, e.g. by a sampler backend just attached in place of its construction placeholder). With
        ``with_gradient`` the raw output is computed with autograd on, so that a backend that samples its gradient in
        the same job (parameter shift) does so now, and the training step at this step reuses that job."""
        with torch.set_grad_enabled(with_gradient):
            raw = self._raw_output(int(self.step))
        self.offset.copy_(target.to(self.offset.device, self.offset.dtype) - raw.detach())

    def block_rows(self) -> int:
        """Basis states per block of the blockwise path (see :mod:`peft_qpa.generator.blockwise`)."""
        return blockwise.block_rows(self)

    def generate(self, training: bool = False) -> torch.Tensor:
        """The flat vector of M generated numbers (differentiable). ``training``: a training generation (it draws
        the random basis assignment of ``basis_features="shuffled"``; nothing else depends on it)."""
        return self._output(int(self.step), self.offset, (self.num_generated,), training)[0]

    def generate_pieces(self, training: bool = False) -> dict[str, torch.Tensor]:
        """The generated tensors by name, as :meth:`split` of :meth:`generate` gives them. For large generators
        the backward then reads each piece's gradient where it lies: no M-sized concatenation of the gradients."""
        pieces = self._output(int(self.step), self.offset, tuple(spec.numel for spec in self.specs), training)
        return {spec.name: piece.view(spec.shape) for spec, piece in zip(self.specs, pieces)}

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut a flat vector into the named tensors (views). One ``split`` rather than a slice per tensor: its
        backward concatenates the pieces' gradients once, where each slice's would zero-fill all M numbers."""
        pieces = torch.split(flat, [spec.numel for spec in self.specs])
        return {spec.name: piece.view(spec.shape) for spec, piece in zip(self.specs, pieces)}

    # --- moving, casting, training ------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # A dtype change (model.to(torch.bfloat16), .half(), ...) or a device change (the raw output differs in
        # the last bits between CPU and GPU kernels) re-anchors the offset where the generator now computes, so
        # the generated tensors keep their values up to rounding and a zero tensor (LoRA's B at init) stays
        # exactly zero, as it does for a LoRA adapter moved or cast the same way.
        reference = next(iter(self._parameters.values()), None)
        if reference is None or reference.is_meta or "offset" not in self._buffers:
            return super()._apply(fn, recurse)
        probe = fn(torch.zeros((), dtype=reference.dtype, device=reference.device))
        same_place = probe.dtype == reference.dtype and probe.device == reference.device
        if same_place or probe.is_meta or not probe.dtype.is_floating_point:
            return super()._apply(fn, recurse)
        with torch.no_grad():
            current = self.generate()
        result = super()._apply(fn, recurse)
        with torch.no_grad():
            self.offset.copy_(current.to(self.offset.device, self.offset.dtype) - self._raw_output(int(self.step)))
        return result

    def requires_grad_(self, requires_grad: bool = True) -> "QPAGenerator":
        # Every path that makes an adapter trainable (get_peft_model, set_adapter, set_requires_grad, ...) ends here,
        # so the freeze_angles control holds through all of them.
        super().requires_grad_(requires_grad)
        for name in self.source.frozen_parameters:
            self._parameters[name].requires_grad_(False)
        return self

    # --- reporting ------------------------------------------------------------------------------------------
    def circuit(self, bound: bool = True):
        """The Qiskit circuit: with the current angles bound (drawable: ``.circuit().draw()``), or with
        ``bound=False`` its parameterized definition, which every backend runs. With
        ``probability_input="multi_readout"`` the shared body: readout k adds one RY layer
        (``source.readout_bound_circuit(generator, k)``)."""
        return self.source.bound_circuit(self, bound)

    def num_trainable(self) -> int:
        """Parameters the generator trains (the frozen ones of a control not counted)."""
        return sum(p.numel() for name, p in self.named_parameters() if name not in self.source.frozen_parameters)

    def summary(self, classical_parameters: Optional[int] = None, classical_name: str = "the classical twin") -> str:
        """Qubits, depth, M, the trainable parameters by part, and their ratio to ``classical_parameters`` (the
        parameters of ``classical_name``, the generated tensors trained directly)."""
        return _summary(self, classical_parameters, classical_name)


def _summary(generator: QPAGenerator, classical_parameters: Optional[int], classical_name: str) -> str:
    mlp_params = sum(p.numel() for p in generator.mapping.parameters())
    gi = generator.interpolation
    gi_params = sum(p.numel() for p in gi.parameters()) if gi is not None else 0
    lines = [
        f"qubits N: {generator.n_qubits} (2^N = {2**generator.n_qubits} basis states, {generator.n_chunks} used)",
        f"depth L: {generator.depth} ({generator.ansatz})",
        f"generated numbers M: {generator.num_generated} in chunks of {generator.chunk_size}",
        *generator.source.summary_lines(generator),
        f"mapping {getattr(generator.mapping, 'summary_name', 'MLP')} parameters: {mlp_params}",
    ]
    if gi_params:
        lines.append(f"interpolation network parameters: {gi_params}")
    if generator.source.description:
        lines.append(generator.source.description)
    if generator.basis.kind != "bits":
        lines.append(f"basis features: {generator.basis.kind}")
    cost = _sampler_cost(generator)
    if cost is not None:
        lines.append(f"sampler: {cost.line()}")
    total = generator.num_trainable()
    lines.append(f"trainable total: {total}")
    if classical_parameters:
        lines.append(f"ratio to {classical_name}: {total / classical_parameters:.2%} ({total} / {classical_parameters})")
    return "\n".join(lines)


def _sampler_cost(generator: QPAGenerator):
    """The per-step cost estimate of a generator with sampler backends (None without: Aer is not imported then)."""
    if not any(type(m).__name__ == "SamplerProbabilities" for m in generator.modules()):
        return None
    from .backends.sampler import generator_cost

    return generator_cost(generator)


def _check_specs(specs: list[TensorSpec]) -> None:
    if not specs:
        raise ValueError("The generator needs at least one tensor to fill.")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("Tensor names given to the generator must be unique.")


def _qubits(num_generated: int, chunk_size: int, max_qubits: int) -> int:
    n_qubits = n_qubits_for(num_generated, chunk_size)
    if n_qubits > max_qubits:
        needed = math.ceil(num_generated / 2**max_qubits)
        raise ValueError(
            f"Generating {num_generated} numbers in chunks of {chunk_size} needs {n_qubits} qubits, more than "
            f"max_qubits={max_qubits} (a statevector of 2^{n_qubits} amplitudes). Raise chunk_size to at least "
            f"{needed}, or raise max_qubits if you have the memory."
        )
    return n_qubits


def _mapping(kind: str, in_features: int, chunk_size: int, dtype: torch.dtype, seed: int, mlp_options: dict,
             options: Optional[dict]) -> nn.Module:
    """The mapping ``kind`` of :data:`MAPPINGS`; the MLP takes the generator's ``hidden_sizes``/``activation``
    unless ``options`` give them."""
    if kind not in MAPPINGS:
        raise ValueError(f"mapping must be one of {tuple(MAPPINGS)}, got {kind!r}.")
    merged = {**(mlp_options if kind == "mlp" else {}), **(options or {})}
    return MAPPINGS[kind](in_features, chunk_size, dtype, seed, **merged)


def _config_kwargs(config: GeneratorConfig) -> dict:
    """The generator's constructor arguments that ``config`` describes."""
    dtype = torch.float64 if config.simulator_dtype == "float64" else torch.float32
    mapping = getattr(config, "mapping", "mlp")
    return dict(
        depth=config.qnn_depth, chunk_size=config.chunk_size, ansatz=config.ansatz,
        hidden_sizes=tuple(config.mapping_hidden_sizes), activation=config.mapping_activation,
        prob_gamma=config.prob_gamma, prob_beta=config.prob_beta, prob_alpha=config.prob_alpha,
        prob_eps=config.prob_eps, max_qubits=config.max_qubits, dtype=dtype, seed=config.seed,
        make_backend=functools.partial(make_config_backend, config, dtype=dtype),
        probability_input=config.probability_input, freeze_angles=config.freeze_angles,
        probability_scaling=getattr(config, "probability_scaling", "none"),
        basis_features=getattr(config, "basis_features", "bits"),
        source_options=FEATURE_SOURCES[config.probability_input].options_from_config(config),
        mapping=mapping, mapping_options=MAPPINGS[mapping].options_from_config(config),
    )
