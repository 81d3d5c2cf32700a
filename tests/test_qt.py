"""Quantum-Train (``QTConfig``, PEFT type ``QT``): the full weight update of every target generated."""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

import peft_qpa
import peft_qpa.generator.blockwise as blockwise_module
from peft_qpa import QTConfig

try:
    from .tiny_models import tiny_gpt2
except ImportError:
    from tiny_models import tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))

SMALL = dict(chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[16, 16], seed=0)


class Net(nn.Module):
    """Every target type QT supports but Conv1D (see tiny GPT-2): Embedding, Conv2d (with padding and groups), Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=1, groups=2)
        self.lin0 = nn.Linear(4 * 4 * 4 + 8, 16)
        self.lin1 = nn.Linear(16, 5)

    def forward(self, x, ids):
        h = torch.relu(self.conv(x)).flatten(1)
        h = torch.cat([h, self.emb(ids).mean(1)], 1)
        return self.lin1(torch.relu(self.lin0(h)))


TARGETS = ["emb", "conv", "lin0", "lin1"]


def net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 12, (6, 3), generator=g)


def adapted(seed=0, **overrides):
    kwargs = dict(target_modules=TARGETS, **SMALL)
    kwargs.update(overrides)
    return get_peft_model(net(seed), QTConfig(**kwargs))


def train(model, steps=6, lr=2e-2):
    x, ids = inputs()
    target = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(model(x, ids), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def out(model):
    with torch.no_grad():
        return model(*inputs())


# --- start, gradients, training --------------------------------------------------------------------------------
def test_zero_delta_at_step_zero():
    base = net()
    model = adapted()
    torch.testing.assert_close(out(model), out(base), rtol=0, atol=0)
    model.train()
    x, ids = inputs()
    torch.testing.assert_close(model(x, ids), base(x, ids), rtol=0, atol=0)


def test_zero_delta_at_step_zero_under_bf16_autocast():
    base, model = net(), adapted(bias_update=True)
    model.train()
    x, ids = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = base(x, ids), model(x, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for name, buffer in model.named_buffers():
        if "qt_delta" in name:
            assert torch.count_nonzero(buffer) == 0, name


def test_gradients_reach_every_generator_parameter_at_the_first_step():
    model = adapted(bias_update=True)
    model.train()
    x, ids = inputs()
    model(x, ids).pow(2).sum().backward()
    generator = model.base_model.get_generator()
    for name, p in generator.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".qt_generator." in n for n in trainable)


def test_training_lowers_the_loss_and_changes_the_model():
    model = adapted()
    losses = train(model, steps=10)
    assert losses[-1] < losses[0]
    assert not torch.allclose(out(model), out(net()))


def test_generator_summary_reports_m_and_the_ratio():
    model = adapted(bias_update=True)
    base = net()
    m = sum(p.numel() for n, p in base.named_parameters())
    generator = model.base_model.get_generator()
    assert generator.num_generated == m  # every weight and bias of the targets
    summary = model.base_model.generator_summary()
    assert f"M = {m}" in summary and f"generated numbers M: {m}" in summary
    assert "ratio to the target weights trained directly" in summary
    assert f"{generator.num_trainable()} / {m}" in summary


# --- each target type ------------------------------------------------------------------------------------------
def _functional_equals_merged(model, base_fn):
    """The adapter's forward equals the network with W + ΔW (from merge) on the same input."""
    model.eval()
    expected = base_fn(model)
    merged = model.merge_and_unload()
    got = base_fn(merged)
    torch.testing.assert_close(expected, got, rtol=1e-5, atol=1e-5)
    return merged


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bias_update", [False, True])
def test_each_target_type_forward_equals_merged_weights(target, bias_update):
    model = adapted(target_modules=[target], init_weights=False, bias_update=bias_update)
    layer = model.base_model.model.get_submodule(target)
    assert isinstance(layer, peft_qpa.QTLayer)
    delta = layer.get_delta_weight("default")
    assert delta.shape == layer.get_base_layer().weight.shape and torch.count_nonzero(delta) > 0
    has_bias = bias_update and target != "emb"  # an Embedding has no bias to update
    assert (layer.get_delta_bias("default") is not None) == has_bias
    assert not torch.allclose(out(model), out(net()))
    merged = _functional_equals_merged(model, out)
    assert type(merged) is Net
    assert type(merged.get_submodule(target)) is type(net().get_submodule(target))


