"""The exact torch statevector simulator: forward+backward time, peak memory and a bandwidth bound.

For every N (default 8, 10, ..., 20), dtype and variant (``--variants``, default all three) it builds
``build_ansatz(N, L)`` and times
``p = StatevectorSimulator(circuit, gradient=..., kernel=...)(angles); (p * w).sum().backward()``
(median over ``--repeats`` after ``--warmup``). The variants (see ``peft_qpa/generator/backends/statevector.py``):
``autograd`` (torch ops, autograd keeps the input of every block matmul), ``adjoint`` (torch ops, the
adjoint backward keeps only the final state and reconstructs the earlier ones) and ``fused`` (the
adjoint backward in the compiled CPU kernel of ``peft_qpa/generator/backends/fused_kernel.py``, the simulator's default
on CPU). Aer statevector with its one-job parameter-shift gradient
(``peft_qpa.generator.backends.aer.AerProbabilities``, 2P+1 circuits) is timed the same way up to ``--aer-max-qubits``
(default 20) and while one Aer step stays under ``--aer-stop-seconds``; repeats stop once their total
passes ``--aer-max-seconds`` (a slow N is timed once); larger N are recorded as ``"not run"``
(nothing is extrapolated).

Memory: peak RSS increase of one forward+backward after a warm-up, measured in a fresh subprocess
started with ``MALLOC_MMAP_THRESHOLD_=65536`` (so freed tensors go back to the OS and RSS follows the
live bytes) after resetting the peak with ``/proc/self/clear_refs`` (Linux). Reported in bytes and as
a multiple of the statevector (2^N amplitudes of the simulation dtype). Only states of at least 64 KiB
(N >= 14 in float32) are allocated by mmap; smaller ones come from the heap and their numbers are noise
(the plot leaves them out).

Bandwidth bound: the bytes that the minimal passes over the state must move, divided by a measured
copy bandwidth (``dst.copy_(src)`` of a ``--copy-mib`` tensor, read+write bytes / time), measured
next to every row (the mean of the copies timed just before and just after it: the speed of a shared
machine drifts by tens of percent over a run, and a ratio is only meaningful between numbers taken under
the same conditions). "Minimal"
means: every layer (a rotation on every qubit and the CNOT chain, fused) reads and writes the state
once in the forward pass; the backward pass per layer reads the incoming gradient and the saved layer
input and writes the outgoing gradient (3 transfers); the final squaring costs 2 forward and 3
backward transfers. Total (5L + 5) state-sized transfers, the same bound for every variant. The
benchmark also reports the bytes of the passes each variant actually makes (one read+write per Kronecker
block matmul and per permutation, plus the int64 index reads) against the same bandwidth.

Compute floor: the bandwidth bound assumes the arithmetic is free. It is not on a CPU core, so the
benchmark also measures the core's peak arithmetic rate (a ``--matmul-size`` square ``torch.mm``, the
fastest kernel torch has, in flops per second) and counts the minimal flops of the computation: a
rotation applied to one qubit is 3 flops per amplitude (out = c·a - s·b), so the forward is
3·N·L·2^N; the backward per qubit propagates λ (3), reconstructs or re-reads the state (3) and
contracts the angle gradient <λ, RY'ψ> = ½ <λ, Jψ_out> (2): 8·N·L·2^N; the squaring adds 3·2^N.
Total ``(11·N·L + 3)·2^N`` real flops (×4 for complex amplitudes, RX). ``compute_floor_s`` = minimal
flops / peak rate, ``roofline_s`` = max(bound_s, compute_floor_s): no implementation can beat either.

Example (the command used for docs/performance.md):

    python benchmarks/bench_simulator.py

Threads: ``--threads`` (default 1) sets ``torch.set_num_threads`` and Aer's ``max_parallel_threads``.
On a shared 2-core machine 2 OpenMP threads next to another busy process made small matmuls 100x
slower (spin contention), so 1 is the default; the JSON records threads, load average and CPU model.

CPU contention (``"contention"`` in the JSON; ``--contention-qubits``, default 16 18 20, float32, the
default simulator): forward+backward with torch's default thread count (``--contention-torch-threads``)
for the kernel's thread policies ``auto`` (the default, ``peft_qpa.generator.backends.fused_kernel.threads``), ``pool``
(every pass on torch's whole thread pool, the kernel's behaviour before the policy) and ``1``, each
``quiet`` and ``contended``: next to ``--contention-procs`` (default 2) busy-loop processes. Quiet and
contended phases alternate for ``--contention-rounds``; every phase times every policy
(``--contention-repeats`` calls after a warm-up; each round in another order; medians and means over
the rounds). ``--only contention`` runs just this and merges it into the
existing ``<out>/<name>.json`` (its other rows are kept):

    python benchmarks/bench_simulator.py --only contention
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft_qpa.generator.circuit import build_ansatz  # noqa: E402
from peft_qpa.generator.backends import fused_kernel  # noqa: E402
from peft_qpa.generator.backends.statevector import StatevectorSimulator, _PermutationStage  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
MMAP_THRESHOLD = 65536  # MALLOC_MMAP_THRESHOLD_ of the memory subprocess
DEFAULT_TORCH_THREADS = torch.get_num_threads()  # torch's own default, before --threads changes it


# --------------------------------------------------------------------------------------------------
# Machine description (shared with bench_step.py)
# --------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict:
    return {
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": threads,
        "loadavg_start": list(os.getloadavg()), "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _proc_status(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) * 1024


def peak_rss_delta(fn) -> int | None:
    """Peak RSS increase (bytes) while ``fn()`` runs; None where /proc/self/clear_refs is unavailable.
    Meaningful only with MALLOC_MMAP_THRESHOLD_ set low (see the module docstring)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _proc_status("VmRSS")
    except (OSError, AttributeError):
        return None
    fn()
    return max(0, _proc_status("VmHWM") - before)


