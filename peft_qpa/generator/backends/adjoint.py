"""The statevector simulator's adjoint gradient for real-amplitude (RY + CNOT) circuits: one autograd Function over
the whole simulation, whose backward sweeps the stages in reverse and reconstructs each stage's input from its
output instead of keeping it (about 4 states at any depth).

:class:`AdjointSweep` is mixed into :class:`~peft_qpa.generator.backends.statevector.StatevectorSimulator` and uses
its ``n_qubits``, ``_stages``, permutation buffers and, where the compiled kernel applies, its fused sweep.
"""

from __future__ import annotations

import torch

from . import fused_kernel
from .fused_path import _serial_gradient_state
from .stages import _PermutationStage, kron_batched


class AdjointSweep:
    """The torch adjoint backward of the statevector simulator (a mixin: its only state is a cache of small index
    tensors, :meth:`_angle_index`)."""

    def _adjoint_backward(self, angles: torch.Tensor, buffers: list, fused=None, threads=None,
                          built: "dict | None" = None) -> torch.Tensor:
        """dL/dangles from the final state and dL/dstate, sweeping the stages backwards.

        The small gradients of all blocks (and of the first layer's product-state columns) from
        :meth:`_block_gradients` are turned into angle gradients in a few batched ops (:func:`_kron_angle_grads`).
        ``buffers`` is ``[final state, dL/dstate]``; the list is emptied so that, when the caller holds no other
        reference, each state is released as soon as the sweep is past it. ``fused``: the compiled kernel where
        the caller found that it applies (:meth:`_fused_module`); the sweep then runs in it
        (:meth:`_fused_sweep`) with ``threads``. ``built``: the rotation blocks and first-layer columns of the forward
        (:meth:`statevector`'s ``_built``), reused instead of built again."""
        if fused is not None:
            y, lam = buffers.pop(0), buffers.pop(0)
            with torch.no_grad():
                return self._fused_sweep(angles, y, lam, fused, threads)
        with torch.no_grad():
            block_grads = self._block_gradients(angles, buffers, built)
            grad = torch.zeros_like(angles)
            groups: dict = {}
            for idx, g, column in block_grads:
                groups.setdefault((len(idx), column), []).append((idx, g))
            for (_, column), items in groups.items():
                index = self._angle_index([idx for idx, _ in items], angles.device)
                g = torch.stack([g for _, g in items])
                grad.index_add_(0, index.reshape(-1), _kron_angle_grads(angles[index], g, column).reshape(-1))
        return grad

    def _angle_index(self, rows: list, device) -> torch.Tensor:
        """``torch.tensor(rows)`` on ``device``, made once per device and kept (no host-to-device copy per call)."""
        key = (str(device), tuple(map(tuple, rows)))
        cache = self.__dict__.setdefault("_angle_indices", {})
        if key not in cache:
            cache[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return cache[key]

    def _block_gradients(self, angles: torch.Tensor, buffers: list, built: "dict | None" = None) -> list:
        """(angle indices, dL/dB, is a first-layer column) for every rotation block, last stage first.

        At every stage ``y = S(x)`` the sweep holds y and λ = dL/dy, reconstructs x = S^-1(y) and sets
        λ <- S^T λ; for a rotation block it also forms dL/dB (2^k x 2^k). It pops ``[final state, dL/dstate]``
        from ``buffers`` and keeps no other reference to a state it is past."""
        dtype = angles.dtype
        stages = self._stages
        product_start = self._starts_with_product_state()
        block_grads = []
        built = built or {}
        all_blocks = built["blocks"] if "blocks" in built else self._rotation_blocks(angles, dtype)
        y, lam = buffers.pop(0), buffers.pop(0)
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
            blocks = [all_blocks[(i, j)] for j in range(len(stage.blocks))]
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
            columns = built["columns"] if "columns" in built else self._first_columns(angles, dtype)
            prefixes = [columns[0]]
            for column in columns[1:-1]:
                prefixes.append(torch.outer(column, prefixes[-1]).reshape(-1))
            for j in range(len(columns) - 1, 0, -1):
                lam_mat = lam.view(columns[j].shape[0], -1)
                block_grads.append((first.blocks[j], torch.mv(lam_mat, prefixes[j - 1])[:, None], True))
                lam = torch.mv(lam_mat.t(), columns[j])
            block_grads.append((first.blocks[0], lam[:, None], True))
        return block_grads


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
    # all k derivatives at once: factors[:, q, j] = RY'(θ_j) if j == q else RY(θ_j), (nb, k, k, 2, c)
    derivative = torch.eye(k, dtype=torch.bool, device=angles.device)[None, :, :, None, None]
    factors = torch.where(derivative, dmats[:, None], mats[:, None])
    blocks = kron_batched(factors.reshape(nb * k, k, *mats.shape[-2:]))  # highest qubit most significant
    return (blocks.view(nb, k, *blocks.shape[1:]) * grads[:, None]).sum((2, 3))


class _AdjointProbabilities(torch.autograd.Function):
    """Probabilities of a real-amplitude circuit with an adjoint (reverse-sweep) backward.

    Forward: the same stages as :meth:`StatevectorSimulator.statevector`, under ``no_grad`` (identical
    values), then ``state**2``. Only the angles and the final state are kept. Backward: λ = 2 ψ g and
    :meth:`AdjointSweep._adjoint_backward`. Peak memory of the backward ~4 states (the incoming
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
                ctx.built = {}  # the rotation blocks, kept for the backward (a few small matrices per layer)
                state = sim.statevector(angles, _as_if_grad=True, _built=ctx.built)
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
        built = None if fused is not None else getattr(ctx, "built", None)
        return sim._adjoint_backward(angles, buffers, fused, threads, built), None


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True when it cannot be told."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True
