"""Adapters saved by peft-qpa 0.1.0 (before the package layout changed) still load and give identical logits.

The fixtures under ``tests/fixtures/legacy_*`` were written by ``tests/fixtures/make_legacy_adapters.py`` at that
version: a tiny base model, a QPA adapter trained for four steps, and the logits the adapted model gave."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peft_qpa

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = ["legacy_llama", "legacy_gpt2_shots_gi"]


def _load(case):
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / case / "base").eval()
    return PeftModel.from_pretrained(base, FIXTURES / case / "adapter").eval()


@pytest.mark.parametrize("case", CASES)
def test_legacy_adapter_gives_identical_logits(case):
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    model = _load(case)
    assert isinstance(model.base_model, peft_qpa.QPAModel)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_legacy_adapter_generator_reproduces_snapshot(case, recwarn):
    # The load cross-check regenerates from the saved generator: no disagreement warning, and a forced
    # regeneration matches the saved snapshot to float rounding.
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    model = _load(case)
    assert not [w for w in recwarn if "disagree" in str(w.message)]
    model.base_model.generated_cache().refresh(force=True)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_legacy_adapter_exports_and_merges(case, tmp_path):
    expected = load_file(str(FIXTURES / case / "expected.safetensors"))
    model = _load(case)
    peft_qpa.export_lora(model, tmp_path / "lora")
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / case / "base").eval()
    lora = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(lora(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)
