"""Time one generator-circuit forward+backward per backend and qubit count.

For every backend configuration and every N, builds the QPA circuit (``build_ansatz(N, depth)``), then
times ``probs = backend(angles, step); (probs * w).sum().backward()`` — the circuit part of one training
step — and records how many circuits the backend ran for it. Writes a JSON file and a PNG plot to
``--out`` (default ``benchmarks/results/``).

Example (the command used for docs/backends.md):

    python benchmarks/bench_backends.py --qubits 6 8 10 12 14 --depth 8

A configuration is skipped for larger N once one step took longer than ``--max-step-seconds``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peft_qpa.generator.backends.aer import AerProbabilities  # noqa: E402
from peft_qpa.generator.circuit import build_ansatz  # noqa: E402


def torch_backend(circuit):
    """The exact torch statevector simulator (the default backend)."""
    from peft_qpa.generator.backends.statevector import StatevectorSimulator

    return "torch_statevector", StatevectorSimulator(circuit)


def configurations(args):
    """(label, kind, options) for every backend configuration to time."""
    configs = [("torch statevector", "torch", {}), ("aer_statevector (param-shift)", "aer", {"backend": "aer_statevector"})]
    for c in args.shots_per_state:
        for grad in ("exact", "parameter_shift"):
            configs.append((f"aer_shots c={c:g} ({grad})", "aer",
                            {"backend": "aer_shots", "shots_per_state": c, "shot_gradient": grad}))
    if args.noise:
        configs.append((f"aer_statevector+{args.noise} (density, param-shift)", "aer",
                        {"backend": "aer_statevector", "noise_model": args.noise, "max_qubits": args.density_max_qubits}))
        for c in args.shots_per_state:
            configs.append((f"aer_shots c={c:g}+{args.noise} (exact)", "aer",
                            {"backend": "aer_shots", "shots_per_state": c, "shot_gradient": "exact",
                             "noise_model": args.noise, "max_qubits": args.noise_max_qubits}))
            configs.append((f"aer_shots c={c:g}+{args.noise} (parameter_shift)", "aer",
                            {"backend": "aer_shots", "shots_per_state": c, "shot_gradient": "parameter_shift",
                             "noise_model": args.noise, "max_qubits": args.noise_shift_max_qubits}))
    return configs


def time_one(label, kind, options, n, args):
    circuit = build_ansatz(n, args.depth, args.ansatz)
    n_angles = circuit.num_parameters
    t0 = time.perf_counter()
    shots = None
    if kind == "torch":
        backend_name, sim = torch_backend(circuit)
        run = lambda a, step: sim(a)  # noqa: E731
        circuits = 1
    else:
        backend_name = options["backend"]
        if "shots_per_state" in options:
            shots = int(np.ceil(options["shots_per_state"] * 2**n))
        sim = AerProbabilities(
            circuit, backend=options["backend"], shots=shots,
            shot_gradient=options.get("shot_gradient", "parameter_shift"),
            noise_model=options.get("noise_model"), seed=0,
            max_parallel_threads=args.aer_threads, dtype=torch.float32,
        )
        run = lambda a, step: sim(a, step)[0]  # noqa: E731
        circuits = sim.circuits_per_step(with_gradient=True)
    setup_s = time.perf_counter() - t0

    w = torch.randn(2**n, generator=torch.Generator().manual_seed(0))
    angles = torch.rand(n_angles, generator=torch.Generator().manual_seed(1)) * 2 * np.pi
    times = []
    for step in range(args.warmup + args.repeats):
        a = angles.clone().requires_grad_(True)
        t = time.perf_counter()
        (run(a, step) * w).sum().backward()
        elapsed = time.perf_counter() - t
        if step >= args.warmup:
            times.append(elapsed)
        if elapsed > args.max_step_seconds:
            break
    return {
        "label": label, "backend": backend_name, "n_qubits": n, "depth": args.depth, "ansatz": args.ansatz,
        "n_angles": n_angles, "shots": shots, "shots_per_state": options.get("shots_per_state"),
        "shot_gradient": options.get("shot_gradient") if options.get("backend") == "aer_shots" else None,
        "noise_model": options.get("noise_model"), "circuits_per_step": circuits,
        "setup_s": setup_s, "step_s_min": min(times) if times else elapsed,
        "step_s_median": statistics.median(times) if times else elapsed, "repeats": len(times) or 1,
    }


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(15, 6.5))
    labels = list(dict.fromkeys(r["label"] for r in results))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    for i, label in enumerate(labels):
        rows = sorted((r for r in results if r["label"] == label), key=lambda r: r["n_qubits"])
        ns = [r["n_qubits"] for r in rows]
        style = dict(color=colors[i % 20], linestyle="--" if rows[0]["noise_model"] else "-",
                     marker="s" if rows[0]["circuits_per_step"] > 1 else "o")
        ax_t.plot(ns, [r["step_s_median"] for r in rows], label=label, **style)
        if rows[0]["shots"]:
            ax_s.plot(ns, [r["circuits_per_step"] * r["shots"] for r in rows], label=label, **style)
    ax_t.set(yscale="log", xlabel="qubits N", ylabel="forward+backward time (s, median)",
             title=f"One circuit forward+backward (depth {results[0]['depth']}); dashed = noisy, square = 2P+1 circuits")
    ax_s.set(yscale="log", xlabel="qubits N", ylabel="shots per step (circuits x shots)",
             title="Measurement shots per training step")
    for ax in (ax_t, ax_s):
        ax.grid(True, which="both", alpha=0.3)
    ax_t.title.set_fontsize(9)
    handles, names = ax_t.get_legend_handles_labels()  # every configuration, not only the shot ones
    ax_s.legend(handles, names, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qubits", type=int, nargs="+", default=[6, 8, 10, 12], help="qubit counts N")
    parser.add_argument("--depth", type=int, default=8, help="circuit depth L (the paper uses 8)")
    parser.add_argument("--ansatz", default="ry_cnot", choices=["ry_cnot", "rx_cnot"])
    parser.add_argument("--shots-per-state", type=float, nargs="+", default=[1, 5, 20], help="c in c*2^N shots")
    parser.add_argument("--noise", default="fake_kyiv", help="fake device for the noisy runs ('' to skip)")
    parser.add_argument("--noise-max-qubits", type=int, default=10, help="largest N for noisy shots")
    parser.add_argument("--noise-shift-max-qubits", type=int, default=8,
                        help="largest N for noisy shots with a parameter-shift gradient")
    parser.add_argument("--density-max-qubits", type=int, default=10, help="largest N for exact noisy (density)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-step-seconds", type=float, default=20.0,
                        help="skip larger N for a configuration once one step took longer than this")
    parser.add_argument("--aer-threads", type=int, default=1, help="AerSimulator max_parallel_threads")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="bench_backends", help="output file stem")
    parser.add_argument("--plot-only", metavar="JSON", help="only redraw the plot of an existing results JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        results = json.loads(Path(args.plot_only).read_text())["results"]
        plot(results, Path(args.plot_only).with_suffix(".png"))
        return

    torch.set_num_threads(args.torch_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    t_start = time.perf_counter()
    for label, kind, options in configurations(args):
        for n in sorted(args.qubits):
            if n > options.get("max_qubits", n):
                continue
            row = time_one(label, kind, options, n, args)
            results.append(row)
            print(f"{label:55s} N={n:2d} circuits/step={row['circuits_per_step']:4d} "
                  f"step={row['step_s_median']:.4f}s (setup {row['setup_s']:.2f}s)", flush=True)
            if row["step_s_median"] > args.max_step_seconds:
                print(f"  -> skipping larger N for {label!r}", flush=True)
                break

    import qiskit
    import qiskit_aer

    payload = {
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/bench_backends.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "qiskit": qiskit.__version__,
            "qiskit_aer": qiskit_aer.__version__, "args": vars(args),
            "total_s": time.perf_counter() - t_start,
            "timed": "probs = backend(angles, step); (probs * w).sum().backward(); median over repeats",
        },
        "results": results,
    }
    json_path = out / f"{args.name}.json"
    json_path.write_text(json.dumps(payload, indent=1))
    png_path = out / f"{args.name}.png"
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path} in {payload['meta']['total_s']:.0f} s")


if __name__ == "__main__":
    main()
