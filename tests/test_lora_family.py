"""QPA-LoRA on Conv2d and Embedding targets, and QPA-DoRA (``use_dora=True``) on Linear, Conv1D, Conv2d and
Embedding: zero start (also under bf16 autocast), gradients, training, save/load, export to plain PEFT (loaded in a
subprocess that never imports peft_qpa), merge/unmerge, several adapters, and refused configurations."""

import copy
import inspect
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import peft_qpa
from peft_qpa.tuners.lora.layer import Conv2d, Embedding, Linear, QPALayer

from tiny_models import tiny_gpt2, tiny_llama

warnings.filterwarnings("ignore", message=".*groups > 1.*")


class TinyNet(nn.Module):
    """Token ids -> embedding -> 2-d feature map -> 3x3 conv -> 1x1 conv -> linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 16, padding_idx=0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=1)
        self.conv1x1 = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, input_ids, labels=None):
        h = self.emb(input_ids).reshape(input_ids.shape[0], 2, 4, 4 * input_ids.shape[1] // 2)[..., :4]
        h = self.conv1x1(torch.relu(self.conv(h)))
        return self.head(h.flatten(1))


SMALL = dict(r=4, lora_alpha=8, chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[8], seed=0)

# case id -> (base model factory, targets, use_dora)
CASES = {
    "dora-linear": (tiny_llama, ["q_proj", "v_proj"], True),
    "dora-conv1d": (tiny_gpt2, ["c_attn"], True),
    "dora-conv2d": (TinyNet, ["conv", "conv1x1"], True),
    "dora-embedding": (TinyNet, ["emb"], True),
    "lora-conv2d": (TinyNet, ["conv", "conv1x1"], False),
    "lora-embedding": (tiny_llama, ["embed_tokens"], False),
}
LAYER_CLASS = {"linear": Linear, "conv1d": Linear, "conv2d": Conv2d, "embedding": Embedding}


def config(case, **overrides):
    _, targets, use_dora = CASES[case]
    return peft_qpa.QPAConfig(target_modules=targets, **{**SMALL, "use_dora": use_dora, **overrides})


def build(case, **overrides):
    base = CASES[case][0]()
    return base, get_peft_model(copy.deepcopy(base), config(case, **overrides))


def inputs(case):
    return torch.randint(1, 30, (3, 8), generator=torch.Generator().manual_seed(1))


def out(model, x):
    y = model(x)
    return y.logits if hasattr(y, "logits") else y


def loss_of(model, x):
    y = out(model, x)
    return y.float().pow(2).mean() if y.dim() == 2 else nn.functional.cross_entropy(y.flatten(0, 1), x.flatten())


def train(model, x, steps=3, lr=1e-2):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def qpa_layers(model):
    return [(n, m) for n, m in model.base_model.model.named_modules() if isinstance(m, QPALayer)]


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


# --- the layers --------------------------------------------------------------------------------------------
def test_layer_classes_and_peft_shapes(case):
    _, model = build(case)
    kind = case.split("-")[1]
    layers = qpa_layers(model)
    assert layers and all(type(layer) is LAYER_CLASS[kind] for _, layer in layers)
    # the exported tensors have exactly the shapes PEFT's LoraConfig(use_dora=...) gives the same targets
    base, targets, use_dora = CASES[case][0](), CASES[case][1], CASES[case][2]
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, use_dora=use_dora))
    from peft.utils import get_peft_model_state_dict

    expected = {k: v.shape for k, v in get_peft_model_state_dict(peft_model, save_embedding_layers=False).items()}
    ours = {}
    for name, layer in layers:
        from peft_qpa.apps.export import _layer_entries

        ours.update({k: v.shape for k, v in _layer_entries(layer, f"base_model.model.{name}", "default").items()})
    assert ours == expected
    for _, layer in layers:
        assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape
        assert repr(layer).startswith("qpa.")


def test_zero_delta_at_step_zero_also_under_autocast(case):
    base, model = build(case)
    x = inputs(case)
    with torch.no_grad():
        expected = out(base, x)
        assert torch.equal(out(model, x), expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected_bf16 = out(base, x)
            assert torch.equal(out(model, x), expected_bf16)
    model.train()  # live generator output
    assert torch.equal(out(model, x).detach(), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(out(model, x).detach(), expected_bf16)


def test_gradients_reach_every_generator_parameter(case):
    _, model = build(case)
    model.train()
    loss_of(model, inputs(case)).backward()
    generator = model.base_model.get_generator()
    named = dict(generator.named_parameters())
    assert "angles" in named and any(n.startswith("mapping.") for n in named)
    for name, parameter in named.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_training_lowers_the_loss(case):
    _, model = build(case)
    losses = train(model, inputs(case), steps=6, lr=1e-2)
    assert losses[-1] < losses[0]


def test_save_and_load_give_identical_outputs(case, tmp_path):
    base, model = build(case)
    x = inputs(case)
    train(model, x, steps=2)
    with torch.no_grad():
        expected = out(model, x)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    if CASES[case][2]:
        assert any(k.endswith("qpa_magnitude_base") for k in saved) and any(k.endswith("qpa_magnitude_delta") for k in saved)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(out(loaded, x), expected)


def test_merge_and_unload_and_unmerge(case):
    base, model = build(case, init_weights=False)  # nonzero delta and magnitude change
    x = inputs(case)
    model.eval()
    with torch.no_grad():
        expected = out(model, x)
        assert not torch.allclose(expected, out(base, x), atol=1e-4)
        model.merge_adapter()
        torch.testing.assert_close(out(model, x), expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        for (name, layer) in qpa_layers(model):
            torch.testing.assert_close(
                layer.get_base_layer().weight, base.get_submodule(name).weight, rtol=0, atol=1e-6
            )
        torch.testing.assert_close(out(model, x), expected, rtol=1e-5, atol=1e-5)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, QPALayer) for m in merged.modules())
        torch.testing.assert_close(out(merged, x), expected, rtol=1e-5, atol=1e-5)


def test_several_adapters(case):
    base, model = build(case)
    x = inputs(case)
    train(model, x, steps=3)
    other = config(case, seed=1, use_dora=not CASES[case][2])  # the other family member on the same targets
    model.add_adapter("other", other)
    model.set_adapter("other")
    assert not any(p.requires_grad for p in model.base_model.get_generator("default").parameters())
    train(model, x, steps=3)
    with torch.no_grad():
        second = out(model, x)
        model.set_adapter("default")
        first = out(model, x)
        assert not torch.allclose(first, second, atol=1e-4)
        # both active: merging (one after another, each DoRA norm on the unmerged weight) matches the forward
        model.base_model.set_adapter(["default", "other"])
        both = out(model, x)
        model.merge_adapter(["default", "other"])
        torch.testing.assert_close(out(model, x), both, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()  # DoRA's unmerge divides by the merge's factor (as PEFT): exact up to rounding
        for name, layer in qpa_layers(model):
            torch.testing.assert_close(layer.get_base_layer().weight, base.get_submodule(name).weight, rtol=0, atol=1e-6)
        model.base_model.set_adapter("default")
        model.delete_adapter("other")
        assert "other" not in model.peft_config
        torch.testing.assert_close(out(model, x), first, rtol=1e-5, atol=1e-5)


# --- export to plain PEFT ------------------------------------------------------------------------------------
PLAIN_PEFT_CHECK = """
import json, sys
import torch
from torch import nn
from peft import PeftModel
{model_source}
results = {{}}
for case, info in json.load(open(sys.argv[1])).items():
    ref = torch.load(info["ref"])
    if info["hf"]:
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(info["base"])
    else:
        base = TinyNet()
        base.load_state_dict(ref["base"])
    model = PeftModel.from_pretrained(base, info["adapter"]).eval()
    with torch.no_grad():
        y = model(ref["x"])
        y = y.logits if hasattr(y, "logits") else y
    config = json.load(open(info["adapter"] + "/adapter_config.json"))
    results[case] = [float((y - ref["out"]).abs().max()), config["peft_type"], config["use_dora"]]
