"""Run by tests/test_fsdp.py under torchrun (2 CPU processes, gloo): QPA under FSDP2 (``fully_shard``).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR

The model is sharded as users shard a PEFT model (each decoder layer, then the root). Each rank trains on its own data
and writes OUT_DIR/rank{r}.json: per step a digest of what the generator produces and of its parameters, the
losses, an uninterrupted run's losses beside those resumed from a sharded checkpoint (torch.distributed.checkpoint,
model and optimizer), the eval logits, and the errors of the refused set-up. Rank 0 also writes adapters: saved from
the gathered full state dict (full/), saved by rank 0 alone (alone/) and exported as LoRA (lora/).
"""

import hashlib
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard  # noqa: E402

import peft_qpa  # noqa: E402
from tiny_models import MODEL_FACTORIES, small_config  # noqa: E402

STEPS, CHECKPOINT_AT = 4, 2
EVAL_IDS = torch.arange(1, 13).reshape(1, 12)


def batch(rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s batch at ``step`` (the test rebuilds both ranks' batches for its one-process reference)."""
    return torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1000 * step + rank))


def build(shard_generator_too: bool = False, ignored: bool = False):
    model = get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama"))
    if shard_generator_too:
        # What a torch that no longer honoured peft_qpa's mark would do: FSDP would shard the generator.
        from torch.distributed._composable.contract import REGISTRY_KEY

        model.base_model.get_generator().__dict__.pop(REGISTRY_KEY, None)
    kwargs = {"ignored_params": set(model.base_model.qpa_generator.parameters())} if ignored else {}
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().double().contiguous().numpy().tobytes()).hexdigest()[:16]


def generator_state(model) -> dict:
    generator = model.base_model.get_generator()
    with torch.no_grad():
        generated = generator.generate()
    params = torch.cat([p.detach().reshape(-1) for p in generator.parameters()])
    return {"generated": digest(generated), "params": digest(params), "step": int(generator.step)}


def train(model, optimizer, rank, steps, record=None):
    losses = []
    model.train()
    for step in steps:
        if record is not None:
            record.append(generator_state(model))  # what this step's forward generates
        ids = batch(rank, step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def sharded_state(model, optimizer) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    result = {"rank": rank}

    # 1. train, checkpointing (sharded) half-way; every rank's generator must be the same at every step
    model, optimizer = build()
    result["generator_is_whole"] = not any(type(p).__name__ == "DTensor" for p in model.base_model.get_generator().parameters())
    record = []
    losses = train(model, optimizer, rank, range(1, CHECKPOINT_AT + 1), record)
    dcp.save(sharded_state(model, optimizer), checkpoint_id=os.path.join(out_dir, "dcp"))
    losses += train(model, optimizer, rank, range(CHECKPOINT_AT + 1, STEPS + 1), record)
    record.append(generator_state(model))
    result.update(losses=losses, record=record, synced=model.base_model.generated_cache().syncs_gradients)
    result["final_params"] = [p.detach().double().reshape(-1).tolist() for p in model.base_model.get_generator().parameters()]

    # 2. eval logits, then the adapter: from the gathered full state dict, by rank 0 alone, and exported by rank 0
    model.eval()
    with torch.no_grad():
        result["eval_logits"] = model(input_ids=EVAL_IDS).logits.reshape(-1).tolist()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(os.path.join(out_dir, "full"), state_dict=full)
        model.save_pretrained(os.path.join(out_dir, "alone"))  # no collective: the generator is whole on rank 0
        peft_qpa.export(model, os.path.join(out_dir, "lora"))
    dist.barrier()

    # 3. resume from the sharded checkpoint in a fresh model and optimizer: the same losses as the uninterrupted run
    resumed, resumed_optimizer = build()
    state = sharded_state(resumed, resumed_optimizer)
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, state["optim"])
    result["resumed_losses"] = train(resumed, resumed_optimizer, rank, range(CHECKPOINT_AT + 1, STEPS + 1))
    result["resumed_final"] = generator_state(resumed)

    # 4. a generator that FSDP shards after all: refused with an error naming the fix; the fix works
    sharded, sharded_optimizer = build(shard_generator_too=True)
    try:
        train(sharded, sharded_optimizer, rank, [1])
        result["sharded_error"] = None
    except RuntimeError as exc:
        result["sharded_error"] = str(exc)
    fixed, fixed_optimizer = build(shard_generator_too=True, ignored=True)
    try:
        train(fixed, fixed_optimizer, rank, range(1, CHECKPOINT_AT + 1))
        result["ignored_params_state"] = generator_state(fixed)
    except Exception:  # noqa: BLE001 - reported to the test
        result["ignored_params_error"] = traceback.format_exc()

    # 5. QPA prefix tuning: its prompt encoder owns the generator, kept whole and synchronised the same way
    prefix = get_peft_model(MODEL_FACTORIES["llama"](), peft_qpa.QPAPrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, chunk_size=32, qnn_depth=2, mapping_hidden_sizes=[16, 16], seed=0))
    for layer in prefix.base_model.model.layers:
        fully_shard(layer)
    fully_shard(prefix)
    prefix_optimizer = torch.optim.AdamW([p for p in prefix.parameters() if p.requires_grad], lr=1e-2)
    result["prefix_losses"] = train(prefix, prefix_optimizer, rank, range(1, CHECKPOINT_AT + 1))
    encoder = prefix.prompt_encoder["default"]
    result["prefix_synced"] = encoder.cache.syncs_gradients
    result["prefix_params"] = digest(torch.cat([p.detach().reshape(-1) for p in encoder.generator.parameters()]))
    prefix.eval()
    with torch.no_grad():
        result["prefix_logits"] = prefix(input_ids=EVAL_IDS).logits.reshape(-1).tolist()
    if rank == 0:
        prefix.save_pretrained(os.path.join(out_dir, "prefix"))  # rank 0 alone
    dist.barrier()

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without interpreter teardown (as tests/ddp_worker.py: a rank once hung there after its work was written).
    os._exit(0)
