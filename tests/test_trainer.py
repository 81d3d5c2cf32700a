"""QPA under the HF Trainer: trains, checkpoints, and the checkpoint is a loadable QPA adapter."""

import json

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
