"""QPA under torchrun + DistributedDataParallel (2 CPU processes, gloo): ranks stay in sync with non-reentrant
gradient checkpointing; reentrant checkpointing, under which they would drift apart, is refused with a clear error."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "ddp_worker.py"


def run_ranks(tmp_path, mode):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path), mode]
    # A session of its own, so that a hang kills the ranks too, not only torchrun.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        written = sorted(p.name for p in tmp_path.glob("rank*.json"))
        raise AssertionError(f"torchrun timed out (rank files written: {written}): {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_keeps_generators_in_sync_with_non_reentrant_checkpointing(tmp_path):
    ranks = run_ranks(tmp_path, "non_reentrant")
    assert all("params" in r for r in ranks), ranks
    assert ranks[0]["params"] == pytest.approx(ranks[1]["params"], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_ddp_with_reentrant_checkpointing_is_refused(tmp_path):
    ranks = run_ranks(tmp_path, "reentrant")
    for r in ranks:
        assert "use_reentrant': False" in r.get("error", ""), r
