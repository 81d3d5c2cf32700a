"""benchmarks/gpu_check.py runs on the CPU (``--device cpu --quick``) and writes the JSON schema that
docs/performance.md ("GPU check") and benchmarks/results/gpu_check.json use, so the script cannot rot between
the (rare) runs on a GPU. Every correctness check must pass on the CPU; no timing is asserted."""

import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

ENV_KEYS = {"device", "quick", "python", "torch", "transformers", "peft", "peft_qpa", "gpu"}
NUMBERS = [
    "train_first_loss_llama", "train_last_loss_llama", "train_first_loss_gpt2", "train_last_loss_gpt2",
    "save_load_max_abs_diff_llama", "save_load_max_abs_diff_gpt2",
    "merge_unmerge_weight_max_abs_diff_llama", "merge_unmerge_weight_max_abs_diff_gpt2",
    "checkpointing_non_reentrant_grad_max_rel_diff", "checkpointing_reentrant_grad_max_rel_diff",
    "timing_lora_step_mean_ms", "timing_qpa_step_mean_ms", "timing_qpa_over_lora", "timing_generator_fwd_bwd_mean_ms",
    "generator_device_vs_cpu_max_abs_llama", "generator_device_vs_cpu_max_abs_gpt2",
]


def _check_schema(results, device):
    assert ENV_KEYS <= results["env"].keys()
    assert results["env"]["device"] == device
    assert set(results["checks"]) == set(gpu_check.CHECK_KEYS)
    assert all(isinstance(v, bool) for v in results["checks"].values())
    for key in NUMBERS:
        assert isinstance(results[key], (int, float)) and math.isfinite(results[key]), key
    assert isinstance(results["timing_qubits_N"], int) and results["timing_qubits_N"] >= 1
    assert results["timing_config"]["targets"] == ["q_proj", "v_proj"]
    assert results["train_steps_llama"] == results["train_steps_gpt2"] >= 2
    assert isinstance(results["all_ok"], bool) and isinstance(results["errors"], dict)


def test_gpu_check_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_QPA_FUSED_KERNEL", "0")  # as on the GPU run; no kernel build in this test
    out = tmp_path / "gpu_check.json"
    status = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["errors"] == {}, results["errors"]
    _check_schema(results, "cpu")
    assert all(results["checks"].values()), results["checks"]  # every correctness check holds on the CPU
    assert results["save_load_max_abs_diff_llama"] == results["save_load_max_abs_diff_gpt2"] == 0.0
    assert results["generator_device_vs_cpu_max_abs_llama"] == 0.0
    assert results["all_ok"] is True and status == 0


def test_committed_gpu_results_have_the_schema():
    """The committed GPU run (docs/performance.md quotes it) has the same keys as the script writes now."""
    path = ROOT / "benchmarks" / "results" / "gpu_check.json"
    if not path.exists():
        pytest.skip("no GPU results committed")
    results = json.loads(path.read_text())
    _check_schema(results, "cuda")
    assert results["env"]["gpu"]
    assert results["timing_config"] == {**gpu_check.FULL_TIMING, **{k: results["timing_config"][k] for k in (
        "targets", "autocast", "base_dtype", "chunk_size", "qnn_depth", "warmup", "timed")}}
