"""``GeneratorConfig``: what every QPA method's config shares about its generator.

A plain dataclass, usable without PEFT (``QPAGenerator.from_config(GeneratorConfig(...), specs)``). Each
member's PEFT config (``QPAConfig``, ``QTConfig``, ...) inherits its fields, so they sit flat beside the
member's own fields in ``adapter_config.json``, and its validation, which names the member's class in errors.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

from .circuit import ANSATZES, MAX_QUBITS
from .memory import check_memory

# The options of the fields below, defined once (the backends and the generator import them from here).
BACKENDS = ("statevector", "aer_statevector", "aer_shots", "sampler")
# The backends that sample shots (shots/shots_per_state, shot_gradient and GI apply to them).
SHOT_BACKENDS = ("aer_shots", "sampler")
# Defaults of the sampler fields (a field left at its default is accepted with any backend).
SAMPLER_DEFAULTS = {"sampler_optimization_level": 1, "sampler_twirling": False, "sampler_dynamical_decoupling": False,
                    "sampler_retries": 3, "sampler_timeout_s": 600.0, "sampler_backoff_s": 2.0,
                    "max_device_seconds": None, "sampler_backend_name": None}
SHOT_GRADIENTS = ("exact", "parameter_shift")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "none")
DTYPES = ("float32", "float64")
PROBABILITY_INPUTS = ("circuit", "constant", "multi_readout", "classical_twin", "distributed", "multi_readout_twin",
                      "distributed_twin")
PROBABILITY_SCALINGS = ("none", "standardize")
BASIS_FEATURES = ("bits", "shuffled", "none")
MAPPINGS_OPTIONS = ("mlp", "mps")

# The generator of the QPA authors' public code (qpa_lora.py in CYLphysics/QPA) as these fields express it: depth 8,
# an affine mapping Linear(N+1, 32) -> 64 -> 128 -> 128 -> 64 -> 32 -> 32 -> chunk (no activation), bits of a random
# basis assignment at every training forward, chunks of 2048 numbers (their GPT-2 runs). Where this differs from
# their code, and why: docs/config.md, "The published configuration".
PUBLISHED_GENERATOR = {
    "qnn_depth": 8,
    "ansatz": "ry_cnot",
    "chunk_size": 2048,
    "mapping_hidden_sizes": [32, 64, 128, 128, 64, 32, 32],
    "mapping_activation": "none",
    "basis_features": "shuffled",
    "prob_gamma": 0.1,
    "prob_beta": 0.6,
    "prob_alpha": 0.15,
    "probability_scaling": "none",
    "backend": "statevector",
}

# `seed` reaches torch.Generator().manual_seed and torch.manual_seed (they accept [-2^63, 2^64 - 1]; a negative
# seed s gives the same stream as 2^64 + s), numpy's SeedSequence and Qiskit's seed_transpiler (any integer >= 0)
# and, through derive_seed, Aer's seed_simulator (int64: at most 2^63 - 1). [0, 2^63 - 1] is what all accept.
SEED_MAX = 2**63 - 1



def _finfo(dtype_name: str):
    import torch

    return torch.finfo(getattr(torch, dtype_name))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A finite int or float (not a bool, a string or NaN/inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plain_number(value):
    """numpy integers/floats -> Python numbers (a config must stay JSON-serialisable); anything else unchanged."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float, numbers.Integral)):
        return float(value)
    return value


