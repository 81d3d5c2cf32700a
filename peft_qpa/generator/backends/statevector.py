"""Exact statevector simulation in torch of a circuit built by :mod:`peft_qpa.circuit`.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from qiskit import QuantumCircuit

from . import fused_kernel
from ..circuit import circuit_program

# Qubits per Kronecker block: a 2^5 x 2^5 matrix keeps the matmul cheap while cutting passes 5-fold.
GROUP_QUBITS = 5


GRADIENT_MODES = ("auto", "adjoint", "autograd")
KERNELS = ("auto", "torch", "fused")


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
    chain: bool = False  # the CNOT chain CNOT(0,1) ... CNOT(N-2,N-1): the fused kernel computes it


@dataclass
class _FusedStep:
    """One call of the fused kernel: the permutation before a full RY layer (if any), then the layer;
    or (``layer`` None) a lone trailing permutation."""

    permutation: "_PermutationStage | None"
    layer: "int | None"  # row of StatevectorSimulator._fused_angles


class _Workspace:
    """State-sized scratch buffers of the fused kernel, kept between calls (at most ``CAP`` per dtype and
    size). Fresh multi-MiB buffers in every call are page-faulted in again each time, which at N = 20
    (float64) cost as much as the kernel itself. Never holds a tensor that leaves the simulator (the
    returned state or probabilities, the state kept for the backward). Not copied or pickled with the
    module; :meth:`StatevectorSimulator.release_workspace` frees it."""

    CAP = 3

    def __init__(self):
        self._free: dict = {}

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        free = self._free.get((dtype, numel))
        try:
            return free.pop()  # list.pop is atomic: concurrent callers never get the same buffer
        except (AttributeError, IndexError):
            return torch.empty(numel, dtype=dtype)

    def give(self, *buffers: torch.Tensor) -> None:
        for buffer in buffers:
            free = self._free.setdefault((buffer.dtype, buffer.numel()), [])
            if len(free) < self.CAP and all(b is not buffer for b in free):
                free.append(buffer)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for free in self._free.values() for b in free)

    def clear(self) -> None:
        self._free = {}

    def __deepcopy__(self, memo):
        return _Workspace()

    def __getstate__(self):
        return {"_free": {}}


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
                identity = np.arange(perm.size, dtype=np.int64)
                chain = bool(np.array_equal(perm, identity ^ ((identity << 1) & (perm.size - 1))))
                self._stages.append(_PermutationStage(index=name, inverse=name + "_inv", chain=chain))
            else:
                rotations: dict[int, int] = {}
                while i < len(program) and program[i].name == gate.name and program[i].qubits[0] not in rotations:
                    rotations[program[i].qubits[0]] = program[i].param_index
                    i += 1
                self._stages.append(self._rotation_stage(gate.name, rotations))
        self.kernel = kernel
        self._workspace = _Workspace()
        self._fused_steps = self._plan_fused()
        if kernel == "fused" and self._fused_steps is None:
            raise ValueError("kernel='fused' supports circuits whose rotation layers are full RY layers (every "
                             "build_ansatz(..., 'ry_cnot') circuit); use kernel='auto' or 'torch' for this one.")

    def _plan_fused(self) -> "list[_FusedStep] | None":
        """The fused kernel's steps after the first (product-state) layer, or None where it does not apply."""
        stages = self._stages
        if self.is_complex or not self._starts_with_product_state():
            return None
        if any(isinstance(st, _RotationStage) and not st.full for st in stages):
            return None
        # row 0: the first layer (applied to |0...0>: the product state), then one row per later layer
        steps, layers, i = [], [[index for block in stages[0].blocks for index in block]], 1
        while i < len(stages):
            stage = stages[i]
            permutation = stage if isinstance(stage, _PermutationStage) else None
            if permutation is not None:
                i += 1
                if i == len(stages) or not isinstance(stages[i], _RotationStage):
                    steps.append(_FusedStep(permutation, None))
                    continue
            rotation = stages[i]
            layers.append([index for block in rotation.blocks for index in block])  # qubit 0 upwards
            steps.append(_FusedStep(permutation, len(layers) - 1))
            i += 1
        self.register_buffer("_fused_angles", torch.tensor(layers, dtype=torch.long).reshape(len(layers), self.n_qubits),
                             persistent=False)
        # the adjoint sweep's order: each layer row, last to first, with the permutation that follows it
        rows, following = [0], {}
        for step in steps:
            if step.permutation is not None:
                following[rows[-1]] = step.permutation
            if step.layer is not None:
                rows.append(step.layer)
        self._fused_undo = [(row, following.get(row)) for row in reversed(rows)]
        return steps

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

    def _first_columns(self, stage: _RotationStage, angles: torch.Tensor, dtype) -> list[torch.Tensor]:
        """First column of each block of a first full layer (the block applied to |0...0>)."""
        return [self._kron(_rotation_matrices(stage.gate, angles[idx]).to(dtype)[:, :, :1])[:, 0]
                for idx in stage.blocks]

    def _stage_blocks(self, stage: _RotationStage, angles: torch.Tensor, dtype) -> list[torch.Tensor]:
        return [self._kron(_rotation_matrices(stage.gate, angles[idx]).to(dtype)) for idx in stage.blocks]

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

    def statevector(self, angles: torch.Tensor, _as_if_grad: bool = False) -> torch.Tensor:
        """The final state (real for RY-only circuits, complex otherwise), length 2^N (autograd path).

        ``_as_if_grad`` (used by the adjoint forward, which runs under ``no_grad``): make the partial-layer
        block matmuls take the code path they take when the block requires grad. ``torch.matmul`` of a
        2-D block with a 3-D view folds the batch into one matmul only when the block does not require
        grad, which rounds differently; with this flag the adjoint forward is bit-identical to the
        autograd forward. (Full layers use ``torch.mm`` and are the same either way.)"""
        self._check(angles)
        dtype = self._dtype(angles)
        stages = self._stages
        graph_needed = torch.is_grad_enabled() and angles.requires_grad
        module = None if graph_needed else self._fused_module(angles)
        if module is not None:
            return self._fused_statevector(angles, module)
        if self._starts_with_product_state():
            # The first layer acts on |0...0>: the result is the product state, a Kronecker product of
            # each block's first column, built without touching a 2^N zero vector (no matmuls, and
            # no backward through them). Each amplitude is the same product, in the same order, as
            # the block matmuls would form (the other terms they add are exact zeros).
            state = None
            for column in self._first_columns(stages[0], angles, dtype):
                state = column if state is None else torch.outer(column, state).reshape(-1)
            stages = stages[1:]
        else:
            state = torch.zeros(2**self.n_qubits, dtype=dtype, device=angles.device)
            state[0] = 1
        for stage in stages:
            if isinstance(stage, _PermutationStage):
                state = _Permute.apply(state, getattr(self, stage.index), getattr(self, stage.inverse))
                continue
            blocks = self._stage_blocks(stage, angles, dtype)
            if stage.full:
                state = self._apply_full_layer(state, blocks)
            else:
                for low, block in zip(stage.lows, blocks):
                    if _as_if_grad and not block.requires_grad:
                        block = block.detach().requires_grad_(True)  # under no_grad: no graph is recorded
                    state = self._apply_block(state, low, block)
        return state

    # ----------------------------------------------------------------------------------------------
    # Fused CPU kernel
    # ----------------------------------------------------------------------------------------------

    def _fused_module(self, angles: torch.Tensor):
        """The compiled kernel where it applies to this call, else None (then the torch path runs)."""
        if self._fused_steps is None or self.kernel == "torch":
            return None
        if angles.device.type != "cpu" or angles.dtype not in (torch.float32, torch.float64):
            if self.kernel == "fused":
                raise ValueError("kernel='fused' runs on CPU float32/float64 angles; got "
                                 f"{angles.dtype} on {angles.device}. Use kernel='auto' to fall back to torch.")
            return None
        module = fused_kernel.load()
        if module is None and self.kernel == "fused":
            raise RuntimeError(f"kernel='fused' but the fused CPU kernel is unavailable: "
                               f"{fused_kernel.error() or fused_kernel.ENV_VAR + '=0 turns it off'}")
        return module

    def _fused_permutation(self, permutation: "_PermutationStage | None", inverse: bool = False):
        """(index tensor or None, chain flag) for the kernel: the CNOT chain (or, with ``inverse``, its
        inverse) is computed, not read."""
        if permutation is None:
            return None, False
        if permutation.chain:
            return None, True
        return getattr(self, permutation.inverse if inverse else permutation.index), False

    def release_workspace(self) -> None:
        """Free the fused kernel's scratch buffers (at most 3 states, kept between calls)."""
        self._workspace.clear()

    def _fused_cos_sin(self, angles: torch.Tensor):
        # (layers, N), qubit 0 first. In numpy: torch's cos/sin (MKL's vector math) start a thread team
        # even for these few values, and waking it costs milliseconds when other processes hold the CPUs.
        half = _array(angles[self._fused_angles] / 2)
        return torch.from_numpy(np.cos(half)), torch.from_numpy(np.sin(half))

    def _fused_statevector(self, angles: torch.Tensor, module, threads: "int | None" = None) -> torch.Tensor:
        """The final state on the fused path. ``threads``: the kernel's thread count for this call
        (:func:`fused_kernel.threads` when None); with 1 the state-sized elementwise ops run in one
        thread too (:func:`_serial_outer`)."""
        cos, sin = self._fused_cos_sin(angles)
        steps, workspace = self._fused_steps, self._workspace
        size, dtype = 2**self.n_qubits, cos.dtype
        if threads is None:
            threads = fused_kernel.threads(self.n_qubits)
        outer = _serial_outer if threads == 1 else torch.outer
        # the first layer on |0...0>: the product state of the columns (cos, sin) of each qubit's RY;
        # only the final output leaves this method, every other state lives in workspace buffers
        columns = torch.stack([cos[0], sin[0]], 1)  # (N, 2), qubit 0 first
        state, borrowed = columns[0], False
        for q in range(1, self.n_qubits):
            if q == self.n_qubits - 1 and steps:
                out, borrowed = workspace.take(size, dtype).view(2, -1), True
                state = outer(columns[q], state, out=out).reshape(-1)
            else:
                state = outer(columns[q], state).reshape(-1)
        for i, step in enumerate(steps):
            index, chain = self._fused_permutation(step.permutation)
            last = i == len(steps) - 1
            out = torch.empty(size, dtype=dtype) if last else workspace.take(size, dtype)
            if step.layer is None:  # the trailing CNOT chain
                module.permute(state, index, chain, out, threads)
            else:
                module.ry_layer_forward(state, index, chain, cos[step.layer], sin[step.layer], out, threads)
            if borrowed:
                workspace.give(state)
            state, borrowed = out, not last
        return state

    def _fused_probabilities(self, angles: torch.Tensor, module) -> tuple[torch.Tensor, torch.Tensor]:
        """(final state, probabilities) on the fused path, with one thread count for the whole call."""
        threads = fused_kernel.threads(self.n_qubits)
        state = self._fused_statevector(angles, module, threads)
        return state, (_serial_square(state) if threads == 1 else state.square())

    def _fused_sweep(self, angles: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, module,
                     threads: "int | None" = None) -> torch.Tensor:
        """dL/dangles by an adjoint sweep over the layers, last to first. Each kernel call un-permutes its
        inputs by the permutation that *follows* its layer (a gather, so no pass of its own and no
        scatter), then undoes the layer and contracts its angle gradients. Overwrites ``lam`` (and keeps it
        as a workspace buffer); never ``y``, which may be the kept final state."""
        cos, sin = self._fused_cos_sin(angles)
        grad = torch.zeros_like(angles)
        workspace, size, dtype = self._workspace, y.numel(), y.dtype
        if threads is None:
            threads = fused_kernel.threads(self.n_qubits)
        spares: list = []
        owned = False  # whether y may be overwritten (not the kept final state)
        for row, permutation in self._fused_undo:
            if permutation is None:  # undone in place
                if not owned:
                    y, owned = y.clone(), True
                y_out, lam_out = y, lam
            else:
                while len(spares) < 2:
                    spares.append(workspace.take(size, dtype))
                y_out, lam_out = spares[0], spares[1]
            index, inverse_chain = self._fused_permutation(permutation, inverse=True)
            layer_grad = module.ry_layer_backward(y, lam, index, inverse_chain, cos[row], sin[row], y_out, lam_out,
                                                  threads)
            if permutation is not None:
                spares = [lam, y] if owned else [lam]  # consumed: reused as the next outputs
            y, lam, owned = y_out, lam_out, True
            grad.index_add_(0, self._fused_angles[row], layer_grad.to(grad.dtype))
        workspace.give(lam, *spares, *([y] if owned else []))
        return grad

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

    # ----------------------------------------------------------------------------------------------
    # Adjoint backward (real amplitudes)
    # ----------------------------------------------------------------------------------------------

    def _adjoint_backward(self, angles: torch.Tensor, buffers: list, fused=None, threads=None) -> torch.Tensor:
        """dL/dangles from the final state and dL/dstate, sweeping the stages backwards.

        At every stage ``y = S(x)`` the sweep holds y and λ = dL/dy, reconstructs x = S^-1(y) and sets
        λ <- S^T λ; for a rotation block it also forms dL/dB (2^k x 2^k). The small gradients of all
        blocks (and of the first layer's product-state columns) are then turned into angle gradients in
        a few batched ops (:func:`_kron_angle_grads`). ``buffers`` is ``[final state, dL/dstate]``; the
        list is emptied so that, when the caller holds no other reference, each state is released as
        soon as the sweep is past it. ``fused``: the compiled kernel where the caller found that it
        applies (:meth:`_fused_module`); the sweep then runs in it (:meth:`_fused_sweep`) with ``threads``."""
        dtype = angles.dtype
        stages = self._stages
        product_start = self._starts_with_product_state()
        block_grads = []  # (angle indices, dL/dB, is a first-layer column)
        y, lam = buffers.pop(0), buffers.pop(0)
        if fused is not None:
            with torch.no_grad():
                return self._fused_sweep(angles, y, lam, fused, threads)
        with torch.no_grad():
            for i in range(len(stages) - 1, 0 if product_start else -1, -1):
                stage = stages[i]
                if isinstance(stage, _PermutationStage):
                    inverse = getattr(self, stage.inverse)
                    # forward: y = x[perm]  =>  x = y[inv], dL/dx = λ[inv]
                    x = torch.index_select(y, 0, inverse)
                    del y
                    lam_x = torch.index_select(lam, 0, inverse)
                    del lam
                    y, lam = x, lam_x
                    continue
                blocks = self._stage_blocks(stage, angles, dtype)
                for j in range(len(blocks) - 1, -1, -1):
                    block = blocks[j]
                    d = block.shape[0]
                    if stage.full:
                        # forward: Y = B X^T with X = x.view(R, d), Y = y.view(d, R)
                        y_mat, lam_mat = y.view(d, -1), lam.view(d, -1)
                        # dL/dB = Λ X and X = Y^T B, so dL/dB = (Λ Y^T) B, without waiting for X
                        block_grads.append((stage.blocks[j], torch.mm(torch.mm(lam_mat, y_mat.t()), block), False))
                        x = torch.mm(y_mat.t(), block).view(-1)  # X = Y^T B
                        del y, y_mat
                        lam_x = torch.mm(lam_mat.t(), block).view(-1)  # dL/dX = Λ^T B
                        del lam, lam_mat
                    else:
                        low = stage.lows[j]
                        shape = (2 ** (self.n_qubits - low - len(stage.blocks[j])), d, 2**low)
                        y_view, lam_view = y.view(shape), lam.view(shape)
                        x = torch.matmul(block.t(), y_view)  # forward: Y[a] = B X[a]
                        block_grads.append((stage.blocks[j], torch.tensordot(lam_view, x, dims=([0, 2], [0, 2])), False))
                        x = x.reshape(-1)
                        del y, y_view
                        lam_x = torch.matmul(block.t(), lam_view).reshape(-1)
                        del lam, lam_view
                    y, lam = x, lam_x
            del y
            if product_start:
                # state = c_m ⊗ ... ⊗ c_1 (the last block's column most significant)
                first = stages[0]
                columns = self._first_columns(first, angles, dtype)
                prefixes = [columns[0]]
                for column in columns[1:-1]:
                    prefixes.append(torch.outer(column, prefixes[-1]).reshape(-1))
                for j in range(len(columns) - 1, 0, -1):
                    lam_mat = lam.view(columns[j].shape[0], -1)
                    block_grads.append((first.blocks[j], torch.mv(lam_mat, prefixes[j - 1])[:, None], True))
                    lam = torch.mv(lam_mat.t(), columns[j])
                block_grads.append((first.blocks[0], lam[:, None], True))
            del lam
            grad = torch.zeros_like(angles)
            groups: dict = {}
            for idx, g, column in block_grads:
                groups.setdefault((len(idx), column), []).append((idx, g))
            for (_, column), items in groups.items():
                index = torch.tensor([idx for idx, _ in items], dtype=torch.long, device=angles.device)
                g = torch.stack([g for _, g in items])
                grad.index_add_(0, index.reshape(-1), _kron_angle_grads(angles[index], g, column).reshape(-1))
        return grad


