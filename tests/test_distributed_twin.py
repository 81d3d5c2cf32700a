"""probability_input="distributed_twin": the classical twin of the distributed ansatz, one classical distribution per
sub-circuit with that sub-circuit's parameter count, their product over the 2^N states."""

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_qpa
from peft_qpa.generator.circuit import build_ansatz
from peft_qpa.generator.features import basis_bits, pairwise_log_weights
from peft_qpa.generator.generator import QPAGenerator, TensorSpec
from tiny_models import tiny_llama, train_steps

SMALL = dict(target_modules=["q_proj", "v_proj"], chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[8], seed=0,
             probability_input="distributed_twin")


def make_generator(n_qubits=5, depth=3, groups=2, **overrides):
    """A generator of 2^N chunks of 2 numbers, so that N is ``n_qubits``."""
    kwargs = dict(depth=depth, chunk_size=2, hidden_sizes=(8,), seed=0, probability_input="distributed_twin",
                  source_options={"circuit_groups": groups})
    kwargs.update(overrides)
    return QPAGenerator([TensorSpec("a", (2**n_qubits, 2), "kaiming_uniform")], **kwargs)


@pytest.mark.parametrize("ansatz", ["ry_cnot", "rx_cnot"])
@pytest.mark.parametrize("n_qubits, depth, groups", [(2, 1, 2), (5, 3, 2), (7, 8, 3), (10, 64, 2), (9, 8, 4)])
def test_parameter_count_is_the_distributed_circuits(n_qubits, depth, groups, ansatz):
    twin = make_generator(n_qubits, depth, groups, ansatz=ansatz)
    circuit = make_generator(n_qubits, depth, groups, ansatz=ansatz, probability_input="distributed")
    assert twin.twin_weights.numel() == circuit.group_angles.numel() == n_qubits * depth
    assert not hasattr(twin, "group_angles") and twin.backend is None and twin.interpolation is None
    mapping = sum(p.numel() for p in twin.mapping.parameters())
    assert twin.num_trainable() == n_qubits * depth + mapping
    assert twin.circuit(bound=False).num_parameters == n_qubits * depth  # the product circuit it stands in for
    assert twin.source.group_sizes == circuit.source.group_sizes


@pytest.mark.parametrize("n_qubits, depth, groups", [(4, 2, 2), (7, 3, 3)])
def test_probabilities_are_the_product_of_one_boltzmann_distribution_per_group(n_qubits, depth, groups):
    g = make_generator(n_qubits, depth, groups, dtype=torch.float64)
    probs = g.probabilities()
    assert probs.shape == (2**n_qubits,) and bool((probs >= 0).all())
    torch.testing.assert_close(float(probs.detach().sum()), 1.0, rtol=0, atol=1e-12)
    assert float(probs.detach().std()) > 0  # a random start, not uniform
    # Independently: p(i) = prod_g p_g(bits of i in group g), p_g(b) ∝ exp(h_g·b + ½ Σ_k (u_gk·b)²).
    weights, start, expected = g.twin_weights.detach(), 0, torch.ones(2**n_qubits, dtype=torch.float64)
    first_qubit = 0
    for size in g.source.group_sizes:
        fields = weights[start:start + size]
        couplings = weights[start + size:start + size * depth].view(depth - 1, size)
        start += size * depth
        bits = basis_bits(2**size, size).double()
        group = torch.softmax(bits @ fields + 0.5 * (bits @ couplings.t()).pow(2).sum(1), 0)
        index = (torch.arange(2**n_qubits) >> first_qubit) % 2**size  # group g holds these bits of each index
        expected = expected * group[index]
        first_qubit += size
    torch.testing.assert_close(probs.detach(), expected, rtol=1e-10, atol=1e-14)


def test_each_group_matches_the_one_circuit_twin_of_its_size():
    """A group's distribution is the one-circuit twin's, so the two twins differ only in where couplings may act."""
    g = make_generator(6, 3, 2, dtype=torch.float64)
    parts = g.source.group_probabilities(g, 0)
    weights = g.twin_weights.detach()
    for k, part in enumerate(parts):
        w = weights[9 * k: 9 * (k + 1)]
        torch.testing.assert_close(part.detach(), torch.softmax(pairwise_log_weights(w[:3], w[3:].view(2, 3)), 0))


def test_gradients_reach_every_twin_weight_and_the_mapping():
    g = make_generator(6, 4, 3)
    out = g.generate()
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert g.twin_weights.grad is not None and bool(g.twin_weights.grad.abs().gt(0).all())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.mapping.parameters())


def test_no_circuit_runs():
    g = make_generator()
    with pytest.raises(ValueError, match="'distributed_twin' runs no circuit: there are no angles to bind"):
        g.circuit()
    summary = g.summary()
    assert "probability input: distributed_twin (control: 2 classical distributions over [3, 2] bits" in summary
    assert "classical twin parameters: 15, the 2 sub-circuits' 15 it replaces" in summary


def test_twin_adapter_starts_at_zero_trains_saves_and_reloads(tmp_path):
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL, circuit_groups=3))
    generator = model.base_model.get_generator()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=1e-5)
    assert generator.twin_weights.numel() == generator.n_qubits * 2
    start = generator.twin_weights.detach().clone()
    losses = train_steps(model, ids, steps=8)
    assert losses[-1] < losses[0] and not torch.equal(generator.twin_weights, start)
    assert generator.num_trainable() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    config = loaded.peft_config["default"]
    assert (config.probability_input, config.circuit_groups) == ("distributed_twin", 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_freeze_angles_freezes_the_twin():
    model = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL, freeze_angles=True))
    generator = model.base_model.get_generator()
    weights = generator.twin_weights.detach().clone()
    train_steps(model, torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0)), steps=3)
    assert torch.equal(generator.twin_weights, weights)
    assert "(frozen: the freeze_angles control, a frozen random twin)" in model.base_model.generator_summary()


@pytest.mark.parametrize("config_cls", [peft_qpa.QPAConfig, peft_qpa.QTConfig, peft_qpa.GeneratorConfig])
def test_bad_settings_are_refused(config_cls):
    kwargs = {} if config_cls is peft_qpa.GeneratorConfig else {"target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match=r"probability_input='distributed_twin' runs no circuit, so backend='aer_shots'"):
        config_cls(**kwargs, probability_input="distributed_twin", backend="aer_shots", shots_per_state=4)
    config_cls(**kwargs, probability_input="distributed_twin", circuit_groups=3)  # circuit_groups applies
    with pytest.raises(ValueError, match=r"circuit_groups=3 only applies to probability_input='distributed' \(or its "
                                         r"classical twin, 'distributed_twin'\)"):
        config_cls(**kwargs, probability_input="classical_twin", circuit_groups=3)


def test_more_groups_than_qubits_is_refused():
    with pytest.raises(ValueError, match="circuit_groups=4 needs at least 4 qubits"):
        make_generator(3, 2, 4)
