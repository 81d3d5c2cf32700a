"""The optional fused CPU kernel for RY layers (``csrc/ry_layers.cpp``), compiled on first use.

Applying a layer of RY rotations as Kronecker-block matmuls (the portable torch path in
:mod:`peft_qpa.simulator`) costs 2^(k+1) flops per amplitude per block of k qubits and one pass over the
state per block. The C++ kernel applies a whole layer (and the CNOT-chain gather before it) in SIMD
registers with one FMA per amplitude per qubit and three qubits per load and store: the low qubits in
L1-sized tiles and L2-sized blocks, then one pass over the state per three qubits above. Its adjoint
backward undoes a layer the same way (un-permuting by a gather, not a scatter) with the angle gradients
contracted on the way. Timings against the torch path and the memory-bandwidth bound are in
``docs/performance.md``. Its results equal the torch path's to float rounding, not bit for bit.

It is built with :func:`torch.utils.cpp_extension.load` (a C++ compiler and ninja; the ``ninja``
package is a dependency) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default under
``~/.cache/torch_extensions``): about 30 s once per machine, then loaded in well under a second. Where
it cannot be built the simulator logs one warning and uses the torch path. ``PEFT_QPA_FUSED_KERNEL=0``
turns it off (the torch path everywhere); ``=1`` makes a failed build an error.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "ry_layers.cpp"
ENV_VAR = "PEFT_QPA_FUSED_KERNEL"
# Cache blocking, passed to the compiler: tiles of TILE_BYTES (2^12 float32 or 2^11 float64 amplitudes;
# the qubits below are rotated inside a tile, in L1), blocks of BLOCK_BYTES (8 tiles: three more qubits
# while the block is in L2), the qubits above in passes of three over the state. Chosen by timing
# N = 16 and 20 on one core (tiles of 8, 16 and 32 KiB; blocks of 16, 64 and 128 KiB were within noise;
# one pass for six high qubits at a time, in L2-sized chunks, was slower than two streaming passes).
TILE_BYTES = 16384
BLOCK_BYTES = 131072


def tile_bits(itemsize: int) -> int:
    """Qubits rotated inside one tile for amplitudes of ``itemsize`` bytes (12 float32, 11 float64)."""
    return (TILE_BYTES // itemsize).bit_length() - 1


def block_bits(itemsize: int) -> int:
    """Qubits rotated inside one block (15 float32, 14 float64): the high passes start there."""
    return min((BLOCK_BYTES // itemsize).bit_length() - 1, tile_bits(itemsize) + 3)

# torch's build lock (a file in the build directory) outlives a process killed while compiling, and
# the next build would then wait for it forever. A build takes ~1 minute, so an older lock is stale.
STALE_LOCK_SECONDS = 600

_lock = threading.Lock()
_module = None
_error: str | None = None


def _setting() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "false", "off", "no"):
        return "off"
    if value in ("1", "true", "on", "yes"):
        return "on"
    raise ValueError(f"{ENV_VAR} must be 0 (off), 1 (required) or auto, got {value!r}")


def _cpu_fingerprint() -> str:
    """-march=native code must not be reused on another CPU sharing the cache (e.g. a network home)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha1((platform.machine() + flags).encode()).hexdigest()[:10]


def build_directory() -> Path:
    """Where the kernel is built and cached: ``$TORCH_EXTENSIONS_DIR`` or torch's default root."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    # the interpreter and torch versions fix the extension's ABI, as in torch's own layout
    abi = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return Path(root) / abi / f"peft_qpa_ry_layers_{_cpu_fingerprint()}"


def _remove_stale_lock(directory: Path) -> None:
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_SECONDS:
        logger.warning("peft_qpa: removing a stale build lock of the fused CPU kernel (%s, %.0f s old)", lock, age)
        lock.unlink(missing_ok=True)


def load():
    """The compiled module, or None when it is turned off or cannot be built (the reason: :func:`error`)."""
    global _module, _error
    setting = _setting()
    if setting == "off":
        return None
    if _module is not None:
        return _module
    if _error is not None and setting == "auto":
        return None
    with _lock:
        if _module is None:
            try:
                from torch.utils.cpp_extension import load as load_extension

                directory = build_directory()
                directory.mkdir(parents=True, exist_ok=True)
                _remove_stale_lock(directory)
                if not any(directory.glob("*.so")) and not any(directory.glob("*.pyd")):
                    logger.warning("peft_qpa: building the fused CPU kernel (once per machine, about a minute)")
                _module = load_extension(
                    name=directory.name,
                    build_directory=str(directory),
                    sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-march=native", f"-DQPA_TILE_BYTES={TILE_BYTES}",
                                  f"-DQPA_BLOCK_BYTES={BLOCK_BYTES}"],
                    verbose=False,
                )
                _error = None
            except Exception as exc:  # no compiler, no ninja, unsupported platform...
                _error = f"{type(exc).__name__}: {exc}".strip()[:2000]
                if setting == "on":
                    raise RuntimeError(f"{ENV_VAR}=1 but the fused CPU kernel could not be built: {_error}") from exc
                logger.warning(
                    "peft_qpa: the fused CPU kernel could not be built, so the simulator uses its (slower) "
                    "torch path. Install a C++ compiler and ninja to get it, or set %s=0 to silence this. "
                    "Reason: %s", ENV_VAR, _error.splitlines()[0] if _error else "unknown")
    return _module


def error() -> str | None:
    """Why the last build failed (None if it did not fail or was not attempted)."""
    return _error