def _kron_angle_grads(angles: torch.Tensor, grads: torch.Tensor, column: bool) -> torch.Tensor:
    """dL/dθ for a batch of RY Kronecker blocks, given dL/dB.

    ``angles`` (nb, k): the angles of qubits low..low+k-1 of each block, ``grads`` (nb, 2^k, 2^k) the
    gradients of the blocks B = RY(θ_{k-1}) ⊗ ... ⊗ RY(θ_0) (or, with ``column``, (nb, 2^k, 1): of
    their first columns). dB/dθ_q is the same Kronecker product with RY(θ_q) replaced by its derivative
    RY'(θ) = RY(θ + π) / 2, so dL/dθ_q = <dL/dB, dB/dθ_q>."""
    nb, k = angles.shape
    c, s = torch.cos(angles / 2), torch.sin(angles / 2)
    mats = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (nb, k, 2, 2)
    dmats = 0.5 * torch.stack([torch.stack([-s, -c], -1), torch.stack([c, -s], -1)], -2)
    if column:
        mats, dmats = mats[..., :1], dmats[..., :1]
    out = []
    for q in range(k):
        factors = [dmats[:, j] if j == q else mats[:, j] for j in range(k)]
        block = factors[-1]
        for j in range(k - 2, -1, -1):  # highest qubit most significant, as in StatevectorSimulator._kron
            a, b = block, factors[j]
            block = (a[:, :, None, :, None] * b[:, None, :, None, :]).reshape(nb, a.shape[1] * 2, a.shape[2] * b.shape[2])
        out.append((block * grads).sum((1, 2)))
    return torch.stack(out, 1)