@dataclass
class GeneratorConfig:
    """The quantum generator of a QPA adapter: circuit, mapping MLP, probability post-processing, backend.

    N, the number of qubits, is not a field: it follows from M (the numbers to generate, set by the method and
    its targets) and ``chunk_size``: N = ceil(log2(ceil(M / chunk_size))). See ``docs/config.md``.
    """

    # --- the circuit and the mapping MLP ---
    qnn_depth: int = field(
        default=8, metadata={"help": "Circuit depth L: repetitions of [rotation on every qubit; CNOT chain] (L >= 1)."}
    )
    ansatz: str = field(
        default="ry_cnot",
        metadata={"help": f"Circuit ansatz, one of {ANSATZES}. 'ry_cnot' keeps amplitudes real (faster)."},
    )
    chunk_size: int = field(
        default=64,
        metadata={
            "help": (
                "Numbers generated per basis state (the MLP's output width). Larger chunks mean fewer qubits and a "
                "larger MLP head; N = ceil(log2(ceil(M / chunk_size))). Refused if the head would not fit in memory."
            )
        },
    )
    mapping_hidden_sizes: list[int] = field(
        default_factory=lambda: [32, 64, 128, 128, 64, 32],
        metadata={
            "help": "Hidden widths of the mapping MLP (the QPA paper's: [32, 64, 128, 128, 64, 32]); [] maps linearly."
        },
    )
    mapping_activation: str = field(
        default="gelu",
        metadata={
            "help": (
                f"Nonlinearity between the mapping MLP's layers, one of {ACTIVATIONS}. 'none' makes the whole mapping "
                "affine, as in the QPA authors' code (then only the features tell chunks apart)."
            )
        },
    )
    basis_features: str = field(
        default="bits",
        metadata={
            "help": (
                f"What the mapping sees of each chunk's basis state beside the feature source's features, one of "
                f"{BASIS_FEATURES}: 'bits' (the state's own ±1 bits), 'shuffled' (the QPA authors' code: the bits of "
                "a fresh random assignment of basis states to chunks at every training forward, drawn from seed and "
                "step; eval, save, merge and export use its expectation, zero bits) or 'none' (no bits: the mapping "
                "sees only the features)."
            )
        },
    )
    mapping: str = field(
        default="mlp",
        metadata={
            "help": (
                f"The mapping from each basis state's row (its bits and features) to its chunk, one of "
                f"{MAPPINGS_OPTIONS}: 'mlp' (the QPA paper's MLP: mapping_hidden_sizes, mapping_activation) or 'mps' "
                "(the tensor-network mapping of Quantum-Train with Tensor Network Mapping Model, arXiv:2409.06992: a "
                "matrix product state over the row's numbers with bond dimension mps_bond_dim; far fewer parameters)."
            )
        },
    )
    mps_bond_dim: int = field(
        default=8,
        metadata={
            "help": (
                "With mapping='mps': the bond dimension chi >= 1 of the matrix product state. It has about 2 * chi^2 "
                "parameters per number of a row plus chi^2 * chunk_size for its output core."
            )
        },
    )
    prob_gamma: float = field(
        default=0.1, metadata={"help": "Probability post-processing x = (beta * tanh(gamma * 2^(N-1) * p) + eps)^alpha - eps^alpha: gamma."}
    )
    prob_beta: float = field(default=0.6, metadata={"help": "Probability post-processing: beta (> 0)."})
    prob_alpha: float = field(default=0.15, metadata={"help": "Probability post-processing: exponent alpha in (0, 1]."})
    probability_scaling: str = field(
        default="none",
        metadata={
            "help": (
                f"Scaling of the post-processed, centred probability column before the mapping MLP, one of "
                f"{PROBABILITY_SCALINGS}: 'none' (the published post-processing only; its standard deviation across "
                "states is about 0.14, next to basis bits of ±1) or 'standardize' (divided by its standard deviation "
                "over the states used, so the circuit's feature has a basis bit's scale). docs/quality.md measures both."
            )
        },
    )
    prob_eps: float = field(
        default=1e-6,
        metadata={
            "help": (
                "Added inside the power so that its derivative stays finite at p = 0 (the published x^0.15 has an "
                "infinite slope there); the constant eps^alpha is subtracted again."
            )
        },
    )
    max_qubits: int = field(
        default=24,
        metadata={
            "help": (
                f"Refuse generators that would need more qubits than this (at most {MAX_QUBITS}); the statevector "
                "holds 2^N amplitudes. Raise chunk_size to need fewer qubits."
            )
        },
    )
    simulator_dtype: str = field(
        default="float32", metadata={"help": f"Floating dtype of the generator and its simulator, one of {DTYPES}."}
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the circuit angles, the MLP and the frozen A init: an integer in [0, 2**63 - 1]."},
    )
    # --- backends (see docs/backends.md) ---
    backend: str = field(
        default="statevector",
        metadata={
            "help": (
                f"Where probabilities come from, one of {BACKENDS}: the exact statevector simulator in torch (default; "
                "adjoint gradients, compiled CPU kernel where it can be built), Aer's statevector (parameter-shift gradients), Aer shots (finite sampling, optional noise), "
                "or 'sampler': shots from a Qiskit SamplerV2 primitive (IBM hardware, Aer or another provider), attached with "
                "peft_qpa.use_sampler(model, sampler)."
            )
        },
    )
    shots: Optional[int] = field(
        default=None,
        metadata={
            "help": "Total shots per circuit for 'aer_shots' or 'sampler' (>= 1; capped by memory, about 128 bytes per shot)."
        },
    )
    shots_per_state: Optional[int] = field(
        default=None, metadata={"help": "Shots per basis state c for 'aer_shots' or 'sampler': c * 2^N shots (the QPA paper, arXiv:2410.09846, uses 20)."}
    )
    shot_gradient: str = field(
        default="exact",
        metadata={
            "help": (
                f"Gradient under shots, one of {SHOT_GRADIENTS}: 'exact' = straight-through (sampled forward, exact "
                "statevector Jacobian backward); 'parameter_shift' = shifted circuits sampled with the same budget."
            )
        },
    )
    noise_model: Optional[Any] = field(
        default=None,
        metadata={
            "help": (
                "None, the name of an offline IBM fake device (e.g. 'fake_kyiv'), or a qiskit_aer NoiseModel "
                "(stored in JSON as its serialized dict). With 'aer_shots' (noisy sampling) or 'aer_statevector' (exact noisy probabilities, N <= 12)."
            )
        },
    )
    generative_interpolation: bool = field(
        default=False,
        metadata={
            "help": (
                "Generative interpolation (GI): estimate the probability of every unobserved basis state from its N "
                "Hamming-distance-1 neighbours with a small trained network. Only with backend='aer_shots' or 'sampler'."
            )
        },
    )
    gi_hidden_sizes: list[int] = field(
        default_factory=lambda: [16, 16], metadata={"help": "Hidden widths of the GI network; [] maps linearly."}
    )
    aer_max_parallel_threads: int = field(
        default=1,
        metadata={"help": "Threads Aer may use (0 = all cores). Keep it low when torch also uses the cores."},
    )
    readout_mitigation: bool = field(
        default=False,
        metadata={
            "help": (
                "Readout-error mitigation of the measured probabilities: the inverse of each measured qubit's 2x2 "
                "readout confusion matrix (from the device), then the nearest probability vector. The mitigated "
                "probabilities feed the generator; GI still sees the raw counts. Only with a noisy device: "
                "backend='aer_shots' with a noise_model, or backend='sampler'. Unmixing amplifies shot noise by up "
                "to about (1 - 2e)^-N for a readout error e: keep it for N*e well below 1 (docs/backends.md)."
            )
        },
    )
    # --- the sampler backend (docs/backends.md, "Sampler primitives: the hardware path") ---
    sampler_optimization_level: int = field(
        default=1,
        metadata={
            "help": (
                "With backend='sampler': the optimization level (0-3) of qiskit's generate_preset_pass_manager, which "
                "transpiles the circuit once to the sampler's device (its ISA)."
            )
        },
    )
    sampler_twirling: bool = field(
        default=False,
        metadata={
            "help": (
                "With backend='sampler': turn on Pauli twirling of gates and measurements (options.twirling.enable_gates "
                "and enable_measure) where the sampler has these options; a sampler without them logs a warning once."
            )
        },
    )
    sampler_dynamical_decoupling: bool = field(
        default=False,
        metadata={
            "help": (
                "With backend='sampler': turn on dynamical decoupling (options.dynamical_decoupling.enable) where the "
                "sampler has this option; a sampler without it logs a warning once."
            )
        },
    )
    sampler_retries: int = field(
        default=3,
        metadata={
            "help": (
                "With backend='sampler': how often a failed or timed-out job is submitted again (>= 0) before the step "
                "fails with a SamplerJobError."
            )
        },
    )
    sampler_timeout_s: float = field(
        default=600.0,
        metadata={"help": "With backend='sampler': seconds to wait for a job's result (> 0) before it counts as failed."},
    )
    sampler_backoff_s: float = field(
        default=2.0,
        metadata={
            "help": (
                "With backend='sampler': the wait before the first retry, in seconds (>= 0); it doubles at each further "
                "retry (exponential backoff)."
            )
        },
    )
    max_device_seconds: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "With backend='sampler': the most estimated device time, in seconds (> 0), a run may use; a run or job "
                "whose estimate would exceed it is refused (peft_qpa.estimate_cost gives the estimate). None: no limit."
            )
        },
    )
    sampler_backend_name: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "With backend='sampler': the name of the device the sampler runs on (e.g. 'fake_kyiv', 'aer_simulator'), "
                "written by peft_qpa.use_sampler for the record and the model card. The sampler itself is never saved."
            )
        },
    )
    # --- controls for ablation studies (docs/config.md, "Controls") ---
    probability_input: str = field(
        default="circuit",
        metadata={
            "help": (
                f"What the mapping MLP sees beside each basis state's bits, one of {PROBABILITY_INPUTS}: 'circuit' (the "
                "method: the state's post-processed probability), 'constant' (a control: the same value for every "
                "state, so the circuit does not influence the generated tensors), 'multi_readout' (readout_settings "
                "probabilities per state: the circuit measured after each of K trainable final RY layers) or "
                "'classical_twin' (a control: a classical distribution over the basis states with the circuit's N * L "
                "trainable parameters, in place of the circuit; backend 'statevector' only). With 'distributed', "
                "circuit_groups smaller circuits replace the one circuit and each state's probability is the product "
                "of theirs (arXiv:2409.06992). 'multi_readout_twin' is the classical twin of 'multi_readout' (a "
                "control: readout_settings classical distributions with the K-readout circuit's N * L + K * N "
                "parameters; backend 'statevector' only), 'distributed_twin' that of 'distributed' (a control: one "
                "classical distribution per sub-circuit, each with that sub-circuit's parameter count; backend "
                "'statevector' only)."
            )
        },
    )
    readout_settings: int = field(
        default=2,
        metadata={
            "help": (
                "With probability_input='multi_readout': K >= 2, the readout settings (measurement bases). The circuit "
                "runs K times per step, and each basis state gets K probability features instead of one. With "
                "'multi_readout_twin': the K distributions of its classical twin."
            )
        },
    )
    circuit_groups: int = field(
        default=2,
        metadata={
            "help": (
                "With probability_input='distributed': G >= 2 sub-circuits (at most N, checked once N is known). The "
                "N qubits split into G groups of contiguous qubits, each its own circuit with no gate between groups, "
                "and each basis state's probability is the product of the groups' probabilities of its bits. With "
                "'distributed_twin': the G classical distributions of its classical twin."
            )
        },
    )
    freeze_angles: bool = field(
        default=False,
        metadata={
            "help": (
                "A control: keep the circuit angles at their initial (seeded) values; only the mapping MLP (and the GI "
                "network) train."
            )
        },
    )


    # What sets M, for the memory check's message (each member's config names its own field).
    generated_size_field = "num_generated"
    generated_size_what = "set by the tensors to generate"
    generated_size_hint = "Generate fewer numbers"

    _INT_FIELDS = ("qnn_depth", "chunk_size", "max_qubits", "seed", "shots", "shots_per_state", "aer_max_parallel_threads",
                   "readout_settings", "mps_bond_dim", "circuit_groups", "sampler_optimization_level", "sampler_retries")
    _REAL_FIELDS = ("prob_gamma", "prob_beta", "prob_alpha", "prob_eps", "sampler_timeout_s", "sampler_backoff_s",
                    "max_device_seconds")
    _BOOL_FIELDS = ("generative_interpolation", "freeze_angles", "readout_mitigation", "sampler_twirling",
                    "sampler_dynamical_decoupling")
    _LIST_FIELDS = ("mapping_hidden_sizes", "gi_hidden_sizes")

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if isinstance(self.noise_model, dict):  # a NoiseModel as stored in adapter_config.json
            from .noise import noise_model_from_json

            self.noise_model = noise_model_from_json(self.noise_model)
        self._normalize()
        self._validate()

    def generator_config(self) -> "GeneratorConfig":
        """The generator's fields alone, as a plain :class:`GeneratorConfig`."""
        names = [f.name for f in dataclasses.fields(GeneratorConfig)]
        return GeneratorConfig(**{name: getattr(self, name) for name in names})

    def _normalize(self) -> None:
        """numpy numbers -> Python numbers and tuples -> lists (the config must stay JSON-serialisable); nothing
        else is converted: strings, bools and None are left for _validate to refuse."""
        for name in self._INT_FIELDS + self._REAL_FIELDS:
            setattr(self, name, plain_number(getattr(self, name)))
        for name in self._LIST_FIELDS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
            setattr(self, name, [plain_number(v) for v in value] if isinstance(value, list) else plain_number(value))

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"{type(self).__name__}.{name} must be {allowed}, got {getattr(self, name)!r}.")

    def _validate_fields(self) -> None:
        """The fields a member config adds (each member checks its own, then calls ``super()``)."""

    def _validate(self) -> None:
        """Check every field; the member configs check their own fields first, then call this."""
        fail = self._fail
        cls = type(self).__name__
        for name in self._BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False (a bool; strings such as 'no' and numbers are not accepted)")
        self._validate_fields()
        # --- the generator
        if not is_int(self.qnn_depth) or self.qnn_depth < 1:
            fail("qnn_depth", "an integer >= 1")
        if not isinstance(self.ansatz, str) or self.ansatz not in ANSATZES:
            fail("ansatz", f"one of {ANSATZES}")
        if not is_int(self.chunk_size) or self.chunk_size < 1:
            fail("chunk_size", "an integer >= 1")
        hidden = self.mapping_hidden_sizes
        if not isinstance(hidden, list) or not all(is_int(h) and h >= 1 for h in hidden):
            fail("mapping_hidden_sizes", "a list of integers >= 1 ([] makes the mapping a single linear layer)")
        if not isinstance(self.mapping_activation, str) or self.mapping_activation not in ACTIVATIONS:
            fail("mapping_activation", f"one of {ACTIVATIONS}")
        if not isinstance(self.basis_features, str) or self.basis_features not in BASIS_FEATURES:
            fail("basis_features", f"one of {BASIS_FEATURES}")
        if not isinstance(self.simulator_dtype, str) or self.simulator_dtype not in DTYPES:
            fail("simulator_dtype", f"one of {DTYPES}")
        if not is_int(self.max_qubits) or not 1 <= self.max_qubits <= MAX_QUBITS:
            fail("max_qubits", f"an integer in [1, {MAX_QUBITS}]")
        # The post-processing runs in simulator_dtype: every constant, and gamma * 2^(N-1), must be finite there,
        # and eps must not flush to zero (its point is a finite slope at p = 0).
        finfo = _finfo(self.simulator_dtype)
        if not is_real(self.prob_gamma) or not 0 < self.prob_gamma * 2.0 ** (self.max_qubits - 1) <= finfo.max:
            fail(
                "prob_gamma",
                f"a finite number > 0 with prob_gamma * 2^(max_qubits - 1) <= {finfo.max:.3g} ({self.simulator_dtype})",
            )
        if not is_real(self.prob_beta) or not 0 < self.prob_beta <= finfo.max:
            fail("prob_beta", f"a finite number > 0 (at most {finfo.max:.3g} in {self.simulator_dtype})")
        if not is_real(self.prob_alpha) or not 0 < self.prob_alpha <= 1:
            fail("prob_alpha", "a number in (0, 1]")
        if not is_real(self.prob_eps) or not finfo.tiny <= self.prob_eps <= finfo.max:
            fail("prob_eps", f"a finite number >= {finfo.tiny:.3g} (smaller ones are zero in {self.simulator_dtype})")
        if not is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            fail(
                "seed",
                f"an integer in [0, 2**63 - 1] (= {SEED_MAX}; the range torch, numpy, Qiskit and Aer all accept)",
            )

        # --- backends
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            fail("backend", f"one of {BACKENDS}")
        if self.shots is not None and (not is_int(self.shots) or self.shots < 1):
            fail("shots", "None or an integer >= 1")
        if self.shots_per_state is not None and (not is_int(self.shots_per_state) or self.shots_per_state < 1):
            fail("shots_per_state", "None or an integer >= 1")
        if self.shots is not None and self.shots_per_state is not None:
            raise ValueError(f"{cls}: set either shots or shots_per_state, not both.")
        if self.backend in SHOT_BACKENDS and self.shots is None and self.shots_per_state is None:
            raise ValueError(f"{cls}.backend={self.backend!r} needs shots or shots_per_state (e.g. shots_per_state=20).")
        if self.backend not in SHOT_BACKENDS and (self.shots is not None or self.shots_per_state is not None):
            raise ValueError(
                f"{cls}.shots/shots_per_state only apply to backend='aer_shots' or 'sampler' (backend is {self.backend!r})."
            )
        if not isinstance(self.shot_gradient, str) or self.shot_gradient not in SHOT_GRADIENTS:
            fail("shot_gradient", f"one of {SHOT_GRADIENTS}")
        if self.noise_model is not None and self.backend == "sampler":
            raise ValueError(
                f"{cls}.noise_model does not apply to backend='sampler': the noise is the sampler's device's. For a "
                "noisy simulation through a sampler, attach qiskit_aer.primitives.SamplerV2.from_backend(device) (or a "
                "qiskit_ibm_runtime SamplerV2 on a fake device), or use backend='aer_shots' with this noise_model."
            )
        if self.noise_model is not None and self.backend == "statevector":
            raise ValueError(
                f"{cls}.noise_model needs an Aer backend: 'aer_shots' (noisy sampling) or 'aer_statevector' "
                "(exact noisy probabilities from a density matrix, N <= 12)."
            )
        if self.noise_model is not None:
            from .noise import is_noise_model, resolve_fake_backend_name

            if isinstance(self.noise_model, str):
                resolve_fake_backend_name(self.noise_model)  # names only: no device or noise model is built
            elif not is_noise_model(self.noise_model):
                fail(
                    "noise_model",
                    "None, a fake IBM device name such as 'fake_kyiv' (peft_qpa.available_fake_backends() "
                    "lists them) or a qiskit_aer.noise.NoiseModel",
                )
        if self.generative_interpolation and self.backend not in SHOT_BACKENDS:
            raise ValueError(
                f"{cls}.generative_interpolation=True only applies to backend='aer_shots' or 'sampler': exact "
                "probabilities have no unobserved states to interpolate."
            )
        self._validate_sampler_fields()
        if self.readout_mitigation and not (
            self.backend == "sampler" or (self.backend == "aer_shots" and self.noise_model is not None)
        ):
            noise = self.noise_model if self.noise_model is None or isinstance(self.noise_model, str) else "a NoiseModel"
            raise ValueError(
                f"{cls}.readout_mitigation=True corrects the readout error of a noisy device, so it needs "
                "backend='aer_shots' with a noise_model (e.g. noise_model='fake_kyiv', shots_per_state=20) or "
                f"backend='sampler'; got backend={self.backend!r} and noise_model={noise!r}. Set those, or "
                "leave readout_mitigation=False."
            )
        if not isinstance(self.gi_hidden_sizes, list) or not all(is_int(h) and h >= 1 for h in self.gi_hidden_sizes):
            fail("gi_hidden_sizes", "a list of integers >= 1 ([] makes the GI network a single linear layer)")
        if not is_int(self.aer_max_parallel_threads) or self.aer_max_parallel_threads < 0:
            fail("aer_max_parallel_threads", "an integer >= 0")
        if not isinstance(self.probability_input, str) or self.probability_input not in PROBABILITY_INPUTS:
            fail("probability_input", f"one of {PROBABILITY_INPUTS}")
        if self.probability_input in ("classical_twin", "multi_readout_twin", "distributed_twin") and self.backend != "statevector":
            raise ValueError(
                f"{cls}.probability_input={self.probability_input!r} runs no circuit, so backend={self.backend!r} does not "
                "apply: the twin's probabilities are exact, with no shots to sample and no noise. Leave backend at "
                "'statevector' (the default)."
            )
        if not is_int(self.readout_settings) or self.readout_settings < 2:
            fail("readout_settings", "an integer >= 2 (the number of readout settings K of probability_input='multi_readout')")
        if self.probability_input not in ("multi_readout", "multi_readout_twin") and self.readout_settings != 2:
            raise ValueError(
                f"{cls}.readout_settings={self.readout_settings} only applies to probability_input='multi_readout' "
                "(or its classical twin, 'multi_readout_twin') "
                f"(probability_input is {self.probability_input!r}); set probability_input='multi_readout' or leave "
                "readout_settings at its default, 2."
            )
        if not isinstance(self.probability_scaling, str) or self.probability_scaling not in PROBABILITY_SCALINGS:
            fail("probability_scaling", f"one of {PROBABILITY_SCALINGS}")
        if not isinstance(self.mapping, str) or self.mapping not in MAPPINGS_OPTIONS:
            fail("mapping", f"one of {MAPPINGS_OPTIONS}")
        if not is_int(self.mps_bond_dim) or self.mps_bond_dim < 1:
            fail("mps_bond_dim", "an integer >= 1 (the bond dimension of mapping='mps')")
        if self.mapping != "mps" and self.mps_bond_dim != 8:
            raise ValueError(
                f"{cls}.mps_bond_dim={self.mps_bond_dim} only applies to mapping='mps' (mapping is {self.mapping!r}); "
                "set mapping='mps' or leave mps_bond_dim at its default, 8."
            )
        if not is_int(self.circuit_groups) or not 2 <= self.circuit_groups <= self.max_qubits:
            fail(
                "circuit_groups",
                f"an integer in [2, max_qubits = {self.max_qubits}] (the sub-circuits of probability_input="
                "'distributed': at least two, at most one per qubit)",
            )
        if self.probability_input not in ("distributed", "distributed_twin") and self.circuit_groups != 2:
            raise ValueError(
                f"{cls}.circuit_groups={self.circuit_groups} only applies to probability_input='distributed' "
                "(or its classical twin, 'distributed_twin') "
                f"(probability_input is {self.probability_input!r}); set probability_input='distributed' or leave "
                "circuit_groups at its default, 2."
            )


        # --- memory the values above commit to, before anything is allocated (the real N is checked again
        # when the generator is built: peft_qpa.generator.backends.check_generator_memory)
        check_memory(self)

    def _validate_sampler_fields(self) -> None:
        """The fields of backend='sampler' (each refused with another backend unless left at its default)."""
        fail, cls = self._fail, type(self).__name__
        level = self.sampler_optimization_level
        if not is_int(level) or not 0 <= level <= 3:
            fail("sampler_optimization_level", "an integer in [0, 3] (generate_preset_pass_manager's levels)")
        if not is_int(self.sampler_retries) or self.sampler_retries < 0:
            fail("sampler_retries", "an integer >= 0 (0: a failed job fails the step at once)")
        if not is_real(self.sampler_timeout_s) or self.sampler_timeout_s <= 0:
            fail("sampler_timeout_s", "a finite number of seconds > 0")
        if not is_real(self.sampler_backoff_s) or self.sampler_backoff_s < 0:
            fail("sampler_backoff_s", "a finite number of seconds >= 0 (0: retry at once)")
        limit = self.max_device_seconds
        if limit is not None and (not is_real(limit) or limit <= 0):
            fail("max_device_seconds", "None (no limit) or a finite number of seconds > 0")
        name = self.sampler_backend_name
        if name is not None and (not isinstance(name, str) or not name.strip()):
            fail("sampler_backend_name", "None or a device name (peft_qpa.use_sampler writes it)")
        if self.backend != "sampler":
            changed = [n for n, default in SAMPLER_DEFAULTS.items() if getattr(self, n) != default]
            if changed:
                raise ValueError(
                    f"{cls}.{changed[0]}={getattr(self, changed[0])!r} only applies to backend='sampler' (backend is "
                    f"{self.backend!r}); set backend='sampler' or leave {changed[0]} at its default, "
                    f"{SAMPLER_DEFAULTS[changed[0]]!r}."
                )
        elif getattr(self, "save_generated_tensors", True) is False:
            raise ValueError(
                f"{cls}.save_generated_tensors=False does not apply to backend='sampler': a device's shots cannot be "
                "drawn again when the adapter is loaded, so the adapter must hold its generated tensors. Leave "
                "save_generated_tensors=True."
            )

    def to_dict(self) -> dict:
        """JSON-safe dict: a NoiseModel object is stored as its serialized form, never pickled."""
        parent = getattr(super(), "to_dict", None)
        output = parent() if parent is not None else dataclasses.asdict(self)
        if output.get("noise_model") is not None and not isinstance(output["noise_model"], str):
            from .noise import noise_model_to_json

            output["noise_model"] = noise_model_to_json(output["noise_model"])
        return output
