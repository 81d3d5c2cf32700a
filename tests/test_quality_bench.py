"""Smoke test of benchmarks/quality.py on a tiny local Llama (never SmolLM2, never the Hub), and the exactness
of its cached-hidden-state trick."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_lm import make_text_files, make_tiny_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    model_dir = make_tiny_model_dir(root / "model")
    train, held = make_text_files(root / "text")
    return root, model_dir, train, held


def _argv(tiny, out: Path, *extra):
    root, model_dir, train, held = tiny
    return [
        "--quick", "--model", str(model_dir), "--train-file", str(train), "--eval-file", str(held),
        "--output", str(out), "--hidden-cache", str(root / "hidden"), "--no-progress",
        "--steps", "3", "--block-size", "32", "--eval-tokens", "128", "--eval-block-size", "64", "--threads", "1", *extra,
    ]


RUN_KEYS = {"name", "method", "config", "trainable_params", "lr", "train_loss_final", "train_loss_last10_mean",
            "eval_ppl", "wall_s", "losses"}


def test_methods_suite_end_to_end(bench, tiny, tmp_path):
    out = tmp_path / "quality.json"
    bench.main(_argv(tiny, out))
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert data["suite"] == "methods" and data["base"]["ppl"] > 1
    assert {r["method"] for r in data["runs"]} == {"lora", "qpa", "vera", "vblora", "fourierft"}
    for r in data["runs"]:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert r["trainable_params"] > 0 and len(r["losses"]) == 3
        assert math.isfinite(r["train_loss_final"])
    assert set(data["best_per_method"]) == {"lora", "qpa", "vera", "vblora", "fourierft"}
    assert set(data["best_per_config"]) == {r["name"] for r in data["runs"]}
    eq = data["equivalence_check"]
    assert eq["loss_rel_diff"] <= 1e-4 and eq["ppl_rel_diff"] <= 1e-4
    qpa = next(r for r in data["runs"] if r["method"] == "qpa")
    assert qpa["n_qubits"] >= 1
    assert {"lora_r4_ppl", "param_budget_quarter"} <= set(data["goal"])
    # a second invocation reuses the hidden states cached on disk
    out2 = tmp_path / "again.json"
    bench.main(_argv(tiny, out2, "--only", "lora_r4"))
    again = json.loads(out2.read_text())
    assert again["hidden_state_cache"]["from_disk"] is True
    assert again["hidden_state_cache"]["key"] == data["hidden_state_cache"]["key"]
    assert again["runs"][0]["eval_ppl"] == pytest.approx(next(r for r in data["runs"] if r["name"] == "lora_r4")["eval_ppl"], rel=1e-6)


def test_backends_suite_end_to_end(bench, tiny, tmp_path):
    out = tmp_path / "backend_quality.json"
    bench.main(_argv(tiny, out, "--suite", "backends"))
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert [r["name"] for r in data["runs"]] == ["exact", "shots_c1", "shots_c1_gi"]
    assert data["runs"][1]["config"]["backend"] == "aer_shots" and data["runs"][2]["config"]["generative_interpolation"]
    for r in data["runs"]:
        assert RUN_KEYS <= set(r) and math.isfinite(r["eval_ppl"])
    # GI adds its network's parameters
    assert data["runs"][2]["trainable_params"] > data["runs"][1]["trainable_params"] == data["runs"][0]["trainable_params"]
    assert data["equivalence_check"]["ppl_rel_diff"] <= 1e-4


def test_cached_trunk_matches_full_model(bench, tiny):
    """Training loss and perplexity of a trained QPA head: cached final hidden states == full forward."""
    from peft_qpa.apps.evaluation import perplexity
    from transformers import AutoModelForCausalLM

    _, model_dir, _, _ = tiny
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = torch.randint(1, model.config.vocab_size, (6, 20), generator=torch.Generator().manual_seed(3)).tolist()
    rows.append(rows[0][:11])  # a shorter row: padded and masked by perplexity()
    hs = bench.HiddenStates.compute(model.model, rows, batch_size=4, progress=False)
    task = bench.Task(model, None, "tiny", rows[:4], rows[4:], {}, bench.CachedTrunk(model.model.embed_tokens, hs))
    cfg = bench.peft_qpa.QPAConfig(r=4, lora_alpha=8, target_modules=["lm_head"], chunk_size=64, qnn_depth=2, init_weights=False)
    pm = bench.build(task, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # move away from the init
        x = torch.tensor(rows[:4])
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    class Args:
        batch_size, eval_batch_size = 4, 2

    eq = bench.equivalence_check(task, pm, Args)
    assert eq["loss_rel_diff"] <= 1e-5 and eq["ppl_rel_diff"] <= 1e-5
    # and against a model that never saw the cache: the real trunk + the same adapter weights
    full = bench.build(task, cfg)
    full.base_model.model.model = model.model
    full.load_state_dict(pm.state_dict(), strict=False)
    full.eval()
    ref = perplexity(full, task.eval_rows, batch_size=2, progress=False).perplexity
    assert eq["eval_ppl_cached"] == pytest.approx(ref, rel=1e-5)
    with pytest.raises(KeyError):
        pm.eval()
        with torch.no_grad():
            pm(input_ids=torch.tensor([[1, 2, 3]]))


# --------------------------------------------------------------------------------------------------------
# caches: per user, and loaded without unpickling code
# --------------------------------------------------------------------------------------------------------
def _python_files():
    for folder in ("peft_qpa", "benchmarks", "examples"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_torch_load_is_weights_only():
    """A cache file is data: ``torch.load`` must never unpickle arbitrary objects from it (torch < 2.6 did by
    default). Every call in the package, the benchmarks and the examples passes ``weights_only=True``."""
    import ast

    unsafe = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                    unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_no_fixed_paths_in_tmp():
    """Caches go to the per-user asset cache ($PEFT_QPA_CACHE or ~/.cache/peft_qpa), not a fixed /tmp path that
    another user can pre-create (or read)."""
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in _python_files() for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "/tmp" in line]
    assert not offenders, offenders


def test_hidden_state_cache_round_trip_is_weights_only(bench, tiny, tmp_path, monkeypatch):
    """cached_hidden_states reads its file back through torch.load(..., weights_only=True)."""
    root, model_dir, train, held = tiny
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [[1, 2, 3, 4], [5, 6, 7, 8]]
    first, info = bench.cached_hidden_states(model, "tiny", rows, tmp_path / "hidden", progress=False)
    assert not info["from_disk"] and Path(info["path"]).parent == tmp_path / "hidden"
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    again, info = bench.cached_hidden_states(model, "tiny", rows, tmp_path / "hidden", progress=False)
    assert info["from_disk"] and calls == [True]
    assert all(torch.equal(a, b) for a, b in zip(first.states, again.states))
