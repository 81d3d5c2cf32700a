"""Qiskit Aer backends for the QPA circuit, as differentiable torch modules.

:class:`AerProbabilities` runs the circuit built by :func:`peft_qpa.generator.circuit.build_ansatz` (never a
re-description of it) on ``qiskit_aer.AerSimulator`` and returns the probabilities of all 2^N basis
states (Qiskit little-endian order: bit q of the index is qubit q) through a custom
``torch.autograd.Function``:

* ``backend="aer_statevector"``: exact probabilities (``save_probabilities``). Gradient by the
  parameter-shift rule, d p / d θ_k = (p(θ + π/2 e_k) - p(θ - π/2 e_k)) / 2, with the forward circuit and
  all 2P shifted circuits bound into ONE Aer job (``parameter_binds``). With a noise model the same job
  runs on Aer's density-matrix method and the device's readout error is applied exactly as per-qubit
  confusion matrices: exact noisy probabilities (no shot noise), limited to
  :data:`MAX_DENSITY_MATRIX_QUBITS` qubits (memory 16·4^N bytes per circuit).
* ``backend="aer_shots"``: ``shots`` measurements; the probabilities are the observed frequencies and the
  counts are returned too. The simulator seed is derived from ``(seed, step)`` only, so every process of
  a multi-process run sees the same counts at the same step. Gradients (``shot_gradient``):
  ``"parameter_shift"`` samples the 2P shifted circuits with the same shot budget in the same job (what
  hardware would do); ``"exact"`` is a straight-through estimator: the backward pass uses the exact,
  noiseless statevector Jacobian (computed by torch autograd), the forward pass the sampled frequencies.
  ``readout_mitigation=True`` (with a noise model) returns readout-error-mitigated frequencies
  (:mod:`.mitigation`: per-qubit inverse confusion matrices, then the nearest probability vector) and the raw
  counts; a parameter-shift Jacobian gets the same linear unmixing (the projection is treated as the identity
  there), the straight-through gradient is unchanged.

Noise (``noise_model``): the snake-case name of an offline fake IBM device from
``qiskit_ibm_runtime.fake_provider`` (see :func:`available_fake_backends`), a
``qiskit_aer.noise.NoiseModel``, or None. The circuit is transpiled once (seeded) to the device's basis
gates and coupling map, and the noise model is restricted to the physical qubits the transpiled circuit
uses: a full 127-qubit model is re-serialised by Aer on every ``run`` (~1 s each), the restricted one is
not. Readout error is included (via ``measure`` for shots, via confusion matrices for the exact path).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from qiskit import ClassicalRegister, QuantumCircuit, transpile
from qiskit_aer import AerSimulator
from qiskit_aer.noise import NoiseModel
from transformers.utils import logging

from ..circuit import circuit_parameters
from ..config import BACKENDS, SEED_MAX, SHOT_GRADIENTS
from ..memory import AER_BYTES_PER_SHOT, _format_bytes, memory_budget
from ..noise import (  # noqa: F401  (the names, re-exported here beside the devices they name)
    available_fake_backends,
    load_fake_backend,
    noise_model_from_dict,
    noise_model_from_json,
    noise_model_to_json,
    resolve_fake_backend_name,
)
from .mitigation import PROJECTIONS, apply_readout_error, inverse_matrices, project_to_simplex
from .mitigation import readout_matrices_from_noise_model as _readout_matrices  # its old name here

logger = logging.get_logger(__name__)

AER_BACKENDS = tuple(b for b in BACKENDS if b.startswith("aer_"))

# Exact noisy probabilities use a density matrix: 16 * 4^N bytes per circuit (N = 12: 268 MB).
MAX_DENSITY_MATRIX_QUBITS = 12


# --------------------------------------------------------------------------------------------------
# Fake devices and noise models
# --------------------------------------------------------------------------------------------------


def _sub_target(target, physical_qubits: set[int]):
    """A copy of a device Target that keeps only the instructions acting on ``physical_qubits``.

    ``basic_device_gate_errors`` on a full 127-qubit target takes ~5 s (it builds every qubit's thermal
    relaxation and depolarizing channels); on the few qubits a small circuit uses it takes milliseconds."""
    from qiskit.transpiler import Target

    sub = Target(num_qubits=target.num_qubits, dt=target.dt, qubit_properties=target.qubit_properties)
    for name in target.operation_names:
        props = target[name]
        kept = {qargs: prop for qargs, prop in props.items() if qargs is not None and set(qargs) <= physical_qubits}
        if kept:
            sub.add_instruction(target.operation_from_name(name), kept, name=name)
    return sub


def _restricted_device_noise_model(name: str, physical_qubits: set[int]) -> NoiseModel:
    """The device's noise model (as ``NoiseModel.from_backend`` builds it, readout error included, no
    delay relaxation since the circuit has no delays) restricted to ``physical_qubits``: a full-device
    model is re-serialised by Aer on every run (~1 s for 127 qubits)."""
    from qiskit_aer.noise.device import basic_device_gate_errors, basic_device_readout_errors

    backend = load_fake_backend(name)
    target = _sub_target(backend.target, physical_qubits)
    model = NoiseModel(basis_gates=backend.operation_names)
    for qubits, error in basic_device_readout_errors(target=target):
        if set(qubits) <= physical_qubits:
            model.add_readout_error(error, qubits)
    for gate, qubits, error in basic_device_gate_errors(target=target):
        model.add_quantum_error(error, gate, qubits)
    return model


def _restricted_user_noise_model(model: NoiseModel, physical_qubits: set[int]) -> NoiseModel:
    """A user NoiseModel without the qubit-specific errors on qubits the circuit never touches."""
    data = model.to_dict()
    errors = []
    for error in data["errors"]:
        if "gate_qubits" in error:
            kept = [qs for qs in error["gate_qubits"] if set(qs) <= physical_qubits]
            if not kept:
                continue
            error = dict(error, gate_qubits=kept)
        errors.append(error)
    restricted = noise_model_from_dict(dict(data, errors=errors))
    return model if restricted is None else restricted


def _resolve_noise(noise_model) -> tuple[NoiseModel | None, dict[str, Any]]:
    """(noise model, transpile target kwargs). Unknown names raise ValueError with the list."""
    if isinstance(noise_model, str):
        backend = load_fake_backend(noise_model)
        return None, {"backend": backend}
    if isinstance(noise_model, NoiseModel):
        return noise_model, {"basis_gates": noise_model.basis_gates}
    raise ValueError(
        "noise_model must be a fake IBM device name (e.g. 'fake_kyiv'), a qiskit_aer.noise.NoiseModel, "
        f"or None; got {type(noise_model).__name__}."
    )


def _shift_rule_holds(transpiled: QuantumCircuit) -> bool:
    """The ±π/2 shift rule is exact only if each θ_k enters one rotation gate as ±θ_k + const."""
    seen: dict[Any, int] = {}
    for inst in transpiled.data:
        for expr in inst.operation.params:
            for p in getattr(expr, "parameters", ()):
                seen[p] = seen.get(p, 0) + 1
                coeff = float(expr.gradient(p))
                if seen[p] > 1 or abs(abs(coeff) - 1.0) > 1e-12:
                    return False
    return True


def resolve_shots(shots: int | None, shots_per_state: float | None, n_qubits: int) -> int:
    """Total shots from either ``shots`` or ``shots_per_state`` c (c·2^N shots, as in the QPA paper, arXiv:2410.09846)."""
    if (shots is None) == (shots_per_state is None):
        raise ValueError("Set exactly one of `shots` (total) or `shots_per_state` (c, giving c*2^N shots).")
    if shots_per_state is not None:
        if shots_per_state <= 0:
            raise ValueError(f"shots_per_state must be > 0, got {shots_per_state}.")
        shots = max(1, math.ceil(shots_per_state * 2**n_qubits))
        _check_shots(shots, "shots_per_state", n_qubits)
    else:
        _check_shots(shots)
    return int(shots)


def _check_shots(shots, field: str = "shots", n_qubits: int | None = None) -> None:
    """``shots`` must be an integer >= 1 whose Aer job fits the memory budget (refused before Aer allocates:
    about ``AER_BYTES_PER_SHOT`` bytes per shot, e.g. 275 GB for 2**31 shots)."""
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1 for backend='aer_shots', got {shots!r}.")
    need = int(shots) * AER_BYTES_PER_SHOT
    budget, how = memory_budget()
    if need > budget:
        at = f" at N = {n_qubits} qubits ({shots} shots)" if n_qubits is not None else ""
        lower = "Lower shots"
        if field == "shots_per_state":
            lower = (
                "Lower shots_per_state (the QPA paper, arXiv:2410.09846, uses 20), set a total `shots` instead, or raise chunk_size for "
                "fewer qubits"
            )
        raise ValueError(
            f"{field}{at} needs about {_format_bytes(need)} for one Aer job ({AER_BYTES_PER_SHOT} B per shot, "
            f"measured), more than the memory budget of {_format_bytes(budget)} ({how}). {lower}: at most "
            f"{int(budget // AER_BYTES_PER_SHOT)} shots fit."
        )


def _check_seed(seed, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**63 - 1], got {seed!r}.")


def derive_seed(seed: int, step: int) -> int:
    """The Aer ``seed_simulator`` of a step: a deterministic function of (seed, step) only, so identical
    across processes and runs, and unrelated between consecutive steps."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}.")
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, dtype=np.uint32)[0])


