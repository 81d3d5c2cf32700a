"""Regressions found by trying QPA as users do: autocast, dtype casts, shot backends outside training, stale
snapshots and live tensors, load cross-checks, delete/pickle, merge through PEFT's base-weight API, export and save
safety, non-finite training, warnings."""

import gc
import io
import json
import warnings
import weakref

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_qpa
from peft_qpa.tuners.lora.layer import QPALayer

from tiny_models import MODEL_FACTORIES, small_config, train_steps


def adapted(arch, **overrides):
    return get_peft_model(MODEL_FACTORIES[arch](), small_config(arch, **overrides))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def base_logits(model, input_ids):
    with torch.no_grad(), model.disable_adapter():
        return model(input_ids).logits


def qpa_layers(model):
    return [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, QPALayer)]


def regenerated(model, adapter="default"):
    generator = model.base_model.get_generator(adapter)
    with torch.no_grad():
        return generator.split(generator.generate())


def assert_snapshot_matches_generator(model, atol=1e-6):
    tensors = regenerated(model)
    for name, layer in qpa_layers(model):
        torch.testing.assert_close(layer.qpa_lora_A["default"], tensors[f"{name}.lora_A"], rtol=0, atol=atol)
        torch.testing.assert_close(layer.qpa_lora_B["default"], tensors[f"{name}.lora_B"], rtol=0, atol=atol)


# --- autocast and dtype casts --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_delta_under_autocast(arch, input_ids, dtype):
    model = adapted(arch)
    model.train()  # as TRL / Trainer do: a training forward with gradients, under autocast
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids).logits
        with torch.no_grad(), model.disable_adapter():
            expected = model(input_ids).logits
    assert torch.equal(out, expected)
    for _, layer in qpa_layers(model):
        assert not layer.qpa_lora_B["default"].any()


def test_autocast_does_not_change_what_is_saved(input_ids, tmp_path):
    model = adapted("llama")
    train_steps(model, input_ids, steps=2)
    model.save_pretrained(tmp_path / "plain")
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids, labels=input_ids).loss.backward()  # the last forward ran under autocast
        model.save_pretrained(tmp_path / "autocast")
    plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    under = load_file(tmp_path / "autocast" / "adapter_model.safetensors")
    for key in plain:
        if "qpa_lora_" in key:
            assert under[key].dtype == plain[key].dtype == torch.float32
            torch.testing.assert_close(under[key], plain[key], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_delta_after_casting_the_wrapped_model(arch, input_ids, dtype):
    model = adapted(arch).to(dtype)
    assert model.base_model.get_generator().angles.dtype == dtype  # follows .to() as LoRA weights do
    assert torch.equal(logits(model, input_ids), base_logits(model, input_ids))
    model.train()
    assert torch.equal(model(input_ids).logits.detach(), base_logits(model, input_ids))


def test_casting_keeps_trained_weights(input_ids):
    model = adapted("gpt2")
    train_steps(model, input_ids, steps=2)
    before = regenerated(model)
    model.to(torch.float64)
    after = regenerated(model)
    for name in before:
        torch.testing.assert_close(after[name], before[name].double(), rtol=0, atol=1e-7)


# --- shot backends outside training ----------------------------------------------------------------------------
def test_eval_forwards_with_shots_are_deterministic_and_do_not_advance_the_step(input_ids):
    model = adapted("gpt2", backend="aer_shots", shots=64, init_weights=False)
    generator = model.base_model.get_generator()
    model.eval()
    first = model(input_ids).logits  # gradients enabled, as in a saliency or reference-model computation
    second = model(input_ids).logits
    assert int(generator.step) == 0
    assert torch.equal(first, second)
    assert torch.equal(logits(model, input_ids), first)  # the snapshot's values
    first.sum().backward()  # gradients still reach the generator in eval mode, as they reach LoRA weights
    assert generator.angles.grad is not None
    model.train()
    model(input_ids).logits
    assert int(generator.step) == 1  # a training forward draws new shots


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_forward_while_merged_never_rewrites_the_base_weights(input_ids, mode):
    model = adapted("gpt2", backend="aer_shots", shots=64, init_weights=False)
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    step = int(model.base_model.get_generator().step)
    model.merge_adapter()
    getattr(model, mode)()
    model(input_ids).logits.sum()  # gradients enabled
    assert int(model.base_model.get_generator().step) == step
    model.unmerge_adapter()
    for k, v in model.get_base_model().state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


# --- snapshots and live tensors ---------------------------------------------------------------------------------
def test_edits_through_data_reach_eval_save_merge_and_export(input_ids, tmp_path):
    model = adapted("gpt2")
    train_steps(model, input_ids, steps=2)
    logits(model, input_ids)  # snapshot fresh
    for p in model.base_model.get_generator().parameters():
        p.data.mul_(1.5)  # not seen by the version counter
    expected_tensors = regenerated(model)

    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    name, _ = qpa_layers(model)[0]
    torch.testing.assert_close(saved[f"base_model.model.{name}.qpa_lora_B"], expected_tensors[f"{name}.lora_B"])

    peft_qpa.export_lora(model, tmp_path / "lora")
    exported = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    torch.testing.assert_close(exported[f"base_model.model.{name}.lora_B.weight"], expected_tensors[f"{name}.lora_B"])

    for p in model.base_model.get_generator().parameters():
        p.data.mul_(1.1)
    unmerged = logits(model, input_ids)
    assert_snapshot_matches_generator(model)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, input_ids), unmerged, rtol=1e-4, atol=1e-5)


