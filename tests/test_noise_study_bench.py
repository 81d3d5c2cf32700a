"""Smoke test of benchmarks/noise_study.py on a tiny local Llama (never SmolLM2, never the Hub): the runs train under a
small fake device's noise with and without GI and readout mitigation, the records carry the documented keys and the
device's error rates, a rerun skips what is recorded, the report and its plot are written, and the plan is in the
documented priority order."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_lm import make_text_files, make_tiny_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = {"design", "condition", "device", "median_2q_error", "median_readout_error", "gi", "mitigation", "seed", "lr",
            "eval_ppl", "wall_s", "s_per_step", "budget_tokens"}


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("noise_study_bench", ROOT / "benchmarks" / "noise_study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(study, tmp_path_factory):
    root = tmp_path_factory.mktemp("noise_study")
    model_dir = make_tiny_model_dir(root / "model")
    train, held = make_text_files(root / "text")
    # the designs' lr grids, as evidence.py records them: the best seed-0 lr is 0.003 for the published design
    grid = root / "evidence_runs"
    grid.mkdir()
    with open(grid / "lm_head.jsonl", "w") as f:
        for lr, ppl in ((1e-3, 48.0), (3e-3, 47.5), (1e-2, 47.9)):
            f.write(json.dumps({"kind": "run", "regime": "lm_head", "name": "pub_affine_shuffled", "budget_tokens":
                                study.BASE_BUDGET, "seed": 0, "lr": lr, "eval_ppl": ppl}) + "\n")
    common = ["--smoke", "--model", str(model_dir), "--train-file", str(train), "--eval-file", str(held),
              "--runs-dir", str(root / "runs"), "--output", str(root / "noise_study.json"), "--hidden-cache", str(root / "hidden"),
              "--evidence-runs", str(grid), "--no-progress", "--block-size", "32", "--eval-tokens", "128",
              "--eval-block-size", "64", "--threads", "1", "--designs", "pub_affine_shuffled"]
    first = study.main(["run", *common, "--max-runs", "2"])
    rest = study.main(["run", *common])
    report = study.main(["report", *common])
    return root, common, first, rest, report


def test_runs_record_the_conditions_and_the_devices_error_rates(smoke):
    root, _, first, rest, _ = smoke
    assert len(first) == 2  # --max-runs
    runs = first + rest
    assert {r["condition"] for r in runs} == {"ideal", "shots", "shots_gi", "fake_perth", "fake_perth_gi",
                                              "fake_perth_mit", "fake_perth_mit_gi"}
    assert all(RUN_KEYS <= set(r) and math.isfinite(r["eval_ppl"]) for r in runs)
    assert {r["lr"] for r in runs} == {3e-3}  # the design's best seed-0 lr from the evidence records
    noisy = [r for r in runs if r["device"]]
    assert all(0 < r["median_2q_error"] < 0.1 and 0 < r["median_readout_error"] < 0.2 for r in noisy)
    assert all(r["config"]["noise_model"] == "fake_perth" and r["config"]["shots_per_state"] == 20 for r in noisy)
    assert all(r["layout_median_2q_error"] > 0 and len(r["physical_qubits"]) == r["n_qubits"] for r in noisy)
    mitigated = {r["condition"] for r in runs if r["mitigation"]}
    assert mitigated == {"fake_perth_mit", "fake_perth_mit_gi"}
    assert all(r["config"].get("readout_mitigation") for r in runs if r["mitigation"])
    ideal = next(r for r in runs if r["condition"] == "ideal")
    assert ideal["backend"] == "statevector" and ideal["device"] is None and "noise_model" not in ideal["config"]
    lines = (root / "runs" / "lm_head.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["kind"] == "run" for line in lines) == len(runs)


def test_rerun_skips_recorded_runs(study, smoke):
    root, common, *_ = smoke
    before = (root / "runs" / "lm_head.jsonl").read_text()
    assert study.main(["run", *common]) == []
    assert (root / "runs" / "lm_head.jsonl").read_text() == before


def test_report_and_plot(smoke):
    root, _, _, _, report = smoke
    data = json.loads((root / "noise_study.json").read_text())
    rows = {r["condition"]: r for r in data["summary"]}
    assert set(rows) >= {"ideal", "shots", "fake_perth", "fake_perth_mit_gi"}
    assert all(r["n_seeds"] == 1 and math.isfinite(r["eval_ppl_mean"]) for r in rows.values())
    assert data["devices"]["fake_perth"]["median_2q_error"] == rows["fake_perth"]["median_2q_error"]
    assert data["plots"] and all((root / p).is_file() for p in data["plots"])  # named relative to the JSON
    paired = rows["fake_perth"]["paired"]
    assert set(paired) == {"ideal", "shots"} and "paired" in rows["ideal"] and "ideal" not in rows["ideal"]["paired"]
    assert paired["ideal"]["diff_mean"] == pytest.approx(rows["fake_perth"]["eval_ppl_mean"] - rows["ideal"]["eval_ppl_mean"])


def test_summary_pairs_each_condition_with_the_references_seed_by_seed(study):
    def run(condition, seed, ppl):
        return {"design": "d", "condition": condition, "budget_tokens": 1, "seed": seed, "eval_ppl": ppl,
                "device": None, "gi": False, "mitigation": False, "backend": "aer_shots", "lr": 1e-3,
                "median_2q_error": None, "median_readout_error": None, "s_per_step": 1.0, "wall_s": 1.0}

    runs = [run("ideal", s, p) for s, p in ((0, 10.0), (1, 11.0), (2, 12.0))]
    runs += [run("shots", 1, 11.5), run("noisy", 2, 12.7), run("noisy", 0, 10.5), run("noisy", 5, 99.0)]
    rows = {r["condition"]: r for r in study.summarize(runs)}
    vs_ideal = rows["noisy"]["paired"]["ideal"]
    assert vs_ideal["seeds"] == [0, 2] and vs_ideal["n_seeds"] == 2  # seed 5 has no ideal run to pair with
    assert vs_ideal["diff_per_seed"] == pytest.approx([0.5, 0.7]) and vs_ideal["diff_mean"] == pytest.approx(0.6)
    assert vs_ideal["diff_std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows["noisy"]["paired"]["shots"]["n_seeds"] == 0  # no seed in common: an empty pairing, not a guess
    assert rows["shots"]["paired"]["ideal"]["diff_mean"] == pytest.approx(0.5)


def test_plan_is_in_priority_order(study):
    devices = ("fake_a", "fake_b")
    jobs = study.plan(study.STUDY_DESIGNS, devices, (0, 1, 2))
    names = [(j.design, j.condition, j.seed) for j in jobs]
    pub, multi = study.STUDY_DESIGNS
    base = ["ideal", "shots", "shots_gi", "fake_a", "fake_a_gi", "fake_b", "fake_b_gi"]
    assert names[: len(base)] == [(pub, c, 0) for c in base]  # published design, seed 0, devices without and with GI
    assert names[len(base): 3 * len(base)] == [(pub, c, s) for s in (1, 2) for c in base]  # then seeds 1 and 2
    assert all(c.split("_")[-1] in ("mit", "gi") and "_mit" in c for _, c, _ in names[3 * len(base): 3 * len(base) + 12])
    assert {d for d, _, _ in names[: len(names) // 2]} == {pub} and {d for d, _, _ in names[len(names) // 2:]} == {multi}
    assert len(set(names)) == len(names) == 2 * 3 * (len(base) + 4)
    conds = study.conditions(devices)
    assert [j.condition for j in study._select(jobs, ["fake_b"], conds)][:2] == ["fake_b", "fake_b_gi"]
    assert {j.design for j in study._select(jobs, [multi], conds)} == {multi}


def test_missing_lr_is_explained(study, smoke, tmp_path):
    _, common, *_ = smoke
    args = [a if a != "--smoke" else "--no-progress" for a in common]
    args[args.index("--evidence-runs") + 1] = str(tmp_path)
    with pytest.raises(SystemExit, match="no seed-0 lr grid"):
        study.main(["run", *args, "--runs-dir", str(tmp_path / "runs")])


def test_time_extrapolates_a_few_steps(study, smoke, tmp_path):
    _, common, *_ = smoke
    rows = study.main(["time", *common, "--runs-dir", str(tmp_path / "runs"), "--only", "fake_perth_gi", "--time-steps", "2"])
    assert [r["condition"] for r in rows] == ["fake_perth_gi"]
    row = rows[0]
    assert row["steps_timed"] == 2 and row["full_steps"] == study.BASE_BUDGET // (4 * 32)
    assert row["estimated_run_s"] >= row["full_steps"] * row["s_per_step"]


def test_sampler_steps_beside_the_cost_estimate(study, smoke, tmp_path):
    import peft_qpa

    if not hasattr(peft_qpa, "use_sampler"):
        pytest.skip("this peft_qpa has no sampler backend")
    _, common, *_ = smoke
    out = study.main(["sampler", *common, "--runs-dir", str(tmp_path / "runs"), "--sampler-device", "fake_perth",
                      "--sampler-qubits", "4", "--sampler-steps", "2"])
    assert out["n_qubits"] == 4 and out["steps"] == 2 and all(t > 0 for t in out["wall_s_per_step"])
    assert out["estimate"]["device_seconds_per_step"] > 0 and out["estimate"]["shots_per_step"] == 20 * 2**4


def test_mitigation_check_measures_what_unmixing_does_to_the_features(study, smoke, tmp_path):
    _, common, *_ = smoke
    out = study.main(["mitigation", *common, "--runs-dir", str(tmp_path / "runs"), "--mitigation-qubits", "4"])
    (row,) = out["devices"]
    assert row["device"] == "fake_perth" and 0 < row["layout_median_readout_error"] < 0.2
    for side in ("raw", "mitigated"):
        m = row[side]
        assert 0 <= m["zero_fraction"] <= 1 and 0 < m["tv_to_ideal"] < 1 and 0 < m["tv_step_to_step"] < 1
        assert m["feature_std"] > 0 and m["feature_rms_step_to_step"] > 0
    assert row["raw"] != row["mitigated"]  # the unmixing changed the probabilities
    lines = (tmp_path / "runs" / "mitigation.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["mitigation_check"]


def test_a_broken_run_is_drawn_at_the_top_edge_with_its_value(study):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.errorbar([1, 2, 3], [47.5, 47.9, 66.7], yerr=[0.1, 0.1, 0.1], marker="o", capsize=3)
    study._cap_off_scale(ax, 49.3)
    low, high = ax.get_ylim()
    assert 47.9 < high < 49.3 and low < 47.5  # the axis stays on the runs that trained
    assert [t.get_text() for t in ax.texts] == ["66.7 ↑"]  # once, not once per error-bar cap
    plt.close(fig)
