"""Qiskit sampler primitives (``SamplerV2``): the hardware path, ``backend="sampler"``.

:class:`SamplerProbabilities` runs the circuit of :func:`peft_qpa.generator.circuit.build_ansatz` (never a
re-description of it) through any ``qiskit.primitives.BaseSamplerV2``: ``qiskit_ibm_runtime.SamplerV2`` on an IBM
device (or a fake device in local mode), ``qiskit_aer.primitives.SamplerV2``, or another provider's. It has the
backend signature ``(angles, step) -> (probs, counts)`` and a custom autograd Function, as
:class:`~peft_qpa.generator.backends.aer.AerProbabilities` with ``backend="aer_shots"``:

* **The sampler is attached, never saved** (:meth:`SamplerProbabilities.attach`, which
  ``peft_qpa.use_sampler(model, sampler)`` calls). The circuit, with measurements that put logical qubit q in
  clbit q, is transpiled once per device to its ISA with ``generate_preset_pass_manager`` (a sampler without a
  device with a coupling map, e.g. Aer's, runs it as it is).
* **One job per step.** Each step binds the current angles into one PUB ``(isa_circuit, values)``: ``values`` is
  ``(1, P)``, or ``(2P+1, P)`` with ``shot_gradient="parameter_shift"`` (the circuit and every ±π/2 shifted copy),
  all in one ``sampler.run([pub], shots=...)``. Counts come from the result's DataBin; the number of PUB results,
  the shape and the bitstring width are checked (:class:`SamplerResultError`).
* **Shots and gradients** as ``aer_shots``: ``shots`` or ``shots_per_state`` c (c·2^N), ``"parameter_shift"`` or
  ``"exact"`` (straight-through: the exact statevector Jacobian in the backward pass).
* **Seeds**: each job is seeded with ``derive_seed(seed, step)`` where the sampler lets itself be seeded
  (``options.simulator.seed_simulator`` of qiskit-ibm-runtime, ``options.seed_simulator`` of qiskit's
  ``BackendSamplerV2``, the ``seed`` of Aer's and of qiskit's ``StatevectorSampler``): a resumed run draws the same
  shots at the same steps.
* **The last result is kept** (buffers ``result_step``, ``result_angles``, ``result_probs``, ``result_counts``, saved
  with the adapter, always float64 on the CPU): an evaluation at the same step and angles reuses it instead of a new
  job (the zero start's step-0 job serves training step 0; a checkpoint's job serves the next training step), and
  a loaded adapter regenerates its tensors from it without a sampler.
* **Before a sampler is attached** a circuit evaluation raises :class:`SamplerNotAttachedError`, except the
  generator's construction (no gradient, no device result yet), which uses the exact statevector as a placeholder:
  ``use_sampler`` then re-anchors the zero start on the device's step-0 result.
* **Faults**: a job that raises or gives no result within ``timeout_s`` is submitted again, up to ``retries`` times,
  after ``backoff_s``, 2·``backoff_s``, ...; then :class:`SamplerJobError`. Nothing changes before a job succeeds.
* **Cost**: every job is charged its estimated device time (:meth:`SamplerProbabilities.seconds_per_shot` × shots ×
  circuits) to a :class:`DeviceBudget` shared by the adapter's backends; a job that would exceed
  ``max_device_seconds`` is refused before it is submitted (:class:`DeviceBudgetError`).

Device time per shot: the ISA circuit scheduled as soon as possible with the device Target's gate and readout
durations, plus its default repetition delay, when the Target reports them; else the default model
``depth × DEFAULT_LAYER_SECONDS + DEFAULT_READOUT_SECONDS + DEFAULT_REP_DELAY_SECONDS`` (0.5 µs per layer, 5 µs
readout, 250 µs repetition delay: upper ends of current superconducting devices, IBM's default repetition delay).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from qiskit import QuantumCircuit
from transformers.utils import logging

from ..circuit import circuit_parameters
from ..config import SHOT_GRADIENTS
from .aer import _AerFunction, _check_seed, _check_shots, _shift_rule_holds, derive_seed

logger = logging.get_logger(__name__)

# The default device-time model (a device whose Target reports no durations, or no device): per shot,
# depth x DEFAULT_LAYER_SECONDS + DEFAULT_READOUT_SECONDS + DEFAULT_REP_DELAY_SECONDS.
DEFAULT_LAYER_SECONDS = 0.5e-6  # one layer of the ISA circuit: a two-qubit gate takes 0.07-0.6 us on current devices
DEFAULT_READOUT_SECONDS = 5e-6  # a measurement: 1-5 us
DEFAULT_REP_DELAY_SECONDS = 250e-6  # IBM devices' default repetition delay between shots
REGISTER = "meas"  # the classical register the measurements write (QuantumCircuit.measure_all's)

ATTACH_HINT = (
    "call peft_qpa.use_sampler(model, sampler) with a qiskit SamplerV2 primitive first (qiskit_ibm_runtime.SamplerV2 "
    "for IBM hardware, qiskit_aer.primitives.SamplerV2 for a local simulation)"
)


class SamplerNotAttachedError(RuntimeError):
    """A circuit evaluation of a ``backend="sampler"`` generator before a sampler was attached."""


class SamplerJobError(RuntimeError):
    """A sampler job that failed (or timed out) on every attempt; the step did not happen."""


class SamplerResultError(RuntimeError):
    """A sampler result that does not fit the job: wrong number of PUB results, shape, register or bitstring width."""


class DeviceBudgetError(RuntimeError):
    """A run or job whose estimated device time would exceed ``max_device_seconds``."""


# --------------------------------------------------------------------------------------------------
# The sampler's device
# --------------------------------------------------------------------------------------------------


def sampler_device(sampler) -> Any:
    """The backend (device) a sampler runs on, or None: ``backend()`` of qiskit-ibm-runtime's primitives (its mode's
    backend in a ``Session``/``Batch``), ``backend`` of qiskit's ``BackendSamplerV2``, the ``AerSimulator`` of Aer's
    ``SamplerV2``; None for a sampler without one (qiskit's ``StatevectorSampler``)."""
    device = getattr(sampler, "backend", None)
    if callable(device) and not hasattr(device, "target"):
        try:
            device = device()
        except Exception:  # noqa: BLE001  (a provider's backend() that needs a connection: no device known)
            device = None
    if device is None:
        device = getattr(sampler, "_backend", None)  # qiskit_aer.primitives.SamplerV2 keeps its AerSimulator here
    return device if hasattr(device, "target") else None


def sampler_backend_name(sampler) -> str:
    """The name to record for a sampler: its device's ``name`` (``"fake_kyiv"``, ``"aer_simulator"``), else the
    sampler's class name."""
    device = sampler_device(sampler)
    name = getattr(device, "name", None)
    if callable(name):
        name = name()
    return str(name) if name else type(sampler).__name__


def _coupled(device) -> bool:
    """Whether the device restricts which qubits a two-qubit gate may join (then the circuit needs a layout)."""
    try:
        return device.coupling_map is not None
    except Exception:  # noqa: BLE001
        return False


def _rep_delay(device) -> Optional[float]:
    """The device's default repetition delay in seconds (IBM backends' ``configuration().default_rep_delay``)."""
    try:
        value = device.configuration().default_rep_delay
    except Exception:  # noqa: BLE001  (no configuration, or no such attribute)
        return None
    return float(value) if value is not None and math.isfinite(float(value)) and value >= 0 else None


def schedule_seconds(circuit: QuantumCircuit, target) -> Optional[float]:
    """Duration of one shot of ``circuit`` (an ISA circuit) scheduled as soon as possible with the Target's durations:
    each instruction starts when all its qubits are free; barriers align their qubits. None when an instruction's
    duration is unknown."""
    if target is None:
        return None
    front = [0.0] * circuit.num_qubits
    names = set(target.operation_names)
    for inst in circuit.data:
        name = inst.operation.name
        qubits = [circuit.find_bit(q).index for q in inst.qubits]
        if not qubits:
            continue
        start = max(front[q] for q in qubits)
        if name == "barrier":
            duration = 0.0
        else:
            props = target[name].get(tuple(qubits)) if name in names else None
            duration = getattr(props, "duration", None)
            if duration is None:
                return None
        for q in qubits:
            front[q] = start + float(duration)
    return max(front, default=0.0)


@dataclass
class Timing:
    """Device seconds per shot of one circuit and how they were estimated."""

    seconds_per_shot: float
    how: str


def circuit_timing(circuit: QuantumCircuit, device=None) -> Timing:
    """Device seconds per shot of ``circuit`` on ``device`` (see the module docstring)."""
    target = getattr(device, "target", None)
    schedule = schedule_seconds(circuit, target) if device is not None and _coupled(device) else None
    if schedule is not None:
        rep = _rep_delay(device)
        rep_how = "the device's default repetition delay" if rep is not None else "the default repetition delay"
        rep = DEFAULT_REP_DELAY_SECONDS if rep is None else rep
        return Timing(schedule + rep, f"the device Target's gate and readout durations (one shot {schedule * 1e6:.3g} us "
                                      f"on {getattr(device, 'name', 'the device')}) + {rep_how}, {rep * 1e6:.3g} us")
    depth = circuit.depth(lambda inst: inst.operation.name != "barrier")
    seconds = depth * DEFAULT_LAYER_SECONDS + DEFAULT_READOUT_SECONDS + DEFAULT_REP_DELAY_SECONDS
    return Timing(seconds, f"the default model: depth {depth} x {DEFAULT_LAYER_SECONDS * 1e6:g} us + readout "
                           f"{DEFAULT_READOUT_SECONDS * 1e6:g} us + repetition delay {DEFAULT_REP_DELAY_SECONDS * 1e6:g} us")


# --------------------------------------------------------------------------------------------------
# The cost guard
# --------------------------------------------------------------------------------------------------


@dataclass
class DeviceBudget:
    """The estimated device seconds the jobs of one adapter have used in this process (shared by its backends), and
    its limit (``max_device_seconds``; None: no limit)."""

    limit_s: Optional[float] = None
    label: str = "this adapter"
    spent_s: float = 0.0
    jobs: int = 0

    def charge(self, seconds: float, step: int, circuits: int, shots: int) -> None:
        """Count a job about to be submitted; refuse it (nothing submitted) if it would exceed the limit."""
        if self.limit_s is not None and self.spent_s + seconds > self.limit_s:
            raise DeviceBudgetError(
                f"QPA sampler ({self.label}): the job of step {step} ({circuits} circuits x {shots} shots, about "
                f"{seconds:.4g} s of device time) would bring the estimated device time to {self.spent_s + seconds:.4g} "
                f"s, over max_device_seconds={self.limit_s:g} ({self.spent_s:.4g} s used by {self.jobs} jobs so far). "
                "It was not submitted, and the model stays at its last completed step. Raise max_device_seconds "
                "(the adapter config), or use fewer shots or steps."
            )
        self.spent_s += seconds
        self.jobs += 1


@dataclass
class CostEstimate:
    """The device cost of ``steps`` training steps (a step: one forward and backward of the generator)."""

    steps: int
    circuits_per_step: int
    jobs_per_step: int
    shots_per_step: int
    device_seconds_per_step: float
    total_device_seconds: float
    method: str
    adapters: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def line(self) -> str:
        """One line for summaries."""
        return (f"{self.jobs_per_step} job(s), {self.circuits_per_step} circuit(s) and {self.shots_per_step} shots per "
                f"step; about {self.device_seconds_per_step:.4g} s of device time per step (estimated from "
                f"{self.method})")

    def __str__(self) -> str:
        return f"{self.line()}; {self.total_device_seconds:.4g} s for {self.steps} steps"


def estimate_backends(backends: list, steps: int, with_gradient: bool = True, timings: Optional[list] = None,
                      adapters: Optional[list] = None) -> CostEstimate:
    """The :class:`CostEstimate` of ``steps`` steps of ``backends`` (one job each per step), with their attached
    timings or ``timings`` (one :class:`Timing` per backend, e.g. for a sampler about to be attached)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}.")
    timings = timings or [backend.timing() for backend in backends]
    circuits = shots = 0
    seconds = 0.0
    for backend, timing in zip(backends, timings):
        n = backend.circuits_per_step(with_gradient)
        circuits += n
        shots += n * backend.shots
        seconds += n * backend.shots * timing.seconds_per_shot
    methods = sorted({timing.how for timing in timings})
    return CostEstimate(int(steps), circuits, len(backends), shots, seconds, seconds * int(steps), "; ".join(methods),
                        list(adapters or []))


def sampler_backends(module: torch.nn.Module) -> list["SamplerProbabilities"]:
    """Every :class:`SamplerProbabilities` in ``module`` (a generator: one, or one per readout or sub-circuit)."""
    return [m for m in module.modules() if isinstance(m, SamplerProbabilities)]


def generator_cost(generator: torch.nn.Module, steps: int = 1) -> Optional[CostEstimate]:
    """The cost estimate of a generator's sampler backends (None without any); the gradient's circuits are counted
    unless the angles are frozen."""
    backends = sampler_backends(generator)
    if not backends:
        return None
    return estimate_backends(backends, steps, with_gradient=not getattr(generator, "freeze_angles", False))


# --------------------------------------------------------------------------------------------------
# Sampler options and seeds
# --------------------------------------------------------------------------------------------------


def _set_option(sampler, path: tuple[str, ...], value) -> bool:
    """Set ``sampler.options.<path>`` if the sampler has that option; whether it did."""
    obj = getattr(sampler, "options", None)
    for name in path[:-1]:
        obj = getattr(obj, name, None)
        if obj is None:
            return False
    if obj is None or not hasattr(obj, path[-1]):
        return False
    setattr(obj, path[-1], value)
    return True


def seed_sampler(sampler, seed: int) -> bool:
    """Seed the sampler's next job with ``seed`` where it allows it; whether it did."""
    if _set_option(sampler, ("simulator", "seed_simulator"), seed):  # qiskit-ibm-runtime (local and simulators)
        return True
    if _set_option(sampler, ("seed_simulator",), seed):  # qiskit's BackendSamplerV2
        return True
    if hasattr(sampler, "_seed"):  # the `seed` of qiskit_aer.primitives.SamplerV2 and of StatevectorSampler
        sampler._seed = seed
        return True
    return False


def _wait(job, timeout_s: float):
    """``job.result()``, or ``TimeoutError`` after ``timeout_s`` seconds (the job is then cancelled if it can be)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = job.result()
        except BaseException as error:  # noqa: BLE001  (handed to the caller)
            box["error"] = error

    thread = threading.Thread(target=target, name="qpa-sampler-result", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        try:
            job.cancel()
        except Exception:  # noqa: BLE001  (not every job can be cancelled)
            pass
        raise TimeoutError(f"no result within sampler_timeout_s={timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


# --------------------------------------------------------------------------------------------------
# The torch module
# --------------------------------------------------------------------------------------------------


@dataclass
class _Attachment:
    """Everything that depends on the attached sampler (built by :meth:`SamplerProbabilities.prepare`)."""

    sampler: Any
    device: Any
    device_name: str
    isa: QuantumCircuit
    columns: np.ndarray  # column j of the PUB's values is the circuit's parameter columns[j]
    physical_qubits: list[int]  # clbit (= logical qubit) q was measured on physical qubit physical_qubits[q]
    timing: Timing
    shift_rule_ok: bool
    readout_matrices: Optional[list] = None
    budget: DeviceBudget = field(default_factory=DeviceBudget)


_RESULT_BUFFERS = ("result_step", "result_angles", "result_probs", "result_counts")


class SamplerProbabilities(torch.nn.Module):
    """Basis-state probabilities of ``circuit`` from a Qiskit ``SamplerV2``, differentiable w.r.t. its angles.

    ``forward(angles, step)`` returns ``(probs, counts)``: the observed frequencies (2^N, Qiskit little-endian
    order, dtype ``dtype``) and the int64 counts. See the module docstring."""

    def __init__(self, circuit: QuantumCircuit, *, shots: int, shot_gradient: str, seed: int,
                 dtype: torch.dtype = torch.float32, optimization_level: int = 1, twirling: bool = False,
                 dynamical_decoupling: bool = False, retries: int = 3, timeout_s: float = 600.0,
                 backoff_s: float = 2.0, max_device_seconds: Optional[float] = None, readout_mitigation: bool = False):
        super().__init__()
        if shot_gradient not in SHOT_GRADIENTS:
            raise ValueError(f"shot_gradient must be one of {SHOT_GRADIENTS}, got {shot_gradient!r}.")
        _check_shots(shots)
        _check_seed(seed)
        if circuit.num_clbits:
            raise ValueError("Pass the unmeasured ansatz circuit; SamplerProbabilities adds the measurements.")
        if not isinstance(optimization_level, int) or not 0 <= optimization_level <= 3:
            raise ValueError(f"optimization_level must be 0, 1, 2 or 3, got {optimization_level!r}.")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}.")
        if not timeout_s > 0 or not backoff_s >= 0:
            raise ValueError(f"timeout_s must be > 0 and backoff_s >= 0, got {timeout_s!r} and {backoff_s!r}.")
        self.circuit = circuit
        self.n_qubits = circuit.num_qubits
        self.parameters_ = circuit_parameters(circuit)
        self.num_angles = len(self.parameters_)
        if [p.index for p in self.parameters_] != list(range(self.num_angles)):
            raise ValueError("The circuit's parameters must be one ParameterVector θ[0..P-1].")
        self.shots, self.shot_gradient, self.seed, self.dtype = int(shots), shot_gradient, seed, dtype
        self.optimization_level = optimization_level
        self.twirling, self.dynamical_decoupling = bool(twirling), bool(dynamical_decoupling)
        self.retries, self.timeout_s, self.backoff_s = retries, float(timeout_s), float(backoff_s)
        self.max_device_seconds = max_device_seconds
        self.readout_mitigation = bool(readout_mitigation)
        self.attachment: Optional[_Attachment] = None
        self._exact_sim = None
        self._jacobian = None  # the parameter-shift Jacobian of the kept result, with its key
        self._jacobian_key = None
        # The measured logical circuit: clbit q <- qubit q (little-endian basis-state indices).
        self.measured = circuit.copy()
        self.measured.measure_all()
        # The last device result (step -1: none yet), saved with the adapter.
        dim = 2**self.n_qubits
        self.register_buffer("result_step", torch.full((), -1, dtype=torch.int64))
        self.register_buffer("result_angles", torch.zeros(self.num_angles, dtype=torch.float64))
        self.register_buffer("result_probs", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("result_counts", torch.zeros(dim, dtype=torch.int64))

    def _apply(self, fn, recurse=True):
        # The kept result stays float64 on the CPU whatever the generator is moved or cast to: it is a key (the
        # angles) and a device's output, not a tensor the model computes with.
        kept = {name: self._buffers.pop(name) for name in _RESULT_BUFFERS if name in self._buffers}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)

    def __getstate__(self):
        # The sampler is a live object (a connection to a service, a simulator): a pickled or deep-copied model does
        # not carry it; attach one to the copy with peft_qpa.use_sampler.
        state = self.__dict__.copy()
        state["attachment"] = None
        return state

    # -- properties ---------------------------------------------------------------------------------
    @property
    def exact_simulator(self) -> torch.nn.Module:
        """Exact noiseless statevector of the same circuit (straight-through backward, construction placeholder)."""
        if self._exact_sim is None:
            from .statevector import StatevectorSimulator

            self._exact_sim = StatevectorSimulator(self.circuit)
        return self._exact_sim

    @property
    def sampler(self):
        return None if self.attachment is None else self.attachment.sampler

    @property
    def attached(self) -> bool:
        return self.attachment is not None

    @property
    def has_device_result(self) -> bool:
        """Whether a device result is kept (from a job, or loaded with the adapter)."""
        return int(self.result_step) >= 0

    @property
    def uses_parameter_shift(self) -> bool:
        return self.shot_gradient == "parameter_shift"

    def circuits_per_step(self, with_gradient: bool = True) -> int:
        """Circuits per job: 1, or 2P+1 with a parameter-shift gradient."""
        return 1 + (2 * self.num_angles if with_gradient and self.uses_parameter_shift else 0)

    def timing(self) -> Timing:
        """Device seconds per shot (the attached device's ISA circuit, or the default model on the logical circuit)."""
        if self.attachment is not None:
            return self.attachment.timing
        return circuit_timing(self.measured)

    def readout_matrices(self) -> Optional[list]:
        """The hook for readout-error mitigation: per logical qubit, the 2x2 confusion matrix R[true, measured] of the
        physical qubit it is measured on, from the device Target's readout error (None entries: no error recorded),
        or None without an attached device."""
        att = self.attachment
        if att is None or att.device is None or not _coupled(att.device):
            return None
        from .mitigation import readout_matrices

        return readout_matrices(att.device, att.physical_qubits)

    # -- attaching ----------------------------------------------------------------------------------
    def prepare(self, sampler) -> _Attachment:
        """What attaching ``sampler`` needs (device, ISA circuit, timing), without attaching it: a device with fewer
        qubits than the circuit is refused here."""
        from qiskit.primitives import BaseSamplerV2

        if not isinstance(sampler, BaseSamplerV2):
            raise TypeError(
                f"use_sampler needs a qiskit.primitives.BaseSamplerV2 (e.g. qiskit_ibm_runtime.SamplerV2, "
                f"qiskit_aer.primitives.SamplerV2), got {type(sampler).__name__}."
            )
        device = sampler_device(sampler)
        name = sampler_backend_name(sampler)
        device_qubits = getattr(device, "num_qubits", None)
        if device is not None and device_qubits is not None and device_qubits < self.n_qubits:
            raise ValueError(
                f"The sampler's device {name} has {device_qubits} qubits, but this circuit needs {self.n_qubits}. Use "
                f"a device with at least {self.n_qubits} qubits, raise chunk_size (N = ceil(log2(ceil(M / "
                "chunk_size))) qubits), or split the circuit with probability_input='distributed' and circuit_groups "
                f"(sub-circuits of about {self.n_qubits}/G qubits, one job each)."
            )
        if device is not None and _coupled(device):
            from qiskit.transpiler import generate_preset_pass_manager

            manager = generate_preset_pass_manager(optimization_level=self.optimization_level, backend=device,
                                                   seed_transpiler=self.seed)
            isa = manager.run(self.measured)
        else:  # no device, or a simulator that takes any two-qubit gate (Aer): the circuit as it is
            isa = self.measured
        order = {p: k for k, p in enumerate(self.parameters_)}
        if set(isa.parameters) != set(self.parameters_):
            raise ValueError(f"Transpiling for {name} changed the circuit's parameters; try sampler_optimization_level=0.")
        columns = np.array([order[p] for p in isa.parameters], dtype=np.int64)
        physical = [0] * self.n_qubits
        measured = set()
        for inst in isa.data:
            if inst.operation.name == "measure":
                clbit = isa.find_bit(inst.clbits[0]).index
                physical[clbit] = isa.find_bit(inst.qubits[0]).index
                measured.add(clbit)
        if measured != set(range(self.n_qubits)):
            raise ValueError(f"The circuit transpiled for {name} does not measure every qubit into its own clbit.")
        attachment = _Attachment(sampler, device, name, isa, columns, physical, circuit_timing(isa, device),
                                 _shift_rule_holds(isa))
        if self.uses_parameter_shift and not attachment.shift_rule_ok:
            raise ValueError(
                f"After transpiling for {name} some angle enters more than one gate, so the parameter-shift rule does "
                "not apply; use shot_gradient='exact' or a lower sampler_optimization_level."
            )
        return attachment

    def attach(self, sampler_or_attachment, budget: Optional[DeviceBudget] = None) -> None:
        """Run on ``sampler`` from now on (or on a prepared attachment): sets its options and, with
        ``readout_mitigation``, reads the device's readout errors."""
        att = sampler_or_attachment
        if not isinstance(att, _Attachment):
            att = self.prepare(att)
        att.budget = budget if budget is not None else DeviceBudget(self.max_device_seconds)
        sampler = att.sampler
        if self.twirling:
            ok = _set_option(sampler, ("twirling", "enable_gates"), True)
            ok = _set_option(sampler, ("twirling", "enable_measure"), True) and ok
            if not ok:
                logger.warning_once(f"QPA sampler: {type(sampler).__name__} has no twirling options "
                                    "(options.twirling.enable_gates/enable_measure); sampler_twirling is ignored.")
        if self.dynamical_decoupling and not _set_option(sampler, ("dynamical_decoupling", "enable"), True):
            logger.warning_once(f"QPA sampler: {type(sampler).__name__} has no dynamical decoupling option "
                                "(options.dynamical_decoupling.enable); sampler_dynamical_decoupling is ignored.")
        self.attachment = att
        if self.readout_mitigation:
            att.readout_matrices = self.readout_matrices()
            if att.readout_matrices is None or all(m is None for m in att.readout_matrices):
                logger.warning_once(f"QPA sampler: the device {att.device_name} reports no readout error, so "
                                    "readout_mitigation changes nothing.")
                att.readout_matrices = None
        logger.info("QPA sampler: %s, circuit of %d qubits transpiled (level %d) to depth %d, physical qubits %s; "
                    "%s s of device time per shot (%s).", att.device_name, self.n_qubits, self.optimization_level,
                    att.isa.depth(), att.physical_qubits, f"{att.timing.seconds_per_shot:.3g}", att.timing.how)

    # -- evaluation ---------------------------------------------------------------------------------
    def _kept(self, theta: np.ndarray, step: int, need_jacobian: bool):
        """The kept result if it is for this step and these angles (with its Jacobian when one is needed)."""
        if int(self.result_step) != step or step < 0:
            return None
        if not np.array_equal(self.result_angles.detach().cpu().numpy(), theta):
            return None
        probs = self.result_probs.detach().cpu().numpy().copy()
        counts = self.result_counts.detach().cpu().numpy().copy()
        jacobian = None
        if need_jacobian:
            if self._jacobian_key != (step, theta.tobytes(), probs.tobytes()):
                return None
            jacobian = self._jacobian
        return probs, counts, jacobian

    def _keep(self, theta, step, probs, counts, jacobian) -> None:
        with torch.no_grad():
            self.result_step.fill_(step)
            self.result_angles.copy_(torch.from_numpy(theta))
            self.result_probs.copy_(torch.from_numpy(probs))
            self.result_counts.copy_(torch.from_numpy(counts))
        self._jacobian = jacobian
        self._jacobian_key = (step, theta.tobytes(), probs.tobytes()) if jacobian is not None else None

    def _evaluate(self, theta: np.ndarray, step: int, need_grad: bool):
        """(probs, counts, jacobian or None) at ``theta``: the kept result, or one job."""
        shift = need_grad and self.uses_parameter_shift
        kept = self._kept(theta, step, shift)
        if kept is not None:
            return kept
        if self.attachment is None:
            raise SamplerNotAttachedError(f"QPA backend='sampler' has no sampler to run the circuit of step {step}: "
                                          f"{ATTACH_HINT}.")
        batch = theta[None, :]
        if shift:
            eye = np.eye(self.num_angles) * (np.pi / 2)
            batch = np.concatenate([batch, theta + eye, theta - eye], axis=0)
        counts = self._run_job(batch, step)
        probs = counts / counts.sum(axis=1, keepdims=True)
        jacobian = (probs[1 : 1 + self.num_angles] - probs[1 + self.num_angles :]) / 2 if shift else None
        out = probs[0]
        matrices = self.attachment.readout_matrices if self.readout_mitigation else None
        if matrices is not None:
            from .mitigation import mitigate, unmix

            # Unmixing is linear, so the shift-rule Jacobian of the unmixed probabilities is the unmixed Jacobian; the
            # projection onto the simplex is applied to the forward output only.
            out = mitigate(out, matrices)
            if jacobian is not None:
                jacobian = unmix(jacobian, matrices)
        self._keep(theta, step, out, counts[0], jacobian)
        return out.copy(), counts[0].copy(), jacobian

    def _run_job(self, batch: np.ndarray, step: int) -> np.ndarray:
        """Submit one job (with retries) for the rows of ``batch``; its (rows, 2^N) counts."""
        att = self.attachment
        values = np.ascontiguousarray(batch[:, att.columns])
        circuits = len(batch)
        seconds = circuits * self.shots * att.timing.seconds_per_shot
        seed = derive_seed(self.seed, step)
        attempts = self.retries + 1
        last: Optional[BaseException] = None
        for attempt in range(1, attempts + 1):
            att.budget.charge(seconds, step, circuits, self.shots)
            if not seed_sampler(att.sampler, seed):
                logger.warning_once(f"QPA sampler: {type(att.sampler).__name__} cannot be seeded; shots are not "
                                    "reproducible across runs.")
            try:
                job = att.sampler.run([(att.isa, values)], shots=self.shots)
                result = _wait(job, self.timeout_s)
            except Exception as error:  # noqa: BLE001  (every failure of a job is retried, then reported)
                last = error
                if attempt < attempts:
                    delay = self.backoff_s * 2 ** (attempt - 1)
                    logger.warning("QPA sampler: the job of step %d failed (attempt %d of %d: %s: %s); retrying in "
                                   "%.3g s.", step, attempt, attempts, type(error).__name__, error, delay)
                    time.sleep(delay)
                continue
            return self._counts(result, circuits, step)
        raise SamplerJobError(
            f"QPA sampler: the job of step {step} on {att.device_name} failed {attempts} time(s) (sampler_retries="
            f"{self.retries}); last error: {type(last).__name__}: {last}. The step did not happen: the model stays at "
            "its last completed step. Check the device or service and train again (a Trainer run resumes from its "
            "last checkpoint with the same steps and shot seeds), or raise sampler_retries / sampler_timeout_s."
        ) from last

    def _counts(self, result, circuits: int, step: int) -> np.ndarray:
        """The (circuits, 2^N) counts of a job's result, after checking that it is the result of this job."""
        try:
            n_results = len(result)
        except TypeError:
            raise SamplerResultError(f"QPA sampler: the job of step {step} returned {type(result).__name__}, not a "
                                     "PrimitiveResult of SamplerPubResults.") from None
        if n_results != 1:
            raise SamplerResultError(f"QPA sampler: the job of step {step} had 1 PUB but its result has {n_results} "
                                     "PUB results; a SamplerV2 returns one per PUB.")
        data = result[0].data
        bits = getattr(data, REGISTER, None)
        if bits is None:
            fields = list(data.keys()) if hasattr(data, "keys") else []
            raise SamplerResultError(f"QPA sampler: the result of step {step} has no classical register "
                                     f"{REGISTER!r} (it has {fields}).")
        if bits.num_bits != self.n_qubits:
            raise SamplerResultError(f"QPA sampler: the result of step {step} has bitstrings of {bits.num_bits} bits, "
                                     f"but the circuit measures {self.n_qubits} qubits.")
        if tuple(bits.shape) != (circuits,):
            raise SamplerResultError(f"QPA sampler: the result of step {step} has shape {tuple(bits.shape)}, but the "
                                     f"job bound {circuits} parameter sets (shape ({circuits},)).")
        if bits.num_shots != self.shots:
            logger.warning_once(f"QPA sampler: the sampler drew {bits.num_shots} shots per circuit instead of "
                                f"{self.shots}; frequencies use the shots drawn.")
        if bits.num_shots < 1:
            raise SamplerResultError(f"QPA sampler: the result of step {step} holds no shots.")
        array = np.asarray(bits.array)  # (circuits, shots, bytes), big-endian bytes
        dim = 2**self.n_qubits
        counts = np.zeros((circuits, dim), dtype=np.int64)
        for i in range(circuits):
            ints = np.zeros(array.shape[1], dtype=np.int64)
            for j in range(array.shape[2]):
                ints = (ints << 8) | array[i, :, j]
            counts[i] = np.bincount(ints, minlength=dim)[:dim]
        return counts

    def forward(self, angles: torch.Tensor, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if angles.shape != (self.num_angles,):
            raise ValueError(f"angles must have shape ({self.num_angles},), got {tuple(angles.shape)}.")
        step = int(step)
        need_grad = torch.is_grad_enabled() and angles.requires_grad
        if self.attachment is None and not self.has_device_result and not torch.is_grad_enabled():
            # The generator's construction (and copies of an adapter never run on a device): the exact statevector
            # stands in until use_sampler re-anchors the zero start on the device's step-0 result.
            with torch.no_grad():
                return self.exact_simulator(angles.detach().to(torch.float64)).to(self.dtype), None
        if self.attachment is None:
            theta = angles.detach().to("cpu", torch.float64).numpy()
            if self._kept(theta, step, need_grad and self.uses_parameter_shift) is None:
                raise SamplerNotAttachedError(
                    f"QPA backend='sampler': this forward needs the circuit at step {step} (training, or evaluating "
                    f"after the generator changed), but no sampler is attached: {ATTACH_HINT}. A loaded adapter's "
                    "inference needs none: it uses the saved tensors."
                )
        return _AerFunction.apply(angles, self, step, need_grad)

    def extra_repr(self) -> str:
        device = self.attachment.device_name if self.attachment is not None else None
        return (f"n_qubits={self.n_qubits}, shots={self.shots}, shot_gradient={self.shot_gradient!r}, "
                f"device={device!r}, optimization_level={self.optimization_level}")
