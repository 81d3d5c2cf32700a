"""``QPAConfig``: LoRA's fields where they mean the same, plus the quantum generator's."""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig

from .circuit import ANSATZES, MAX_QUBITS
from .registration import ensure_peft_type

BACKENDS = ("statevector", "aer_statevector", "aer_shots")
SHOT_GRADIENTS = ("exact", "parameter_shift")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh")
DTYPES = ("float32", "float64")
BIASES = ("none", "all", "qpa_only")

# `seed` reaches torch.Generator().manual_seed and torch.manual_seed (they accept [-2^63, 2^64 - 1]; a negative
# seed s gives the same stream as 2^64 + s), numpy's SeedSequence and Qiskit's seed_transpiler (any integer >= 0)
# and, through derive_seed, Aer's seed_simulator (int64: at most 2^63 - 1). [0, 2^63 - 1] is what all accept.
SEED_MAX = 2**63 - 1

# --- memory caps (see docs/config.md, "Memory caps") ---
# Peak memory of one Aer shot job per shot, measured with counts only (no memory=True), as AerProbabilities asks:
# 120-125 B at 1e6-1e7 shots for N = 2..12, noiseless or fake_kyiv, one circuit or 2P+1 in one job.
AER_BYTES_PER_SHOT = 128
# Per generator parameter: the weight, its gradient, Adam's two moments, the optimizer's temporaries and the
# generator's change fingerprint (measured 24-34 B per float32 parameter in a training step with Adam).
_PARAM_COPIES = 8
# Per number of the mapping MLP's output (n_chunks x chunk_size) and per hidden activation: forward, recompute,
# gradients, the centred and offset copies.
_OUTPUT_COPIES = 6
_ACTIVATION_COPIES = 4
MEMORY_BUDGET_ENV = "PEFT_QPA_MEMORY_BUDGET_GB"
MEMORY_BUDGET_FRACTION = 0.5


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.3g} PB"