assert "peft_qpa" not in sys.modules
print(json.dumps(results))
"""


def test_export_is_exact_in_plain_peft(tmp_path):
    plan = {}
    for case, (factory, _, use_dora) in CASES.items():
        base, model = build(case)
        x = inputs(case)
        train(model, x, steps=2)
        with torch.no_grad():
            expected = out(model, x)
        adapter = tmp_path / case / "adapter"
        lora_config = peft_qpa.export_lora(model, adapter)
        assert lora_config.use_dora is use_dora
        hf = hasattr(base, "save_pretrained")
        if hf:
            base.save_pretrained(tmp_path / case / "base")
        ref = tmp_path / case / "ref.pt"
        torch.save({"x": x, "out": expected, "base": None if hf else base.state_dict()}, ref)
        plan[case] = {"hf": hf, "base": str(tmp_path / case / "base"), "adapter": str(adapter), "ref": str(ref)}
        keys = load_file(adapter / "adapter_model.safetensors").keys()
        assert not any("qpa_" in k for k in keys)
        assert any(k.endswith("lora_magnitude_vector") for k in keys) is use_dora
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    script = PLAIN_PEFT_CHECK.format(model_source=textwrap.dedent(inspect.getsource(TinyNet)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "plan.json")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, (worst, peft_type, use_dora) in results.items():
        assert peft_type == "LORA" and use_dora is CASES[case][2], case
        assert worst <= 1e-5, (case, worst)


# --- refused configurations -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["yes", 1, None])
def test_use_dora_must_be_a_bool(value):
    with pytest.raises(ValueError, match="use_dora"):
        peft_qpa.QPAConfig(target_modules=["q_proj"], use_dora=value)


class _Convs(nn.Module):
    def __init__(self, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, **conv_kwargs)
        self.emb = nn.Embedding(10, 4, max_norm=1.0)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    "conv_kwargs, target, message",
    [
        ({"groups": 4}, "conv", "groups=4 and rank 2"),
        ({"dilation": 2}, "conv", "dilation"),
        ({"padding": 1, "padding_mode": "reflect"}, "conv", "padding_mode"),
        ({}, "emb", "max_norm"),
    ],
)
def test_unsupported_layers_are_refused_with_the_reason(conv_kwargs, target, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(_Convs(**conv_kwargs), peft_qpa.QPAConfig(target_modules=[target], **{**SMALL, "r": 2}))


def test_grouped_conv_runs_but_refuses_to_merge():
    model = get_peft_model(_Convs(groups=2), peft_qpa.QPAConfig(target_modules=["conv"], **{**SMALL, "r": 2}))
    x = torch.randn(1, 4, 5, 5)
    base_out = model.get_base_model().conv.get_base_layer()(x)
    assert torch.equal(model(x), base_out)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        model.merge_adapter()


def test_other_layer_types_are_still_refused():
    with pytest.raises(TypeError, match="LlamaRMSNorm.*not supported by QPA"):
        get_peft_model(tiny_llama(), peft_qpa.QPAConfig(target_modules=["input_layernorm"], **SMALL))
