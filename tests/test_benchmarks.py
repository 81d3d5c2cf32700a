"""Smoke tests of the benchmark scripts: each main() runs with tiny settings into a temporary folder and
writes a JSON with the documented schema and a plot. No timing is asserted."""

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_simulator  # noqa: E402
import bench_step  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _check_machine(meta):
    machine = meta["machine"]
    assert machine["torch_threads"] == 1
    assert len(machine["loadavg_start"]) == 3 and len(machine["loadavg_end"]) == 3
    assert isinstance(machine["cpu_model"], str) and machine["cpu_count"] >= 1
    assert meta["command"].startswith("python benchmarks/")
    assert meta["total_s"] > 0


TINY_CONTENTION = ["--contention-qubits", "8", "--contention-repeats", "2", "--contention-rounds", "1",
                   "--contention-procs", "1", "--contention-torch-threads", "2"]


def _check_contention(result, command_start):
    import torch

    from peft_qpa.generator.backends import fused_kernel

    assert torch.get_num_threads() == 1  # the scenario's torch threads are not left behind
    if fused_kernel.load() is None:
        assert result["status"] == "not run" and "unavailable" in result["reason"]
        return
    assert result["status"] == "run" and result["command"].startswith(command_start)
    assert result["torch_threads"] == 2 and result["busy_processes"] == 1
    assert result["parallel_min_qubits"] == fused_kernel.PARALLEL_MIN_QUBITS
    assert [(p["round"], p["phase"]) for p in result["phases"]] == [(0, "quiet"), (0, "contended")]
    for phase in result["phases"]:
        assert len(phase["loadavg"]) == 3 and phase["idle_cpus"] >= 0
        assert phase["runnable_elsewhere"] is None or phase["runnable_elsewhere"] >= 0
    rows = {r["policy"]: r for r in result["rows"]}
    assert sorted(rows) == ["1", "auto", "pool"]
    quiet_best = min(r["quiet_s_median"] for r in rows.values())
    for policy, r in rows.items():
        assert r["n_qubits"] == 8 and r["dtype"] == "float32"
        for phase in ("quiet", "contended"):
            assert len(r[f"{phase}_s_all"]) == 2 and r[f"{phase}_s_median"] > 0 and r[f"{phase}_cpu_s_median"] > 0
            assert sum(r[f"{phase}_kernel_threads"].values()) == 2
        assert r["contended_over_quiet"] == pytest.approx(r["contended_s_median"] / r["quiet_s_median"])
        assert r["contended_s_mean"] == pytest.approx(sum(r["contended_s_all"]) / 2)
        assert r["contended_over_quiet_mean"] == pytest.approx(r["contended_s_mean"] / r["quiet_s_mean"])
        assert r["contended_over_best_quiet"] == pytest.approx(r["contended_s_median"] / quiet_best)
    # the policies: auto takes one thread below PARALLEL_MIN_QUBITS, pool torch's whole pool (two here)
    assert rows["auto"]["env"] is None and rows["1"]["env"] == "1" and rows["pool"]["env"] == "2"
    for phase in ("quiet", "contended"):
        assert rows["auto"][f"{phase}_kernel_threads"] == {"1": 2}
        assert rows["1"][f"{phase}_kernel_threads"] == {"1": 2}
        assert rows["pool"][f"{phase}_kernel_threads"] == {"2": 2}
    assert os.environ.get(fused_kernel.THREADS_ENV_VAR) is None  # the policies' setting is not left behind