def available_memory_bytes() -> Optional[int]:
    """Memory this process may still allocate: /proc/meminfo's MemAvailable (else the physical RAM), lowered
    to the room left under a cgroup memory limit if one is set. None where neither can be read."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge number: no limit
            available = min(available, max(0, int(limit) - usage))
        break
    return available


def memory_budget() -> tuple[float, str]:
    """(bytes, how it was chosen): the most one generator (and its Aer job) may plan to use.

    ``PEFT_QPA_MEMORY_BUDGET_GB`` overrides it (``inf`` disables the caps); otherwise it is
    ``MEMORY_BUDGET_FRACTION`` of :func:`available_memory_bytes`, or no cap where that is unknown."""
    env = os.environ.get(MEMORY_BUDGET_ENV)
    if env is not None and env.strip():
        try:
            gigabytes = float(env)
        except ValueError:
            gigabytes = float("nan")
        if not gigabytes > 0:
            raise ValueError(f"{MEMORY_BUDGET_ENV} must be a number of GB > 0 (or 'inf' for no cap), got {env!r}.")
        return gigabytes * 1e9, f"{MEMORY_BUDGET_ENV}={env}"
    available = available_memory_bytes()
    if available is None:
        return math.inf, "no cap (available memory unknown)"
    return (
        available * MEMORY_BUDGET_FRACTION,
        f"{MEMORY_BUDGET_FRACTION:.0%} of the {_format_bytes(available)} available now; "
        f"{MEMORY_BUDGET_ENV} overrides it",
    )


def _finfo(dtype_name: str):
    import torch

    return torch.finfo(getattr(torch, dtype_name))


def _mlp_parameters(widths: list[int]) -> int:
    """Weights and biases of Linear layers through ``widths`` (input, hidden..., output)."""
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))


def estimate_memory(
    config: "QPAConfig", num_generated: Optional[int] = None, shots: Optional[int] = None
) -> dict[str, tuple[str, int]]:
    """Estimated peak training memory in bytes of what user-set sizes allocate, as ``{field: (what, bytes)}``:
    the mapping MLP's output layer and the padding of its last chunk (``chunk_size``), its hidden layers
    (``mapping_hidden_sizes``), the M generated numbers (``r`` with the targets), the GI network
    (``gi_hidden_sizes``) and one Aer shot job (``shots`` or ``shots_per_state``).

    Without ``num_generated`` (M, known once the targets are) it is a lower bound for N = 1 and one chunk: the
    config check. The generator build passes M, hence the real N and chunk count; ``shots`` overrides the
    config's total (e.g. ``shots_per_state * 2^N``)."""
    from .circuit import n_qubits_for

    itemsize = 8 if config.simulator_dtype == "float64" else 4
    if num_generated is None:
        n_qubits, n_chunks, generated = 1, 1, 0
        padding = config.chunk_size - 1
    else:
        n_qubits, generated = n_qubits_for(num_generated, config.chunk_size), num_generated
        n_chunks = math.ceil(num_generated / config.chunk_size)
        padding = n_chunks * config.chunk_size - num_generated
    hidden = [int(h) for h in config.mapping_hidden_sizes]
    last = hidden[-1] if hidden else n_qubits + 1
    head = (last + 1) * config.chunk_size * itemsize * _PARAM_COPIES + padding * itemsize * _OUTPUT_COPIES
    body = _mlp_parameters([n_qubits + 1, *hidden]) * itemsize * _PARAM_COPIES
    body += n_chunks * sum(hidden) * itemsize * _ACTIVATION_COPIES
    terms = {
        "chunk_size": (
            f"the mapping MLP's output layer ({last + 1} x chunk_size weights in {config.simulator_dtype}, with "
            "gradients and Adam state) and the unused end of the last chunk",
            head,
        ),
        "mapping_hidden_sizes": ("the mapping MLP's hidden layers", body),
    }
    if generated:
        terms["r"] = (
            f"the M = {generated} generated LoRA numbers (set by r and the targets; with copies and gradients)",
            generated * itemsize * _OUTPUT_COPIES,
        )
    if config.generative_interpolation:
        gi_hidden = [int(h) for h in config.gi_hidden_sizes]
        gi = _mlp_parameters([n_qubits, *gi_hidden, 1]) * 4 * _PARAM_COPIES
        gi += 2**n_qubits * (sum(gi_hidden) + n_qubits) * 4 * _ACTIVATION_COPIES + 2**n_qubits * n_qubits * 8
        terms["gi_hidden_sizes"] = ("the generative-interpolation network", gi)
    if config.backend == "aer_shots":
        if shots is None:
            shots = config.shots if config.shots is not None else config.shots_per_state * 2**n_qubits
        field_name = "shots" if config.shots is not None else "shots_per_state"
        terms[field_name] = (
            f"one Aer job of {shots} shots at {AER_BYTES_PER_SHOT} B each (N = {n_qubits})", shots * AER_BYTES_PER_SHOT
        )
    return terms


