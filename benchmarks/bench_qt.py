"""Quantum-Train (QT) cost per training step as the number of generated weights M grows (10^4 ... 10^7).

The model: an MLP of ``--layers`` bias-free ``nn.Linear(width, width)`` layers (ReLU between), width chosen so
that M = layers * width^2 is close to each ``--sizes`` value; every layer is a QT target
(``QTConfig(target_modules="all-linear"...)``, the default generator: chunk_size 64, depth 8, mapping MLP
[32, 64, 128, 128, 64, 32]). A batch of ``--batch`` random rows, loss = mean square of the output.

Measured per M:

* **step time**: ``loss.backward(); opt.step(); opt.zero_grad()`` with AdamW on the generator's parameters,
  median over ``--steps`` after one warm-up step; the same for the classical network (every weight trainable,
  AdamW) for reference;
* **generation memory**: bytes of the tensors allocated during one training step (forward + backward) at their
  peak, counted exactly by a ``TorchDispatchMode`` that records every new tensor storage an operator creates and
  its release (:class:`PeakMemory`): ``qt_step_peak_bytes``; minus the same count for the base model's own
  forward + backward (input requiring grad, no adapter: ``base_step_peak_bytes``, the activations and their
  gradients). The difference, ``generation_bytes``, is the extra memory of the generation; it is reported over
  4 M (M float32 numbers) as ``generation_over_m_floats``. The model, the adapter's persistent state (the
  snapshot and the offset, 2 x 4 M bytes, reported as ``persistent_adapter_bytes``) and the optimizer state
  existed before the step and are not counted.

Example (the command used for docs/qt.md):

    python benchmarks/bench_qt.py

writes ``benchmarks/results/qt_scaling.json``. ``--sizes 10000 100000 --steps 2`` is a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peft_qpa  # noqa: E402
from peft import get_peft_model  # noqa: E402

DEFAULT_SIZES = [10_000, 100_000, 1_000_000, 10_000_000]


class PeakMemory(TorchDispatchMode):
    """Exact count of the tensor memory allocated while the mode is active: every storage an operator returns that
    none of its inputs had is counted from its creation until it is freed (a weak finalizer on the storage,
    whose Python object torch keeps as long as the storage lives). ``peak`` is the maximum of the running total;
    storages that existed before (the model, the optimizer state) are never counted, views never twice."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or getattr(storage, "_qt_counted", False):
                continue
            storage._qt_counted = True
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, nbytes)
        return out


def mlp(width: int, layers: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(width, width, bias=False))
        if i < layers - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def qt_model(base: nn.Module, **config) -> nn.Module:
    return get_peft_model(copy.deepcopy(base), peft_qpa.QTConfig(target_modules="all-linear", **config))


def step_peak(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes allocated during one forward + backward of ``model`` (see :class:`PeakMemory`)."""
    with PeakMemory() as tracker:
        loss = model(x).pow(2).mean()
        loss.backward()
        del loss
    return tracker.peak


def timed_steps(model: nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step (allocations, lazy init) is a warm-up
            times.append(time.perf_counter() - start)
    return times


def measure(size: int, layers: int, batch: int, steps: int, config: dict) -> dict:
    width = max(1, round(math.sqrt(size / layers)))
    base = mlp(width, layers)
    m_exact = layers * width * width
    x = torch.randn(batch, width)
    model = qt_model(base, **config)
    model.train()
    generator = model.base_model.get_generator()
    trainable = generator.num_trainable()
    persistent = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "qt_delta" in n)
    persistent += generator.offset.numel() * generator.offset.element_size()
    qt_times = timed_steps(model, x, steps)
    model.zero_grad(set_to_none=True)
    model.base_model.generated_cache().drop_live()  # the step below starts as a fresh step does: the last step's generation released
    qt_peak = step_peak(model, x)
    model.base_model.generated_cache().drop_live()
    reference = copy.deepcopy(base).requires_grad_(False)
    x_grad = x.clone().requires_grad_(True)
    base_peak = step_peak(reference, x_grad)
    classical = copy.deepcopy(base).train()
    classical_times = timed_steps(classical, x, steps)
    record = {
        "m_target": size, "m": m_exact, "width": width, "layers": layers, "batch": batch,
        "n_qubits": generator.n_qubits, "chunk_size": generator.chunk_size, "block_rows": generator.block_rows(),
        "trainable_parameters": trainable, "trainable_over_m": trainable / m_exact,
        "qt_step_s_median": statistics.median(qt_times), "qt_step_s_all": qt_times,
        "classical_step_s_median": statistics.median(classical_times), "classical_step_s_all": classical_times,
        "qt_step_peak_bytes": qt_peak, "base_step_peak_bytes": base_peak,
        "generation_bytes": qt_peak - base_peak, "generation_over_m_floats": (qt_peak - base_peak) / (4 * m_exact),
        "persistent_adapter_bytes": persistent,
        "classical_adam_state_bytes": 2 * 4 * m_exact,
    }
    print(
        f"M={m_exact:>10d} N={generator.n_qubits:2d} trainable={trainable:6d} ({trainable / m_exact:.2e} of M) "
        f"QT step {record['qt_step_s_median'] * 1e3:8.1f} ms, classical {record['classical_step_s_median'] * 1e3:7.1f} ms, "
        f"generation memory {record['generation_bytes'] / 2**20:8.1f} MiB = {record['generation_over_m_floats']:.2f} x M floats",
        flush=True,
    )
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="target M values")
    parser.add_argument("--layers", type=int, default=4, help="Linear layers of the MLP")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per M (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "qt_scaling.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = {}
    records = [measure(size, args.layers, args.batch, args.steps, config) for size in args.sizes]
    payload = {
        "meta": {
            "command": "python benchmarks/bench_qt.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": {
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
                "peft_qpa": peft_qpa.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
            "generator": "QTConfig defaults: chunk_size 64, qnn_depth 8, mapping_hidden_sizes [32, 64, 128, 128, 64, 32], statevector",
            "memory_method": (
                "PeakMemory (TorchDispatchMode): peak bytes of the storages created during one forward+backward; "
                "generation_bytes = qt_step_peak_bytes - base_step_peak_bytes (the frozen base model's own "
                "forward+backward with an input requiring grad)"
            ),
            "total_s": None,
        },
        "records": records,
    }
    payload["meta"]["total_s"] = time.perf_counter() - started
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out} in {payload['meta']['total_s']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
