"""The parameterized circuit, defined once in Qiskit terms.

Every backend (the torch statevector simulator, Aer statevector, Aer shots/noise) runs the
``QuantumCircuit`` built here; none of them re-describes the ansatz. The torch simulator reads the
circuit's instruction list through :func:`circuit_program`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qiskit import QuantumCircuit
from qiskit.circuit import ParameterVector
from qiskit.circuit.library import n_local, real_amplitudes

ANSATZES = ("ry_cnot", "rx_cnot")

# Largest register the exact statevector backends accept: 2^N amplitudes must fit in memory
# (N = 30 is 8 GiB of float64 amplitudes before any autograd buffers).
MAX_QUBITS = 30


def n_qubits_for(num_parameters: int, chunk_size: int) -> int:
    """Qubits needed to generate ``num_parameters`` numbers in chunks of ``chunk_size``.

    N = ceil(log2(ceil(M / chunk_size))), at least 1 (a one-qubit circuit still has two states).
    """
    if num_parameters < 1:
        raise ValueError(f"num_parameters must be >= 1, got {num_parameters}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_chunks = math.ceil(num_parameters / chunk_size)
    return max(1, math.ceil(math.log2(n_chunks)))


def build_ansatz(n_qubits: int, depth: int, ansatz: str = "ry_cnot") -> QuantumCircuit:
    """The QPA circuit: ``depth`` repetitions of [a rotation on every qubit; CNOT(q, q+1) for q < N-1].

    The circuit's parameters are one ``ParameterVector`` named ``θ`` of length ``depth * n_qubits``
    in layer-major order (``θ[l * N + q]`` rotates qubit ``q`` in layer ``l``). Qubit ``q`` is bit ``q``
    of a basis-state index (Qiskit's little-endian order).
    """
    if ansatz not in ANSATZES:
        raise ValueError(f"ansatz must be one of {ANSATZES}, got {ansatz!r}")
    if n_qubits < 1:
        raise ValueError(f"n_qubits must be >= 1, got {n_qubits}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if ansatz == "ry_cnot":
        qc = real_amplitudes(n_qubits, reps=depth, entanglement="linear", skip_final_rotation_layer=True)
    else:
        # n_local refuses a two-qubit block on one qubit; a single qubit simply has no CNOT chain.
        entangler = "cx" if n_qubits > 1 else []
        qc = n_local(n_qubits, "rx", entangler, entanglement="linear", reps=depth, skip_final_rotation_layer=True)
    qc.name = f"qpa_{ansatz}_N{n_qubits}_L{depth}"
    return qc


def readout_circuit(body: QuantumCircuit) -> QuantumCircuit:
    """``body`` followed by one RY on every qubit: a trainable change of measurement basis before the
    computational-basis readout (the ``multi_readout`` feature source runs it once per readout setting).

    The backends take one ``ParameterVector`` in index order, so the result has one, ``θ`` of length P + N:
    ``θ[:P]`` are the body's parameters in the body's order and ``θ[P + q]`` rotates qubit ``q`` last. The body
    itself is reused as built, not described again."""
    n_qubits, n_body = body.num_qubits, body.num_parameters
    theta = ParameterVector("θ", n_body + n_qubits)
    qc = body.assign_parameters(dict(zip(circuit_parameters(body), theta[:n_body])))
    for q in range(n_qubits):
        qc.ry(theta[n_body + q], q)
    qc.name = f"{body.name}_readout"
    return qc


def circuit_parameters(qc: QuantumCircuit) -> ParameterVector | list:
    """The circuit's parameters in index order (``θ[0]``, ``θ[1]``, ...)."""
    return sorted(qc.parameters, key=lambda p: p.index)


@dataclass(frozen=True)
class Gate:
    """One instruction of a circuit: ``name`` in {"ry", "rx", "cx"}, its qubits, and for a rotation the
    index of its angle in the circuit's parameter vector."""

    name: str
    qubits: tuple[int, ...]
    param_index: int | None = None


SUPPORTED_GATES = ("ry", "rx", "cx")


def circuit_program(qc: QuantumCircuit) -> list[Gate]:
    """Read a circuit's instructions as a flat list of :class:`Gate` (what the torch simulator runs)."""
    program = []
    for instruction in qc.data:
        op = instruction.operation
        qubits = tuple(qc.find_bit(q).index for q in instruction.qubits)
        if op.name not in SUPPORTED_GATES:
            raise ValueError(
                f"Gate {op.name!r} is not supported by the torch statevector simulator "
                f"(supported: {SUPPORTED_GATES})."
            )
        param_index = None
        if op.params:
            (param,) = op.params
            param_index = param.index
        program.append(Gate(op.name, qubits, param_index))
    return program


def product_circuit(parts: list[QuantumCircuit]) -> QuantumCircuit:
    """The tensor product of ``parts``: part g on its own qubits, above those of parts 0..g-1 (part 0 holds the
    lowest bits of a basis-state index), with no gate between parts. Its one ``ParameterVector`` ``θ`` holds part
    0's parameters in part 0's order, then part 1's, and so on; the parts themselves are reused as built."""
    theta = ParameterVector("θ", sum(part.num_parameters for part in parts))
    qc = QuantumCircuit(sum(part.num_qubits for part in parts))
    first_qubit = first_parameter = 0
    for part in parts:
        values = theta[first_parameter : first_parameter + part.num_parameters]
        bound = part.assign_parameters(dict(zip(circuit_parameters(part), values)))
        qc.compose(bound, qubits=range(first_qubit, first_qubit + part.num_qubits), inplace=True)
        first_qubit += part.num_qubits
        first_parameter += part.num_parameters
    qc.name = "product(" + ", ".join(part.name for part in parts) + ")"
    return qc