def run_memory_probe(script: Path, argv: list[str], timeout: float = 300) -> dict:
    """Run ``script --memory-probe ...`` in a fresh interpreter with a fixed mmap threshold; parse its JSON."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("MEMORY_PROBE "):
            return json.loads(line[len("MEMORY_PROBE "):])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def median_time(fn, repeats: int, warmup: int) -> tuple[float, float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), times


def matmul_flop_rate(size: int, dtype: torch.dtype, repeats: int = 7) -> float:
    """Flops per second of a ``size`` x ``size`` ``torch.mm`` (2·size³ flops): the core's practical peak."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    b, out = a.clone(), torch.empty(size, size, dtype=dtype)
    best = median_time(lambda: torch.mm(a, b, out=out), repeats, 1)[0]
    return 2 * size**3 / best


def copy_bandwidth(mib: int, repeats: int = 7) -> float:
    """Bytes per second of ``dst.copy_(src)`` counting the read and the write."""
    n = mib * 2**20 // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    best = median_time(lambda: dst.copy_(src), repeats, 1)[0]
    return 2 * n * 4 / best


# --------------------------------------------------------------------------------------------------
# Bytes moved
# --------------------------------------------------------------------------------------------------


def minimal_transfers(depth: int) -> int:
    """State-sized transfers of the minimal passes, forward + backward (see the module docstring)."""
    return (2 * depth + 2) + (3 * depth + 3)


def minimal_flops(n_qubits: int, depth: int, is_complex: bool) -> int:
    """Real flops the computation needs at least, forward + backward (see the module docstring)."""
    return (11 * n_qubits * depth + 3) * 2**n_qubits * (4 if is_complex else 1)


VARIANTS = {"autograd": ("autograd", "torch"), "adjoint": ("adjoint", "torch"), "fused": ("adjoint", "fused")}