def test_safe_merge_sees_nan_written_through_data(input_ids):
    model = adapted("gpt2", init_weights=False)
    logits(model, input_ids)
    model.base_model.get_generator().mapping[-1].bias.data[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)


def test_calling_a_submodule_after_a_training_step_uses_current_weights(input_ids):
    model = adapted("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    decoder = model.base_model.model.model  # the decoder without the LM head
    hidden = decoder(input_ids).last_hidden_state  # gradients enabled, no whole-model forward since the step
    with torch.no_grad():
        expected = decoder(input_ids).last_hidden_state
    torch.testing.assert_close(hidden.detach(), expected, rtol=1e-5, atol=1e-5)
    hidden.sum().backward()  # its own graph, not the previous step's freed one
    # and again right after a backward, without an optimizer step in between
    model(input_ids, labels=input_ids).loss.backward()
    decoder(input_ids).last_hidden_state.sum().backward()


# --- loading cross-checks ---------------------------------------------------------------------------------------
def _saved(tmp_path, input_ids):
    model = adapted("gpt2")
    train_steps(model, input_ids, steps=2)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_loading_a_consistent_adapter_does_not_warn(input_ids, tmp_path):
    path = _saved(tmp_path, input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), path)


def test_loading_warns_when_the_generator_disagrees_with_its_snapshot(input_ids, tmp_path):
    path = _saved(tmp_path, input_ids)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.qpa_generator.mapping.0.weight"
    raw = tensors[key].view(torch.int32).clone()
    raw.view(-1)[0] ^= 1 << 29  # a flipped exponent bit in one weight
    tensors[key] = raw.view(torch.float32)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"adapter 'default'.*disagree.*max \|difference\|"):
        PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), path)


@pytest.mark.parametrize("field, value", [("prob_gamma", 0.3), ("mapping_activation", "tanh"), ("ansatz", "rx_cnot")])
def test_loading_warns_when_the_config_was_edited(input_ids, tmp_path, field, value):
    path = _saved(tmp_path, input_ids)
    config = json.loads((path / "adapter_config.json").read_text())
    config[field] = value
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="adapter 'default'"):
        PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), path)


# --- delete, pickle ---------------------------------------------------------------------------------------------
def test_delete_adapter_frees_its_generator(input_ids):
    model = adapted("gpt2")
    model.add_adapter("other", small_config("gpt2", seed=3))
    model.set_adapter("other")
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    model.set_adapter("default")
    ref = weakref.ref(model.base_model.get_generator("other"))
    model.delete_adapter("other")
    gc.collect()
    assert ref() is None
    for _, layer in qpa_layers(model):
        assert "other" not in layer._qpa_caches and "other" not in layer._qpa_tensor_names


def test_a_qpa_model_can_be_pickled(input_ids):
    model = adapted("gpt2")
    train_steps(model, input_ids, steps=1)
    model.train()
    model(input_ids, labels=input_ids).loss  # live tensors present
    model.eval()
    expected = logits(model, input_ids)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(logits(restored, input_ids), expected, rtol=0, atol=0)
    train_steps(restored, input_ids, steps=1)  # and it still trains


