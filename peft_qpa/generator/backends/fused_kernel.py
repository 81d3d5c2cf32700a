"""The optional fused CPU kernel for RY layers (``csrc/ry_layers.cpp``), compiled on first use.

Applying a layer of RY rotations as Kronecker-block matmuls (the portable torch path in
:mod:`peft_qpa.generator.backends.statevector`) costs 2^(k+1) flops per amplitude per block of k qubits and
one pass over the state per block. The C++ kernel applies a whole layer (and the CNOT-chain gather before it) in SIMD
registers with one FMA per amplitude per qubit and three qubits per load and store: the low qubits in
L1-sized tiles and L2-sized blocks, then one pass over the state per three qubits above. Its adjoint
backward undoes a layer the same way (un-permuting by a gather, not a scatter) with the angle gradients
contracted on the way. Timings against the torch path and the memory-bandwidth bound are in
``docs/performance.md``. Its results equal the torch path's to float rounding, not bit for bit.

It is built with :func:`torch.utils.cpp_extension.load` (a C++ compiler and ninja; the ``ninja``
package is a dependency) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default under
``~/.cache/torch_extensions``): about 30 s once per machine, then loaded in well under a second. The
build directory (and the module's name) is keyed by the CPU, the Python and torch versions and a hash
of the source and the compile flags, and the source is compiled from a copy inside it: checkouts and
installed copies of the same source share one build, different sources never overwrite each other's.
Where it cannot be built the simulator logs one warning and uses the torch path.
``PEFT_QPA_FUSED_KERNEL=0`` turns it off (the torch path everywhere); ``=1`` makes a failed build an
error.

Threads: every pass over the state ends in a barrier of its threads, so one thread descheduled by
another busy process (a DataLoader worker, another job) stalls every pass. :func:`threads` therefore
uses one thread for states below ``2^PARALLEL_MIN_QUBITS`` amplitudes, and above that as many threads
as there are idle CPUs, i.e. CPUs that no other process's runnable thread wants (counted at most a
quarter second before the call), at most torch's ``torch.get_num_threads()``, and one where fewer than
two are idle. ``PEFT_QPA_KERNEL_THREADS=<n>`` fixes the count instead (at most torch's). With one
thread the simulator's state-sized elementwise ops on this path run in one thread too (see
:mod:`peft_qpa.generator.backends.statevector`).
"""

from __future__ import annotations

import hashlib
import math
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
THREADS_ENV_VAR = "PEFT_QPA_KERNEL_THREADS"
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


CFLAGS = ("-O3", "-march=native", f"-DQPA_TILE_BYTES={TILE_BYTES}", f"-DQPA_BLOCK_BYTES={BLOCK_BYTES}")

# Below this many qubits the kernel runs in one thread (threads()). On the 2-core machine of
# docs/performance.md a second thread gained nothing at N = 16-20 even on an idle machine (0.92-1.06x)
# and made a call 2.4-9x slower next to one other busy process. From 2^20 amplitudes (4 MiB in float32) the
# state streams from memory, where more cores can add bandwidth on larger machines.
PARALLEL_MIN_QUBITS = 20

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


def source_key(source: bytes | None = None, flags=CFLAGS) -> str:
    """A short hash of the kernel's source (by default :data:`SOURCE`'s bytes) and its compile flags."""
    if source is None:
        source = SOURCE.read_bytes()
    digest = hashlib.sha256(source)
    digest.update("\0".join(flags).encode())
    return digest.hexdigest()[:12]


