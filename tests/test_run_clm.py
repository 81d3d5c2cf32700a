"""examples/run_clm_qpa.py: a few Trainer steps on a tiny local model, resume, and 2 CPU processes."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "run_clm_qpa.py"

from peft_qpa.apps.demo import DEFAULT_LR  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_lm_files):
    return tiny_lm_files


def _env(tmp_path):
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PEFT_QPA_CACHE=str(tmp_path / "cache"), TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
    )
    return env


def _args(tiny, out, *extra, lr="1e-2", model=None):
    model_dir, train, held = tiny
    return [
        "--model_name_or_path", str(model or model_dir), "--train_file", str(train), "--validation_file", str(held),
        "--block_size", "32", "--output_dir", str(out), "--per_device_train_batch_size", "2",
        *(["--learning_rate", lr] if lr is not None else []),
        "--chunk_size", "16", "--qnn_depth", "2", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
        "--seed", "0", "--save_strategy", "steps", *extra,
    ]


def _run(cmd, tmp_path, timeout=120):
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _losses(out: Path):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def test_train_eval_and_resume_gives_same_continuation(tiny, tmp_path):
    full = tmp_path / "full"
    proc = _run([sys.executable, str(SCRIPT), *_args(tiny, full, "--do_train", "--do_eval", "--max_steps", "4", "--save_steps", "2")], tmp_path)
    results = json.loads((full / "qpa_results.json").read_text())
    # base and final perplexity on the console, not only in the JSON
    assert f"base perplexity (before training): {results['base_perplexity']:.3f}" in proc.stdout
    assert f"final perplexity: {results['eval_perplexity']:.3f}" in proc.stdout
    assert results["learning_rate"] == 1e-2  # given on the command line
    assert results["method"] == "qpa" and results["n_qubits"] >= 1
    assert results["eval_tokens"] > 0 and results["base_tokens"] == results["eval_tokens"]
    assert 1.0 < results["eval_perplexity"] < 1e4
    assert (full / "adapter_config.json").is_file() and (full / "checkpoint-2").is_dir()
    assert json.loads((full / "lora_export" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # resume from step 2 in a fresh directory: steps 3-4 and the final adapter are identical
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    _run(
        [sys.executable, str(SCRIPT), *_args(tiny, resumed, "--do_train", "--max_steps", "4", "--save_steps", "2",
                                               "--resume_from_checkpoint", "true")],
        tmp_path,
    )
    assert _losses(resumed) == pytest.approx(_losses(full), rel=1e-6)
    from safetensors.torch import load_file

    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(resumed / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert (a[key].float() - b[key].float()).abs().max() <= 1e-6, key


def test_lora_baseline(tiny, tmp_path):
    out = tmp_path / "lora"
    _run([sys.executable, str(SCRIPT), *_args(tiny, out, "--do_train", "--do_eval", "--max_steps", "2", "--method", "lora",
                                               "--save_steps", "100", lr=None)], tmp_path)
    # the results file is named after the method
    assert not (out / "qpa_results.json").exists()
    results = json.loads((out / "lora_results.json").read_text())
    assert results["method"] == "lora" and "n_qubits" not in results
    assert results["eval_perplexity"] > 1.0
    # no --learning_rate: the demo's LoRA default, not TrainingArguments' 5e-5
    assert results["learning_rate"] == DEFAULT_LR["lora"] == 3e-3


def test_gguf_model_trains_and_saves(tiny, tmp_path):
    """The default model is a GGUF file: the script must de-quantize it (the demo's loader) so that the Trainer
    accepts it, and save the adapter. A tiny Q8_0 GGUF stands in for SmolLM2; no --learning_rate: QPA's default."""
    from tiny_gguf import make_tiny_gguf

    gguf = make_tiny_gguf(tmp_path / "gguf" / "tiny.gguf")
    out = tmp_path / "from_gguf"
    proc = _run([sys.executable, str(SCRIPT), *_args(tiny, out, "--do_train", "--do_eval", "--max_steps", "2",
                                                      "--save_steps", "100", lr=None, model=gguf)], tmp_path)
    results = json.loads((out / "qpa_results.json").read_text())
    assert results["learning_rate"] == DEFAULT_LR["qpa"] == 1e-2
    assert 1.0 < results["eval_perplexity"] < 1e4 and results["base_tokens"] == results["eval_tokens"] > 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "lora_export" / "adapter_config.json").is_file()
    assert "final perplexity" in proc.stdout
    assert "pin_memory" not in proc.stderr  # no memory pinning asked for on a CPU-only machine


