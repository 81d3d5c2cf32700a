"""Exact statevector simulation in torch of a circuit built by :mod:`peft_qpa.generator.circuit`.

The simulator runs the Qiskit circuit's own instruction list (no second description of the ansatz).
It compiles the list once into stages:

* a run of single-qubit rotations becomes a few batched matmuls: the qubits are grouped into blocks of
  up to ``GROUP_QUBITS`` adjacent qubits and each block's rotations are one Kronecker-product matrix
  applied to a reshaped view of the state (one pass over the state per block instead of per qubit);
* a run of CNOTs is one fixed permutation of basis indices, applied as one gather.

RY and CNOT keep amplitudes real, so an RY-only circuit runs in a real dtype; RX needs complex
amplitudes. Everything is differentiable, on CPU and CUDA, in one of two ways (``gradient=``):

* ``"autograd"``: torch autograd through every block matmul and permutation. It keeps the input of
  every block pass, about L * ceil(N / GROUP_QUBITS) + a few states (~33 states at N = 20, L = 8).
* ``"adjoint"`` (real-amplitude, i.e. RY + CNOT, circuits only): one :class:`torch.autograd.Function`
  over the whole simulation (:class:`_AdjointProbabilities`). The forward runs the same operations under
  ``no_grad`` (identical results) and keeps only the final state; the backward sweeps the stages in
  reverse, reconstructing each stage's input from its output (an orthogonal block B is undone by B^T,
  a permutation by its inverse), and needs ~4 states at any depth, for one extra matmul per block.
* ``"auto"`` (default): adjoint for real-amplitude circuits, autograd otherwise (RX circuits always use
  autograd). Measured (docs/performance.md, 1 thread, L = 8): adjoint is faster than autograd up to N = 16
  and within ~1.3x at N = 18-20, with ~4 states of peak memory instead of ~33, so it is used at every N. The adjoint backward is
  first-order only (``once_differentiable``); use ``"autograd"`` for double backward.

Two implementations of the same stages (``kernel=``):

* ``"torch"``: the Kronecker-block matmuls and gathers above, in torch ops (CPU and CUDA, any circuit).
* ``"fused"``: the compiled CPU kernel of :mod:`peft_qpa.generator.backends.fused_kernel` for circuits made of full RY
  layers and CNOTs (every ``build_ansatz(..., "ry_cnot")`` circuit): a layer and the CNOT chain before
  it in SIMD registers, cache-blocked, one FMA per amplitude and qubit, and an adjoint backward that
  un-permutes by a gather and undoes each layer. Used for the no-grad forward and the adjoint path, on
  CPU float32/float64. It agrees with the torch path to float rounding (not bit for bit). It keeps up
  to 3 state-sized scratch buffers between calls (:meth:`StatevectorSimulator.release_workspace`).
* ``"auto"`` (default): ``"fused"`` where it applies and the kernel could be built, else ``"torch"``.

The parts live beside this module: the compiled stages and their torch operations in :mod:`.stages`, the fused
kernel's path and scratch buffers in :mod:`.fused_path`, the adjoint gradient in :mod:`.adjoint`.
"""

from __future__ import annotations

import torch
from qiskit import QuantumCircuit

from ..circuit import circuit_program
from .adjoint import AdjointSweep, _AdjointProbabilities
from .fused_path import FusedKernelPath, _Workspace
from .stages import (  # noqa: F401  (GROUP_QUBITS and the stage types stay importable from here)
    GROUP_QUBITS,
    _PermutationStage,
    _Permute,
    _RotationStage,
    apply_block,
    apply_full_layer,
    compile_stages,
    group_blocks,
    plan_block_groups,
)

GRADIENT_MODES = ("auto", "adjoint", "autograd")
KERNELS = ("auto", "torch", "fused")