def implementation_bytes(sim: StatevectorSimulator, amp_bytes: int, variant: str = "autograd") -> int:
    """Bytes the implemented passes move (forward + backward), from the simulator's stages.

    autograd: rotation block matmul y = B x: forward R x + W y; backward R g + W grad_x
    (grad_x = B^T g) and R g + R x (grad_B = g x^T). Permutation: R state + R int64 index + W, both
    ways. A first full layer on |0...0> is the product state: W once, backward R g once. Squaring:
    2 forward, 3 backward.

    adjoint: block forward R x + W y; backward R y + W x (x = B^T y), R λ + W λ_x and R λ + R y
    (grad_B = (λ y^T) B). Permutation: forward once, backward twice (state and λ). First layer: W once,
    backward R λ twice (the column gradients and λ contracted with each column). Squaring: 2 forward;
    backward R g + R ψ + W λ and the in-place doubling R λ + W λ.

    fused: a layer forward is one sweep over tiles and blocks (R x through the gather + W; the qubits
    inside a block are rotated in L1/L2) and one pass (R + W) per three qubits above the block; its
    backward one sweep over the state and λ (R both through the gather of the following permutation,
    W both) and one pass over both per three qubits above the block. The CNOT chain is computed, not
    read; an index permutation is read once forward and twice backward. The first layer: W once forward
    (the product state), its backward like any layer's. The trailing permutation: one gather forward
    (R + W), fused into the last layer's backward. The squaring as for adjoint."""
    size = 2**sim.n_qubits
    state = size * amp_bytes
    index = size * 8
    if variant == "fused":
        passes = 1 + -(-max(sim.n_qubits - fused_kernel.block_bits(amp_bytes), 0) // 3)
        layer = passes * 2 * state + passes * 4 * state
        total = state + layer  # first layer
        for step in sim._fused_steps:
            permutation = step.permutation
            if permutation is not None and not permutation.chain:
                total += 3 * index
            total += 2 * state if step.layer is None else layer
        return total + 7 * state
    adjoint = variant == "adjoint"
    total = 0
    for i, stage in enumerate(sim._stages):
        if isinstance(stage, _PermutationStage):
            total += (3 if adjoint else 2) * (2 * state + index)
        elif i == 0 and stage.full:
            total += (3 if adjoint else 2) * state
        else:
            total += len(stage.blocks) * (8 if adjoint else 6) * state
    # squaring: forward reads the state and writes real probabilities; backward reads their gradient and
    # the state and writes the state's gradient (counted as state-sized transfers)
    total += (7 if adjoint else 5) * state
    return total


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def write_results(payload: dict, out: Path, name: str, plot_fn) -> dict:
    """Write ``<name>.json`` and its plot ``<name>.png`` into ``out``."""
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=1))
    plot_fn(payload, out / f"{name}.png")
    print(f"wrote {json_path} and {name}.png in {payload['meta']['total_s']:.0f} s")
    return payload


def redraw(json_path: str, plot_fn) -> dict:
    """``--plot-only``: redraw ``<name>.png`` beside its JSON from the JSON alone."""
    payload = json.loads(Path(json_path).read_text())
    plot_fn(payload, Path(json_path).with_suffix(".png"))
    return payload


