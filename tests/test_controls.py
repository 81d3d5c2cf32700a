"""The ablation controls of the generator: ``freeze_angles`` and ``probability_input="constant"``."""

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_qpa
from tiny_models import tiny_llama

SMALL = dict(target_modules=["q_proj", "v_proj"], chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[8], seed=0)


def _train(model, steps=3):
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return ids


def test_freeze_angles_keeps_the_angles_and_trains_the_mlp():
    model = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL, freeze_angles=True))
    generator = model.base_model.get_generator()
    angles, mlp = generator.angles.detach().clone(), [p.detach().clone() for p in generator.mapping.parameters()]
    assert not generator.angles.requires_grad
    _train(model)
    assert torch.equal(generator.angles, angles)
    assert all(not torch.equal(p, q) for p, q in zip(generator.mapping.parameters(), mlp))
    # every path that makes an adapter trainable keeps the control
    model.base_model.set_adapter("default")
    model.base_model.set_requires_grad("default", True)
    model.add_adapter("other", peft_qpa.QPAConfig(**SMALL))
    assert not generator.angles.requires_grad
    assert model.base_model.get_generator("other").angles.requires_grad is False  # inactive adapter: all frozen
    # reported: the angles are not trainable parameters
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert generator.num_trainable() == trainable
    assert "(frozen: the freeze_angles control)" in model.base_model.generator_summary()
    assert f"trainable total: {trainable}" in model.base_model.generator_summary()


def test_constant_probability_input_removes_the_circuit(monkeypatch):
    model = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL, probability_input="constant"))
    generator = model.base_model.get_generator()
    assert "probability input: constant" in model.base_model.generator_summary()

    def never(*args, **kwargs):
        raise AssertionError("the circuit must not run under probability_input='constant'")

    monkeypatch.setattr(generator, "probabilities", never)
    before = generator.generate().detach().clone()
    with torch.no_grad():
        generator.angles.add_(1.0)  # the output does not depend on the angles
    torch.testing.assert_close(generator.generate().detach(), before, rtol=0, atol=0)
    ids = _train(model)
    assert generator.angles.grad is None or not generator.angles.grad.any()
    # against the method: the angles matter
    full = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL))
    g = full.base_model.get_generator()
    before = g.generate().detach().clone()
    with torch.no_grad():
        g.angles.add_(1.0)
    assert not torch.allclose(g.generate().detach(), before)
    assert model(ids).logits.shape == full(ids).logits.shape


def test_controls_survive_save_and_load(tmp_path):
    model = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL, probability_input="constant", freeze_angles=True))
    ids = _train(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    config = loaded.peft_config["default"]
    assert config.probability_input == "constant" and config.freeze_angles is True
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("field, value", [("probability_input", "uniform"), ("probability_input", None),
                                          ("freeze_angles", "yes"), ("freeze_angles", 1)])
@pytest.mark.parametrize("config_cls", [peft_qpa.QPAConfig, peft_qpa.QTConfig, peft_qpa.GeneratorConfig])
def test_bad_control_values_name_the_field(config_cls, field, value):
    kwargs = {} if config_cls is peft_qpa.GeneratorConfig else {"target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}\.{field} must be"):
        config_cls(**kwargs, **{field: value})


def test_standardized_probability_column_has_unit_spread_and_keeps_the_zero_start():
    """probability_scaling='standardize': the MLP's probability feature is centred with unit RMS over the states
    used; the published 'none' keeps its small spread. Both start at the base model (zero delta)."""
    base = tiny_llama()
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(ids).logits
    columns = {}
    for scaling in ("none", "standardize"):
        model = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL, probability_scaling=scaling))
        g = model.base_model.get_generator()
        with torch.no_grad():
            col = g.features(0).squeeze(1)
            torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-5)
        assert abs(float(col.mean())) < 1e-5
        columns[scaling] = col
    torch.testing.assert_close(float(columns["standardize"].pow(2).mean().sqrt()), 1.0, rtol=1e-4, atol=0)
    assert float(columns["none"].std()) < 0.5  # the published constants: a small spread next to ±1 bits
    # same ordering of states: standardizing is a positive rescaling of the published column
    ratio = columns["standardize"] / columns["none"]
    assert float(ratio.min()) > 0 and torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-3)


def test_probability_scaling_is_saved_and_reloaded(tmp_path):
    model = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL, probability_scaling="standardize"))
    ids = _train(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].probability_scaling == "standardize"
    assert loaded.base_model.get_generator().probability_scaling == "standardize"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("value", ["zscore", None, 1])
@pytest.mark.parametrize("config_cls", [peft_qpa.QPAConfig, peft_qpa.QTConfig, peft_qpa.QPABottleneckConfig, peft_qpa.GeneratorConfig])
def test_bad_probability_scaling_names_the_field(config_cls, value):
    kwargs = {} if config_cls is peft_qpa.GeneratorConfig else {"target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}\.probability_scaling must be one of"):
        config_cls(**kwargs, probability_scaling=value)
