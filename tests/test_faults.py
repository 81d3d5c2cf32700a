"""Faults a user meets with saved adapters and broken generators: saves that must not destroy what they do not own,
a stale weights file of the other format, prefix adapters on a model of another shape, non-finite generators in
eval, and clear messages where PEFT's are obscure."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_qpa
from peft_qpa import QPABottleneckConfig, QPAPrefixTuningConfig, QTConfig

from tiny_models import MODEL_FACTORIES, small_config, tiny_llama, train_steps

PREFIX = dict(task_type="CAUSAL_LM", num_virtual_tokens=4, chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[16, 16])
SMALL = dict(chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[16, 16])


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def two_adapters():
    model = get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama"))
    model.add_adapter("second", small_config("llama", seed=5))
    return model


def llama_with_layers(n_layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


# --- a save writes and replaces only the files of the adapters it saves ----------------------------------------
def test_saving_one_adapter_keeps_the_other_adapters_folder(tmp_path, input_ids):
    model = two_adapters()
    model.save_pretrained(tmp_path)
    second_before = files(tmp_path / "second")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(second_before)
    train_steps(model, input_ids, steps=2)
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    assert files(tmp_path / "second") == second_before
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path)
    reloaded.load_adapter(tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), rtol=0, atol=1e-6)


def test_saving_a_named_adapter_keeps_the_default_adapter_at_the_top(tmp_path, input_ids):
    model = two_adapters()
    model.save_pretrained(tmp_path)
    top_before = {k: v for k, v in files(tmp_path).items() if "/" not in k}
    train_steps(model, input_ids, steps=1)
    model.save_pretrained(tmp_path, selected_adapters=["second"])
    assert {k: v for k, v in files(tmp_path).items() if "/" not in k} == top_before
    assert (tmp_path / "second" / "adapter_config.json").is_file()


def test_a_folder_of_other_things_survives_a_save(tmp_path):
    model = get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("mine")
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "notes" / "README.md").read_text() == "mine" and (tmp_path / "empty").is_dir()
    assert (tmp_path / "adapter_config.json").is_file()


def test_export_keeps_an_adapter_in_a_subfolder(tmp_path):
    model = get_peft_model(MODEL_FACTORIES["llama"](), QPAPrefixTuningConfig(**PREFIX))
    peft_qpa.export(model, tmp_path)  # a plain prefix adapter at the top
    model.save_pretrained(tmp_path / "sub_adapter")  # a QPA prefix adapter beside it
    sub_before = files(tmp_path / "sub_adapter")
    peft_qpa.export(model, tmp_path)
    assert files(tmp_path / "sub_adapter") == sub_before
    assert (tmp_path / "adapter_config.json").is_file()


def test_a_resave_in_the_other_format_removes_the_stale_weights_file(tmp_path, input_ids):
    model = get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama"))
    (tmp_path / "trainer_state.json").write_text("{}")  # a checkpoint: the save moves files in one by one
    for directory in (tmp_path, tmp_path / "alone"):
        model.save_pretrained(directory)
    train_steps(model, input_ids, steps=3)
    for directory in (tmp_path, tmp_path / "alone"):
        model.save_pretrained(directory, safe_serialization=False)
        assert not (directory / "adapter_model.safetensors").exists()
        assert (directory / "adapter_model.bin").is_file()
        reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), directory)
        torch.testing.assert_close(logits(reloaded, input_ids), logits(model, input_ids), rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)  # and back
    assert not (tmp_path / "adapter_model.bin").exists() and (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "trainer_state.json").read_text() == "{}"


# --- prefix adapters on a model of another shape ------------------------------------------------------------------
@pytest.mark.parametrize("saved_layers, model_layers", [(3, 2), (2, 3)])
def test_a_prefix_adapter_for_another_layer_count_is_refused_at_load(tmp_path, saved_layers, model_layers):
    get_peft_model(llama_with_layers(saved_layers), QPAPrefixTuningConfig(**PREFIX)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"adapter: num_layers={saved_layers},.*this model: num_layers={model_layers},"):
        PeftModel.from_pretrained(llama_with_layers(model_layers), tmp_path)


def test_a_prefix_adapter_for_another_width_is_refused_at_load(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    get_peft_model(tiny_llama(), QPAPrefixTuningConfig(**PREFIX)).save_pretrained(tmp_path)
    wider = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=97, max_position_embeddings=64,
    ))
    # Under grouped-query attention PEFT re-derives token_dim (head_dim x num_key_value_heads: 16 for the tiny model,
    # 32 for this one) from the model at load, so the width is caught by the weights' shape.
    with pytest.raises(ValueError, match=r"shape \(4, 64\), the model needs \(4, 128\).*num_layers=2, token_dim=32"):
        PeftModel.from_pretrained(wider, tmp_path)


# --- non-finite generators in every mode ---------------------------------------------------------------------------
def _qt():
    return get_peft_model(MODEL_FACTORIES["llama"](), QTConfig(target_modules=["q_proj"], **SMALL))


def _bottleneck():
    return get_peft_model(MODEL_FACTORIES["llama"](), QPABottleneckConfig(target_modules=["mlp"], bottleneck_size=4,
                                                                           **SMALL))


def _prefix():
    return get_peft_model(MODEL_FACTORIES["llama"](), QPAPrefixTuningConfig(**PREFIX))


def _lora():
    return get_peft_model(MODEL_FACTORIES["llama"](), small_config("llama"))


def _generator(model):
    if hasattr(model, "prompt_encoder"):
        return model.prompt_encoder["default"].get_generator()
    return model.base_model.get_generator()


MEMBERS = {"QT": (_qt, "QT"), "bottleneck": (_bottleneck, "QPA_BOTTLENECK"),
           "prefix": (_prefix, "QPA prefix-tuning"), "lora": (_lora, "QPA")}


@pytest.mark.parametrize("member", sorted(MEMBERS))
@pytest.mark.parametrize("mode", ["eval", "no_grad", "train"])
def test_a_non_finite_generator_warns_once_in_every_mode_naming_the_member(member, mode, input_ids):
    build, label = MEMBERS[member]
    model = build()
    with torch.no_grad():
        _generator(model).angles[0] = float("nan")
    model.train(mode == "train")

    def run():
        if mode == "no_grad":
            with torch.no_grad():
                return model(input_ids).logits
        return model(input_ids, labels=input_ids).logits

    with pytest.warns(RuntimeWarning, match=rf"^{label} adapter 'default'.*not finite"):
        run()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run()  # once, not at every forward
    with torch.no_grad():
        _generator(model).angles[0] = 0.0
    run()  # finite again: silent, and the next NaN warns again
    with torch.no_grad():
        _generator(model).angles[0] = float("inf")
    with pytest.warns(RuntimeWarning, match="not finite"):
        run()


# --- clear messages --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["merge_and_unload", "merge_adapter", "unload"])
def test_merging_a_prefix_model_says_what_to_do(method):
    model = get_peft_model(tiny_llama(), QPAPrefixTuningConfig(**PREFIX))
    with pytest.raises(AttributeError, match=r"prefix tuning cannot be merged.*peft_qpa\.export"):
        getattr(model, method)()
    assert not hasattr(model, "merge_and_unload")


def test_plain_peft_attribute_errors_are_unchanged():
    model = get_peft_model(tiny_llama(), small_config("llama"))
    with pytest.raises(AttributeError, match="no_such_thing"):
        model.no_such_thing  # noqa: B018
    assert callable(model.merge_and_unload)


@pytest.mark.parametrize("build", [_qt, _bottleneck, _prefix, _lora], ids=["QT", "bottleneck", "prefix", "lora"])
def test_the_saved_config_and_card_say_import_peft_qpa(tmp_path, build):
    build().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "import peft_qpa" in config["loading"]
    assert "import peft_qpa" in (tmp_path / "README.md").read_text()
    PeftModel.from_pretrained(tiny_llama(), tmp_path)  # the note itself loads


def test_loading_without_import_peft_qpa_fails_with_peft_s_error_and_the_file_says_why(tmp_path):
    """PEFT dispatches on the type before any of our code runs: its KeyError is what a user sees (documented in
    docs/generator.md), and the config they then open says what to do."""
    _qt().save_pretrained(tmp_path)
    script = (
        "import sys; from peft import PeftConfig\n"
        "try:\n    PeftConfig.from_pretrained(sys.argv[1])\nexcept KeyError as e:\n    print('KeyError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert "KeyError 'QT'" in out.stdout, out.stderr
