"""The adapter's model card and what push_to_hub would upload (intercepted: the Hub is never called)."""

import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from peft import get_peft_model

import peft_qpa

from tiny_models import MODEL_FACTORIES, small_config


def test_save_pretrained_writes_a_qpa_model_card(tmp_path):
    model = get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama"))
    model.peft_config["default"].base_model_name_or_path = "org/tiny-llama"
    generator = model.base_model.get_generator()
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving twice keeps one QPA section
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft"
    assert {"qpa", "quantum", "lora"} <= set(card.data.tags)
    assert card.data.base_model == "org/tiny-llama"
    text = card.text
    assert text.count("## Quantum Parameter Adaptation (QPA)") == 1
    assert f"| qubits | {generator.n_qubits} |" in text
    assert f"| trainable parameters | {generator.num_trainable():,} |" in text
    assert f"| LoRA with the same r and targets | {generator.num_generated:,} |" in text
    assert "| backend | statevector (exact probabilities) |" in text
    assert "import peft_qpa" in text and "export_lora" in text
    # names the method's paper; links only to what exists (peft-qpa has no PyPI project)
    assert "arXiv:2410.09846" in text and "https://arxiv.org/abs/2410.09846" in text
    assert "pypi.org" not in text
    assert "pip install ." in text


class FakeRepo:
    repo_id = "someone/qpa-adapter"


@pytest.fixture
def intercepted_hub(monkeypatch):
    """Record what would be uploaded; a new repository has no README yet."""
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return FakeRepo()

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            uploaded[op.path_in_repo] = open(source, "rb").read() if isinstance(source, str) else source.read()
        return "http://localhost/commit/0"

    local_load = ModelCard.load.__func__

    def load_card(cls, repo_id_or_path, **kwargs):
        if os.path.exists(repo_id_or_path):
            return local_load(cls, repo_id_or_path, **kwargs)
        raise huggingface_hub.errors.EntryNotFoundError("a new repo has no README yet")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(load_card))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                uploaded[str(path.relative_to(folder_path))] = path.read_bytes()
        return "http://localhost/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return uploaded


def test_model_push_to_hub_uploads_the_adapter(intercepted_hub):
    model = get_peft_model(MODEL_FACTORIES["gpt2"](), small_config("gpt2"))
    model.push_to_hub("someone/qpa-adapter", token="not-used")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(intercepted_hub)
    assert json.loads(intercepted_hub["adapter_config.json"])["peft_type"] == "QPA"


def test_peft_qpa_push_to_hub_keeps_the_qpa_card(intercepted_hub, tmp_path):
    model = get_peft_model(MODEL_FACTORIES["gpt2"](), small_config("gpt2"))
    peft_qpa.push_to_hub(model, "someone/qpa-adapter", token="not-used")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(intercepted_hub)
    (tmp_path / "README.md").write_bytes(intercepted_hub["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and "qpa" in card.data.tags
    assert "## Quantum Parameter Adaptation (QPA)" in card.text
    # the uploaded weights reload into a model with the same outputs
    (tmp_path / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "adapter" / name).write_bytes(intercepted_hub[name])
    from peft import PeftModel

    ids = torch.randint(1, 97, (1, 8))
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
