"""QPA under the HF Trainer: trains, checkpoints, and the checkpoint is a loadable QPA adapter."""

import json

import pytest

import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from tiny_models import MODEL_FACTORIES, small_config


class RepeatedBatch(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randint(1, 97, (length,), generator=g) for _ in range(4)] * (n // 4)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i], "attention_mask": torch.ones_like(self.items[i])}


def test_trainer_trains_and_checkpoints(tmp_path):
    model = get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama"))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_steps=12, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RepeatedBatch())
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0], losses
    assert result.global_step == 12

    checkpoint = tmp_path / "checkpoint-12"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["peft_type"] == "QPA"
    batch = RepeatedBatch()[0]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        expected = model(batch).logits
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch).logits, expected, rtol=0, atol=0)


def _trainer(model, out, max_steps, **kwargs):
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant", **kwargs,
    )
    return Trainer(model=model, args=args, train_dataset=RepeatedBatch())


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


DESIGNS = {  # the research designs of docs/quality.md, each as a user selects it
    "published": dict(mapping_hidden_sizes=[16, 16], mapping_activation="none", basis_features="shuffled"),
    "multi_readout": dict(probability_input="multi_readout", readout_settings=3, mapping_activation="none",
                          basis_features="none"),
    "distributed": dict(probability_input="distributed", circuit_groups=2, mapping_activation="none", basis_features="none"),
    "mps": dict(mapping="mps", mps_bond_dim=2),
    "classical_twin": dict(probability_input="classical_twin", mapping_activation="none", basis_features="none"),
    "multi_readout_twin": dict(probability_input="multi_readout_twin", readout_settings=3, mapping_activation="none",
                               basis_features="none"),
}


@pytest.mark.parametrize("backend", [{}, {"backend": "aer_shots", "shots": 256}, *DESIGNS.values()],
                         ids=["default", "aer_shots", *DESIGNS])
def test_trainer_bf16_checkpointing_and_resume(tmp_path, backend):
    """bf16 autocast + gradient checkpointing: step 1 is the base model's loss (zero delta under autocast), and a
    run resumed from a checkpoint continues exactly as the uninterrupted run (shots included: the step is saved)."""
    options = dict(bf16=True, gradient_checkpointing=True)
    batch = RepeatedBatch()[0]
    base = MODEL_FACTORIES["llama"]()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base_loss = base(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.item()

    full = _trainer(get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama", **backend)), tmp_path / "full", 6, **options)
    full.train()
    full_losses = _losses(full)
    assert full_losses[-1] < full_losses[0]

    first = _trainer(get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama", **backend)), tmp_path / "part", 3, **options)
    first.train()
    resumed = _trainer(get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama", **backend)), tmp_path / "part", 6, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-3"))
    assert _losses(resumed) == pytest.approx(full_losses, rel=1e-3)  # its history starts with the first 3 steps

    # step 1's loss is the base model's (the batch of step 1 is the first item repeated 4 times)
    # (with shuffled bits only in eval: a training forward adds the bits' zero-mean noise, as documented)
    model = get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama", **backend))
    model.train(backend.get("basis_features") != "shuffled")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.item()
    assert out == base_loss