def _load_script():
    if "run_clm_qpa" not in sys.modules:
        spec = importlib.util.spec_from_file_location("run_clm_qpa", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["run_clm_qpa"] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return sys.modules["run_clm_qpa"]


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--max_steps", "0", "an integer >= 1"),
        ("--per_device_train_batch_size", "0", "an integer >= 1"),
        ("--per_device_eval_batch_size", "0", "an integer >= 1"),
        ("--learning_rate", "0", "a number > 0"),
        ("--block_size", "1", "an integer >= 2"),
        ("--chunk_size", "0", "an integer >= 1"),
        ("--qnn_depth", "0", "an integer >= 1"),
        ("--r", "0", "an integer >= 1"),
        ("--lora_alpha", "0", "a number > 0"),
        ("--lora_dropout", "1", "a number in [0, 1)"),
        ("--max_eval_samples", "0", "an integer >= 1"),
        ("--max_train_samples", "0", "an integer >= 1"),
        ("--eval_plays", "0", "an integer >= 1"),
        ("--eval_stride", "0", "an integer >= 1"),
        ("--mapping_hidden_sizes", "32,0", "comma-separated integers >= 1"),
        ("--shots_per_state", "0", "an integer >= 1"),
    ],
)
def test_numeric_flags_are_validated(flag, value, allowed, tmp_path, capsys):
    script = _load_script()
    argv = ["--output_dir", str(tmp_path / "out"), "--do_train", flag, value]
    if flag == "--shots_per_state":
        argv += ["--backend", "aer_shots"]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be {allowed}" in err, err[-500:]


def _free_port() -> int:
    """A TCP port nothing listens on now (a fixed one can be held by another job; gloo then aborts the ranks)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(tiny, tmp_path):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate CLI not on PATH")
    out = tmp_path / "ddp"
    # accelerate's `--cpu --num_processes 2` starts a single process unless MPI is set up; `--multi_gpu` spawns
    # the processes through torchrun and the script switches them to CPU DDP (gloo) when there is no GPU.
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()), str(SCRIPT),
        *_args(tiny, out, "--do_train", "--do_eval", "--max_steps", "2", "--save_steps", "100", "--per_device_eval_batch_size", "2"),
    ]
    _run(cmd, tmp_path)
    results = json.loads((out / "qpa_results.json").read_text())
    assert results["world_size"] == 2 and results["parallel_mode"] == "distributed"
    # the distributed perplexity (windows sharded, sums all-reduced) covers the whole held-out set
    single = tmp_path / "single"
    _run([sys.executable, str(SCRIPT), *_args(tiny, single, "--do_eval", "--per_device_eval_batch_size", "2")], tmp_path)
    one = json.loads((single / "qpa_results.json").read_text())
    assert one["eval_tokens"] == results["eval_tokens"]
    # 2 processes x 2 per device: 4 blocks per step, i.e. 8 blocks seen in 2 steps
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["train_batch_size"] == 2


def test_full_set_evaluation_cost_is_announced(tiny, tmp_path, monkeypatch, caplog):
    """--do_eval scores every held-out block (twice with --do_train); past EVAL_TOKENS_WARN tokens on a CPU the
    script says so and names --max_eval_samples (lowered here so that the tiny text crosses it)."""
    import logging

    script = _load_script()
    monkeypatch.setattr(script, "EVAL_TOKENS_WARN", 16)
    monkeypatch.setenv("PEFT_QPA_CACHE", str(tmp_path / "cache"))
    # --log_level: the tests' environment sets TRANSFORMERS_VERBOSITY=error, which would hide the warning
    argv = _args(tiny, tmp_path / "eval_only", "--do_eval", "--log_level", "warning")
    with caplog.at_level(logging.WARNING):
        results = script.main(argv)
    warned = [r.getMessage() for r in caplog.records if "--max_eval_samples" in r.getMessage()]
    assert len(warned) == 1 and f"held-out tokens ({results['eval_samples']} blocks of 32) once" in warned[0], warned


@pytest.fixture(scope="module")
def base_perplexity(tiny, tmp_path_factory):
    """The base model's held-out perplexity as the LoRA baseline reports it (LoRA starts at the base model)."""
    tmp_path = tmp_path_factory.mktemp("base")
    out = tmp_path / "lora"
    _run([sys.executable, str(SCRIPT), *_args(tiny, out, "--do_train", "--do_eval", "--max_steps", "1", "--method", "lora",
                                               "--save_steps", "100")], tmp_path)
    return json.loads((out / "lora_results.json").read_text())["base_perplexity"]


@pytest.mark.parametrize("method", ["qpa-dora", "qpa-bottleneck", "bottleneck", "qpa-prefix", "qt"])
def test_every_member_trains(tiny, tmp_path, method, base_perplexity):
    """Each member of the family (and the bottleneck baseline) through the Trainer, with the method's default
    targets and learning rate; QPA members with a classical twin in plain PEFT are exported."""
    out = tmp_path / method
    _run([sys.executable, str(SCRIPT), *_args(tiny, out, "--do_train", "--do_eval", "--max_steps", "2", "--method", method,
                                               "--save_steps", "100", lr=None)], tmp_path)
    results = json.loads((out / f"{method}_results.json").read_text())
    assert results["method"] == method and results["eval_perplexity"] > 1.0
    assert results["learning_rate"] == DEFAULT_LR[method]
    # "base" is the base model's perplexity, also for prefix tuning, which does not start at the base model
    assert results["base_perplexity"] == pytest.approx(base_perplexity, rel=1e-6)
    quantum = method != "bottleneck"
    assert ("n_qubits" in results) is quantum
    if quantum:
        assert results["ratio_to_classical"] == results["trainable_params"] / results["classical_params"]
    twin = {"qpa-dora": "lora_export", "qpa-prefix": "prefix_export"}.get(method)
    if twin:
        peft_type = json.loads((out / twin / "adapter_config.json").read_text())["peft_type"]
        assert peft_type == ("LORA" if method == "qpa-dora" else "PREFIX_TUNING")
    assert (out / "adapter_config.json").is_file()
