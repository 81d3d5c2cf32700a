"""Markdown tables for docs/performance.md, rendered from the benchmarks' JSON (never typed by hand).

    python benchmarks/tables.py [--simulator benchmarks/results/bench_simulator.json]
                                [--step benchmarks/results/bench_step.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("autograd", "adjoint", "fused")


def ms(seconds: float) -> str:
    value = seconds * 1e3
    if value >= 1000:
        return f"{seconds:.3g} s"
    return f"{value:.3g} ms"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.3g} MiB"


def _variant(row: dict) -> str:
    return row.get("variant", row.get("gradient", "autograd"))


def simulator_tables(payload: dict) -> str:
    rows = payload["results"]
    torch_rows = {(r["n_qubits"], r["dtype"], _variant(r)): r for r in rows if r["backend"] == "torch_statevector"}
    aer = {r["n_qubits"]: r for r in rows if r["backend"] == "aer_statevector_param_shift"}
    ns = sorted({key[0] for key in torch_rows})
    dtypes = [d for d in ("float32", "float64") if any(key[1] == d for key in torch_rows)]
    variants = [v for v in VARIANTS if any(key[2] == v for key in torch_rows)]
    meta = payload["meta"]
    row_bw = [r["copy_bandwidth_bytes_per_s"] for r in torch_rows.values() if "copy_bandwidth_bytes_per_s" in r]
    bw_text = (f"Copy bandwidth measured next to each row: {min(row_bw) / 1e9:.1f}–{max(row_bw) / 1e9:.1f} GB/s"
               if row_bw else f"Copy bandwidth {meta['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s")
    out = [bw_text + "; peak matmul rate at the start "
           + ", ".join(f"{d} {r / 1e9:.0f} GFLOP/s" for d, r in meta.get("matmul_flops_per_s", {}).items())
           + f"; load average {meta['machine']['loadavg_start'][0]:.1f} → {meta['machine']['loadavg_end'][0]:.1f}.",
           ""]
    header = ["N"] + [f"{d} {v}" for d in dtypes for v in variants] + ["Aer + param-shift (circuits)"]
    header += [f"speed-up vs Aer, {d} {v}" for d in dtypes for v in ("autograd", "fused") if v in variants]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for n in ns:
        cells = [str(n)]
        cells += [ms(torch_rows[(n, d, v)]["fwd_bwd_s_median"]) if (n, d, v) in torch_rows else "—"
                  for d in dtypes for v in variants]
        a = aer.get(n)
        ran = a is not None and a.get("status") == "run"
        cells.append(f"{ms(a['fwd_bwd_s_median'])} ({a['circuits_per_step']})" if ran else "not run")
        for d in dtypes:
            for v in ("autograd", "fused"):
                if v not in variants:
                    continue
                r = torch_rows.get((n, d, v))
                cells.append(f"{a['fwd_bwd_s_median'] / r['fwd_bwd_s_median']:.0f}x" if ran and r else "—")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "| N | dtype | variant | measured | copy bandwidth | bandwidth bound | **measured / bound** | "
            "compute floor | measured / roofline | implementation passes | peak memory | **/ statevector** |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in [n for n in ns if n >= 16]:
        for d in dtypes:
            for v in variants:
                r = torch_rows.get((n, d, v))
                if r is None:
                    continue
                peak = r.get("peak_memory_bytes")
                over = r.get("peak_memory_over_state")
                out.append(
                    f"| {n} | {d} | {v} | {ms(r['fwd_bwd_s_median'])} | "
                    f"{r.get('copy_bandwidth_bytes_per_s', meta['copy_bandwidth_bytes_per_s']) / 1e9:.1f} GB/s | "
                    f"{ms(r['bound_s'])} | "
                    f"**{r['ratio_to_bound']:.2f}x** | {ms(r['compute_floor_s'])} | {r['ratio_to_roofline']:.2f}x | "
                    f"{ms(r['implementation_bytes_s'])} | {mib(peak) if peak else '—'} | "
                    f"{f'**{over:.1f}x**' if over else '—'} |")
    return "\n".join(out)


def contention_table(payload: dict) -> str:
    """The ``contention`` scenario of bench_simulator.json: quiet vs contended per thread policy."""
    result = payload.get("contention")
    if not result:
        return ""
    if result.get("status") != "run":
        return f"Contention scenario not run: {result.get('reason', 'unknown')}."

    def threads(counts: dict) -> str:
        return " / ".join(f"{k}×{v}" if len(counts) > 1 else k for k, v in counts.items())

    phases = result.get("phases", [])
    loads, idle, others = {}, {}, {}
    for phase in ("quiet", "contended"):
        loads[phase] = [f"{p['loadavg'][0]:.1f}" for p in phases if p["phase"] == phase]
        idle[phase] = sorted({p["idle_cpus"] for p in phases if p["phase"] == phase})
        others[phase] = [p.get("runnable_elsewhere") for p in phases if p["phase"] == phase]
    out = [f"`{result['command']}`: torch threads {result['torch_threads']}, {result['busy_processes']} busy-loop "
           f"processes while contended, {result['rounds']} rounds of quiet then contended, "
           f"{result['repeats_per_phase']} calls per policy, phase and round (medians and means over the rounds' "
           f"{result['repeats_per_phase'] * result['rounds']}); {result['cpu_count']} CPUs "
           f"({result['cpu_model']}). One-minute load average (this run's own processes included) at the start "
           f"of the quiet phases {', '.join(loads['quiet'])}, of the contended ones {', '.join(loads['contended'])}; "
           f"runnable threads of "
           f"other processes at their start: quiet {others['quiet']}, contended {others['contended']}; idle CPUs "
           f"seen by the policy: quiet {idle['quiet']}, contended {idle['contended']}.", "",
           "| N | policy | kernel threads quiet / contended | quiet: median / mean | contended: median / mean | "
           "contended / quiet: medians / **means** | contended / best quiet (medians) | CPU time quiet / contended |",
           "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cpu = (f"{ms(r['quiet_cpu_s_median'])} / {ms(r['contended_cpu_s_median'])}"
               if "quiet_cpu_s_median" in r else "—")
        mean = r.get("contended_over_quiet_mean")
        quiet_mean = ms(r["quiet_s_mean"]) if "quiet_s_mean" in r else "—"
        contended_mean = ms(r["contended_s_mean"]) if "contended_s_mean" in r else "—"
        out.append(f"| {r['n_qubits']} | {r['policy']} | {threads(r['quiet_kernel_threads'])} / "
                   f"{threads(r['contended_kernel_threads'])} | "
                   f"{ms(r['quiet_s_median'])} / {quiet_mean} | {ms(r['contended_s_median'])} / {contended_mean} | "
                   f"{r['contended_over_quiet']:.2f}x / **{f'{mean:.2f}x' if mean else '—'}** | "
                   f"{r['contended_over_best_quiet']:.2f}x | {cpu} |")
    return "\n".join(out)


def step_tables(payload: dict) -> str:
    variants = payload["variants"]
    lora = variants["lora"]
    out = ["| variant | N | chunk | trainable | step (median) | vs LoRA: medians / **paired** | generator fwd+bwd "
           "alone (share of step) | AdamW state | peak memory, first step |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in variants.items():
        if name == "lora":
            out.append(f"| LoRA | — | — | {v['trainable_params']:,} | {v['step_s_median']:.3f} s | — | — | "
                       f"{mib(v['optimizer_state_bytes'])} | {mib(v['peak_first_step_bytes'])} |")
            continue
        gen = v["generator_fwd_bwd_s"]
        peak = v["peak_first_step_bytes"]
        out.append(
            f"| QPA | {v['n_qubits']} | {v['chunk_size']} | {v['trainable_params']:,} | {v['step_s_median']:.3f} s | "
            f"{v['overhead_vs_lora']:+.1%} / **{v.get('overhead_vs_lora_paired', float('nan')):+.1%}** | "
            f"{ms(gen)} ({gen / v['step_s_median']:.1%}) | "
            f"{mib(v['optimizer_state_bytes'])} | {mib(peak)} (**{peak / lora['peak_first_step_bytes'] - 1:+.1%}**) |")
    evaluation = payload.get("eval", {}).get("forward_s_median", {})
    if evaluation:
        out += ["", "| model | forward (median) |", "|---|---|"]
        out += [f"| {name} | {ms(seconds)} |" for name, seconds in evaluation.items()]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--simulator", default=str(RESULTS / "bench_simulator.json"))
    parser.add_argument("--step", default=str(RESULTS / "bench_step.json"))
    args = parser.parse_args(argv)
    text = []
    if Path(args.simulator).exists():
        simulator = json.loads(Path(args.simulator).read_text())
        if simulator.get("results"):
            text += ["## bench_simulator", "", simulator_tables(simulator), ""]
        if simulator.get("contention"):
            text += ["## bench_simulator: CPU contention", "", contention_table(simulator), ""]
    if Path(args.step).exists():
        text += ["## bench_step", "", step_tables(json.loads(Path(args.step).read_text())), ""]
    print("\n".join(text))
    return "\n".join(text)


if __name__ == "__main__":
    main()
