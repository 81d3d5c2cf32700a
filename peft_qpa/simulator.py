"""Exact statevector simulation in torch of a circuit built by :mod:`peft_qpa.circuit`.

The simulator runs the Qiskit circuit's own instruction list (no second description of the ansatz).
It compiles the list once into stages:

* a run of single-qubit rotations becomes a few batched matmuls: the qubits are grouped into blocks of
  up to ``GROUP_QUBITS`` adjacent qubits and each block's rotations are one Kronecker-product matrix
  applied to a reshaped view of the state (one pass over the state per block instead of per qubit);
* a run of CNOTs is one fixed permutation of basis indices, applied as one gather.

RY and CNOT keep amplitudes real, so an RY-only circuit runs in a real dtype; RX needs complex
amplitudes. Everything is differentiable by autograd, on CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from qiskit import QuantumCircuit

from .circuit import circuit_program

# Qubits per Kronecker block: a 2^5 x 2^5 matrix keeps the matmul cheap while cutting passes 5-fold.
GROUP_QUBITS = 5


@dataclass
class _RotationStage:
    gate: str  # "ry" or "rx"
    blocks: list[list[int]]  # parameter index per qubit, blocks of adjacent qubits from qubit 0 upwards
    full: bool  # rotates every qubit (then the blocks run as cyclic matmuls, see _apply_full_layer)
    lows: list[int]  # lowest qubit of each block


@dataclass
class _PermutationStage:
    index: str  # buffer name: new_state = state[index]
    inverse: str  # buffer name of the inverse permutation (used by the backward pass)


class _Permute(torch.autograd.Function):
    """``state[index]`` whose backward is a gather by the inverse permutation (no scatter-add).

    Both directions use ``index_select``, which on CPU measured ~4x faster than advanced indexing
    (``state[index]``) for a 2^20 state (0.8 ms vs 3.3 ms, one thread); the values are identical.
    """

    @staticmethod
    def forward(ctx, state, index, inverse):
        ctx.save_for_backward(inverse)
        return torch.index_select(state, 0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return torch.index_select(grad, 0, inverse), None, None


def _cnot_chain_permutation(n_qubits: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """Indices ``perm`` such that applying the CNOTs in order maps a state ``s`` to ``s[perm]``."""
    identity = np.arange(2**n_qubits, dtype=np.int64)
    perm = identity.copy()
    for control, target in pairs:
        step = identity ^ (((identity >> control) & 1) << target)
        perm = perm[step]
    return perm


def _rotation_matrices(gate: str, angles: torch.Tensor) -> torch.Tensor:
    """(k, 2, 2) matrices of RY or RX for a vector of k angles."""
    c, s = torch.cos(angles / 2), torch.sin(angles / 2)
    if gate == "ry":
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    zero = torch.zeros_like(c)
    real = torch.stack([torch.stack([c, zero], -1), torch.stack([zero, c], -1)], -2)
    imag = torch.stack([torch.stack([zero, -s], -1), torch.stack([-s, zero], -1)], -2)
    return torch.complex(real, imag)


class StatevectorSimulator(torch.nn.Module):
    """Exact probabilities of a parameterized circuit of RY/RX rotations and CNOTs.

    ``forward(angles)`` takes the circuit's parameter values in index order (``θ[0]``, ``θ[1]``, ...)
    and returns the 2^N basis-state probabilities in Qiskit's little-endian order. The module has no
    parameters; its permutation buffers follow ``.to(device)``.
    """

    def __init__(self, circuit: QuantumCircuit):
        super().__init__()
        self.n_qubits = circuit.num_qubits
        self.num_parameters = circuit.num_parameters
        program = circuit_program(circuit)
        self.is_complex = any(g.name == "rx" for g in program)
        self._stages: list = []
        n_perm = 0
        i = 0
        while i < len(program):
            gate = program[i]
            if gate.name == "cx":
                pairs = []
                while i < len(program) and program[i].name == "cx":
                    pairs.append(program[i].qubits)
                    i += 1
                perm = _cnot_chain_permutation(self.n_qubits, pairs)
                inverse = np.empty_like(perm)
                inverse[perm] = np.arange(perm.size)
                name = f"_perm{n_perm}"
                n_perm += 1
                self.register_buffer(name, torch.from_numpy(perm), persistent=False)
                self.register_buffer(name + "_inv", torch.from_numpy(inverse), persistent=False)
                self._stages.append(_PermutationStage(index=name, inverse=name + "_inv"))
            else:
                rotations: dict[int, int] = {}
                while i < len(program) and program[i].name == gate.name and program[i].qubits[0] not in rotations:
                    rotations[program[i].qubits[0]] = program[i].param_index
                    i += 1
                self._stages.append(self._rotation_stage(gate.name, rotations))

    def _rotation_stage(self, gate: str, rotations: dict[int, int]) -> _RotationStage:
        """Group rotated qubits into runs of adjacent qubits of at most GROUP_QUBITS (balanced sizes)."""
        runs: list[list[int]] = []
        for q in sorted(rotations):
            if runs and runs[-1][-1] == q - 1:
                runs[-1].append(q)
            else:
                runs.append([q])
        blocks, lows = [], []
        for run in runs:
            n_blocks = -(-len(run) // GROUP_QUBITS)
            sizes = [len(run) // n_blocks + (i < len(run) % n_blocks) for i in range(n_blocks)]
            start = 0
            for size in sizes:
                qubits = run[start : start + size]
                blocks.append([rotations[q] for q in qubits])
                lows.append(qubits[0])
                start += size
        return _RotationStage(gate, blocks, full=len(rotations) == self.n_qubits, lows=lows)

    @staticmethod
    def _kron(matrices: torch.Tensor) -> torch.Tensor:
        """Kronecker product of (k, 2, 2) matrices of qubits low..low+k-1 (highest qubit most significant)."""
        block = matrices[-1]
        for j in range(matrices.shape[0] - 2, -1, -1):
            block = torch.kron(block, matrices[j])
        return block

    def _apply_full_layer(self, state: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Rotate every qubit with one matmul per block and no transposition copies.

        Viewing the state as (rest, 2^k) puts the block's k qubits in the fast index; ``block @ view.T``
        (BLAS reads the transposed operand in place) writes (2^k, rest), in which the *next* k qubits are
        the lowest bits. After all blocks the qubit order has rotated by N, i.e. back to the start.
        """
        for block in blocks:
            state = torch.mm(block, state.reshape(-1, block.shape[0]).t()).reshape(-1)
        return state

    def _apply_block(self, state: torch.Tensor, low: int, block: torch.Tensor) -> torch.Tensor:
        """Apply a Kronecker block acting on qubits low .. low+k-1 (general path, partial layers)."""
        k = block.shape[0].bit_length() - 1
        view = state.reshape(2 ** (self.n_qubits - low - k), 2**k, 2**low)
        return torch.matmul(block, view).reshape(-1)

    def statevector(self, angles: torch.Tensor) -> torch.Tensor:
        """The final state (real for RY-only circuits, complex otherwise), length 2^N."""
        if angles.shape != (self.num_parameters,):
            raise ValueError(f"Expected {self.num_parameters} angles, got shape {tuple(angles.shape)}.")
        dtype = angles.dtype
        if self.is_complex:
            dtype = torch.complex128 if angles.dtype == torch.float64 else torch.complex64
        stages = self._stages
        first = stages[0] if stages else None
        if isinstance(first, _RotationStage) and first.full:
            # The first layer acts on |0...0>: the result is the product state, a Kronecker product of
            # each block's first column, built without touching a 2^N zero vector (no matmuls, and
            # no backward through them). Each amplitude is the same product, in the same order, as
            # the block matmuls would form (the other terms they add are exact zeros).
            state = None
            for idx in first.blocks:
                column = self._kron(_rotation_matrices(first.gate, angles[idx]).to(dtype)[:, :, :1])[:, 0]
                state = column if state is None else torch.outer(column, state).reshape(-1)
            stages = stages[1:]
        else:
            state = torch.zeros(2**self.n_qubits, dtype=dtype, device=angles.device)
            state[0] = 1
        for stage in stages:
            if isinstance(stage, _PermutationStage):
                state = _Permute.apply(state, getattr(self, stage.index), getattr(self, stage.inverse))
                continue
            blocks = [self._kron(_rotation_matrices(stage.gate, angles[idx]).to(dtype)) for idx in stage.blocks]
            if stage.full:
                state = self._apply_full_layer(state, blocks)
            else:
                for low, block in zip(stage.lows, blocks):
                    state = self._apply_block(state, low, block)
        return state

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        state = self.statevector(angles)
        if self.is_complex:
            return state.real.square() + state.imag.square()
        return state.square()
