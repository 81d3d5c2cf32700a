"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): QPA under DistributedDataParallel.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR {reentrant|non_reentrant}
Each rank trains a few steps on its own data and writes its generator parameters (or the error it got) to OUT_DIR.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import peft_qpa  # noqa: E402,F401
from tiny_models import MODEL_FACTORIES, small_config  # noqa: E402


def main(out_dir: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    model.train()
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(100 + rank))  # per-rank data
    result = {"rank": rank}
    try:
        for _ in range(3):
            ddp(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        generator = model.base_model.get_generator()
        result["params"] = [p.detach().double().sum().item() for p in generator.parameters()]
    except RuntimeError as exc:
        result["error"] = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # both ranks' results are written; the process exits without tearing gloo down (see below)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without interpreter teardown: a rank once hung there (thread pools, gloo) after its work was written.
    os._exit(0)