# --- merging through PEFT's base-weight API; conversion ---------------------------------------------------------
def test_merge_goes_through_the_quantization_backend(input_ids):
    model = adapted("llama")
    train_steps(model, input_ids, steps=2)
    expected = logits(model, input_ids)
    calls = []

    class RecordingBackend:  # stands in for a bitsandbytes / torchao backend
        supports_merge = True

        def get_base_weight(self, base_layer):
            calls.append("get")
            return base_layer.weight.data

        def set_base_weight(self, peft_layer, weight_data):
            calls.append("set")
            peft_layer.get_base_layer().weight.data = weight_data

        def maybe_clone_base_result(self, result):
            return result

    for _, layer in qpa_layers(model):
        assert hasattr(layer, "quantization_backend")
        layer.quantization_backend = RecordingBackend()
    model.merge_adapter()
    assert calls.count("set") == len(qpa_layers(model))
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    assert calls.count("set") == 2 * len(qpa_layers(model))


def test_peft_convert_to_lora_accepts_qpa(input_ids):
    from peft import convert_to_lora

    model = adapted("llama")
    train_steps(model, input_ids, steps=2)
    lora_config, state_dict = convert_to_lora(model, rank=4)
    assert state_dict and lora_config.r == 4


# --- export and save safety ------------------------------------------------------------------------------------
def test_export_refuses_to_overwrite_a_qpa_adapter(input_ids, tmp_path):
    model = adapted("gpt2")
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="QPA adapter"):
        peft_qpa.export_lora(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    peft_qpa.export_lora(model, tmp_path / "lora")
    peft_qpa.export_lora(model, tmp_path / "lora")  # overwriting an earlier LoRA export is fine


def test_an_interrupted_save_leaves_the_previous_adapter(input_ids, tmp_path, monkeypatch):
    model = adapted("gpt2")
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    train_steps(model, input_ids, steps=2)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt  # after the weights were written, before the config

    monkeypatch.setattr(peft_qpa.QPAConfig, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()
    model.save_pretrained(tmp_path)  # the next save goes through
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} != before
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")]


def test_save_into_a_directory_with_other_files_keeps_them(input_ids, tmp_path):
    model = adapted("gpt2")
    (tmp_path / "optimizer.pt").write_bytes(b"keep me")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "optimizer.pt").read_bytes() == b"keep me"
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "adapter_config.json").exists()
    PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), tmp_path)


# --- non-finite training -----------------------------------------------------------------------------------------
def test_non_finite_generator_parameters_are_reported_once(input_ids):
    model = adapted("gpt2")
    model.train()
    with torch.no_grad():
        model.base_model.get_generator().angles[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="adapter 'default'.*not finite"):
        model(input_ids, labels=input_ids).loss
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model(input_ids, labels=input_ids).loss  # said once, not at every step


# --- warnings ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_no_future_warning_from_the_checkpointing_check(input_ids, use_reentrant):
    model = adapted("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model(input_ids, labels=input_ids).loss.backward()
    assert model.base_model._forward_state()[2] is use_reentrant


def test_get_peft_model_checks_the_generators_memory_before_building_it(monkeypatch):
    config = small_config("llama")  # checked at construction with N = 1: fits
    monkeypatch.setenv("PEFT_QPA_MEMORY_BUDGET_GB", "1e-7")  # 100 bytes: the real M does not
    with pytest.raises(ValueError, match="memory"):
        get_peft_model(MODEL_FACTORIES["llama"](), config)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_no_grad_forwards_between_forward_and_backward(input_ids, use_reentrant):
    """TRL's DPO: the policy's forward, then no-grad reference forwards (adapter disabled, or not), then the
    policy's backward, which recomputes checkpointed layers: the generator's gradients are unchanged."""
    def grads(interleave):
        model = adapted("llama", init_weights=False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids, labels=input_ids).loss
            if interleave:
                with torch.no_grad():
                    with model.disable_adapter():
                        model(input_ids)
                    model(input_ids)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, interleaved = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(interleaved[name], plain[name], rtol=0, atol=0)


def test_a_device_smaller_than_the_circuit_is_refused_clearly():
    with pytest.raises(ValueError, match=r"'fake_manila' is a 5-qubit device.*N=\d+ qubits.*chunk_size"):
        adapted("gpt2", backend="aer_statevector", noise_model="fake_manila")