class _AdjointProbabilities(torch.autograd.Function):
    """Probabilities of a real-amplitude circuit with an adjoint (reverse-sweep) backward.

    Forward: the same stages as :meth:`StatevectorSimulator.statevector`, under ``no_grad`` (identical
    values), then ``state**2``. Only the angles and the final state are kept. Backward: λ = 2 ψ g and
    :meth:`StatevectorSimulator._adjoint_backward`. Peak memory of the backward ~4 states (the incoming
    gradient, λ and the reconstructed state with their next values), independent of the depth. Under
    ``retain_graph=True`` (e.g. the generator's reentrant-checkpointing path) the final state stays
    kept for the next backward: one state more."""

    @staticmethod
    def forward(ctx, angles, sim):
        with torch.no_grad():
            fused = sim._fused_module(angles)
            if fused is not None:
                state, probs = sim._fused_probabilities(angles, fused)
            else:
                state = sim.statevector(angles, _as_if_grad=True)
                probs = state.square()
        ctx.sim = sim
        ctx.save_for_backward(angles)
        # The state is an internal tensor (not an output, no grad_fn): kept as an attribute so that a
        # backward that frees the graph can drop it as soon as the sweep no longer needs it.
        ctx.state = state
        return probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_probs):
        (angles,) = ctx.saved_tensors
        state = ctx.state
        if not _graph_kept():
            ctx.state = None  # the graph is freed after this backward: let the sweep release the state
        sim = ctx.sim
        fused = sim._fused_module(angles)
        threads = fused_kernel.threads(sim.n_qubits) if fused is not None else None
        # λ = 2 g ψ; on the fused path into a workspace buffer, which the sweep keeps for the next call
        lam = sim._workspace.take(state.numel(), state.dtype) if fused is not None else None
        if threads == 1:
            _serial_gradient_state(grad_probs, state, lam)
        else:
            lam = torch.mul(grad_probs, state, out=lam)
            lam.mul_(2)
        buffers = [state, lam]
        del state, lam
        return sim._adjoint_backward(angles, buffers, fused, threads), None


