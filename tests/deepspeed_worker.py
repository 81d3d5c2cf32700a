"""Run by tests/test_deepspeed.py under torchrun (2 CPU processes, gloo, DS_ACCELERATOR=cpu): QPA under DeepSpeed.

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_worker.py OUT_DIR

Three engines in turn, each rank on its own data: ZeRO-2; ZeRO-3 with the generator persistent (DeepSpeed's default
threshold; every generator parameter is below it); ZeRO-3 with ``stage3_param_persistence_threshold: 0``, which would
partition the generator and is refused. Each rank writes OUT_DIR/rank{r}.json (losses, a digest of the generator, the
errors); rank 0 writes the ZeRO-2 adapter saved alone (zero2/), its export (zero2_lora/) and the ZeRO-3 adapter saved
from DeepSpeed's consolidated state dict (zero3/), after a ZeRO-3 checkpoint (which partitions every parameter).
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402

import peft_qpa  # noqa: E402
from fsdp_worker import batch  # noqa: E402
from tiny_models import MODEL_FACTORIES, small_config  # noqa: E402

STEPS = 3


def engine_for(stage: int, threshold=None):
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if threshold is not None:
            zero["stage3_param_persistence_threshold"] = threshold
    config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10**6,
    }
    model = get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama"))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=config)
    return model, engine


def train(engine, rank) -> list:
    losses = []
    for step in range(1, STEPS + 1):
        ids = batch(rank, step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def digest(model) -> str:
    params = torch.cat([p.detach().double().reshape(-1) for p in model.base_model.get_generator().parameters()])
    return hashlib.sha256(params.numpy().tobytes()).hexdigest()[:16]


def main(out_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    result = {"rank": rank}

    model, engine = engine_for(2)
    result["zero2_losses"] = train(engine, rank)
    result["zero2_generator"] = digest(model)
    if rank == 0:  # ZeRO-2 keeps parameters whole: rank 0 saves and exports alone
        model.save_pretrained(os.path.join(out_dir, "zero2"))
        peft_qpa.export(model, os.path.join(out_dir, "zero2_lora"))
    dist.barrier()

    model, engine = engine_for(3)
    result["zero3_losses"] = train(engine, rank)
    result["zero3_generator"] = digest(model)  # persistent: whole on every rank
    engine.save_checkpoint(os.path.join(out_dir, "zero3_checkpoint"))  # partitions everything while it saves
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # as the HF Trainer saves under ZeRO-3
    if rank == 0:
        model.save_pretrained(os.path.join(out_dir, "zero3"), state_dict=state_dict)
    dist.barrier()

    model, engine = engine_for(3, threshold=0)
    try:
        train(engine, rank)
        result["partitioned_error"] = None
    except RuntimeError as exc:
        result["partitioned_error"] = str(exc)

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/ddp_worker.py: no interpreter teardown
