"""Memory caps: refuse, before anything is allocated, a generator (and its Aer job) that would not fit.

See ``docs/config.md``, "Memory caps". :func:`estimate_memory` adds what the user-set sizes of a
:class:`~peft_qpa.generator.config.GeneratorConfig` allocate; :func:`check_memory` compares it with
:func:`memory_budget`. They read the config's values through :class:`MemorySizes` rather than importing the
config class, which calls them from its own validation.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Protocol

from .circuit import n_qubits_for

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


class MemorySizes(Protocol):
    """The values of a generator config that the estimate reads (a ``GeneratorConfig`` or a member's config)."""

    chunk_size: int
    mapping_hidden_sizes: list
    simulator_dtype: str
    backend: str
    shots: Optional[int]
    shots_per_state: Optional[int]
    generative_interpolation: bool
    gi_hidden_sizes: list
    generated_size_field: str  # the field that sets M, its description, and how to lower it
    generated_size_what: str
    generated_size_hint: str


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


def _mlp_parameters(widths: list[int]) -> int:
    """Weights and biases of Linear layers through ``widths`` (input, hidden..., output)."""
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))


def estimate_memory(
    config: MemorySizes, num_generated: Optional[int] = None, shots: Optional[int] = None
) -> dict[str, tuple[str, int]]:
    """Estimated peak training memory in bytes of what user-set sizes allocate, as ``{field: (what, bytes)}``:
    the mapping MLP's output layer and the padding of its last chunk (``chunk_size``), its hidden layers
    (``mapping_hidden_sizes``), the M generated numbers (``r`` with the targets), the GI network
    (``gi_hidden_sizes``) and one Aer shot job (``shots`` or ``shots_per_state``).

    Without ``num_generated`` (M, known once the targets are) it is a lower bound for N = 1 and one chunk: the
    config check. The generator build passes M, hence the real N and chunk count; ``shots`` overrides the
    config's total (e.g. ``shots_per_state * 2^N``)."""
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
    if getattr(config, "mapping", "mlp") == "mps":  # at most chi x chi bonds, one site per number of a row
        chi, sites = int(config.mps_bond_dim), n_qubits + 1
        body = (2 * sites + config.chunk_size) * chi * chi * itemsize * _PARAM_COPIES
        body += n_chunks * (3 * chi * sites + chi * chi) * itemsize * _ACTIVATION_COPIES
        terms = {
            "chunk_size": ("the unused end of the last chunk", padding * itemsize * _OUTPUT_COPIES),
            "mps_bond_dim": (
                f"the MPS mapping's cores (its output core alone {chi * chi} x chunk_size weights in "
                f"{config.simulator_dtype}, with gradients and Adam state) and their activations",
                body,
            ),
        }
    if generated:
        field_name, what = config.generated_size_field, config.generated_size_what
        terms[field_name] = (
            f"the M = {generated} generated numbers ({what}; with copies and gradients)",
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


def check_memory(config: MemorySizes, num_generated: Optional[int] = None, shots: Optional[int] = None) -> None:
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
        "gi_hidden_sizes": "Use smaller gi_hidden_sizes (default [16, 16])",
        "mps_bond_dim": "Lower mps_bond_dim (the default is 8) or chunk_size (the output core has mps_bond_dim^2 x "
                        "chunk_size weights)",
        "shots": f"Lower shots (at most about {int(budget // AER_BYTES_PER_SHOT)} fit)",
        "shots_per_state": (
            "Lower shots_per_state (the QPA paper, arXiv:2410.09846, uses 20), set a total `shots` instead, or raise chunk_size for fewer "
            "qubits"
        ),
    }.get(name, config.generated_size_hint)
    others = ", ".join(f"{n}: {_format_bytes(b)}" for n, (_, b) in terms.items() if n != name)
    raise ValueError(
        f"{type(config).__name__}.{name}={getattr(config, name, None)!r} needs about {_format_bytes(largest)} for {what}; with the "
        f"rest ({others}) the estimate is {_format_bytes(total)}, more than the memory budget of "
        f"{_format_bytes(budget)} ({how}). {lower}."
    )
