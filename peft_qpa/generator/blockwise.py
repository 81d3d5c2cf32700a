"""Memory of large generators (Quantum-Train generates every weight of a network: M up to 10^7 and more).

From :data:`BLOCKWISE_MIN_GENERATED` numbers on, the mapping runs over blocks of basis states, in the forward (no
gradient kept) and again in the backward (recomputed block by block, see :class:`BlockwiseGenerate`), and the
centring and offset are applied in place: one generation (forward + backward) then allocates the M generated
numbers, their gradient (M, computed by the layers that use them) and one block's activations, at most
max(BLOCK_ELEMENTS_MIN, M / BLOCK_FRACTION) numbers. Smaller generators keep the whole-mapping path (its activations
are recomputed by torch's checkpoint), unchanged from earlier versions.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

BLOCKWISE_MIN_GENERATED = 1 << 16
BLOCK_ELEMENTS_MIN = 1 << 17
# On an accelerator (CUDA) each block costs ~80 kernel launches (its MLP forward, and in the backward its
# recomputation and backpropagation), which at a few microseconds each outweighed the block's arithmetic: at
# N = 12 the 31 blocks of 2^17 numbers were most of the generator's launches. There blocks are at least this large
# (2^24 numbers, 64 MiB in float32: one block up to ~17,000 rows of the default MLP), a small share of the memory of
# any model that trains on a GPU. The CPU keeps BLOCK_ELEMENTS_MIN (memory, not launches, is what costs there).
ACCELERATOR_BLOCK_ELEMENTS_MIN = 1 << 24
BLOCK_FRACTION = 16


def block_elements_min(device: torch.device) -> int:
    """The smallest block budget (numbers of activation) on ``device``: BLOCK_ELEMENTS_MIN on the CPU (and meta),
    ACCELERATOR_BLOCK_ELEMENTS_MIN elsewhere."""
    return BLOCK_ELEMENTS_MIN if device.type in ("cpu", "meta") else ACCELERATOR_BLOCK_ELEMENTS_MIN


def block_rows(generator: "torch.nn.Module") -> int:
    """Basis states (mapping rows) per block: a block's activations (every layer's input and output) hold at most
    max(block_elements_min(device), M / BLOCK_FRACTION) numbers."""
    budget = max(block_elements_min(generator.offset.device), generator.num_generated // BLOCK_FRACTION)
    return max(1, min(generator.n_chunks, budget // generator.mapping.row_numbers()))


@torch.no_grad()
def blockwise_values(generator: "torch.nn.Module", features: torch.Tensor, offset: Optional[torch.Tensor],
                     bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The M numbers written block by block into one flat tensor, centred and offset in place: the only M-sized
    allocation is the result (each block's mapping input is built from ``features`` and the basis features ``bits``
    when it is needed)."""
    total, chunk = generator.num_generated, generator.chunk_size
    out = torch.empty(total, dtype=generator.mapping.output_dtype, device=features.device)
    rows = block_rows(generator)
    for start in range(0, generator.n_chunks, rows):
        stop = min(start + rows, generator.n_chunks)
        begin, end = start * chunk, min(stop * chunk, total)
        block = generator.mapping(generator.mapping_input(features, slice(start, stop), bits=bits))
        out[begin:end] = block.reshape(-1)[: end - begin]
    out.sub_(out.mean())
    if offset is not None:
        out.add_(offset)
    return out


def blockwise_output(generator: "torch.nn.Module", features, offset, sizes, bits=None) -> tuple[torch.Tensor, ...]:
    """The M numbers cut into pieces of ``sizes``: through :class:`BlockwiseGenerate` when gradients are needed."""
    params = tuple(generator.mapping.parameters())
    if torch.is_grad_enabled() and (features.requires_grad or any(p.requires_grad for p in params)):
        return BlockwiseGenerate.apply(weakref.ref(generator), features, offset, tuple(sizes), bits, *params)
    return torch.split(blockwise_values(generator, features, offset, bits), list(sizes))


