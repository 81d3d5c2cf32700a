"""Bottleneck (feed-forward) adapters: the QPA member (``QPABottleneckConfig``, PEFT type ``QPA_BOTTLENECK``) and the
classical baseline (``BottleneckConfig``, PEFT type ``BOTTLENECK``), on a tiny Llama and a tiny GPT-2."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

import peft_qpa
import peft_qpa.generator.generator as generator_module
from peft_qpa import BottleneckConfig, QPABottleneckConfig

try:
    from .tiny_models import MODEL_FACTORIES, train_steps
except ImportError:
    from tiny_models import MODEL_FACTORIES, train_steps

SMALL = dict(chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[16], seed=0)
MEMBERS = ["qpa", "classical"]


def config(member, **overrides):
    kwargs = dict(target_modules=["mlp"], bottleneck_size=4)
    if member == "qpa":
        kwargs.update(SMALL)
    kwargs.update(overrides)
    return (QPABottleneckConfig if member == "qpa" else BottleneckConfig)(**kwargs)


def adapted(arch, member, seed=0, **overrides):
    torch.manual_seed(seed + 100)  # the classical adapter's initialisation
    return get_peft_model(MODEL_FACTORIES[arch](), config(member, **overrides))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(params=MEMBERS)
def member(request):
    return request.param


# --- step 0 ----------------------------------------------------------------------------------------------------
def test_zero_delta_at_step_zero(arch, member, input_ids):
    base = MODEL_FACTORIES[arch]()
    model = adapted(arch, member)
    torch.testing.assert_close(logits(model, input_ids), logits(base, input_ids), rtol=0, atol=0)
    model.train()
    torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits, rtol=0, atol=0)


def test_zero_delta_at_step_zero_under_bf16_autocast(arch, member, input_ids):
    base = MODEL_FACTORIES[arch]()
    model = adapted(arch, member, target_modules=["mlp", "attn" if arch == "gpt2" else "self_attn"])
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = base(input_ids).logits, model(input_ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_init_is_kaiming_down_and_zero_up(member):
    model = adapted("llama", member, bottleneck_size=8)
    tensors = model.base_model.bottleneck_tensors()
    assert set(tensors) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    for t in tensors.values():
        assert t["down_weight"].shape == (8, 32) and t["up_weight"].shape == (32, 8)
        assert t["down_bias"].shape == (8,) and t["up_bias"].shape == (32,)
        bound = 1 / 32**0.5  # nn.Linear's default: kaiming_uniform_(a=sqrt(5)) on fan_in 32
        assert 0.5 * bound < t["down_weight"].abs().max() <= bound * (1 + 1e-5)
        for name in ("down_bias", "up_weight", "up_bias"):
            assert torch.count_nonzero(t[name]) == 0, name


# --- gradients and training ------------------------------------------------------------------------------------
def test_gradients_reach_every_generator_parameter(arch, input_ids):
    model = adapted(arch, "qpa")
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    generator = model.base_model.get_generator()
    for name, p in generator.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".qpa_bottleneck_generator." in n for n in trainable)


def test_classical_trains_exactly_the_adapter_tensors(arch):
    model = adapted(arch, "classical")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".bottleneck_down." in n or ".bottleneck_up." in n for n in trainable)
    assert sum(trainable.values()) == model.base_model.bottleneck_parameter_count() == 2 * (2 * 32 * 4 + 4 + 32)


def test_training_lowers_the_loss(arch, member, input_ids):
    base = MODEL_FACTORIES[arch]()
    model = adapted(arch, member)
    losses = train_steps(model, input_ids, steps=8, lr=1e-2)
    assert losses[-1] < losses[0], losses
    assert not torch.allclose(logits(model, input_ids), logits(base, input_ids))


# --- the same architecture -------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["sequential", "parallel"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_qpa_and_classical_have_the_same_architecture(arch, input_ids, placement, activation):
    fields = dict(placement=placement, activation=activation, init_weights=False)
    qpa = adapted(arch, "qpa", **fields)
    qpa.eval()
    classical = get_peft_model(MODEL_FACTORIES[arch](), qpa.base_model.classical_config())
    assert isinstance(classical.base_model, peft_qpa.BottleneckModel)
    assert classical.peft_config["default"].placement == placement
    classical.base_model.set_bottleneck_tensors(qpa.base_model.bottleneck_tensors())
    expected = logits(qpa, input_ids)
    assert not torch.allclose(expected, logits(MODEL_FACTORIES[arch](), input_ids))
    torch.testing.assert_close(logits(classical, input_ids), expected, rtol=1e-6, atol=1e-6)
    assert qpa.base_model.classical_parameter_count() == classical.base_model.bottleneck_parameter_count()


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
def test_forward_is_the_documented_formula(member, activation):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 6))
    x = torch.randn(3, 6)
    fn = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[activation]
    for placement in ("sequential", "parallel"):
        wrapper = nn.ModuleDict({"block": block})
        model = get_peft_model(_Wrap(block), config(member, target_modules=["block"], activation=activation,
                                                    placement=placement, init_weights=False, bottleneck_size=3))
        t = model.base_model.bottleneck_tensors()["block"]
        h = block(x)
        source = h if placement == "sequential" else x
        expected = h + F.linear(fn(F.linear(source, t["down_weight"], t["down_bias"])), t["up_weight"], t["up_bias"])
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
        model.unload()
        del wrapper


class _Wrap(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


# --- targets ---------------------------------------------------------------------------------------------------
def test_attention_targets_get_the_adapter_on_the_first_element(arch, member, input_ids):
    target = "attn" if arch == "gpt2" else "self_attn"
    base = MODEL_FACTORIES[arch]()
    model = adapted(arch, member, target_modules=[target])
    torch.testing.assert_close(logits(model, input_ids), logits(base, input_ids), rtol=0, atol=0)
    model = adapted(arch, member, target_modules=[target], init_weights=False)
    assert not torch.allclose(logits(model, input_ids), logits(base, input_ids))
    layer = model.base_model.model.get_submodule("transformer.h.0.attn" if arch == "gpt2" else "model.layers.0.self_attn")
    assert layer.bottleneck_settings["default"].width == 32


def test_linear_and_conv1d_targets(arch, member, input_ids):
    target = "c_proj" if arch == "gpt2" else "o_proj"  # GPT-2: Conv1D in attn and mlp; Llama: the attention output
    model = adapted(arch, member, target_modules=[target], init_weights=False)
    widths = {layer.bottleneck_settings["default"].width for _, layer in model.base_model._targeted_layers("default")}
    assert widths == {32}
    assert torch.isfinite(logits(model, input_ids)).all()


def test_default_targets_are_the_mlp_blocks(arch, member):
    model = get_peft_model(MODEL_FACTORIES[arch](), config(member, target_modules=None))
    assert model.peft_config["default"].target_modules == {"mlp"}
    assert len(model.base_model._targeted_layers("default")) == 2


def test_a_target_without_a_width_is_refused_clearly(member):
    # Llama's post_attention_layernorm (RMSNorm) has no Linear: its output width cannot be inferred
    target = "post_attention_layernorm"
    with pytest.raises(ValueError, match=rf"cannot find the output width of target `model\.layers\.0\.{target}`.*hidden_size"):
        get_peft_model(MODEL_FACTORIES["llama"](), config(member, target_modules=[target]))
    # with hidden_size it works
    ids = torch.tensor([[1, 2, 3]])
    model = get_peft_model(MODEL_FACTORIES["llama"](), config(member, target_modules=[target], hidden_size=32,
                                                               init_weights=False))
    assert not torch.allclose(logits(model, ids), logits(MODEL_FACTORIES["llama"](), ids))
    # a wrong hidden_size is caught at the first forward
    model = get_peft_model(MODEL_FACTORIES["llama"](), config(member, target_modules=[target], hidden_size=16))
    with pytest.raises(ValueError, match="built for width 16.*32 output features"):
        logits(model, ids)
    # a target without parameters (an activation) is refused
    with pytest.raises(ValueError, match=r"target `model\.layers\.0\.mlp\.act_fn` \(\w+\) has no parameters"):
        get_peft_model(MODEL_FACTORIES["llama"](), config(member, target_modules=["act_fn"], hidden_size=64))


def test_parallel_needs_equal_widths(member):
    with pytest.raises(ValueError, match=r"placement='parallel' needs targets whose input and output widths agree.*32 to 64"):
        get_peft_model(MODEL_FACTORIES["llama"](), config(member, target_modules=["up_proj"], placement="parallel"))


def test_bf16_base_model(member, input_ids):
    base = MODEL_FACTORIES["llama"]().to(torch.bfloat16)
    model = get_peft_model(MODEL_FACTORIES["llama"]().to(torch.bfloat16), config(member))
    torch.testing.assert_close(logits(model, input_ids), logits(base, input_ids), rtol=0, atol=0)
    losses = train_steps(model, input_ids, steps=3, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))


# --- save and load ---------------------------------------------------------------------------------------------
def test_save_and_load_give_identical_logits(arch, member, input_ids, tmp_path):
    model = adapted(arch, member, dropout=0.1)
    train_steps(model, input_ids, steps=3)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("QPA_BOTTLENECK" if member == "qpa" else "BOTTLENECK")
    assert saved["bottleneck_size"] == 4 and saved["dropout"] == 0.1
    loaded = PeftModel.from_pretrained(MODEL_FACTORIES[arch](), tmp_path)
    expected_cls = peft_qpa.QPABottleneckModel if member == "qpa" else peft_qpa.BottleneckModel
    assert isinstance(loaded.base_model, expected_cls)
    torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=0, atol=0)


def test_inference_from_a_saved_qpa_adapter_runs_no_simulation(input_ids, tmp_path, monkeypatch):
    model = adapted("llama", "qpa")
    train_steps(model, input_ids, steps=2)
    expected = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    calls = []
    original = generator_module.QPAGenerator.probabilities

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(generator_module.QPAGenerator, "probabilities", counted)
    loaded = PeftModel.from_pretrained(MODEL_FACTORIES["llama"](), tmp_path, low_cpu_mem_usage=True)
    at_load = len(calls)
    for _ in range(2):
        torch.testing.assert_close(logits(loaded, input_ids), expected, rtol=0, atol=0)
    assert len(calls) == at_load  # the no-grad forwards read the saved snapshot
    # at load, the only simulation is the cross-check of the loaded generator against the loaded snapshot
    assert at_load <= 1


# --- several adapters, disabling, merging ----------------------------------------------------------------------
def test_two_adapters(member, input_ids):
    model = adapted("llama", member, init_weights=False)
    other = config(member, target_modules=["mlp", "self_attn"], init_weights=False, bottleneck_size=2,
                   **({"seed": 1} if member == "qpa" else {}))
    model.add_adapter("other", other)
    first = logits(model, input_ids)
    model.set_adapter("other")
    second = logits(model, input_ids)
    assert not torch.allclose(first, second)
    if member == "qpa":
        generators = model.base_model._generators()
        assert set(generators) == {"default", "other"}
        assert all(p.requires_grad for p in generators["other"].parameters())
        assert not any(p.requires_grad for p in generators["default"].parameters())
    else:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".other." in n for n in trainable)
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, input_ids), first, rtol=0, atol=0)
    model.delete_adapter("other")
    torch.testing.assert_close(logits(model, input_ids), first, rtol=0, atol=0)
    assert not any("other" in n for n, _ in model.named_parameters())


def test_disable_adapter(member, input_ids):
    base = MODEL_FACTORIES["gpt2"]()
    model = adapted("gpt2", member, init_weights=False)
    adapted_logits = logits(model, input_ids)
    assert not torch.allclose(adapted_logits, logits(base, input_ids))
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), logits(base, input_ids), rtol=0, atol=0)
    torch.testing.assert_close(logits(model, input_ids), adapted_logits, rtol=0, atol=0)


def test_merging_is_refused_with_advice_and_unload_works(member, input_ids):
    base = MODEL_FACTORIES["llama"]()
    model = adapted("llama", member, init_weights=False)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(NotImplementedError, match=r"cannot be merged into the base weights.*nonlinear.*unload\(\)"):
            merge()
    layer = model.base_model.model.model.layers[0].mlp
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        layer.merge()
    unloaded = model.unload()
    assert type(unloaded) is type(base)
    assert not any("bottleneck" in n for n, _ in unloaded.state_dict().items())
    torch.testing.assert_close(logits(unloaded, input_ids), logits(base, input_ids), rtol=0, atol=0)


# --- gradient checkpointing and the Trainer --------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(member, input_ids, use_reentrant):
    def grads(checkpointing):
        model = adapted("llama", member, init_weights=False, target_modules=["mlp", "self_attn"])
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            if use_reentrant:
                model.enable_input_require_grads()
        model.train()
        model(input_ids, labels=input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


class _RepeatedBatch(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randint(1, 97, (12,), generator=g) for _ in range(4)] * 2

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i], "attention_mask": torch.ones_like(self.items[i])}


def test_trainer_smoke(member, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = adapted("gpt2", member)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = Trainer(model=model, args=args, train_dataset=_RepeatedBatch())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    checkpoint = tmp_path / "checkpoint-4"
    batch = _RepeatedBatch()[0]["input_ids"][None]
    model.eval()
    reloaded = PeftModel.from_pretrained(MODEL_FACTORIES["gpt2"](), checkpoint)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)


# --- reporting and configs -------------------------------------------------------------------------------------
def test_generator_summary_reports_qubits_m_and_the_ratio():
    model = adapted("llama", "qpa", bottleneck_size=8)
    m = 2 * (2 * 32 * 8 + 8 + 32)
    generator = model.base_model.get_generator()
    assert generator.num_generated == model.base_model.classical_parameter_count() == m
    summary = model.base_model.generator_summary()
    assert f"M = {m}" in summary and f"generated numbers M: {m}" in summary
    assert f"qubits N: {generator.n_qubits}" in summary
    assert "ratio to the bottleneck adapters trained directly (BottleneckConfig)" in summary
    assert f"{generator.num_trainable()} / {m}" in summary
    classical = adapted("llama", "classical", bottleneck_size=8)
    assert sum(p.numel() for p in classical.parameters() if p.requires_grad) == m


@pytest.mark.parametrize("cls", [QPABottleneckConfig, BottleneckConfig])
@pytest.mark.parametrize(
    "field, value",
    [("bottleneck_size", 0), ("bottleneck_size", 2.5), ("activation", "swish"), ("placement", "before"),
     ("dropout", 1.0), ("dropout", -0.1), ("hidden_size", 0), ("init_weights", "yes"), ("target_modules", []),
     ("modules_to_save", "lm_head")],
)
def test_bad_config_values_name_the_field(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
        cls(**{"target_modules": ["mlp"], field: value})


def test_missing_targets_on_an_unknown_architecture_are_refused_clearly(member):
    with pytest.raises(ValueError, match=r"target_modules must be set for model type 'custom'"):
        get_peft_model(_Wrap(nn.Linear(4, 4)), config(member, target_modules=None))


def test_config_round_trip_and_peft_types(tmp_path):
    qpa = QPABottleneckConfig(target_modules=["mlp"], bottleneck_size=8, activation="gelu", placement="parallel",
                              hidden_size=32, **SMALL)
    assert qpa.peft_type == "QPA_BOTTLENECK"
    qpa.save_pretrained(tmp_path / "q")
    loaded = QPABottleneckConfig.from_pretrained(tmp_path / "q")
    assert (loaded.bottleneck_size, loaded.activation, loaded.placement, loaded.hidden_size) == (8, "gelu", "parallel", 32)
    classical = qpa.classical_config()
    assert classical.peft_type == "BOTTLENECK" and classical.bottleneck_fields() == qpa.bottleneck_fields()
    classical.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["peft_type"] == "BOTTLENECK"
    assert BottleneckConfig.from_pretrained(tmp_path / "c").bottleneck_fields() == qpa.bottleneck_fields()
