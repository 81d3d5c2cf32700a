"""``save_generated_tensors=False``: adapter files that hold the generator alone, and reload to the same model."""

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_qpa
from peft_qpa import QPABottleneckConfig, QPAPrefixTuningConfig, QTConfig

from tiny_models import MODEL_FACTORIES, small_config, train_steps

SMALL = dict(chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[16, 16])
BUILDERS = {
    "lora": lambda **kw: small_config("llama", **kw),
    "dora": lambda **kw: small_config("llama", use_dora=True, **kw),
    "qt": lambda **kw: QTConfig(target_modules=["q_proj", "v_proj"], **SMALL, **kw),
    "bottleneck": lambda **kw: QPABottleneckConfig(target_modules=["mlp"], bottleneck_size=4, **SMALL, **kw),
    "prefix": lambda **kw: QPAPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **SMALL, **kw),
}


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def trained(member, input_ids, **overrides):
    model = get_peft_model(MODEL_FACTORIES["llama"](), BUILDERS[member](**overrides))
    train_steps(model, input_ids, steps=3)
    return model


def generator_of(model):
    if hasattr(model, "prompt_encoder"):
        return model.prompt_encoder["default"].get_generator()
    return model.base_model.get_generator()


@pytest.mark.parametrize("member", sorted(BUILDERS))
def test_the_file_holds_the_generator_alone_and_reloads_the_same_model(member, input_ids, tmp_path):
    model = trained(member, input_ids, save_generated_tensors=False)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path / "small")
    model.peft_config["default"].save_generated_tensors = True
    model.save_pretrained(tmp_path / "full")
    small, full = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("small", "full"))
    assert set(small) < set(full)
    assert not any(k.endswith("offset") or "prompt_embeddings" in k for k in small)
    # nothing but the generator (and DoRA's base magnitude m0, which is not generated)
    assert all("generator" in k or "magnitude_base" in k for k in small), sorted(small)
    assert sum(v.numel() for v in small.values()) < sum(v.numel() for v in full.values()) - generator_of(
        model).num_generated  # at least M (the snapshot) and the offset smaller
    assert json.loads((tmp_path / "small" / "adapter_config.json").read_text())["save_generated_tensors"] is False

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys")
        reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path / "small")
    torch.testing.assert_close(logits(reloaded, input_ids), expected, rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(generator_of(model).named_parameters(), generator_of(reloaded).named_parameters()):
        assert torch.equal(p, q), name
    assert int(generator_of(reloaded).step) == int(generator_of(model).step)


def test_a_fresh_adapter_reloads_at_the_base_model(input_ids, tmp_path):
    base = MODEL_FACTORIES["llama"]()
    with torch.no_grad():
        base_logits = base(input_ids).logits
    get_peft_model(MODEL_FACTORIES["llama"](), BUILDERS["lora"](save_generated_tensors=False)).save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path)
    torch.testing.assert_close(logits(reloaded, input_ids), base_logits, rtol=0, atol=0)  # B is exactly zero


def test_low_cpu_mem_usage_load_computes_the_offset(input_ids, tmp_path):
    model = trained("lora", input_ids, save_generated_tensors=False)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in generator_of(reloaded).state_dict().values())
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_training_continues_from_a_small_file(input_ids, tmp_path):
    model = trained("qt", input_ids, save_generated_tensors=False)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path, is_trainable=True)
    losses = train_steps(reloaded, input_ids, steps=3)
    assert losses[-1] < losses[0]


def test_the_field_is_validated():
    with pytest.raises(ValueError, match=r"QPAConfig\.save_generated_tensors must be True or False"):
        peft_qpa.QPAConfig(save_generated_tensors="no")


def test_the_size_benchmark_writes_its_json(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import adapter_size

    result = adapter_size.main(["--out", str(tmp_path / "sizes.json")])
    sizes = json.loads((tmp_path / "sizes.json").read_text())["bytes"]
    assert sizes == result["bytes"]
    assert sizes["qpa_generator_only"] < sizes["lora"] < sizes["qpa_default"]
