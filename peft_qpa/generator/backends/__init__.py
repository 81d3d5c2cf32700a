"""Where the 2^N probabilities come from: one factory, :func:`make_backend`, for every ``backend`` of a
:class:`~peft_qpa.generator.GeneratorConfig`.

* ``statevector`` (:mod:`.statevector`, with the compiled CPU kernel of :mod:`.fused_kernel`): exact, in torch.
* ``aer_statevector`` and ``aer_shots`` (:mod:`.aer`): Qiskit Aer, exact or sampled, optionally noisy, with
  optional readout-error mitigation of the sampled probabilities (:mod:`.mitigation`).
* ``sampler`` (:mod:`.sampler`): shots from a Qiskit ``SamplerV2`` primitive (hardware), attached after
  construction with ``peft_qpa.use_sampler``.

Every backend is a module mapping ``(angles, step)`` to ``(probabilities, counts or None)`` and runs the one
Qiskit definition of the circuit it is given.
"""

from __future__ import annotations

import torch
from qiskit import QuantumCircuit

from ..circuit import n_qubits_for
from ..config import GeneratorConfig
from ..memory import check_memory


class ExactBackend(torch.nn.Module):
    """The exact torch statevector simulator with the backend signature ``(angles, step) -> (probs, None)``."""

    def __init__(self, circuit: QuantumCircuit):
        super().__init__()
        from .statevector import StatevectorSimulator

        self.simulator = StatevectorSimulator(circuit)

    def forward(self, angles: torch.Tensor, step: int):
        return self.simulator(angles), None


def check_generator_memory(config: GeneratorConfig, num_generated: int) -> None:
    """Refuse, before anything is allocated, a generator for ``num_generated`` (M) numbers whose mapping MLP,
    generated numbers, GI network and Aer shot job would not fit the memory budget (``ValueError`` naming the
    field to lower; see ``docs/config.md``, "Memory caps").

    The config check (at construction) can only assume N = 1 and one chunk; this one uses the real N and
    chunk count. ``QPAGenerator.from_config`` calls it first."""
    n_qubits = n_qubits_for(num_generated, config.chunk_size)
    if n_qubits > config.max_qubits:
        return  # QPAGenerator refuses it with its own message (the smallest chunk_size that fits)
    shots = None
    if config.backend in ("aer_shots", "sampler"):  # names shots/shots_per_state and N if the job alone is too big
        from .aer import resolve_shots

        job_qubits = n_qubits
        if getattr(config, "probability_input", "circuit") == "distributed":  # one job per sub-circuit: the largest
            job_qubits = -(-n_qubits // config.circuit_groups)
        shots = resolve_shots(config.shots, config.shots_per_state, job_qubits)
    check_memory(config, num_generated=num_generated, shots=shots)


def make_backend(config: GeneratorConfig, circuit: QuantumCircuit, dtype: torch.dtype = torch.float32):
    """``(backend, interpolation or None)`` for ``config.backend`` running ``circuit``."""
    if config.backend == "statevector":
        return ExactBackend(circuit), None
    from .aer import AerProbabilities, resolve_shots

    if config.backend == "sampler":
        from .sampler import SamplerProbabilities

        backend = SamplerProbabilities(
            circuit,
            shots=resolve_shots(config.shots, config.shots_per_state, circuit.num_qubits),
            shot_gradient=config.shot_gradient,
            seed=config.seed,
            dtype=dtype,
            optimization_level=config.sampler_optimization_level,
            twirling=config.sampler_twirling,
            dynamical_decoupling=config.sampler_dynamical_decoupling,
            retries=config.sampler_retries,
            timeout_s=config.sampler_timeout_s,
            backoff_s=config.sampler_backoff_s,
            max_device_seconds=config.max_device_seconds,
            readout_mitigation=config.readout_mitigation,
        )
        return backend, _interpolation(config, circuit, dtype)

    shots = resolve_shots(config.shots, config.shots_per_state, circuit.num_qubits) if config.backend == "aer_shots" else None
    backend = AerProbabilities(
        circuit,
        backend=config.backend,
        shots=shots,
        shot_gradient=config.shot_gradient,
        noise_model=config.noise_model,
        seed=config.seed,
        max_parallel_threads=config.aer_max_parallel_threads,
        dtype=dtype,
        readout_mitigation=config.readout_mitigation,
    )
    return backend, _interpolation(config, circuit, dtype)


def _interpolation(config: GeneratorConfig, circuit: QuantumCircuit, dtype: torch.dtype):
    """The GI network of ``circuit`` when the config asks for one, else None."""
    if not config.generative_interpolation:
        return None
    from ..interpolation import GenerativeInterpolation

    return GenerativeInterpolation(circuit.num_qubits, list(config.gi_hidden_sizes), seed=config.seed).to(dtype)
