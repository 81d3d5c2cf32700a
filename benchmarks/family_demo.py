"""Every member of the family, and its classical twin, through the demo on the real model.

Runs ``peft-qpa --method <m>`` for each method (the demo's defaults: SmolLM2-135M-Instruct, Shakespeare, 60 steps
of 4 x 128 tokens, each method's default targets and learning rate) and writes one record per run to ``benchmarks/results/family_demo.json``: the command, held-out perplexity
before and after, trainable parameters, the classical twin's count and the ratio, qubits, wall time. With
``--collect DIR`` it only gathers the ``summary.json`` of runs already made under ``DIR/<method>/``.

    python benchmarks/family_demo.py                       # all methods, about 20 min on 2 CPU cores
    python benchmarks/family_demo.py --methods qpa lora    # some of them
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft_qpa.apps.methods import METHODS  # noqa: E402

def command(method: str, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "peft_qpa.apps.demo", "--method", method, "--no-progress", "--output-dir", str(out), *extra]


def record(method: str, summary: dict) -> dict:
    adapter = summary["adapter"]
    return {
        "method": method,
        "family": METHODS[method].family,
        "quantum": METHODS[method].quantum,
        "command": summary["command"],
        "target_modules": adapter.get("target_modules"),
        "max_steps": summary["args"]["max_steps"],
        "train_tokens": summary["data"]["train_tokens_seen"],
        "lr": summary["args"]["lr"],
        "perplexity_before": summary["perplexity_before"]["perplexity"],
        "perplexity_after": summary["perplexity_after"]["perplexity"],
        "eval_tokens": summary["perplexity_after"]["n_tokens"],
        "trainable_params": adapter["trainable_params"],
        "classical_params": adapter.get("classical_params"),
        "ratio_to_classical": adapter.get("ratio_to_classical"),
        "n_qubits": adapter.get("n_qubits"),
        "export_max_abs_logit_diff": summary["outputs"].get("max_abs_logit_diff_vs_qpa"),
        "wall_seconds": summary["timings_seconds"]["total"],
        "train_seconds": summary["timings_seconds"]["train"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--collect", type=Path, default=None, help="Only gather DIR/<method>/summary.json of earlier runs.")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "family_demo.json")
    args, extra = p.parse_known_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            out = (args.collect or Path(tmp)) / method
            if args.collect is None:
                subprocess.run(command(method, out, extra), check=True)
            path = out / "summary.json"
            if not path.is_file():
                print(f"{method}: no {path}, skipped", file=sys.stderr)
                continue
            runs.append(record(method, json.loads(path.read_text())))
    result = {
        "benchmark": "family_demo",
        "command": "python benchmarks/family_demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor()},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| method | trainable | classical twin | ratio | qubits | steps | held-out ppl before -> after | wall |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for r in runs:
        ratio = f"{r['ratio_to_classical']:.1%}" if r["ratio_to_classical"] else "—"
        twin = f"{r['classical_params']:,}" if r["classical_params"] else "—"
        print(
            f"| {r['method']} | {r['trainable_params']:,} | {twin} | {ratio} | {r['n_qubits'] or '—'} | {r['max_steps']} | "
            f"{r['perplexity_before']:.3f} -> {r['perplexity_after']:.3f} | {r['wall_seconds']:.0f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