def check_memory(config: "QPAConfig", num_generated: Optional[int] = None, shots: Optional[int] = None) -> None:
    """Raise ``ValueError`` if :func:`estimate_memory` exceeds :func:`memory_budget`, before anything is allocated.

    The message names the field behind the largest term, its estimate, the budget and how to lower it."""
    terms = estimate_memory(config, num_generated, shots)
    total = sum(b for _, b in terms.values())
    budget, how = memory_budget()
    if total <= budget:
        return
    name, (what, largest) = max(terms.items(), key=lambda kv: kv[1][1])
    lower = {
        "chunk_size": "Lower chunk_size (the circuit then gets more qubits instead; the default is 64)",
        "mapping_hidden_sizes": "Use smaller mapping_hidden_sizes (the QPA paper's: [32, 64, 128, 128, 64, 32])",
        "r": "Lower r, or adapt fewer modules (target_modules, exclude_modules, layers_to_transform)",
        "gi_hidden_sizes": "Use smaller gi_hidden_sizes (default [16, 16])",
        "shots": f"Lower shots (at most about {int(budget // AER_BYTES_PER_SHOT)} fit)",
        "shots_per_state": (
            "Lower shots_per_state (the QPA paper, arXiv:2410.09846, uses 20), set a total `shots` instead, or raise chunk_size for fewer "
            "qubits"
        ),
    }[name]
    others = ", ".join(f"{n}: {_format_bytes(b)}" for n, (_, b) in terms.items() if n != name)
    raise ValueError(
        f"QPAConfig.{name}={getattr(config, name)!r} needs about {_format_bytes(largest)} for {what}; with the "
        f"rest ({others}) the estimate is {_format_bytes(total)}, more than the memory budget of "
        f"{_format_bytes(budget)} ({how}). {lower}."
    )


