"""The statevector simulator's path through the compiled CPU kernel (:mod:`.fused_kernel`): planning the kernel
calls for a circuit, the forward, the adjoint sweep, and the scratch buffers they reuse between calls.

Kept apart from the torch path so that each reads on its own; :class:`FusedKernelPath` is mixed into
:class:`~peft_qpa.generator.backends.statevector.StatevectorSimulator` and uses its ``n_qubits``, ``is_complex``,
``kernel``, ``_stages`` and permutation buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import fused_kernel
from .stages import _PermutationStage, _RotationStage


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


class FusedKernelPath:
    """The fused-kernel methods of the statevector simulator (a mixin: it holds no state of its own)."""

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