# --------------------------------------------------------------------------------------------------
# Exact statevector (for the straight-through gradient)
# --------------------------------------------------------------------------------------------------


def _exact_simulator(circuit: QuantumCircuit) -> torch.nn.Module:
    """The exact torch statevector simulator of the same circuit (its dtype follows the angles')."""
    from .statevector import StatevectorSimulator

    return StatevectorSimulator(circuit)


# --------------------------------------------------------------------------------------------------
# The torch module
# --------------------------------------------------------------------------------------------------


class _AerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, angles, module, step, need_grad):
        theta = angles.detach().to("cpu", torch.float64).numpy()
        probs, counts, jacobian = module._evaluate(theta, step, need_grad)
        ctx.module = module
        ctx.jacobian = jacobian
        ctx.save_for_backward(angles)
        out = torch.as_tensor(probs, device=angles.device).to(module.dtype)
        if counts is None:
            return out, None
        counts_t = torch.as_tensor(counts, device=angles.device)
        ctx.mark_non_differentiable(counts_t)
        return out, counts_t

    @staticmethod
    def backward(ctx, grad_probs, grad_counts):
        (angles,) = ctx.saved_tensors
        module = ctx.module
        if ctx.jacobian is not None:  # parameter shift: J[k, i] = d p_i / d θ_k
            g = grad_probs.detach().to("cpu", torch.float64).numpy()
            grad = torch.as_tensor(ctx.jacobian @ g).to(angles.device, angles.dtype)
        else:  # straight-through: vector-Jacobian product of the exact statevector
            with torch.enable_grad():
                a = angles.detach().to(torch.float64).requires_grad_(True)
                p = module.exact_simulator(a)
                (grad,) = torch.autograd.grad(p, a, grad_probs.to(p.dtype))
            grad = grad.to(angles.dtype)
        return grad, None, None, None


