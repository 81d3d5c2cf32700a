"""probability_input="classical_twin": a classical distribution with the circuit's parameter count, in its place."""

import time

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_qpa
from peft_qpa.generator.circuit import build_ansatz
from peft_qpa.generator.features import FEATURE_SOURCES, basis_bits, pairwise_log_weights
from peft_qpa.generator.generator import QPAGenerator, TensorSpec
from tiny_models import tiny_llama, train_steps

SMALL = dict(target_modules=["q_proj", "v_proj"], chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[8], seed=0)


def make_generator(n_qubits=5, depth=3, **overrides):
    """A generator of 2^N chunks of 2 numbers, so that N is ``n_qubits``."""
    kwargs = dict(depth=depth, chunk_size=2, hidden_sizes=(8,), seed=0, probability_input="classical_twin")
    kwargs.update(overrides)
    return QPAGenerator([TensorSpec("a", (2**n_qubits, 2), "kaiming_uniform")], **kwargs)


@pytest.mark.parametrize("ansatz", ["ry_cnot", "rx_cnot"])
@pytest.mark.parametrize("n_qubits, depth", [(1, 1), (1, 8), (3, 1), (4, 8), (6, 64), (8, 1), (10, 8), (12, 64)])
def test_parameter_count_is_the_circuits(n_qubits, depth, ansatz):
    g = make_generator(n_qubits, depth, ansatz=ansatz)
    assert g.n_qubits == n_qubits
    circuit = build_ansatz(n_qubits, depth, ansatz).num_parameters
    assert g.twin_weights.numel() == circuit == n_qubits * depth
    assert not hasattr(g, "angles")
    mapping = sum(p.numel() for p in g.mapping.parameters())
    assert g.num_trainable() == circuit + mapping
    assert g.circuit(bound=False).num_parameters == circuit  # the circuit it stands in for


@pytest.mark.parametrize("n_qubits, depth", [(1, 1), (3, 1), (5, 2), (7, 9)])
def test_log_weights_are_the_pairwise_model_over_every_state(n_qubits, depth):
    """f(b) = h·b + ½ Σ_k (u_k·b)², in basis-state order, up to a constant."""
    weights = torch.randn(n_qubits * depth, dtype=torch.float64, generator=torch.Generator().manual_seed(depth))
    fields, couplings = weights[:n_qubits], weights[n_qubits:].view(depth - 1, n_qubits)
    bits = basis_bits(2**n_qubits, n_qubits).double()
    expected = bits @ fields + 0.5 * (bits @ couplings.t()).pow(2).sum(1)
    difference = pairwise_log_weights(fields, couplings) - expected
    torch.testing.assert_close(difference, difference[:1].expand_as(difference), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_qubits, depth", [(1, 1), (4, 1), (6, 8), (9, 64)])
def test_probabilities_are_a_differentiable_distribution(n_qubits, depth):
    g = make_generator(n_qubits, depth, dtype=torch.float64)
    probs = g.probabilities()
    assert probs.shape == (2**n_qubits,) and bool((probs >= 0).all())
    torch.testing.assert_close(float(probs.detach().sum()), 1.0, rtol=0, atol=1e-12)
    assert probs.requires_grad and float(probs.std()) > 0  # a random start, not uniform
    source = g.source
    n = n_qubits

    def twin(weights):
        return torch.softmax(pairwise_log_weights(weights[:n], weights[n:].view(source.rank, n)), 0)

    if n_qubits <= 6:
        torch.autograd.gradcheck(twin, (g.twin_weights.detach().clone().requires_grad_(),))


def test_gradients_reach_the_twin_and_the_mapping():
    g = make_generator(6, 4)
    out = g.generate()
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert g.twin_weights.grad is not None and bool(g.twin_weights.grad.abs().gt(0).all())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.mapping.parameters())
    # the twin is the generator's only source of the probability feature: moving it moves the output
    before = g.generate().detach().clone()
    with torch.no_grad():
        g.twin_weights.add_(0.5)
    assert not torch.allclose(g.generate().detach(), before)


