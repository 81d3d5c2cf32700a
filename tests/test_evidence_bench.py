"""Smoke test of benchmarks/evidence.py on a tiny local Llama (never SmolLM2, never the Hub): both regimes' caches
are exact, records carry the documented keys, seeds share one lr and one data set, and the report computes its
summaries and goals from the records."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_lm import make_text_files, make_tiny_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN_KEYS = {"name", "method", "regime", "r", "budget_tokens", "seed", "trainable_params", "eval_ppl", "lr"}


def _load(name, file):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / file)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load("evidence_bench", "evidence.py")


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence")
    model_dir = make_tiny_model_dir(root / "model")
    train, held = make_text_files(root / "text")
    common = ["--smoke", "--model", str(model_dir), "--train-file", str(train), "--eval-file", str(held),
              "--runs-dir", str(root / "runs"), "--output", str(root / "evidence.json"), "--hidden-cache", str(root / "hidden"),
              "--no-progress", "--block-size", "32", "--eval-tokens", "128", "--eval-block-size", "64", "--threads", "1",
              "--top-layers", "1"]
    bench.main(["run", "smoke", *common])
    report = bench.main(["report", *common])
    return root, common, report


def test_records_and_report(smoke):
    root, _, report = smoke
    data = json.loads((root / "evidence.json").read_text())
    assert data["runs"] and all(RUN_KEYS <= set(r) for r in data["runs"])
    assert {r["regime"] for r in data["runs"]} == {"lm_head", "all_linear"}
    assert {r["method"] for r in data["runs"]} >= {"lora", "qpa", "qpa-ablation-const"}
    assert set(data["base"]) == {"lm_head", "all_linear"}
    # the same frozen model scores the same base perplexity whichever part of it is cached
    assert math.isclose(data["base"]["lm_head"]["eval_ppl"], data["base"]["all_linear"]["eval_ppl"], rel_tol=1e-5)
    assert data["base"]["all_linear"]["adapted_layers_from"] == 1
    # each regime's cache was checked against the real layers on a trained adapter, and agreed exactly
    eq = {e["regime"]: e for e in data["equivalence"]}
    assert set(eq) == {"lm_head", "all_linear"}
    assert all(e["loss_rel_diff"] <= 1e-4 and e["ppl_rel_diff"] <= 1e-4 for e in eq.values())
    const = [r for r in data["summary"] if r["name"].endswith("__const")]
    assert const and const[0]["n_seeds"] == 2 and const[0]["seeds"] == [0, 1]
    # the control reused the full config's lr (its seed-0 grid's best)
    full = next(r for r in data["summary"] if r["name"] == const[0]["name"].split("__")[0] and r["regime"] == "lm_head")
    assert const[0]["lr"] == full["lr"]
    assert set(data["plots"]) >= {"evidence_ablations.png", "evidence_all_linear.png", "evidence_lm_head.png"}
    assert all((root / p).is_file() for p in data["plots"])  # named relative to the JSON


def test_tables_render_every_config(bench, smoke):
    root, common, report = smoke
    text = bench.main(["tables", *common])
    for r in report["summary"]:
        assert f"| {r['name'].split('__')[0]} |" in text
    assert "#### lm_head" in text and "#### all_linear" in text and "#### Ablations" in text


def test_docs_tables_are_rendered_from_the_committed_json(bench):
    """docs/quality.md's tables are `python benchmarks/evidence.py tables`, from benchmarks/results/evidence.json."""
    committed = ROOT / "benchmarks" / "results" / "evidence.json"
    doc = (ROOT / "docs" / "quality.md").read_text()
    for line in bench.tables(json.loads(committed.read_text())).splitlines():
        if line.startswith("|"):
            assert line in doc, f"docs/quality.md lacks (or has a stale) row: {line}"


def test_trained_adapters_move_away_from_the_base(smoke):
    _, _, report = smoke
    base = report["base"]["lm_head"]["eval_ppl"]
    lora = next(r for r in report["runs"] if r["name"] == "lora_r4" and r["regime"] == "lm_head")
    assert math.isfinite(lora["eval_ppl"]) and lora["eval_ppl"] != base
    assert lora["train_loss_first"] == pytest.approx(math.log(base), rel=0.2)  # zero delta at step 0: near the base loss


def test_rerun_skips_recorded_runs(bench, smoke):
    root, common, _ = smoke
    before = (root / "runs" / "lm_head.jsonl").read_text()
    bench.main(["run", "smoke", *common])
    assert (root / "runs" / "lm_head.jsonl").read_text() == before


def test_unknown_group_and_missing_grid_are_explained(bench, smoke, tmp_path):
    _, common, _ = smoke
    with pytest.raises(SystemExit, match="unknown group"):
        bench.main(["run", "no_such_group", *common])


def test_goals_are_computed_and_can_fail(bench):
    """The goal logic on hand-made summaries: met, and not met (a test that cannot fail is a defect)."""
    def row(name, method, params, mean, std, regime="all_linear"):
        return {"regime": regime, "name": name, "method": method, "budget_tokens": bench.BASE_BUDGET, "trainable_params": params,
                "eval_ppl_mean": mean, "eval_ppl_std": std, "n_seeds": 3}

    good = [row("lora_r4", "lora", 1000, 40.0, 0.1), row("qpa_5pct", "qpa", 50, 40.3, 0.1),
            row("qpa_5pct__const", "qpa-ablation-const", 50, 41.0, 0.1), row("lora_r1", "lora", 250, 40.5, 0.1)]
    g = bench.goals(good)
    assert g["all_linear_within_1pct_of_lora_r4_at_10pct_params"]["met"] is True
    assert g["circuit_matters_const_control_worse_by_2std"]["all_linear/qpa_5pct"]["met"] is True
    bad = good[:1] + [row("qpa_5pct", "qpa", 50, 41.0, 0.1), row("qpa_5pct__const", "qpa-ablation-const", 50, 41.1, 0.1),
                      row("vblora", "vblora", 40, 40.2, 0.1)]
    g = bench.goals(bad)
    assert g["all_linear_within_1pct_of_lora_r4_at_10pct_params"]["met"] is False
    assert g["all_linear_within_1pct_of_lora_r4_at_10pct_params"]["cheaper_peers_better_beyond_1std"] == ["vblora"]
    assert g["circuit_matters_const_control_worse_by_2std"]["all_linear/qpa_5pct"]["met"] is False
