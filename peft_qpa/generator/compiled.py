"""Optional ``torch.compile`` of the generator's mapping MLP: off by default, turned on by an environment variable.

    PEFT_QPA_COMPILE_MAPPING=1           # torch.compile(backend="inductor") of the MLP mapping's forward
    PEFT_QPA_COMPILE_MAPPING=aot_eager   # any other value: the torch.compile backend of that name
    PEFT_QPA_COMPILE_MAPPING=0           # (or unset) off: the eager MLP, as always

**What is compiled, and why only that.** The mapping MLP (``MLPMapping``: Linear layers and activations) is plain
modules and tensors, which ``torch.compile`` handles whole (``dynamic=True``: one graph for every block size of
``blockwise.py``). The rest of the generator is not compiled: the circuit's adjoint gradient is an
``autograd.Function`` holding the simulator and the final state on its context, the blockwise path another one
holding a weak reference to the generator, and the fused CPU kernel runs numpy and a C++ extension; each would be a
graph break or worse. The compiled forward runs everywhere the eager one did: the whole-mapping path under
``torch.utils.checkpoint`` (its recomputation calls it again), the blockwise forward and backward, under an outer
autocast (the generator turns autocast off around the mapping), with reentrant or non-reentrant gradient
checkpointing of the model and with gradient accumulation (the compiled graph returns fresh tensors: no static
buffers, unlike CUDA graphs, which is why ``mode="reduce-overhead"`` is not used).

**Falling back.** The first generation on a device and dtype compiles the mapping and runs it forward and backward
on three probe rows, outside any checkpointed region; if that raises (no C++ compiler or Triton, an unsupported
Python, a backend error) one ``RuntimeWarning`` says so and the eager mapping runs from then on, in this process.

**Status.** Off by default: the values match the eager mapping to float rounding (tests/test_launches.py, CPU), but
its speed has not been measured on a GPU yet (docs/performance.md, "Operator launches").
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

ENV_VAR = "PEFT_QPA_COMPILE_MAPPING"

_compiled: dict = {}  # (class, backend) -> the compiled function (module, rows) -> chunks
_ready: set = set()  # (class, backend, device, dtype) tried once and working
_failed: dict = {"message": None}  # the first failure: then eager for the rest of the process


def backend() -> Optional[str]:
    """The torch.compile backend that ``PEFT_QPA_COMPILE_MAPPING`` asks for, or None (off)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in ("", "0", "false", "off", "no"):
        return None
    return "inductor" if value.lower() in ("1", "true", "on", "yes") else value


def failure() -> Optional[str]:
    """Why compiling failed in this process (then the eager mapping runs), or None."""
    return _failed["message"]


def reset() -> None:
    """Forget compiled functions and failures (tests)."""
    _compiled.clear()
    _ready.clear()
    _failed["message"] = None


def _function(cls: type, eager: Callable, name: str) -> Callable:
    key = (cls, name)
    if key not in _compiled:
        _compiled[key] = torch.compile(lambda module, rows: eager(module, rows), backend=name, dynamic=True)
    return _compiled[key]


def prepare(module: torch.nn.Module, eager: Callable, in_features: int, device, dtype) -> None:
    """Compile ``eager`` (``(module, rows) -> chunks``) for ``module`` on ``device``/``dtype`` if the environment asks
    for it, and try it forward and backward on three probe rows; on failure warn once and stay eager. Call outside
    any checkpointed region (the probe's backward must not run inside one)."""
    name = backend()
    if name is None or _failed["message"] is not None:
        return
    key = (type(module), name, str(device), dtype)
    if key in _ready:
        return
    try:
        function = _function(type(module), eager, name)
        params = [p for p in module.parameters() if p.requires_grad]
        with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
            probe = torch.linspace(-1, 1, 3 * in_features, device=device, dtype=dtype).view(3, in_features)
            probe.requires_grad_(True)
            out = function(module, probe)
            torch.autograd.grad(out.square().sum(), [probe, *params])
        _ready.add(key)
    except Exception as exc:  # any failure of the optional path: the eager one always works
        _failed["message"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        warnings.warn(f"{ENV_VAR}={os.environ.get(ENV_VAR)}: torch.compile of the generator's mapping failed "
                      f"({_failed['message'][:300]}); the eager mapping runs instead.", RuntimeWarning, stacklevel=3)


def call(module: torch.nn.Module, rows: torch.Tensor, eager: Callable) -> torch.Tensor:
    """``eager(module, rows)``, through the compiled function where :func:`prepare` made it ready."""
    name = backend()
    if name is not None and _failed["message"] is None and (type(module), name, str(rows.device), rows.dtype) in _ready:
        return _compiled[(type(module), name)](module, rows)
    return eager(module, rows)