def test_no_circuit_no_backend():
    g = make_generator()
    assert g.backend is None and g.interpolation is None
    with pytest.raises(ValueError, match="runs no circuit: there are no angles to bind"):
        g.circuit()
    assert "probability input: classical_twin (control:" in g.summary()


def test_half_precision_generator_computes_the_twin_in_float32():
    g = make_generator(6, 3).to(torch.bfloat16)
    probs = g.probabilities()
    assert probs.dtype == torch.float32
    torch.testing.assert_close(float(probs.sum()), 1.0, rtol=0, atol=1e-6)
    assert g.generate().dtype == torch.bfloat16


@pytest.mark.parametrize("source", ["circuit", "classical_twin"])
def test_deep_circuits_and_twins_are_accepted_and_cheap(source):
    config = peft_qpa.GeneratorConfig(qnn_depth=128, chunk_size=2, mapping_hidden_sizes=[8],
                                      probability_input=source)
    g = QPAGenerator.from_config(config, [TensorSpec("a", (2**12, 2), "zeros")])
    start = time.perf_counter()
    g.probabilities()[:7].sum().backward()
    assert time.perf_counter() - start < 5
    parameters = g.twin_weights if source == "classical_twin" else g.angles
    assert parameters.numel() == 12 * 128 and parameters.grad is not None


def _base_logits(ids):
    with torch.no_grad():
        return tiny_llama()(ids).logits


def test_twin_adapter_starts_at_zero_trains_and_reloads(tmp_path):
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL, probability_input="classical_twin"))
    generator = model.base_model.get_generator()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _base_logits(ids), rtol=0, atol=1e-5)
    start = generator.twin_weights.detach().clone()
    losses = train_steps(model, ids, steps=8)
    assert losses[-1] < losses[0]
    assert not torch.equal(generator.twin_weights, start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert generator.num_trainable() == trainable
    summary = model.base_model.generator_summary()
    n = generator.n_qubits
    assert f"classical twin parameters: {n * 2}, the circuit's N·L = {n}·2 = {n * 2} it replaces" in summary
    assert f"trainable total: {trainable}" in summary
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert loaded.peft_config["default"].probability_input == "classical_twin"
    loaded_generator = loaded.base_model.get_generator()
    torch.testing.assert_close(loaded_generator.twin_weights, generator.twin_weights, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_freeze_angles_freezes_the_twin():
    model = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL, probability_input="classical_twin",
                                                             freeze_angles=True))
    generator = model.base_model.get_generator()
    weights = generator.twin_weights.detach().clone()
    mapping = [p.detach().clone() for p in generator.mapping.parameters()]
    assert not generator.twin_weights.requires_grad
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    train_steps(model, ids, steps=3)
    assert torch.equal(generator.twin_weights, weights)
    assert all(not torch.equal(p, q) for p, q in zip(generator.mapping.parameters(), mapping))
    model.base_model.set_adapter("default")
    model.base_model.set_requires_grad("default", True)
    assert not generator.twin_weights.requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert generator.num_trainable() == trainable == sum(p.numel() for p in generator.mapping.parameters())
    assert "(frozen: the freeze_angles control, a frozen random twin)" in model.base_model.generator_summary()


def test_the_other_sources_keep_their_parameters():
    for source in ("circuit", "constant"):
        g = make_generator(probability_input=source)
        assert hasattr(g, "angles") and not hasattr(g, "twin_weights") and g.backend is not None
    assert "classical_twin" in FEATURE_SOURCES


@pytest.mark.parametrize("backend, extra", [("aer_shots", {"shots_per_state": 4}), ("aer_statevector", {})])
@pytest.mark.parametrize("config_cls", [peft_qpa.QPAConfig, peft_qpa.QTConfig, peft_qpa.GeneratorConfig])
def test_twin_refuses_other_backends(config_cls, backend, extra):
    kwargs = {} if config_cls is peft_qpa.GeneratorConfig else {"target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}\.probability_input='classical_twin' runs no "
                                         rf"circuit, so backend='{backend}' does not apply"):
        config_cls(**kwargs, probability_input="classical_twin", backend=backend, **extra)