def test_conv1d_of_gpt2():
    base = tiny_gpt2()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(tiny_gpt2(), QTConfig(target_modules=["c_attn", "c_proj"], **SMALL))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=0)
    model = get_peft_model(tiny_gpt2(), QTConfig(target_modules=["c_attn", "c_proj", "wpe"], init_weights=False,
                                                 bias_update=True, **SMALL))
    model.eval()
    with torch.no_grad():
        adapted_logits = model(ids).logits
        assert not torch.allclose(adapted_logits, base(ids).logits)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, adapted_logits, rtol=1e-4, atol=1e-5)
    assert type(merged).__name__ == "GPT2LMHeadModel"


def test_unsupported_targets_are_refused_with_advice():
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.lin = nn.Linear(4, 4)

    with pytest.raises(TypeError, match="LayerNorm.*not supported by Quantum-Train.*target_modules"):
        get_peft_model(WithNorm(), QTConfig(target_modules=["norm"], **SMALL))

    class WithMaxNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4, max_norm=1.0)

    with pytest.raises(TypeError, match="max_norm"):
        get_peft_model(WithMaxNorm(), QTConfig(target_modules=["emb"], **SMALL))


# --- configs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [("bias_update", "yes"), ("init_weights", 1), ("chunk_size", 0), ("qnn_depth", 0), ("target_modules", []),
     ("mapping_hidden_sizes", [0]), ("modules_to_save", "lin1")],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"QTConfig\.{field} must be"):
        QTConfig(**{"target_modules": ["lin0"], field: value})


def test_missing_target_modules_is_refused_clearly():
    with pytest.raises(ValueError, match=r"QTConfig\.target_modules must be set"):
        get_peft_model(net(), QTConfig(**SMALL))


def test_config_round_trip_and_peft_type(tmp_path):
    config = QTConfig(target_modules=["lin0"], bias_update=True, **SMALL)
    assert config.peft_type == "QT"
    config.save_pretrained(tmp_path)
    loaded = QTConfig.from_pretrained(tmp_path)
    assert loaded.bias_update is True and loaded.peft_type == "QT" and loaded.chunk_size == 16
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "QT"