class StatevectorSimulator(FusedKernelPath, AdjointSweep, torch.nn.Module):
    """Exact probabilities of a parameterized circuit of RY/RX rotations and CNOTs.

    ``forward(angles)`` takes the circuit's parameter values in index order (``θ[0]``, ``θ[1]``, ...)
    and returns the 2^N basis-state probabilities in Qiskit's little-endian order. The module has no
    parameters; its permutation buffers follow ``.to(device)``.

    ``gradient`` picks the backward pass (see the module docstring): ``"auto"`` (adjoint for RY + CNOT
    circuits, autograd otherwise), ``"adjoint"`` (RY + CNOT only) or
    ``"autograd"``. The forward values are the same in every mode.
    """

    def __init__(self, circuit: QuantumCircuit, gradient: str = "auto", kernel: str = "auto"):
        super().__init__()
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.n_qubits = circuit.num_qubits
        self.num_parameters = circuit.num_parameters
        program = circuit_program(circuit)
        self.is_complex = any(g.name == "rx" for g in program)
        if gradient == "adjoint" and self.is_complex:
            raise ValueError("gradient='adjoint' supports real-amplitude (RY + CNOT) circuits only; "
                             "this circuit has RX rotations (use 'auto' or 'autograd').")
        self.gradient = gradient
        # The backward this module actually runs for differentiable angles.
        self.use_adjoint = not self.is_complex and (
            gradient in ("adjoint", "auto"))
        self._stages, buffers = compile_stages(program, self.n_qubits)
        # Every rotation block of a forward (or of a backward sweep) is built by a few batched ops per block size
        # (stages.group_blocks), from angle indices kept as buffers (no host-to-device copy per call).
        first = 1 if self._starts_with_product_state() else 0
        self._block_groups, group_buffers = plan_block_groups(self._stages, first)
        self._column_groups, column_buffers = (
            plan_block_groups(self._stages, 0, columns=True, prefix="_columns") if first else ([], {}))
        for name, buffer in {**buffers, **group_buffers, **column_buffers}.items():
            self.register_buffer(name, buffer, persistent=False)
        self.kernel = kernel
        self._workspace = _Workspace()
        self._fused_steps = self._plan_fused()
        if kernel == "fused" and self._fused_steps is None:
            raise ValueError("kernel='fused' supports circuits whose rotation layers are full RY layers (every "
                             "build_ansatz(..., 'ry_cnot') circuit); use kernel='auto' or 'torch' for this one.")

    def _check(self, angles: torch.Tensor) -> None:
        if angles.shape != (self.num_parameters,):
            raise ValueError(f"Expected {self.num_parameters} angles, got shape {tuple(angles.shape)}.")

    def _dtype(self, angles: torch.Tensor):
        if self.is_complex:
            return torch.complex128 if angles.dtype == torch.float64 else torch.complex64
        return angles.dtype

    def _starts_with_product_state(self) -> bool:
        first = self._stages[0] if self._stages else None
        return isinstance(first, _RotationStage) and first.full

    def _grouped_blocks(self, groups, angles: torch.Tensor, dtype) -> dict:
        """{(stage position, block position): block} of ``groups`` (:func:`stages.plan_block_groups`): the Kronecker
        product of that block's rotation matrices (its first column for column groups)."""
        blocks = {}
        for group in groups:
            blocks.update(zip(group.members, group_blocks(group, getattr(self, group.index), angles, dtype).unbind(0)))
        return blocks

    def _rotation_blocks(self, angles: torch.Tensor, dtype) -> dict:
        """The Kronecker block of every rotation stage after a product-state first layer (of every one without)."""
        return self._grouped_blocks(self._block_groups, angles, dtype)

    def _first_columns(self, angles: torch.Tensor, dtype) -> list:
        """The first layer's block columns, in block order, when it acts on |0...0>."""
        columns = self._grouped_blocks(self._column_groups, angles, dtype)
        return [columns[(0, j)] for j in range(len(self._stages[0].blocks))]

    def statevector(self, angles: torch.Tensor, _as_if_grad: bool = False, _built: "dict | None" = None) -> torch.Tensor:
        """The final state (real for RY-only circuits, complex otherwise), length 2^N (autograd path).

        ``_as_if_grad`` (used by the adjoint forward, which runs under ``no_grad``): make the partial-layer
        block matmuls take the code path they take when the block requires grad. ``torch.matmul`` of a
        2-D block with a 3-D view folds the batch into one matmul only when the block does not require
        grad, which rounds differently; with this flag the adjoint forward is bit-identical to the
        autograd forward. (Full layers use ``torch.mm`` and are the same either way.) ``_built`` (the adjoint
        forward too): a dict that receives the rotation blocks and first-layer columns, which its backward reuses."""
        self._check(angles)
        dtype = self._dtype(angles)
        stages = self._stages
        graph_needed = torch.is_grad_enabled() and angles.requires_grad
        module = None if graph_needed else self._fused_module(angles)
        if module is not None:
            return self._fused_statevector(angles, module)
        first = 0
        if self._starts_with_product_state():
            # The first layer acts on |0...0>: the result is the product state, a Kronecker product of
            # each block's first column, built without touching a 2^N zero vector (no matmuls, and
            # no backward through them). Each amplitude is the same product, in the same order, as
            # the block matmuls would form (the other terms they add are exact zeros).
            state = None
            columns = self._first_columns(angles, dtype)
            if _built is not None:
                _built["columns"] = columns
            for column in columns:
                state = column if state is None else torch.outer(column, state).reshape(-1)
            first = 1
        else:
            state = torch.zeros(2**self.n_qubits, dtype=dtype, device=angles.device)
            state[0] = 1
        all_blocks = self._rotation_blocks(angles, dtype)
        if _built is not None:
            _built["blocks"] = all_blocks
        for position in range(first, len(stages)):
            stage = stages[position]
            if isinstance(stage, _PermutationStage):
                state = _Permute.apply(state, getattr(self, stage.index), getattr(self, stage.inverse))
                continue
            blocks = [all_blocks[(position, j)] for j in range(len(stage.blocks))]
            if stage.full:
                state = apply_full_layer(state, blocks)
            else:
                for low, block in zip(stage.lows, blocks):
                    if _as_if_grad and not block.requires_grad:
                        block = block.detach().requires_grad_(True)  # under no_grad: no graph is recorded
                    state = apply_block(state, self.n_qubits, low, block)
        return state

    def forward(self, angles: torch.Tensor) -> torch.Tensor:
        if self.use_adjoint and torch.is_grad_enabled() and angles.requires_grad:
            self._check(angles)
            return _AdjointProbabilities.apply(angles, self)
        if not (torch.is_grad_enabled() and angles.requires_grad):
            self._check(angles)
            module = self._fused_module(angles)
            if module is not None:
                return self._fused_probabilities(angles, module)[1]
        state = self.statevector(angles)
        if self.is_complex:
            return state.real.square() + state.imag.square()
        return state.square()
