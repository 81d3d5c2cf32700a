"""QPA as a PEFT tuner on tiny GPT-2 (Conv1D) and Llama models: the behaviour users rely on."""

import copy
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType

import peft_qpa
from peft_qpa.tuners.lora.layer import QPALayer

from tiny_models import MODEL_FACTORIES, small_config, train_steps


def adapted(arch, **overrides):
    base = MODEL_FACTORIES[arch]()
    return get_peft_model(base, small_config(arch, **overrides))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


# --- registration -----------------------------------------------------------------------------------------
def test_registered_with_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PeftType.QPA == "QPA" and PeftType("QPA") is PeftType.QPA
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.QPA] is peft_qpa.QPAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.QPA] is peft_qpa.QPAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.QPA] == "qpa_"
    assert list(PeftType).count(PeftType.QPA) == 1


def test_importing_twice_is_harmless():
    importlib.reload(peft_qpa.peft_types)
    peft_qpa.register_qpa()
    peft_qpa.register_qpa()
    assert list(PeftType).count(PeftType.QPA) == 1


# --- the adapted model --------------------------------------------------------------------------------------
def test_zero_delta_at_step_zero(arch, input_ids):
    base = MODEL_FACTORIES[arch]()
    expected = logits(base, input_ids)
    model = get_peft_model(base, small_config(arch))
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=0)


def test_only_generator_is_trainable_and_named_with_prefix(arch):
    model = adapted(arch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("qpa_" in n for n in trainable)
    assert all(".qpa_generator.default." in n for n in trainable)
    generator = model.base_model.get_generator()
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == generator.num_trainable()
    # no layer registers the shared generator (it would be saved once per layer)
    assert not any(isinstance(m, QPALayer) and "qpa_generator" in dict(m.named_modules()) for m in model.modules())


def test_every_trainable_parameter_gets_a_gradient_at_the_first_step(arch, input_ids):
    model = adapted(arch)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, name


def test_training_lowers_the_loss(arch, input_ids):
    model = adapted(arch)
    losses = train_steps(model, input_ids, steps=15, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05, losses


def test_get_generator_api(arch):
    model = adapted(arch)
    generator = model.base_model.get_generator("default")
    lora_numbers = sum(
        m.r["default"] * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, QPALayer)
    )
    assert generator.num_generated == lora_numbers
    assert generator.n_qubits == peft_qpa.n_qubits_for(lora_numbers, 32)
    probs = generator.probabilities()
    assert probs.shape == (2**generator.n_qubits,) and abs(float(probs.sum()) - 1) < 1e-5
    assert generator.generate().shape == (lora_numbers,)
    assert generator.circuit().num_qubits == generator.n_qubits
    summary = model.base_model.generator_summary()
    assert f"qubits N: {generator.n_qubits}" in summary and "ratio to LoRA" in summary
    with pytest.raises(ValueError, match="No QPA adapter named 'nope'"):
        model.base_model.get_generator("nope")


def test_weights_generated_once_per_forward_and_cached_in_eval(arch, input_ids, monkeypatch):
    model = adapted(arch)
    generator = model.base_model.get_generator()
    calls = []
    original = generator.generate
    monkeypatch.setattr(generator, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    assert len(calls) == 1  # one generation serves every adapted layer
    model(input_ids, labels=input_ids).loss.backward()
    assert len(calls) == 2  # and every forward regenerates (gradient accumulation works)
    model.eval()
    calls.clear()
    logits(model, input_ids)
    logits(model, input_ids)
    assert len(calls) <= 1  # parameters unchanged since the last generation: at most one refresh
    before = len(calls)
    with torch.no_grad():
        generator.angles.add_(0.1)
    logits(model, input_ids)
    assert len(calls) == before + 1  # a parameter change invalidates the cache
    logits(model, input_ids)
    assert len(calls) == before + 1


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(input_ids, use_reentrant):
    def grads(checkpointing):
        model = adapted("llama", init_weights=False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.train()
        model(input_ids, labels=input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


# --- save, load, export, merge ------------------------------------------------------------------------------
def test_save_and_load_reproduce_logits_exactly(arch, input_ids, tmp_path):
    model = adapted(arch)
    train_steps(model, input_ids, steps=3)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "QPA" and saved["chunk_size"] == 32
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(k.startswith("base_model.qpa_generator.mapping.") for k in keys)
    assert any(k.endswith(".qpa_lora_A") for k in keys) and any(k.endswith(".qpa_lora_B") for k in keys)
    assert not any(".default" in k for k in keys)

    assert PeftConfig.from_pretrained(tmp_path).peft_type == PeftType.QPA
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(logits(reloaded, input_ids), expected, rtol=0, atol=0)
    # the generator came back too: regenerating from it gives the same weights
    generator = reloaded.base_model.get_generator()
    original = model.base_model.get_generator()
    torch.testing.assert_close(generator.generate(), original.generate())


def test_load_under_another_adapter_name(input_ids, tmp_path):
    model = adapted("gpt2")
    train_steps(model, input_ids, steps=3)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    other = get_peft_model(MODEL_FACTORIES["gpt2"](), small_config("gpt2", seed=5))
    other.load_adapter(tmp_path, adapter_name="trained")
    other.set_adapter("trained")
    torch.testing.assert_close(logits(other, input_ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        other.base_model.get_generator("trained").angles, model.base_model.get_generator().angles
    )


def test_resume_training_after_reload(input_ids, tmp_path):
    model = adapted("gpt2")
    train_steps(model, input_ids, steps=2)
    model.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), tmp_path, is_trainable=True)
    assert all("qpa_" in n for n, p in resumed.named_parameters() if p.requires_grad)
    continued = copy.deepcopy(model)
    a = train_steps(resumed, input_ids, steps=2, lr=1e-3)
    b = train_steps(continued, input_ids, steps=2, lr=1e-3)
    assert a == pytest.approx(b, rel=1e-5)


def test_auto_peft_model_loads_from_a_local_base(input_ids, tmp_path):
    base = MODEL_FACTORIES["llama"]()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    train_steps(model, input_ids, steps=2)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded.eval(), input_ids), expected, rtol=0, atol=1e-6)


def test_merge_and_unload_and_unload(arch, input_ids):
    model = adapted(arch)
    train_steps(model, input_ids, steps=3)
    expected = logits(model, input_ids)
    base_logits = logits(MODEL_FACTORIES[arch](), input_ids)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), base_logits)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, QPALayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, rtol=1e-4, atol=1e-5)
    unloaded = model.unload()
    torch.testing.assert_close(logits(unloaded, input_ids), base_logits)