class AerProbabilities(torch.nn.Module):
    """Basis-state probabilities of ``circuit`` on Qiskit Aer, differentiable w.r.t. its angles.

    ``forward(angles, step)`` returns ``(probs, counts)``: ``probs`` has 2^N entries in Qiskit
    little-endian order and dtype ``dtype``; ``counts`` is an int64 tensor of 2^N counts for
    ``backend="aer_shots"`` and None otherwise. See the module docstring for backends and gradients.
    """

    def __init__(
        self,
        circuit: QuantumCircuit,
        *,
        backend: str,
        shots: int | None,
        shot_gradient: str,
        noise_model: str | NoiseModel | None,
        seed: int,
        max_parallel_threads: int = 1,
        dtype: torch.dtype = torch.float32,
        readout_mitigation: bool = False,
        mitigation_projection: str = "nearest",
    ):
        super().__init__()
        if backend not in AER_BACKENDS:
            raise ValueError(f"backend must be one of {AER_BACKENDS}, got {backend!r}.")
        if shot_gradient not in SHOT_GRADIENTS:
            raise ValueError(f"shot_gradient must be one of {SHOT_GRADIENTS}, got {shot_gradient!r}.")
        if backend == "aer_shots":
            _check_shots(shots)
        elif shots is not None:
            raise ValueError(
                f"shots={shots} was given with backend='aer_statevector', which computes exact "
                "probabilities; use backend='aer_shots' to sample, or set shots=None."
            )
        if max_parallel_threads < 0:  # 0 = Aer's own default: all cores
            raise ValueError(f"max_parallel_threads must be >= 0 (0 = all cores), got {max_parallel_threads}.")
        _check_seed(seed)
        if not isinstance(readout_mitigation, bool):
            raise ValueError(f"readout_mitigation must be True or False, got {readout_mitigation!r}.")
        if readout_mitigation and (backend != "aer_shots" or noise_model is None):
            raise ValueError(
                "readout_mitigation=True corrects a noisy device's readout error in sampled frequencies: it needs "
                f"backend='aer_shots' and a noise_model (got backend={backend!r}, noise_model={noise_model!r})."
            )
        if mitigation_projection not in PROJECTIONS:
            raise ValueError(f"mitigation_projection must be one of {PROJECTIONS}, got {mitigation_projection!r}.")
        if circuit.num_clbits:
            raise ValueError("Pass the unmeasured ansatz circuit; AerProbabilities adds the measurements.")

        self.circuit = circuit
        self.n_qubits = circuit.num_qubits
        self.backend = backend
        self.shots = int(shots) if shots is not None else None
        self.shot_gradient = shot_gradient
        self.seed = seed
        self.dtype = dtype
        self.max_parallel_threads = max_parallel_threads
        self.parameters_ = circuit_parameters(circuit)
        self.num_angles = len(self.parameters_)
        if [p.index for p in self.parameters_] != list(range(self.num_angles)):
            raise ValueError("The circuit's parameters must be one ParameterVector θ[0..P-1].")
        self.noise_model_spec = noise_model
        self._exact_sim = None
        self._readout = None  # per-logical-qubit readout matrices (exact noisy path only)
        self.readout_mitigation = readout_mitigation
        self.mitigation_projection = mitigation_projection
        self.readout_matrices = None  # per-logical-qubit R[true, measured] (noisy shots with mitigation)
        self._unmixing = None  # their inverses
        self._shift_rule_ok = True

        noisy = noise_model is not None
        if noisy and backend == "aer_statevector" and self.n_qubits > MAX_DENSITY_MATRIX_QUBITS:
            raise ValueError(
                f"Exact noisy probabilities (backend='aer_statevector' with a noise_model) use a density "
                f"matrix of 16*4^N bytes and are limited to N <= {MAX_DENSITY_MATRIX_QUBITS} qubits "
                f"(got N={self.n_qubits}); use backend='aer_shots' for larger noisy circuits."
            )

        body = circuit.copy()
        if noisy:
            noise, target = _resolve_noise(noise_model)
            device = target.get("backend")
            if device is not None and device.num_qubits < self.n_qubits:
                raise ValueError(
                    f"noise_model={noise_model!r} is a {device.num_qubits}-qubit device, but this generator's circuit "
                    f"has N={self.n_qubits} qubits. Choose a larger device (peft_qpa.available_fake_backends() "
                    "lists them; e.g. 'fake_kyiv' has 127), or raise chunk_size so that fewer qubits are needed."
                )
            # Transpile the unmeasured circuit once, so both backends use the same layout and routing.
            body = transpile(body, seed_transpiler=seed, optimization_level=2, **target)
            layout = body.layout.final_index_layout() if body.layout is not None else list(range(self.n_qubits))
            used = {body.find_bit(q).index for inst in body.data for q in inst.qubits} | set(layout)
            if isinstance(noise_model, str):
                noise = _restricted_device_noise_model(noise_model.strip().lower(), used)
            else:
                noise = _restricted_user_noise_model(noise, used)
            logger.info(
                "QPA Aer: circuit transpiled for %s (seed %d): depth %d, ops %s, physical qubits %s.",
                noise_model if isinstance(noise_model, str) else "the given NoiseModel",
                seed, body.depth(), dict(body.count_ops()), layout,
            )
            self._shift_rule_ok = _shift_rule_holds(body)
            # One density-matrix simulation, then sampling: measured 3x faster than Aer's "automatic"
            # choice (one noisy statevector trajectory per shot when shots are few) at N = 8..10, c = 1.
            sim_method = "density_matrix" if self.n_qubits <= MAX_DENSITY_MATRIX_QUBITS else "automatic"
        else:
            noise, layout, sim_method = None, list(range(self.n_qubits)), "statevector"
        self.physical_qubits = layout  # logical qubit q lives on physical qubit layout[q]
        if backend == "aer_shots":
            # clbit q <- logical qubit q, so the count keys are little-endian basis-state indices
            body.add_register(ClassicalRegister(self.n_qubits, "meas"))
            body.barrier()
            body.measure(layout, list(range(self.n_qubits)))
            if readout_mitigation:  # the same restricted model Aer samples with gives the matrices
                self.readout_matrices = _readout_matrices(noise, layout)
                self._unmixing = inverse_matrices(self.readout_matrices)
        else:
            body.save_probabilities(qubits=layout)
            if noisy:  # save_probabilities excludes readout error: apply it afterwards
                self._readout = _readout_matrices(noise, layout)
        self.executed_circuit = body
        self.noise_model = noise
        self.simulator = AerSimulator(
            method=sim_method, noise_model=noise, max_parallel_threads=max_parallel_threads
        )

    @property
    def exact_simulator(self) -> torch.nn.Module:
        """Exact noiseless statevector of the same circuit (straight-through backward)."""
        if self._exact_sim is None:
            self._exact_sim = _exact_simulator(self.circuit)
        return self._exact_sim

    @property
    def uses_parameter_shift(self) -> bool:
        return self.backend == "aer_statevector" or self.shot_gradient == "parameter_shift"

    def circuits_per_step(self, with_gradient: bool = True) -> int:
        """Circuits Aer runs per forward(+backward): 1, or 2P+1 with a parameter-shift gradient."""
        return 1 + (2 * self.num_angles if with_gradient and self.uses_parameter_shift else 0)

    # -- evaluation -------------------------------------------------------------------------------

    def _evaluate(self, theta: np.ndarray, step: int, need_grad: bool):
        """One Aer job: the circuit at θ and, for a parameter-shift gradient, at θ ± π/2 e_k."""
        shift = need_grad and self.uses_parameter_shift
        if shift and not self._shift_rule_ok:
            raise ValueError(
                "After transpiling for the noise model some angle enters more than one gate, so the "
                "parameter-shift rule does not apply; use shot_gradient='exact'."
            )
        batch = theta[None, :]
        if shift:
            eye = np.eye(self.num_angles) * (np.pi / 2)
            batch = np.concatenate([batch, theta + eye, theta - eye], axis=0)
        binds = [{p: batch[:, k] for k, p in enumerate(self.parameters_)}]
        run_kwargs = {"parameter_binds": binds}
        if self.backend == "aer_shots":
            run_kwargs.update(shots=self.shots, seed_simulator=derive_seed(self.seed, step))
        result = self.simulator.run(self.executed_circuit, **run_kwargs).result()
        if not result.success:
            raise RuntimeError(f"Aer job failed: {result.status}")

        dim = 2**self.n_qubits
        if self.backend == "aer_shots":
            counts = np.zeros((len(batch), dim), dtype=np.int64)
            for i, exp in enumerate(result.results):
                for key, value in exp.data.counts.items():
                    counts[i, int(key, 16)] = value
            probs = counts / self.shots
        else:
            counts = None
            probs = np.stack([np.asarray(exp.data.probabilities, dtype=np.float64) for exp in result.results])
            if self._readout is not None:
                probs = apply_readout_error(probs, self._readout)
        jacobian = (probs[1 : 1 + self.num_angles] - probs[1 + self.num_angles :]) / 2 if shift else None
        out = probs[0]
        if self._unmixing is not None:
            # Unmixing is linear: the shift-rule Jacobian of the unmixed probabilities is the unmixed Jacobian. The
            # projection onto the simplex is applied to the forward output only (identity in the backward pass).
            out = project_to_simplex(apply_readout_error(out, self._unmixing), self.mitigation_projection)
            if jacobian is not None:
                jacobian = apply_readout_error(jacobian, self._unmixing)
        return out, (counts[0] if counts is not None else None), jacobian

    def forward(self, angles: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if angles.shape != (self.num_angles,):
            raise ValueError(f"angles must have shape ({self.num_angles},), got {tuple(angles.shape)}.")
        need_grad = torch.is_grad_enabled() and angles.requires_grad
        return _AerFunction.apply(angles, self, int(step), need_grad)

    def extra_repr(self) -> str:
        noise = self.noise_model_spec if isinstance(self.noise_model_spec, str) or self.noise_model_spec is None else "NoiseModel"
        return (
            f"n_qubits={self.n_qubits}, backend={self.backend!r}, shots={self.shots}, "
            f"shot_gradient={self.shot_gradient!r}, noise_model={noise!r}, threads={self.max_parallel_threads}"
            + (", readout_mitigation=True" if self.readout_mitigation else "")
        )