class BlockwiseGenerate(torch.autograd.Function):
    """``(features, offset, basis features, mapping parameters) -> pieces of the M numbers``.

    Forward: the mapping block by block with no activation kept, centred and offset in place (one M-sized tensor,
    returned as views ``pieces``). Backward: the gradient of the centring is g - mean(g); each block's rows are
    recomputed with gradients and backpropagated on their own, reading the pieces' gradients where they lie, and
    the parameter gradients are summed over blocks. Nothing M-sized is allocated in the backward."""

    @staticmethod
    def forward(ctx, generator_ref, features, offset, sizes, bits, *params):
        generator = generator_ref()
        ctx.generator_ref = generator_ref  # weak: the graph must not keep a deleted adapter's generator alive
        ctx.sizes = sizes
        ctx.bits = bits  # not differentiated: the basis features of this generation (drawn, for "shuffled")
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(features)
        out = blockwise_values(generator, features, offset, bits)
        return tuple(torch.split(out, list(sizes)))

    @staticmethod
    def backward(ctx, *grads):
        generator = ctx.generator_ref()
        if generator is None:
            raise RuntimeError("The generator of these tensors was deleted before the backward pass.")
        (features,) = ctx.saved_tensors
        params = list(generator.mapping.parameters())
        need_features = ctx.needs_input_grad[1]
        need_params = list(ctx.needs_input_grad[5:])
        present = [g for g in grads if g is not None]
        if not present or not (need_features or any(need_params)):
            return (None, None, None, None, None, *[None] * len(params))
        rows, total, chunk = block_rows(generator), generator.num_generated, generator.chunk_size
        if rows >= generator.n_chunks:
            # One block: its incoming gradient is all M numbers, concatenated once; the mean is one sum of it (a sum
            # per piece and their Python sum were ~2 small ops per generated tensor)
            whole = _IncomingGradient(grads, ctx.sizes, None, features)(0, total)
            incoming = _OneBlock(whole.sub_(whole.sum() / total))
        else:
            incoming = _IncomingGradient(grads, ctx.sizes, sum(g.sum() for g in present) / total, features)
        grad_features = None
        grad_params = [None] * len(params)
        with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
            for start in range(0, generator.n_chunks, rows):
                stop = min(start + rows, generator.n_chunks)
                begin, end = start * chunk, min(stop * chunk, total)
                block_features = features[start:stop].detach().requires_grad_(need_features)
                block = generator.mapping(generator.mapping_input(block_features, bits_rows=slice(start, stop),
                                                                  bits=ctx.bits))
                block = block.reshape(-1)[: end - begin]
                inputs = ([block_features] if need_features else []) + [p for p, n in zip(params, need_params) if n]
                got = list(torch.autograd.grad(block, inputs, incoming(begin, end), allow_unused=True))
                if need_features:
                    g = got.pop(0)
                    if grad_features is None and (start, stop) == (0, generator.n_chunks):
                        grad_features = g
                    else:
                        if grad_features is None:
                            grad_features = torch.zeros_like(features)
                        grad_features[start:stop] += g
                for i, need in enumerate(need_params):
                    if need:
                        g = got.pop(0)
                        if g is not None:  # a fresh tensor of autograd.grad: summed into in place
                            grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        grad_params = [torch.zeros_like(p) if need and g is None else g for p, g, need in zip(params, grad_params,
                                                                                               need_params)]
        return (None, grad_features, None, None, None, *grad_params)


class _OneBlock:
    """The incoming gradient of a generation that is one block: already assembled and centred."""

    def __init__(self, whole: torch.Tensor):
        self.whole = whole

    def __call__(self, begin: int, end: int) -> torch.Tensor:
        return self.whole[begin:end]


class _IncomingGradient:
    """The incoming gradient of numbers [begin, end), read from the pieces' gradients where they lie, minus the mean
    (the backward of the centring; ``mean`` None: not centred)."""

    def __init__(self, grads, sizes, mean, like: torch.Tensor):
        self.grads, self.sizes, self.mean, self.like = grads, sizes, mean, like
        self.starts, position = [], 0
        for size in sizes:
            self.starts.append(position)
            position += size

    def __call__(self, begin: int, end: int) -> torch.Tensor:
        parts = []
        for start, size, g in zip(self.starts, self.sizes, self.grads):
            lo, hi = max(begin, start), min(end, start + size)
            if lo >= hi:
                continue
            if g is None:
                parts.append(torch.zeros(hi - lo, dtype=self.like.dtype, device=self.like.device))
            else:
                parts.append(g.reshape(-1)[lo - start: hi - start])
        out = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        return out if self.mean is None else out.sub_(self.mean)