def simulation_case(n: int, dtype_name: str, variant: str, args):
    """(simulator, seeded angles, fwd_bwd) for one benchmark cell: fwd_bwd runs (p · w).sum().backward()."""
    circuit = build_ansatz(n, args.depth, args.ansatz)
    gradient, kernel = VARIANTS[variant]
    sim = StatevectorSimulator(circuit, gradient=gradient, kernel=kernel)
    dtype = DTYPES[dtype_name]
    angles = (torch.rand(circuit.num_parameters, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
              * 2 * math.pi).to(dtype)
    w = torch.randn(2**n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)

    def fwd_bwd():
        a = angles.clone().requires_grad_(True)
        (sim(a) * w).sum().backward()

    return sim, angles, fwd_bwd


def torch_row(n: int, dtype_name: str, variant: str, args) -> dict:
    t0 = time.perf_counter()
    sim, angles, fwd_bwd = simulation_case(n, dtype_name, variant, args)
    setup_s = time.perf_counter() - t0

    def fwd():
        with torch.no_grad():
            sim(angles)

    med, best, times = median_time(fwd_bwd, args.repeats, args.warmup)
    fwd_med = median_time(fwd, args.repeats, 1)[0]
    amp_bytes = angles.element_size() * (2 if sim.is_complex else 1)
    state_bytes = 2**n * amp_bytes
    return {
        "backend": "torch_statevector", "variant": variant, "gradient": VARIANTS[variant][0],
        "kernel": VARIANTS[variant][1], "n_qubits": n, "depth": args.depth,
        "ansatz": args.ansatz, "dtype": dtype_name, "n_angles": sim.num_parameters, "setup_s": setup_s,
        "fwd_bwd_s_median": med, "fwd_bwd_s_min": best, "fwd_bwd_s_all": times, "fwd_s_median": fwd_med,
        "state_bytes": state_bytes, "minimal_bytes": minimal_transfers(args.depth) * state_bytes,
        "implementation_bytes": implementation_bytes(sim, amp_bytes, variant),
        "minimal_flops": minimal_flops(n, args.depth, sim.is_complex),
    }


def aer_row(n: int, args) -> dict:
    from peft_qpa.generator.backends.aer import AerProbabilities

    circuit = build_ansatz(n, args.depth, args.ansatz)
    t0 = time.perf_counter()
    sim = AerProbabilities(circuit, backend="aer_statevector", shots=None, shot_gradient="parameter_shift",
                           noise_model=None, seed=0, max_parallel_threads=args.threads, dtype=torch.float64)
    setup_s = time.perf_counter() - t0
    angles = torch.rand(circuit.num_parameters, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 * math.pi
    w = torch.randn(2**n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def fwd_bwd():
        a = angles.clone().requires_grad_(True)
        (sim(a, 0)[0] * w).sum().backward()

    t = time.perf_counter()
    fwd_bwd()
    first = time.perf_counter() - t
    times = [first] if first > 1.0 else []  # a slow first run is kept as a measurement (no separate warm-up)
    while len(times) < args.aer_repeats and sum(times) < args.aer_max_seconds:
        t = time.perf_counter()
        fwd_bwd()
        times.append(time.perf_counter() - t)
    return {
        "backend": "aer_statevector_param_shift", "n_qubits": n, "depth": args.depth, "ansatz": args.ansatz,
        "dtype": "float64 (Aer double precision)", "n_angles": circuit.num_parameters,
        "circuits_per_step": sim.circuits_per_step(with_gradient=True), "setup_s": setup_s,
        "fwd_bwd_s_median": statistics.median(times), "fwd_bwd_s_min": min(times), "fwd_bwd_s_all": times,
    }


def memory_probe(args) -> dict:
    """(subprocess) peak RSS increase of one forward+backward after a warm-up one, per (N, dtype, variant)."""
    return {f"{n}/{d}/{v}": one_memory_probe(n, d, v, args)
            for n in sorted(args.qubits) for d in args.dtypes for v in args.variants}


def one_memory_probe(n: int, dtype_name: str, variant: str, args) -> int | None:
    sim, _, fwd_bwd = simulation_case(n, dtype_name, variant, args)

    fwd_bwd()
    sim.release_workspace()  # the scratch buffers kept between calls count: allocated again inside
    return peak_rss_delta(fwd_bwd)


# --------------------------------------------------------------------------------------------------
# CPU contention
# --------------------------------------------------------------------------------------------------

BUSY_LOOP = "while True:\n    pass\n"


def start_busy(count: int) -> list[subprocess.Popen]:
    """``count`` processes that each keep one CPU busy until stopped (:func:`stop_busy`)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]
    time.sleep(1.0)  # running, not starting up
    return procs


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()
    if procs:
        time.sleep(fused_kernel.IDLE_CPUS_MAX_AGE)  # no count of idle CPUs from before outlives them


def policy_threads(policy: str, torch_threads: int) -> str | None:
    """The PEFT_QPA_KERNEL_THREADS value of a policy (None: unset, the default ``auto``)."""
    return {"auto": None, "pool": str(torch_threads), "1": "1"}[policy]


def time_policy(fwd_bwd, n: int, policy: str, torch_threads: int, repeats: int) -> dict:
    """Wall and CPU times (this process, all its threads) of fwd+bwd under one policy, and the kernel
    thread counts it chose in the timed calls."""
    previous = os.environ.pop(fused_kernel.THREADS_ENV_VAR, None)
    value = policy_threads(policy, torch_threads)
    if value is not None:
        os.environ[fused_kernel.THREADS_ENV_VAR] = value
    try:
        fwd_bwd()  # warm-up
        times, cpu, chosen = [], [], []
        for _ in range(repeats):
            chosen.append(fused_kernel.threads(n))
            c, t = time.process_time(), time.perf_counter()
            fwd_bwd()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    finally:
        os.environ.pop(fused_kernel.THREADS_ENV_VAR, None)
        if previous is not None:
            os.environ[fused_kernel.THREADS_ENV_VAR] = previous
    return {"times": times, "cpu": cpu, "kernel_threads": chosen}


CONTENTION_POLICIES = ("auto", "pool", "1")


def simulator_only_case(n: int, args):
    """fwd+bwd of the default simulator alone, float32: ``sim(a).backward(w)`` (the gradient of
    (p · w).sum() without the loss's own torch ops, which run on torch's thread pool whatever the
    simulator does)."""
    sim, angles, _ = simulation_case(n, "float32", "fused", args)
    w = torch.randn(2**n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()

    def fwd_bwd():
        sim(angles.clone().requires_grad_(True)).backward(w)

    return fwd_bwd


def contention(args) -> dict:
    """Quiet vs contended fwd+bwd for each thread policy (see the module docstring)."""
    if fused_kernel.load() is None:
        return {"status": "not run", "reason": f"fused kernel unavailable ({fused_kernel.error() or 'turned off'})"}
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.contention_torch_threads)
    samples = {}  # (n, policy, phase) -> {"times": [...], "cpu": [...], "kernel_threads": [...]}
    phases = []
    try:
        cases = {n: simulator_only_case(n, args) for n in args.contention_qubits}
        for round_ in range(args.contention_rounds):
            for phase in ("quiet", "contended"):
                procs = start_busy(args.contention_procs) if phase == "contended" else []
                try:
                    phases.append({"round": round_, "phase": phase, "loadavg": list(os.getloadavg()),
                                   "runnable_elsewhere": fused_kernel._runnable_elsewhere(),
                                   "idle_cpus": fused_kernel.idle_cpus(max_age=0)})
                    # every round another order (what runs right after the busy processes start fares
                    # differently): policies rotated, qubits reversed every other round
                    order = list(cases.items())[::-1] if round_ % 2 else list(cases.items())
                    shift = round_ % len(CONTENTION_POLICIES)
                    policies = CONTENTION_POLICIES[shift:] + CONTENTION_POLICIES[:shift]
                    for n, fwd_bwd in order:
                        for policy in policies:
                            got = time_policy(fwd_bwd, n, policy, args.contention_torch_threads,
                                              args.contention_repeats)
                            slot = samples.setdefault((n, policy, phase), {})
                            for key, values in got.items():
                                slot[key] = slot.get(key, []) + values
                finally:
                    stop_busy(procs)
    finally:
        torch.set_num_threads(threads_before)
    rows = []
    for n in args.contention_qubits:
        quiet_best = min(statistics.median(samples[(n, p, "quiet")]["times"]) for p in CONTENTION_POLICIES)
        for policy in CONTENTION_POLICIES:
            row = {"n_qubits": n, "dtype": "float32", "depth": args.depth, "policy": policy,
                   "env": policy_threads(policy, args.contention_torch_threads)}
            for phase in ("quiet", "contended"):
                got = samples[(n, policy, phase)]
                row[f"{phase}_s_median"] = statistics.median(got["times"])
                row[f"{phase}_s_mean"] = statistics.fmean(got["times"])
                row[f"{phase}_s_all"] = got["times"]
                row[f"{phase}_cpu_s_median"] = statistics.median(got["cpu"])
                row[f"{phase}_kernel_threads"] = {str(k): got["kernel_threads"].count(k)
                                                  for k in sorted(set(got["kernel_threads"]))}
            row["contended_over_quiet"] = row["contended_s_median"] / row["quiet_s_median"]
            # the mean counts every preemption (a call of a few ms either loses a whole time slice of the
            # CPU or none: the median of such calls flips between the two): what a training loop sees
            row["contended_over_quiet_mean"] = row["contended_s_mean"] / row["quiet_s_mean"]
            row["contended_over_best_quiet"] = row["contended_s_median"] / quiet_best
            rows.append(row)
            print(f"contention N={n:2d} {policy:5s} quiet {row['quiet_s_median'] * 1e3:8.2f} ms  contended "
                  f"{row['contended_s_median'] * 1e3:8.2f} ms  x{row['contended_over_quiet']:.2f} "
                  f"(means x{row['contended_over_quiet_mean']:.2f})  CPU time "
                  f"{row['quiet_cpu_s_median'] * 1e3:.1f} / {row['contended_cpu_s_median'] * 1e3:.1f} ms  "
                  f"threads quiet {row['quiet_kernel_threads']} contended {row['contended_kernel_threads']}",
                  flush=True)
    return {
        "status": "run", "rows": rows, "phases": phases,
        "torch_threads": args.contention_torch_threads, "busy_processes": args.contention_procs,
        "repeats_per_phase": args.contention_repeats, "rounds": args.contention_rounds,
        "parallel_min_qubits": fused_kernel.PARALLEL_MIN_QUBITS,
        "policies": {"auto": "peft_qpa.generator.backends.fused_kernel.threads (the default)",
                     "pool": "every pass on torch's whole thread pool (the kernel before the policy)",
                     "1": "one thread"},
        "timed": "StatevectorSimulator(build_ansatz(N, L))(a).backward(w), float32, "
                 "torch.set_num_threads(torch_threads); contended: next to busy_processes busy-loop processes; "
                 "wall time (perf_counter) and this process's CPU time (process_time, all its threads)",
        "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "total_s": time.perf_counter() - t_start,
    }


def merge_contention(args) -> dict:
    """``--only contention``: run the scenario and merge it into ``<out>/<name>.json`` (other rows kept)."""
    path = Path(args.out) / f"{args.name}.json"
    payload = json.loads(path.read_text()) if path.exists() else {"meta": {}, "results": [], "speedups_vs_aer": []}
    result = contention(args)
    result["command"] = "python benchmarks/bench_simulator.py " + " ".join(args.argv)
    payload["contention"] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"merged the contention scenario into {path}")
    return payload


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"autograd": ("o", "-"), "adjoint": ("^", "--"), "fused": ("s", "-")}
    first_variant = next((r.get("variant", r.get("gradient")) for r in rows if r["backend"] == "torch_statevector"), None)
    for (dtype_name, color), variant in [(d, v) for d in (("float32", "C0"), ("float64", "C1")) for v in styles]:
        sel = sorted((r for r in rows if r["backend"] == "torch_statevector" and r["dtype"] == dtype_name
                      and r.get("variant", r.get("gradient")) == variant), key=lambda r: r["n_qubits"])
        if not sel:
            continue
        ns = [r["n_qubits"] for r in sel]
        marker, line = styles[variant]
        width = 2.2 if variant == "fused" else 1.2
        ax_t.plot(ns, [r["fwd_bwd_s_median"] for r in sel], marker + line, color=color, linewidth=width,
                  label=f"{dtype_name} {variant} fwd+bwd")
        if variant == first_variant:
            ax_t.plot(ns, [r["bound_s"] for r in sel], ":", color=color, label=f"bandwidth bound {dtype_name}")
            if all("compute_floor_s" in r for r in sel):
                ax_t.plot(ns, [r["compute_floor_s"] for r in sel], "-.", color=color, linewidth=1,
                          label=f"compute floor {dtype_name}")
        ax_r.plot(ns, [r["ratio_to_bound"] for r in sel], marker + line, color=color, linewidth=width,
                  label=f"time / bound ({dtype_name}, {variant})")
        # below the 64 KiB mmap threshold the allocations come from the heap: RSS does not follow them
        mem = [(r["n_qubits"], r.get("peak_memory_over_state")) for r in sel
               if r.get("peak_memory_over_state") and r["state_bytes"] >= MMAP_THRESHOLD]
        if mem:
            ax_r.plot(*zip(*mem), marker + ":", color=color, markerfacecolor="none",
                      label=f"peak memory / statevector ({dtype_name}, {variant})")
    aer = sorted((r for r in rows if r["backend"] == "aer_statevector_param_shift" and "fwd_bwd_s_median" in r),
                 key=lambda r: r["n_qubits"])
    if aer:
        ax_t.plot([r["n_qubits"] for r in aer], [r["fwd_bwd_s_median"] for r in aer], "s-", color="C3",
                  label="Aer statevector + parameter shift (2P+1 circuits)")
    ax_t.set(yscale="log", xlabel="qubits N", ylabel="seconds (median)",
             title=f"Circuit forward+backward, L={payload['meta']['args']['depth']}, "
                   f"{payload['meta']['machine']['torch_threads']} thread(s)")
    ax_r.axhline(4, color="gray", linestyle="--", linewidth=1, label="4x (target for time / bound)")
    ax_r.set(yscale="log", xlabel="qubits N", ylabel="ratio", title="measured / bandwidth bound; peak memory / state")
    for ax in (ax_t, ax_r):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qubits", type=int, nargs="+", default=list(range(8, 21, 2)))
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--ansatz", default="ry_cnot", choices=["ry_cnot", "rx_cnot"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=list(DTYPES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="autograd / adjoint (torch ops) / fused (compiled CPU kernel, adjoint backward)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--aer-max-qubits", type=int, default=20, help="largest N timed on Aer")
    parser.add_argument("--aer-stop-seconds", type=float, default=600.0,
                        help="larger N are not timed on Aer once one Aer step took longer than this")
    parser.add_argument("--matmul-size", type=int, default=1024, help="square matmul measuring the peak flop rate")
    parser.add_argument("--aer-max-seconds", type=float, default=30.0,
                        help="stop repeating an Aer measurement once the repeats took this many seconds in total")
    parser.add_argument("--aer-repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--copy-mib", type=int, default=256, help="size of the tensor copied to measure bandwidth")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads and Aer max_parallel_threads")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="bench_simulator")
    parser.add_argument("--plot-only", metavar="JSON")
    parser.add_argument("--only", choices=["contention"],
                        help="run only this scenario and merge it into <out>/<name>.json (other rows kept)")
    parser.add_argument("--no-contention", action="store_true", help="skip the contention scenario")
    parser.add_argument("--contention-qubits", type=int, nargs="+", default=[16, 18, 20])
    parser.add_argument("--contention-procs", type=int, default=2, help="busy-loop processes while contended")
    parser.add_argument("--contention-repeats", type=int, default=11)
    parser.add_argument("--contention-rounds", type=int, default=3, help="quiet/contended alternations")
    parser.add_argument("--contention-torch-threads", type=int, default=DEFAULT_TORCH_THREADS,
                        help="torch.set_num_threads during the scenario (default: torch's own default)")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)

    if args.memory_probe:
        print("MEMORY_PROBE " + json.dumps(memory_probe(args)))
        return None
    if args.plot_only:
        return redraw(args.plot_only, plot)
    if args.only == "contention":
        return merge_contention(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = machine_info(args.threads)
    bw = copy_bandwidth(args.copy_mib)
    print(f"copy bandwidth ({args.copy_mib} MiB tensor): {bw / 1e9:.1f} GB/s (read+write)", flush=True)
    flop_rates = {d: matmul_flop_rate(args.matmul_size, DTYPES[d]) for d in args.dtypes}
    print("peak matmul rate: " + ", ".join(f"{d} {r / 1e9:.1f} GFLOP/s" for d, r in flop_rates.items()), flush=True)
    probe = {}
    if "fused" in args.variants and fused_kernel.load() is None:
        print(f"fused kernel unavailable ({fused_kernel.error() or 'turned off'}): not measured", flush=True)
        args.variants = [v for v in args.variants if v != "fused"]
    if not args.no_memory:  # one fresh subprocess measures every (N, dtype, variant), before the timings
        probe = run_memory_probe(Path(__file__), ["--memory-probe", "--qubits", *map(str, args.qubits),
                                                  "--dtypes", *args.dtypes, "--variants", *args.variants,
                                                  "--depth", str(args.depth),
                                                  "--ansatz", args.ansatz, "--threads", str(args.threads)])
        if "error" in probe:
            print("memory probe failed:", probe["error"], flush=True)
    results = []
    # The machine's speed drifts (a shared host): each row's bound uses the copy bandwidth measured just
    # before and just after it (their mean), and its compute floor the matmul rate measured just after.
    bw_before = bw
    for n in sorted(args.qubits):
        for dtype_name in args.dtypes:
            for variant in args.variants:
                row = torch_row(n, dtype_name, variant, args)
                bw_after = copy_bandwidth(args.copy_mib)
                row_bw = row["copy_bandwidth_bytes_per_s"] = (bw_before + bw_after) / 2
                row["matmul_flops_per_s"] = matmul_flop_rate(args.matmul_size, DTYPES[dtype_name])
                bw_before = bw_after
                row["bound_s"] = row["minimal_bytes"] / row_bw
                row["ratio_to_bound"] = row["fwd_bwd_s_median"] / row["bound_s"]
                row["implementation_bytes_s"] = row["implementation_bytes"] / row_bw
                row["compute_floor_s"] = row["minimal_flops"] / row["matmul_flops_per_s"]
                row["roofline_s"] = max(row["bound_s"], row["compute_floor_s"])
                row["ratio_to_roofline"] = row["fwd_bwd_s_median"] / row["roofline_s"]
                if not args.no_memory:
                    row["peak_memory_bytes"] = probe.get(f"{n}/{dtype_name}/{variant}")
                    if row["peak_memory_bytes"]:
                        row["peak_memory_over_state"] = row["peak_memory_bytes"] / row["state_bytes"]
                results.append(row)
                print(f"torch {dtype_name} {variant:8s} N={n:2d} fwd+bwd {row['fwd_bwd_s_median'] * 1e3:9.2f} ms  "
                      f"(fwd {row['fwd_s_median'] * 1e3:8.2f} ms)  bound {row['bound_s'] * 1e3:8.2f} ms  "
                      f"ratio {row['ratio_to_bound']:6.1f}  compute floor {row['compute_floor_s'] * 1e3:8.2f} ms  "
                      f"ratio to roofline {row['ratio_to_roofline']:5.1f}  "
                      f"peak mem / state {row.get('peak_memory_over_state', float('nan')):5.1f}", flush=True)
    aer_stopped = None
    for n in sorted(args.qubits):
        if n > args.aer_max_qubits or aer_stopped is not None:
            reason = (f"N > --aer-max-qubits {args.aer_max_qubits}" if n > args.aer_max_qubits
                      else f"a step at N={aer_stopped} took longer than --aer-stop-seconds {args.aer_stop_seconds}")
            results.append({"backend": "aer_statevector_param_shift", "n_qubits": n, "depth": args.depth,
                            "ansatz": args.ansatz, "status": "not run", "reason": reason})
            print(f"aer N={n:2d} not run ({reason})", flush=True)
            continue
        row = aer_row(n, args)
        row["status"] = "run"
        results.append(row)
        print(f"aer   N={n:2d} fwd+param-shift {row['fwd_bwd_s_median']:.3f} s ({row['circuits_per_step']} circuits)", flush=True)
        if row["fwd_bwd_s_min"] > args.aer_stop_seconds:
            aer_stopped = n

    speedups = []
    for aer in (r for r in results if r["backend"] == "aer_statevector_param_shift" and r["status"] == "run"):
        for r in results:
            if r["backend"] == "torch_statevector" and r["n_qubits"] == aer["n_qubits"]:
                speedups.append({"n_qubits": aer["n_qubits"], "dtype": r["dtype"], "variant": r["variant"],
                                 "speedup_vs_aer": aer["fwd_bwd_s_median"] / r["fwd_bwd_s_median"]})

    contention_result = None if args.no_contention else contention(args)

    import qiskit
    import qiskit_aer

    machine["loadavg_end"] = list(os.getloadavg())
    payload = {
        "meta": {
            "command": "python benchmarks/bench_simulator.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine, "qiskit": qiskit.__version__, "qiskit_aer": qiskit_aer.__version__,
            "args": {k: v for k, v in vars(args).items() if k not in ("plot_only", "memory_probe", "argv")},
            "copy_bandwidth_bytes_per_s": bw,
            "matmul_flops_per_s": flop_rates,
            "fused_kernel": {"available": fused_kernel.load() is not None, "error": fused_kernel.error(),
                             "tile_bytes": fused_kernel.TILE_BYTES, "block_bytes": fused_kernel.BLOCK_BYTES},
            "timed": "sim = StatevectorSimulator(circuit, gradient=row['gradient'], kernel=row['kernel']); "
                     "a = angles.requires_grad_(); (sim(a) * w).sum().backward(); median over repeats",
            "memory": "peak RSS increase during one fwd+bwd after a warm-up, fresh subprocess, "
                      "MALLOC_MMAP_THRESHOLD_=65536, VmHWM reset via /proc/self/clear_refs",
            "bound": "minimal_bytes = (5L+5) * state_bytes (per layer fwd R+W, bwd 3 transfers; squaring 2+3); "
                     "bound_s = minimal_bytes / copy bandwidth (read+write bytes per second of a large copy; "
                     "per row: the mean of the copies measured just before and just after the row)",
            "compute_floor": "minimal_flops = (11 N L + 3) 2^N (x4 complex); compute_floor_s = minimal_flops / "
                             "matmul_flops_per_s (per row: measured just after it); "
                             "roofline_s = max(bound_s, compute_floor_s)",
            "total_s": time.perf_counter() - t_start,
        },
        "results": results,
        "speedups_vs_aer": speedups,
    }
    if contention_result is not None:
        contention_result["command"] = payload["meta"]["command"]
        payload["contention"] = contention_result
    return write_results(payload, out, args.name, plot)


if __name__ == "__main__":
    main()
