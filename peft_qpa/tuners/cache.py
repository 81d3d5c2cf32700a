"""The generated tensors of one adapter, owned by its tuner: the live tensors of the current forward and the
snapshot buffers of its layers.

The generator (``peft_qpa.generator``) only computes; :class:`GeneratedCache` decides when to run it and writes the
results where they are read:

* **Live tensors.** While gradients are needed, the tensors are generated once per forward of the whole model
  (:meth:`GeneratedCache.begin_forward`, before any checkpointed layer runs) and every layer reads the same ones. They
  are reused only while the generator is unchanged and no backward has consumed their graph; a layer or submodule
  called on its own, outside a whole-model forward, gets new ones (once for all layers of that call).
* **Snapshots.** Otherwise (eval without gradients, ``no_grad``, saving, merging, exporting) layers read snapshot
  buffers, which the cache regenerates when the generator changed, judged by value (:meth:`GeneratedCache.refresh`).
  The tuner writes every layer's snapshot buffer at once and explicitly: those buffers are what is saved.
* **Checks.** After a load, the loaded generator is compared with the loaded snapshot (:meth:`disagreement`); a
  generator with NaN or inf parameters is reported once, in every mode (:meth:`report_non_finite`).

``docs/generator.md`` ("When weights are generated") states these rules; the tests hold them.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any, Optional

import torch

from ..generator import QPAGenerator
from ..generator import blockwise
from . import distributed


def on_meta(module: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device: nothing can be generated yet (e.g. FSDP's
    memory-efficient loading moves the model to meta and re-registers non-persistent buffers only after the load)."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _tensor_versions(module: torch.nn.Module) -> tuple:
    """Identity and in-place version of every parameter and buffer: cheap enough to check at every layer of a
    forward. In-place updates (optimizer steps, load_state_dict) bump a tensor's version counter (``_version``, which
    torch keeps for autograd and exposes without a public name); replacing a tensor changes its data pointer."""
    return tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))


def _fingerprint(module: torch.nn.Module) -> tuple:
    """What the generated tensors depend on: the parameters' values (few: compared by content, so that edits through
    ``.data``, which no version counter sees, are caught too) and the buffers' identity and version (the offset
    holds M numbers; it only changes by loading or casting, which replace or bump it)."""
    buffers = tuple((b.data_ptr(), b._version, b.dtype) for b in module.buffers())
    params = [p.detach().reshape(-1) for p in module.parameters()]
    return buffers, torch.cat(params) if params else None


def _same_fingerprint(old: Optional[tuple], new: tuple) -> bool:
    if old is None or old[0] != new[0]:
        return False
    if new[1] is None or old[1] is None:
        return new[1] is old[1]
    a, b = old[1], new[1]
    return a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


class GeneratedCache:
    """One adapter's generated tensors: ``targets`` maps each generated tensor's name (as in the generator's specs)
    to where its snapshot lives, ``(BufferDict, key)``. ``member`` and ``adapter_name`` name it in warnings."""

    def __init__(self, generator: QPAGenerator, targets: dict[str, tuple[Any, str]], member: str = "QPA",
                 adapter_name: str = "default"):
        self.generator = generator
        self.targets = targets
        self.member, self.adapter_name = member, adapter_name
        self._live: Optional[dict[str, torch.Tensor]] = None
        self._live_consumed = False
        self._live_versions: Optional[tuple] = None
        self._snapshot_state: Optional[tuple] = None  # the generator's fingerprint when the snapshot was written
        self._snapshot_checked: Optional[tuple] = None  # versions at the last check within a whole-model forward
        self._warned_non_finite = False
        # Under FSDP the generator stays whole on every rank and its gradients are averaged by us (distributed.py):
        # whether that is on, over which process group (None: the default one), and whether this backward's
        # all-reduce is already queued.
        self._sync_gradients = False
        self._sync_group = None
        self._sync_queued = False

    def __getstate__(self):
        # Live tensors belong to one forward's autograd graph: never copy or pickle them. A process group belongs to
        # this process: a copy attaches again at its first forward under FSDP.
        state = self.__dict__.copy()
        state["_live"] = None
        state["_sync_gradients"], state["_sync_group"], state["_sync_queued"] = False, None, False
        return state

    # --- several ranks (FSDP) -----------------------------------------------------------------------------------
    @property
    def syncs_gradients(self) -> bool:
        """Whether each backward ends with an all-reduce (mean) of the generator's gradients (FSDP, see
        ``distributed.py``)."""
        return self._sync_gradients

    def sync_gradients(self, group=None) -> None:
        """Average the generator's gradients over ``group`` (None: the default process group) at the end of every
        backward that reaches it: the generator is a replica that no data-parallel wrapper synchronises."""
        self._sync_gradients, self._sync_group, self._sync_queued = True, group, False

    # --- once per forward of the whole model ------------------------------------------------------------------
    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.generator.parameters())

    def begin_forward(self, training: bool = True, reentrant_checkpointing: bool = False) -> None:
        """Generate once for all layers, at the start of a forward of the whole model.

        With gradients needed the tensors are generated here, outside any gradient-checkpointed block. Otherwise
        layers read the snapshot, checked once here for all of them (until :meth:`end_forward`); live tensors of an
        earlier forward are kept, as its backward may still recompute checkpointed layers with them (e.g. TRL's DPO
        runs a no-grad reference forward, adapter disabled, between the policy's forward and backward).

        Only a training forward advances the generator's ``step``, which seeds shot sampling: in eval mode the output
        is the snapshot's, also when gradients are enabled (they still flow, as they do to LoRA weights in eval).

        Reentrant gradient checkpointing runs one nested backward per checkpointed block, and each would traverse
        (and free) the generator's graph. Then the layers read a detached leaf instead; its gradient is pushed
        through the generator (graph retained) at the end of each nested backward."""
        if not self._needs_grad():
            self.refresh()
            self._snapshot_checked = _tensor_versions(self.generator)
            return
        self._make_live(advance=training, reentrant_checkpointing=reentrant_checkpointing)

    def end_forward(self) -> None:
        """At the end of a forward of the whole model: a layer called on its own afterwards checks the snapshot again."""
        self._snapshot_checked = None

    def drop_live(self) -> None:
        """Release the live tensors and their graph (e.g. the adapter is being deleted)."""
        self._live = None

    def live(self, training: bool = True) -> Optional[dict[str, torch.Tensor]]:
        """The live (differentiable) tensors of this forward, or None when the snapshot is to be read (in which case
        it is made fresh first)."""
        generator = self.generator
        if not self._needs_grad():
            if self._snapshot_checked != _tensor_versions(generator):
                self.refresh()
            return None
        if self._live is not None and not self._live_consumed and self._live_versions == _tensor_versions(generator):
            return self._live
        self._make_live(advance=training)
        return self._live

    def _make_live(self, advance: bool, reentrant_checkpointing: bool = False) -> None:
        generator = self.generator
        self.report_non_finite()
        # Drop the previous forward's live tensors first: a pending backward keeps what it needs through its graph,
        # and holding them here too would put two generations (2 M numbers) in memory at once.
        self._live = None
        consumed = functools.partial(_mark_live_consumed, weakref.ref(self))
        self._sync_queued = False  # a backward that failed half-way must not leave the next one unsynchronised
        if reentrant_checkpointing:
            generated = generator.generate(training=advance)
            flat = generated.detach().requires_grad_(True)
            flat.register_hook(functools.partial(_queue_backward, generated))
            self._live = generator.split(flat)
            roots = (flat,)
        elif generator.num_generated >= blockwise.BLOCKWISE_MIN_GENERATED:
            # One tensor per piece, each gradient read where it lies (no M-sized concatenation). Once a backward
            # has gone through them, their graph is freed: a layer called on its own after that gets new ones.
            self._live = generator.generate_pieces(training=advance)
            for piece in self._live.values():
                piece.register_hook(consumed)
            roots = tuple(self._live.values())
        else:
            flat = generator.generate(training=advance)
            flat.register_hook(consumed)
            self._live = generator.split(flat)
            roots = (flat,)
        self._live_consumed = False
        if self._sync_gradients:
            sync = functools.partial(distributed.queue_gradient_sync, weakref.ref(self))
            for tensor in roots:
                tensor.register_hook(sync)
        if advance:
            with torch.no_grad():
                generator.step += 1
        self._live_versions = _tensor_versions(generator)

    # --- snapshots ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh(self, force: bool = False) -> None:
        """Regenerate the snapshot buffers if the generator changed since they were written (always with ``force``:
        saving and exporting use it, as they are rare and must never write a stale snapshot)."""
        if not self.targets or on_meta(self.generator):
            return
        distributed.refuse_sharded(self.generator, self.member, self.adapter_name)
        with distributed.zero3_gathered(self.generator):
            state = _fingerprint(self.generator)
            if not force and _same_fingerprint(self._snapshot_state, state):
                return
            self.report_non_finite()
            tensors = self.generator.split(self.generator.generate())
            for name, (buffers, key) in self.targets.items():
                buffers[key].copy_(tensors[name])
            self._snapshot_state = state

    def mark_fresh(self) -> None:
        """Declare the snapshot buffers authoritative for the current parameters (after a load)."""
        self._snapshot_state = _fingerprint(self.generator)

    @torch.no_grad()
    def disagreement(self) -> tuple[float, float, int, int]:
        """Compare the snapshot buffers with a fresh generation, without writing anything.

        Returns ``(max |difference|, tolerance, numbers beyond it, numbers compared)``. The tolerance allows float
        rounding between machines (thread counts, compiled kernel or not): 1e-3 of the largest snapshot value in
        float32/float64, 1e-2 in half precision."""
        distributed.refuse_sharded(self.generator, self.member, self.adapter_name)
        with distributed.zero3_gathered(self.generator):
            tensors = self.generator.split(self.generator.generate())
        pairs = [(buffers[key], tensors[name]) for name, (buffers, key) in self.targets.items()]
        if not pairs:
            return 0.0, 0.0, 0, 0
        scale = max(float(saved.detach().abs().max()) if saved.numel() else 0.0 for saved, _ in pairs)
        half = any(saved.dtype in (torch.float16, torch.bfloat16) for saved, _ in pairs)
        tolerance = (1e-2 if half else 1e-3) * max(scale, 1e-3)
        worst, beyond, total = 0.0, 0, 0
        for saved, fresh in pairs:
            diff = (saved.double() - fresh.to(saved.device).double()).abs()
            diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
            if diff.numel():
                worst = max(worst, float(diff.max()))
            beyond += int((diff > tolerance).sum())
            total += diff.numel()
        return worst, tolerance, beyond, total

    def warn_if_loaded_disagrees(self, what: str, hint: str) -> None:
        """After a load: warn (once) when the loaded generator does not reproduce the loaded snapshot. ``what`` names
        the snapshot ("snapshot", "prefixes"), ``hint`` says which files and fields to suspect."""
        worst, tolerance, beyond, total = self.disagreement()
        if beyond:
            warnings.warn(
                f"{self.member} adapter '{self.adapter_name}': the loaded {what} and the output regenerated from the "
                f"loaded generator disagree (max |difference| {worst:.3g} in {beyond} of {total} numbers; rounding "
                f"allows {tolerance:.2g}). The adapter's files changed after it was saved: {hint}. Inference uses the "
                f"loaded {what}; training would continue from the generator, whose output differs. Re-save the "
                "adapter from the model that trained it, or restore the original config.",
                UserWarning,
                stacklevel=3,
            )

    # --- health -----------------------------------------------------------------------------------------------
    def report_non_finite(self) -> None:
        """Warn once (until the parameters are finite again) when the generator's parameters are NaN or inf
        (training diverged, or a damaged file was loaded), in every mode: live tensors in training, snapshots in
        eval and under ``no_grad``."""
        named = list(self.generator.named_parameters())
        if not named or any(p.is_meta for _, p in named):
            return
        if bool(torch.isfinite(torch.cat([p.detach().reshape(-1) for _, p in named])).all()):
            self._warned_non_finite = False
            return
        if self._warned_non_finite:
            return
        self._warned_non_finite = True
        bad = [name for name, p in named if not torch.isfinite(p.detach()).all()]
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        warnings.warn(
            f"{self.member} adapter '{self.adapter_name}': the generator's parameters are not finite (NaN or inf in "
            f"{shown}) at step {int(self.generator.step)}, so every generated tensor and the model's outputs are NaN "
            "from here on. If training made them so, lower the learning rate or clip gradients (Trainer: "
            "max_grad_norm) and resume from the last checkpoint saved before this step; if a loaded adapter holds "
            "them, its weights file is damaged: load a good copy.",
            RuntimeWarning,
            stacklevel=4,
        )


def _mark_live_consumed(cache_ref: "weakref.ref[GeneratedCache]", grad: torch.Tensor) -> None:
    # A weak reference: a tensor hook is held by autograd (C++), out of reach of Python's cycle collector, so a
    # strong one would keep a deleted adapter's cache (and generator) alive.
    cache = cache_ref()
    if cache is not None:
        cache._live_consumed = True


def _queue_backward(flat: torch.Tensor, grad: torch.Tensor) -> None:
    """Backpropagate ``grad`` through the generator's graph once the current backward pass ends."""
    torch.autograd.Variable._execution_engine.queue_callback(
        lambda: torch.autograd.backward(flat, grad, retain_graph=True)
    )