# The fused path's state-sized elementwise ops where the kernel runs in one thread. A torch elementwise
# op over at least _TORCH_GRAIN values runs on torch's whole thread pool and ends in a barrier, which
# stalls like the kernel's passes when another process holds a CPU (see fused_kernel.threads); numpy
# never starts a thread team, at the same speed as one torch thread. Smaller ops stay in torch (which
# runs them in the calling thread, with less overhead). Each is the same IEEE operation as the torch op
# it replaces: the results are bit-identical.
_TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().resolve_conj().resolve_neg().numpy()


def _serial_outer(a: torch.Tensor, b: torch.Tensor, out: "torch.Tensor | None" = None) -> torch.Tensor:
    if a.numel() * b.numel() < _TORCH_GRAIN:
        return torch.outer(a, b, out=out)
    if out is None:
        out = torch.empty(a.numel(), b.numel(), dtype=torch.result_type(a, b))
    np.outer(_array(a), _array(b), out=out.numpy())
    return out


def _serial_square(state: torch.Tensor) -> torch.Tensor:
    if state.numel() < _TORCH_GRAIN:
        return state.square()
    out = torch.empty_like(state)
    np.square(_array(state), out=out.numpy())
    return out


def _serial_gradient_state(grad_probs: torch.Tensor, state: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = 2 g ψ, as (g ψ) · 2 like torch.mul then mul_(2)."""
    if state.numel() < _TORCH_GRAIN:
        return torch.mul(grad_probs, state, out=out).mul_(2)
    array = out.numpy()
    np.multiply(_array(grad_probs), _array(state), out=array)
    np.multiply(array, 2, out=array)
    return out


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True when it cannot be told."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True