def test_merge_then_unmerge_restores_base_weights(input_ids):
    model = adapted("gpt2")
    train_steps(model, input_ids, steps=2)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    expected = logits(model, input_ids)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    for k, v in model.get_base_model().state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_export_lora_loads_without_peft_qpa(arch, input_ids, tmp_path):
    model = adapted(arch)
    train_steps(model, input_ids, steps=3)
    expected = logits(model, input_ids)
    MODEL_FACTORIES[arch]().save_pretrained(tmp_path / "base")
    lora_config = peft_qpa.export_lora(model, tmp_path / "lora")
    assert lora_config.peft_type == PeftType.LORA
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert exported and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in exported)  # no frozen weights
    torch.save({"input_ids": input_ids, "expected": expected}, tmp_path / "io.pt")
    script = f"""
import sys
sys.modules["peft_qpa"] = None  # make any import of peft_qpa fail: plain peft only
import torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}).eval()
model = PeftModel.from_pretrained(base, {str(tmp_path / "lora")!r})
assert type(model.base_model).__name__ == "LoraModel"
with torch.no_grad():
    out = model(io["input_ids"]).logits
torch.testing.assert_close(out, io["expected"], rtol=1e-4, atol=1e-5)
print("OK")
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# --- several adapters ------------------------------------------------------------------------------------
def test_several_adapters(input_ids):
    model = adapted("llama")
    train_steps(model, input_ids, steps=2)
    first = logits(model, input_ids)
    model.add_adapter("second", small_config("llama", seed=3, init_weights=False))
    assert set(model.base_model.qpa_generator.keys()) == {"default", "second"}
    assert torch.equal(logits(model, input_ids), first)  # adding does not activate
    model.set_adapter("second")
    second = logits(model, input_ids)
    assert not torch.allclose(second, first)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".qpa_generator.second." in n for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, input_ids), first, rtol=0, atol=0)
    model.delete_adapter("second")
    assert set(model.base_model.qpa_generator.keys()) == {"default"}
    assert not any("second" in k for k in model.state_dict())
    torch.testing.assert_close(logits(model, input_ids), first, rtol=0, atol=0)


# --- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("r", 0, "QPAConfig.r must be an integer >= 1"),
        ("chunk_size", 0, "QPAConfig.chunk_size must be an integer >= 1"),
        ("qnn_depth", 0, "QPAConfig.qnn_depth"),
        ("ansatz", "rz", "QPAConfig.ansatz must be one of"),
        ("lora_dropout", 1.0, "QPAConfig.lora_dropout"),
        ("mapping_hidden_sizes", [8, 0], "QPAConfig.mapping_hidden_sizes"),
        ("max_qubits", 40, r"QPAConfig.max_qubits must be an integer in \[1, 30\]"),
        ("backend", "ibm_hardware", "QPAConfig.backend must be one of"),
        ("simulator_dtype", "float16", "QPAConfig.simulator_dtype"),
        ("prob_alpha", 0.0, "QPAConfig.prob_alpha"),
        ("generative_interpolation", True, "only applies to backend='aer_shots'"),
    ],
)
def test_bad_config_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        peft_qpa.QPAConfig(target_modules=["q_proj"], **{field: value})


def test_too_many_qubits_names_chunk_size():
    with pytest.raises(ValueError, match="Raise chunk_size to at least"):
        adapted("llama", chunk_size=1, max_qubits=8)


def test_missing_target_modules():
    with pytest.raises(ValueError, match="not_a_module"):
        adapted("llama", target_modules=["not_a_module"])


def test_unsupported_module_type_is_named():
    with pytest.raises(TypeError, match="LlamaRMSNorm.*not supported by QPA"):
        adapted("llama", target_modules=["input_layernorm"])


def test_corrupt_adapter_file_errors_and_keeps_files(input_ids, tmp_path):
    model = adapted("gpt2")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    corrupt = weights.read_bytes()
    with pytest.raises(Exception):
        PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), tmp_path)
    assert weights.read_bytes() == corrupt and (tmp_path / "adapter_config.json").exists()


def test_adapter_from_another_config_is_refused(input_ids, tmp_path):
    model = adapted("gpt2")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["chunk_size"] = 16  # the saved generator no longer fits this config
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), tmp_path)


def test_every_config_field_is_documented():
    import dataclasses
    from pathlib import Path

    from peft import PeftConfig

    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    own = {f.name for f in dataclasses.fields(peft_qpa.QPAConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    missing = [
        f.name for f in dataclasses.fields(peft_qpa.QPAConfig)
        if f.name in own and f"| `{f.name}` |" not in doc or (f.name in own and f.metadata["help"] not in doc)
    ]
    assert not missing, f"docs/config.md lacks {missing}"
    for f in dataclasses.fields(peft_qpa.QPAConfig):
        if f.name in own:
            assert f.metadata.get("help"), f"{f.name} has no help metadata"


def test_saving_right_after_an_optimizer_step_saves_the_current_weights(input_ids, tmp_path):
    model = adapted("gpt2")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()  # no forward since: the layers' snapshot is stale until something refreshes it
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), tmp_path)
    model.eval()
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), rtol=0, atol=0)
    generated = model.base_model.get_generator().split(model.base_model.get_generator().generate().detach())
    layer_name = next(n for n, m in model.base_model.model.named_modules() if isinstance(m, QPALayer))
    layer = model.base_model.model.get_submodule(layer_name)
    torch.testing.assert_close(layer.qpa_lora_B["default"], generated[f"{layer_name}.lora_B"])