# --- save, load, merge ------------------------------------------------------------------------------------------
def test_save_and_load_give_identical_outputs(tmp_path):
    model = adapted(bias_update=True)
    train(model, steps=4)
    expected = out(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "QT" and config["bias_update"] is True
    loaded = PeftModel.from_pretrained(net(), tmp_path).eval()
    assert isinstance(loaded.base_model, peft_qpa.QTModel)
    torch.testing.assert_close(out(loaded), expected, rtol=0, atol=0)
    # the loaded generator reproduces the snapshot: training could continue from it
    worst, tolerance, beyond, _ = loaded.base_model.generated_cache().disagreement()
    assert beyond == 0, (worst, tolerance)


def test_merge_and_unload_is_exact_and_plain():
    model = adapted(bias_update=True)
    train(model, steps=4)
    expected = out(model)
    merged = model.merge_and_unload()
    assert type(merged) is Net
    assert not any("qt_" in n for n, _ in merged.named_parameters())
    assert not any("qt_" in n for n, _ in merged.named_buffers())
    torch.testing.assert_close(out(merged), expected, rtol=1e-5, atol=1e-6)


def test_unmerge_restores_the_base_weights_exactly():
    base = net()
    model = adapted(bias_update=True)
    train(model, steps=3)
    expected = out(model)
    model.merge_adapter()
    torch.testing.assert_close(out(model), expected, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    for name, p in base.named_parameters():
        got = model.base_model.model.get_submodule(name.rsplit(".", 1)[0])
        got = got.get_base_layer() if hasattr(got, "get_base_layer") else got
        assert torch.equal(getattr(got, name.rsplit(".", 1)[1]), p), name
    torch.testing.assert_close(out(model), expected, rtol=0, atol=0)
    with model.disable_adapter():
        torch.testing.assert_close(out(model), out(base), rtol=0, atol=0)


def test_two_adapters():
    model = adapted(init_weights=False)
    model.add_adapter("other", QTConfig(target_modules=["lin0", "lin1"], init_weights=False, **{**SMALL, "seed": 1}))
    first = out(model)
    model.set_adapter("other")
    second = out(model)
    assert not torch.allclose(first, second)
    generators = model.base_model._generators()
    assert set(generators) == {"default", "other"}
    assert all(p.requires_grad for p in generators["other"].parameters())
    assert not any(p.requires_grad for p in generators["default"].parameters())
    model.set_adapter("default")
    torch.testing.assert_close(out(model), first, rtol=0, atol=0)
    model.delete_adapter("other")
    assert set(model.base_model._generators()) == {"default"}
    torch.testing.assert_close(out(model), first, rtol=0, atol=0)


# --- memory ----------------------------------------------------------------------------------------------------
def test_blockwise_generation_matches_the_whole_mlp_path(monkeypatch):
    # Large generators run the mapping MLP block by block (forward and recomputed backward): the same numbers
    # and gradients as the whole-MLP path, to float rounding.
    from peft_qpa.generator import QPAGenerator, TensorSpec

    specs = [TensorSpec("a", (37, 50), "kaiming_uniform"), TensorSpec("b", (23, 41), "zeros")]

    def run():
        g = QPAGenerator(specs, depth=2, chunk_size=16, hidden_sizes=(8, 8))
        with torch.no_grad():
            for i, p in enumerate(g.parameters()):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        g.zero_grad()
        pieces = g.generate_pieces()
        loss = sum((t * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum() for t in pieces.values())
        loss.backward()
        return g.generate().detach(), {n: p.grad.clone() for n, p in g.named_parameters()}, g

    flat, grads, g = run()
    monkeypatch.setattr(blockwise_module, "BLOCKWISE_MIN_GENERATED", 0)
    monkeypatch.setattr(blockwise_module, "BLOCK_ELEMENTS_MIN", 200)
    flat_b, grads_b, g_b = run()
    assert g_b.block_rows() < g_b.n_chunks  # several blocks
    torch.testing.assert_close(flat_b, flat, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_b[name], grads[name], rtol=1e-4, atol=1e-5)


def test_generation_memory_of_a_training_step_is_bounded():
    """The documented bound (docs/qt.md): one training step's generation (forward + backward) allocates at most
    2 M + 2 B numbers beyond the model, with B = max(BLOCK_ELEMENTS_MIN, M / BLOCK_FRACTION) (one block of the
    mapping MLP's activations): the generated M, their gradient M, one block. Counted exactly (bench_qt.PeakMemory)."""
    import bench_qt

    width, layers = 256, 4
    base = bench_qt.mlp(width, layers)
    m = layers * width * width
    assert m >= blockwise_module.BLOCKWISE_MIN_GENERATED
    model = bench_qt.qt_model(base, chunk_size=64, qnn_depth=2, mapping_hidden_sizes=[32, 64, 32])
    model.train()
    x = torch.randn(4, width)
    model(x).pow(2).mean().backward()  # a first step: the previous step's tensors exist as in training
    generator = model.base_model.get_generator()
    model.base_model.generated_cache().drop_live()
    model.zero_grad(set_to_none=True)
    qt_peak = bench_qt.step_peak(model, x)
    base_peak = bench_qt.step_peak(copy.deepcopy(base).requires_grad_(False), x.clone().requires_grad_(True))
    block = max(blockwise_module.BLOCK_ELEMENTS_MIN, m // blockwise_module.BLOCK_FRACTION)
    generation = qt_peak - base_peak
    assert generation >= 2 * 4 * m * 0.95  # it measures something real: the output and its gradient
    assert generation <= 4 * (2 * m + 2 * block), (generation / (4 * m), block / m)


# --- scripts ---------------------------------------------------------------------------------------------------
def test_bench_qt_smoke(tmp_path):
    import bench_qt

    output = tmp_path / "qt_scaling.json"
    payload = bench_qt.main(["--sizes", "5000", "80000", "--steps", "1", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["meta"]["command"].startswith("python benchmarks/bench_qt.py")
    assert [r["m"] for r in saved["records"]] == [r["m"] for r in payload["records"]]
    for record in saved["records"]:
        for key in ("m", "n_qubits", "trainable_parameters", "qt_step_s_median", "generation_bytes",
                    "generation_over_m_floats", "persistent_adapter_bytes"):
            assert key in record
        assert record["generation_bytes"] > 0


def test_digits_example_smoke(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn (the examples extra: pip install -e '.[examples]') is not installed")
    import quantum_train_digits

    results = quantum_train_digits.main(["--quick", "--output-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "quantum_train_digits.json").read_text())
    assert (tmp_path / "quantum_train_digits.png").stat().st_size > 0
    qt = saved["models"]["quantum_train"]
    assert qt["trainable_parameters"] < saved["m"] == results["m"]
    assert math.isclose(qt["merged_test_accuracy"], qt["test_accuracy"], abs_tol=1e-9)