@dataclass
class QPAConfig(PeftConfig):
    """Configuration of a [`QPAModel`]: a LoRA adapter whose matrices are generated by a quantum circuit.

    All adapted layers of one adapter share one generator: a circuit of N qubits whose 2^N basis-state
    probabilities, each paired with its own basis index, are mapped by a small MLP to chunks of
    `chunk_size` numbers; the chunks, concatenated and cut, are the LoRA A/B matrices of every target.
    N = ceil(log2(ceil(M / chunk_size))) where M is the number of LoRA numbers over all targets.
    Only the circuit angles and the mapping MLP are trained.

    LoRA fields (`r`, `lora_alpha`, `target_modules`, `exclude_modules`, `lora_dropout`, `fan_in_fan_out`,
    `bias`, `modules_to_save`, `layers_to_transform`, `layers_pattern`) mean exactly what they mean in
    [`peft.LoraConfig`]. See `docs/config.md` for every field.
    """

    r: int = field(default=4, metadata={"help": "LoRA rank of the generated matrices (r >= 1)."})
    lora_alpha: int = field(default=8, metadata={"help": "LoRA scaling numerator: the delta is scaled by lora_alpha / r."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Names of the modules to adapt, as in LoraConfig: a list (exact name or suffix match), a regex string, "
                "or 'all-linear'. If None, LoRA's defaults for the model architecture are used."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (list) or a regex of modules not to adapt, as in LoraConfig."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input, in [0, 1)."})
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True if the target stores its weight as (fan_in, fan_out), e.g. GPT-2's Conv1D."},
    )
    bias: str = field(default="none", metadata={"help": "Bias type: 'none', 'all' or 'qpa_only'."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the QPA layers that are trained in full and saved."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt (as in LoraConfig); None adapts all matching layers."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer container used with layers_to_transform (as in LoraConfig)."}
    )
    # --- the quantum generator ---
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
        default="gelu", metadata={"help": f"Nonlinearity between the mapping MLP's layers, one of {ACTIVATIONS}."}
    )
    prob_gamma: float = field(
        default=0.1, metadata={"help": "Probability post-processing x = (beta * tanh(gamma * 2^(N-1) * p) + eps)^alpha - eps^alpha: gamma."}
    )
    prob_beta: float = field(default=0.6, metadata={"help": "Probability post-processing: beta (> 0)."})
    prob_alpha: float = field(default=0.15, metadata={"help": "Probability post-processing: exponent alpha in (0, 1]."})
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
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: the adapted model equals the base model at step 0 (A starts at LoRA's seeded Kaiming init, B "
                "at zero; both then move with the generator). False: the raw generator output is used from the start "
                "(nonzero delta; for tests and experiments)."
            )
        },
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
                "adjoint gradients, compiled CPU kernel where it can be built), Aer's statevector (parameter-shift gradients), or Aer shots (finite sampling, optional noise)."
            )
        },
    )
    shots: Optional[int] = field(
        default=None,
        metadata={
            "help": "Total shots per circuit for 'aer_shots' (>= 1; capped by memory, about 128 bytes per shot)."
        },
    )
    shots_per_state: Optional[int] = field(
        default=None, metadata={"help": "Shots per basis state c for 'aer_shots': c * 2^N shots (the QPA paper, arXiv:2410.09846, uses 20)."}
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
                "Hamming-distance-1 neighbours with a small trained network. Only with backend='aer_shots'."
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

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if isinstance(self.noise_model, dict):  # a NoiseModel as stored in adapter_config.json
            from .aer import noise_model_from_json

            self.noise_model = noise_model_from_json(self.noise_model)
        self._normalize()
        self._validate()

    _INT_FIELDS = (
        "r", "qnn_depth", "chunk_size", "max_qubits", "seed", "shots", "shots_per_state", "aer_max_parallel_threads"
    )
    _REAL_FIELDS = ("lora_alpha", "lora_dropout", "prob_gamma", "prob_beta", "prob_alpha", "prob_eps")
    _BOOL_FIELDS = ("fan_in_fan_out", "init_weights", "generative_interpolation", "inference_mode")

    def _normalize(self) -> None:
        """numpy integers/floats -> Python numbers and tuples -> lists (the config must stay JSON-serialisable);
        nothing else is converted: strings, bools and None are left for _validate to refuse."""

        def plain(value):
            if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
                return int(value)
            if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float, numbers.Integral)):
                return float(value)
            return value

        for name in self._INT_FIELDS + self._REAL_FIELDS:
            setattr(self, name, plain(getattr(self, name)))
        for name in ("mapping_hidden_sizes", "gi_hidden_sizes", "modules_to_save", "layers_to_transform"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = list(value)
            setattr(self, name, [plain(v) for v in value] if isinstance(value, list) else plain(value))

    def _validate(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise ValueError(f"QPAConfig.{name} must be {allowed}, got {getattr(self, name)!r}.")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_real(value) -> bool:  # a finite int or float (not a bool, a string or NaN/inf)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def is_names(value) -> bool:  # a list/set of strings
            return isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value)

        def check_regex(name: str, pattern: str) -> None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"QPAConfig.{name}={pattern!r} is a string, so it is used as a regular expression (matched "
                    f"against full module names), but it does not compile: {error}. Pass a list of names instead."
                ) from None

        # --- bools: anything else (e.g. 'no', 0, None) would be read as True or False by accident
        for name in self._BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                fail(name, "True or False (a bool; strings such as 'no' and numbers are not accepted)")

        # --- LoRA's fields
        if not is_int(self.r) or self.r < 1:
            fail("r", "an integer >= 1")
        if not is_real(self.lora_alpha) or self.lora_alpha <= 0:
            fail("lora_alpha", "a finite number > 0")
        if not is_real(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            fail("lora_dropout", "a number in [0, 1)")
        if not isinstance(self.bias, str) or self.bias not in BIASES:
            fail("bias", f"one of {BIASES}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                check_regex("target_modules", self.target_modules)
            elif not is_names(self.target_modules) or not self.target_modules:
                fail(
                    "target_modules",
                    "None (LoRA's defaults for the architecture), a non-empty list of module names, a regex string "
                    "or 'all-linear'",
                )
        if self.exclude_modules is not None:
            if isinstance(self.exclude_modules, str):
                check_regex("exclude_modules", self.exclude_modules)
            elif not is_names(self.exclude_modules):
                fail("exclude_modules", "None, a list of module names or a regex string")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and is_names(self.modules_to_save)
        ):
            fail("modules_to_save", "None or a list of module names, e.g. ['lm_head'] (a bare string is not accepted)")
        if self.layers_to_transform is not None and not (
            (is_int(self.layers_to_transform) and self.layers_to_transform >= 0)
            or (
                isinstance(self.layers_to_transform, list)
                and all(is_int(i) and i >= 0 for i in self.layers_to_transform)
            )
        ):
            fail(
                "layers_to_transform",
                "None, a layer index >= 0, or a list of layer indices >= 0 ([] adapts all layers, like None)",
            )
        if self.layers_pattern is not None and not (
            isinstance(self.layers_pattern, str)
            or (isinstance(self.layers_pattern, list) and is_names(self.layers_pattern))
        ):
            fail("layers_pattern", "None, a string or a list of strings")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("QPAConfig.layers_pattern needs layers_to_transform to be set too.")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(
                "QPAConfig.layers_to_transform/layers_pattern cannot be used when target_modules is a regex string "
                "(as in LoraConfig; the regex would silently ignore them): pass target_modules as a list of names."
            )

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
            raise ValueError("QPAConfig: set either shots or shots_per_state, not both.")
        if self.backend == "aer_shots" and self.shots is None and self.shots_per_state is None:
            raise ValueError("QPAConfig.backend='aer_shots' needs shots or shots_per_state (e.g. shots_per_state=20).")
        if self.backend != "aer_shots" and (self.shots is not None or self.shots_per_state is not None):
            raise ValueError(
                f"QPAConfig.shots/shots_per_state only apply to backend='aer_shots' (backend is {self.backend!r})."
            )
        if not isinstance(self.shot_gradient, str) or self.shot_gradient not in SHOT_GRADIENTS:
            fail("shot_gradient", f"one of {SHOT_GRADIENTS}")
        if self.noise_model is not None and self.backend == "statevector":
            raise ValueError(
                "QPAConfig.noise_model needs an Aer backend: 'aer_shots' (noisy sampling) or 'aer_statevector' "
                "(exact noisy probabilities from a density matrix, N <= 12)."
            )
        if self.noise_model is not None:
            if isinstance(self.noise_model, str):
                from .aer import resolve_fake_backend_name

                resolve_fake_backend_name(self.noise_model)  # names only: no device or noise model is built
            else:
                from qiskit_aer.noise import NoiseModel

                if not isinstance(self.noise_model, NoiseModel):
                    fail(
                        "noise_model",
                        "None, a fake IBM device name such as 'fake_kyiv' (peft_qpa.aer.available_fake_backends() "
                        "lists them) or a qiskit_aer.noise.NoiseModel",
                    )
        if self.generative_interpolation and self.backend != "aer_shots":
            raise ValueError(
                "QPAConfig.generative_interpolation=True only applies to backend='aer_shots': exact probabilities "
                "have no unobserved states to interpolate."
            )
        if not isinstance(self.gi_hidden_sizes, list) or not all(is_int(h) and h >= 1 for h in self.gi_hidden_sizes):
            fail("gi_hidden_sizes", "a list of integers >= 1 ([] makes the GI network a single linear layer)")
        if not is_int(self.aer_max_parallel_threads) or self.aer_max_parallel_threads < 0:
            fail("aer_max_parallel_threads", "an integer >= 0")

        # --- memory the values above commit to, before anything is allocated (the real N is checked again
        # when the generator is built: peft_qpa.backends.check_generator_memory)
        check_memory(self)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save ``adapter_config.json`` and, once the adapter was built, the QPA section of the model card."""
        super().save_pretrained(save_directory, **kwargs)
        facts = getattr(self, "_model_card_facts", None)
        if facts is not None:
            from .model_card import update_model_card

            update_model_card(save_directory, facts, self.base_model_name_or_path)

    def to_dict(self) -> dict:
        """JSON-safe dict: a NoiseModel object is stored as its serialized form, never pickled."""
        output = super().to_dict()
        if output.get("noise_model") is not None and not isinstance(output["noise_model"], str):
            from .aer import noise_model_to_json

            output["noise_model"] = noise_model_to_json(output["noise_model"])
        return output