def build_directory(source: bytes | None = None) -> Path:
    """Where the kernel is built and cached: ``$TORCH_EXTENSIONS_DIR`` or torch's default root, then
    ``<python>_<torch>/peft_qpa_ry_layers_<cpu>_<source_key>``. The directory's name is also the
    module's name, so a different source is a different module and never replaces a loaded one."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    # the interpreter and torch versions fix the extension's ABI, as in torch's own layout
    abi = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    return Path(root) / abi / f"peft_qpa_ry_layers_{_cpu_fingerprint()}_{source_key(source)}"


def _stage_source(directory: Path, source: bytes) -> Path:
    """The copy of the source inside the build directory that is compiled. Compiling the checkout's own
    file would make ninja rebuild whenever another checkout (another path, a newer file) used the
    directory; the copy has one path and is written once, so its time stamp stays older than the build."""
    path = directory / SOURCE.name
    try:
        if path.read_bytes() == source:
            return path
    except OSError:
        pass
    partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    partial.write_bytes(source)
    os.replace(partial, path)
    return path


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

                source = SOURCE.read_bytes()
                directory = build_directory(source)
                directory.mkdir(parents=True, exist_ok=True)
                _remove_stale_lock(directory)
                if not any(directory.glob("*.so")) and not any(directory.glob("*.pyd")):
                    logger.warning("peft_qpa: building the fused CPU kernel (once per machine, about a minute)")
                _module = load_extension(
                    name=directory.name,
                    build_directory=str(directory),
                    sources=[str(_stage_source(directory, source))],
                    extra_cflags=list(CFLAGS),
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


def _runnable_elsewhere() -> int | None:
    """Runnable threads of other processes right now (Linux: the kernel's count of runnable tasks in
    ``/proc/loadavg`` minus this process's own running threads, which include the caller and any of
    torch's threads still spinning after a parallel op), or None where it cannot be told."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.scandir("/proc/self/task"):
            try:
                with open(f"{task.path}/stat") as f:
                    own += f.read().rpartition(")")[2].split(None, 1)[0] == "R"
            except OSError:  # the thread ended meanwhile
                pass
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - max(own, 1))


# A count of idle CPUs is reused for this long (reading /proc costs 0.1-0.3 ms, a kernel call at
# PARALLEL_MIN_QUBITS qubits a few milliseconds; the forward and the backward of a call share one count).
IDLE_CPUS_MAX_AGE = 0.25
_idle_cpus_cache: tuple[float, int] = (-math.inf, 0)


def idle_cpus(max_age: float = IDLE_CPUS_MAX_AGE) -> int:
    """CPUs this process may run on that no other process's runnable thread is using right now (a count
    up to ``max_age`` seconds old). Without ``/proc`` (not Linux) the one-minute load average, which
    counts this process too, stands in."""
    global _idle_cpus_cache
    now = time.monotonic()
    stamp, count = _idle_cpus_cache
    if now - stamp <= max_age:
        return count
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:
        allowed = os.cpu_count() or 1
    total = os.cpu_count() or allowed
    others = _runnable_elsewhere()
    if others is None:
        try:
            others = math.ceil(os.getloadavg()[0])
        except (AttributeError, OSError):
            others = 0
    count = max(0, min(allowed, total - others))
    _idle_cpus_cache = (now, count)
    return count


def threads(n_qubits: int) -> int:
    """Threads for one kernel call on a state of ``n_qubits`` qubits (see the module docstring).

    ``PEFT_QPA_KERNEL_THREADS=<n>`` (n >= 1): n, at most torch's ``torch.get_num_threads()``. Unset or
    ``auto``: 1 below ``PARALLEL_MIN_QUBITS`` qubits or where torch has one thread; else the idle CPUs
    (:func:`idle_cpus`, at most torch's count) when there are at least two, otherwise 1. The results
    do not depend on it (the kernel adds its partial sums in a fixed order)."""
    pool = torch.get_num_threads()
    value = os.environ.get(THREADS_ENV_VAR, "auto").strip().lower()
    if value not in ("", "auto"):
        try:
            count = int(value)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"{THREADS_ENV_VAR} must be a positive number of threads or auto, got {value!r}")
        return min(count, pool)
    if pool <= 1 or n_qubits < PARALLEL_MIN_QUBITS:
        return 1
    free = min(idle_cpus(), pool)
    return free if free >= 2 else 1