def test_bench_simulator_schema(tmp_path):
    bench_simulator.main(["--qubits", "3", "4", "--dtypes", "float32", "--repeats", "1", "--warmup", "0",
                          "--aer-max-qubits", "3", "--aer-repeats", "1", "--copy-mib", "4", "--no-memory",
                          *TINY_CONTENTION, "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bench_simulator.json").read_text())
    assert (tmp_path / "bench_simulator.png").stat().st_size > 0
    meta = payload["meta"]
    _check_machine(meta)
    assert meta["copy_bandwidth_bytes_per_s"] > 0
    rows = payload["results"]
    torch_rows = [r for r in rows if r["backend"] == "torch_statevector"]
    from peft_qpa.generator.backends import fused_kernel

    variants = ["autograd", "adjoint"] + (["fused"] if fused_kernel.load() is not None else [])
    assert meta["fused_kernel"]["available"] == ("fused" in variants)
    for variant in variants:  # every variant is measured by default
        assert [r["n_qubits"] for r in torch_rows if r["variant"] == variant] == [3, 4]
    assert len(torch_rows) == 2 * len(variants)
    for r in torch_rows:
        assert r["dtype"] == "float32" and r["depth"] == 8
        assert r["fwd_bwd_s_median"] > 0 and r["fwd_s_median"] > 0
        assert r["state_bytes"] == 4 * 2 ** r["n_qubits"]
        assert r["minimal_bytes"] == (5 * 8 + 5) * r["state_bytes"]
        assert r["implementation_bytes"] >= r["minimal_bytes"]
        assert r["ratio_to_bound"] == pytest.approx(r["fwd_bwd_s_median"] / r["bound_s"])
        # the bound uses the bandwidth measured next to the row
        assert r["bound_s"] == pytest.approx(r["minimal_bytes"] / r["copy_bandwidth_bytes_per_s"])
        n = r["n_qubits"]
        assert r["minimal_flops"] == (11 * n * 8 + 3) * 2**n
        assert r["compute_floor_s"] == pytest.approx(r["minimal_flops"] / r["matmul_flops_per_s"])
        assert r["roofline_s"] == max(r["bound_s"], r["compute_floor_s"])
        assert r["ratio_to_roofline"] <= r["ratio_to_bound"]
    aer = {r["n_qubits"]: r for r in rows if r["backend"] == "aer_statevector_param_shift"}
    assert aer[3]["status"] == "run" and aer[3]["circuits_per_step"] == 2 * 8 * 3 + 1
    assert aer[4]["status"] == "not run" and "fwd_bwd_s_median" not in aer[4]  # nothing extrapolated
    assert sorted((s["n_qubits"], s["variant"]) for s in payload["speedups_vs_aer"]) == sorted((3, v) for v in variants)
    _check_contention(payload["contention"], "python benchmarks/bench_simulator.py --qubits 3 4")
    # the plot can be redrawn from the JSON alone
    bench_simulator.main(["--plot-only", str(tmp_path / "bench_simulator.json")])
    import tables

    text = tables.main(["--simulator", str(tmp_path / "bench_simulator.json"), "--step", str(tmp_path / "none")])
    assert "| N | policy |" in text or "Contention scenario not run" in text


def test_bench_simulator_only_contention_merges(tmp_path):
    """``--only contention`` runs just the scenario and replaces only the ``contention`` entry of the
    existing JSON: the other rows stay as they were."""
    existing = {"meta": {"command": "python benchmarks/bench_simulator.py", "total_s": 1.0},
                "results": [{"backend": "torch_statevector", "n_qubits": 20, "fwd_bwd_s_median": 0.04}],
                "speedups_vs_aer": [{"n_qubits": 20, "speedup_vs_aer": 9893.0}],
                "contention": {"status": "run", "rows": []}}
    path = tmp_path / "bench_simulator.json"
    path.write_text(json.dumps(existing))
    bench_simulator.main(["--only", "contention", *TINY_CONTENTION, "--out", str(tmp_path)])
    payload = json.loads(path.read_text())
    assert {k: payload[k] for k in ("meta", "results", "speedups_vs_aer")} == \
        {k: existing[k] for k in ("meta", "results", "speedups_vs_aer")}
    _check_contention(payload["contention"], "python benchmarks/bench_simulator.py --only contention")


def test_peak_rss_delta_sees_an_allocation():
    import torch

    held = []
    delta = bench_simulator.peak_rss_delta(lambda: held.append(torch.ones(8 * 2**20)))  # 32 MiB, touched
    if delta is None:
        pytest.skip("/proc/self/clear_refs not available")
    assert delta >= 16 * 2**20


def test_bench_step_schema(tmp_path):
    bench_step.main(["--layers", "1", "--chunk-sizes", "64", "--seq", "8", "--steps", "1", "--warmup", "0",
                     "--eval-repeats", "1", "--no-memory", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "bench_step.json").read_text())
    assert (tmp_path / "bench_step.png").stat().st_size > 0
    _check_machine(payload["meta"])
    assert payload["meta"]["model"]["hidden_size"] == 576 and payload["meta"]["model"]["num_hidden_layers"] == 1
    variants = payload["variants"]
    assert list(variants) == ["lora", "qpa_c64"]
    lora, qpa = variants["lora"], variants["qpa_c64"]
    for v in (lora, qpa):
        assert v["step_s_median"] > 0 and v["optimizer_state_bytes"] > 0 and v["trainable_params"] > 0
    assert qpa["generated_numbers_M"] == lora["trainable_params"]
    assert qpa["chunk_size"] == 64 and qpa["n_qubits"] >= 1
    assert "overhead_vs_lora" in qpa and qpa["generator_fwd_bwd_s"] > 0
    ratios = [q / l for q, l in zip(qpa["step_s_all"], payload["variants"]["lora"]["step_s_all"])]
    assert qpa["overhead_vs_lora_paired"] == pytest.approx(sorted(ratios)[len(ratios) // 2] - 1)
    profile = payload["profile"]
    assert profile["variant"] == "qpa_c64" and profile["top_ops"] and profile["generator_forward_cpu_s"] > 0
    forward = payload["eval"]["forward_s_median"]
    for key in ("base", "lora (adapter)", "qpa_c64 (adapter)", "lora merged", "qpa_c64 merged", "base (merged round)"):
        assert forward[key] > 0
    assert set(payload["eval"]["merged_vs_unmerged_logits_max_abs_diff"]) == {"lora", "qpa_c64"}
