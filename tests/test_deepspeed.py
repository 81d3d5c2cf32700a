"""QPA under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo, DeepSpeed's CPU accelerator): the engine directly
(tests/deepspeed_worker.py) and the HF Trainer running examples/run_clm_qpa.py with examples/ds_zero3.json.

ZeRO-2 and ZeRO-3 train as FSDP and DDP do (the same losses), ZeRO-3 keeps the generator whole (persistent) and
refuses a configuration that would partition it; adapters saved under either (ZeRO-3: from DeepSpeed's consolidated
state dict, with fresh snapshots) reload in one process, and the Trainer resumes from a ZeRO-3 checkpoint to the same
losses. Skipped where DeepSpeed is not installed (it is not a test dependency).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import MODEL_FACTORIES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "deepspeed_worker.py"
SHIM = Path(__file__).parent / "accelerate_cpu.py"
SCRIPT = REPO / "examples" / "run_clm_qpa.py"
EVAL_IDS = torch.arange(1, 13).reshape(1, 12)


def _env(tmp_path):
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
        TRANSFORMERS_VERBOSITY="error", PEFT_QPA_CACHE=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    return env


def _torchrun(args, tmp_path, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                            cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out: {stderr[-3000:]}")
    assert proc.returncode == 0, (stdout[-2000:], stderr[-4000:])
    return stdout


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=EVAL_IDS).logits


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    _torchrun([WORKER, out], out)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_zero2_and_zero3_train_alike_and_keep_ranks_in_sync(ds_run):
    _, ranks = ds_run
    for r in ranks:
        assert r["zero3_losses"] == pytest.approx(r["zero2_losses"], rel=1e-6)
    assert ranks[0]["zero2_losses"] != ranks[1]["zero2_losses"]  # each rank on its own data
    assert ranks[0]["zero2_generator"] == ranks[1]["zero2_generator"]
    assert ranks[0]["zero3_generator"] == ranks[1]["zero3_generator"]  # persistent: whole and equal on every rank


@pytest.mark.slow
def test_adapters_saved_under_zero2_and_zero3_reload_in_one_process(ds_run):
    import peft_qpa  # noqa: F401
    from peft import PeftModel

    out, _ = ds_run
    zero2 = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), str(out / "zero2"))
    zero3 = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), str(out / "zero3"))
    # ZeRO-3's consolidated state dict is taken without the model's hooks: saving wrote fresh snapshots into it
    worst, _, beyond, _ = zero3.base_model.generated_cache().disagreement()
    assert beyond == 0 and worst < 1e-6
    torch.testing.assert_close(_logits(zero3), _logits(zero2), rtol=0, atol=1e-5)
    lora = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), str(out / "zero2_lora"))
    torch.testing.assert_close(_logits(lora), _logits(zero2), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_zero3_partitioning_the_generator_is_refused_with_the_fix(ds_run):
    _, ranks = ds_run
    for r in ranks:
        error = r["partitioned_error"]
        assert error is not None and "ZeRO-3 partitions the generator" in error
        assert '"stage3_param_persistence_threshold"' in error


@pytest.mark.slow
def test_trainer_with_zero3_config_trains_saves_and_resumes(tiny_lm_files, tmp_path):
    import peft_qpa  # noqa: F401
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir, train, held = tiny_lm_files

    def run(out, *extra):
        _torchrun([SHIM, SCRIPT, "--model_name_or_path", model_dir, "--train_file", train, "--validation_file", held,
                   "--block_size", "32", "--output_dir", out, "--per_device_train_batch_size", "2",
                   "--learning_rate", "1e-2", "--chunk_size", "16", "--qnn_depth", "2", "--logging_steps", "1",
                   "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--do_train", "--max_steps", "4",
                   "--save_strategy", "steps", "--save_steps", "2", "--deepspeed", REPO / "examples" / "ds_zero3.json",
                   *extra], tmp_path)
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        reports = [json.loads((out / f"engine_rank{r}.json").read_text()) for r in (0, 1)]
        return [h["loss"] for h in history if "loss" in h], reports

    full = tmp_path / "full"
    losses, reports = run(full)
    for report in reports:
        assert report["deepspeed_enabled"] and report["zero_stage"] == 3 and not report["generator_sharded"], report
    assert reports[0]["generator"] == reports[1]["generator"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(full))
    worst, _, beyond, _ = loaded.base_model.generated_cache().disagreement()
    assert beyond == 0 and worst < 1e-6

    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    resumed_losses, resumed_reports = run(resumed, "--resume_from_checkpoint", "true")
    assert resumed_losses == pytest.approx(losses, rel=1e-6)
    assert resumed_reports[0]["generator"] == reports[0]["generator"]
    a, b = load_file(str(full / "adapter_model.safetensors")), load_file(str(resumed / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
