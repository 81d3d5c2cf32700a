"""The shared generator: circuit API, pairing of states with their index, nonlinearity, zero delta."""

import math

import numpy as np
import pytest
import torch
from qiskit.quantum_info import Statevector

from peft_qpa.generator.generator import QPAGenerator, TensorSpec, basis_bits


def make_generator(**overrides):
    specs = overrides.pop("specs", [TensorSpec("a", (4, 40), "kaiming_uniform"), TensorSpec("b", (30, 4), "zeros")])
    kwargs = dict(depth=3, chunk_size=8, hidden_sizes=(16, 16), seed=0)
    kwargs.update(overrides)
    return QPAGenerator(specs, **kwargs)


def test_sizes():
    g = make_generator()
    assert g.num_generated == 4 * 40 + 30 * 4
    assert g.n_chunks == math.ceil(280 / 8) == 35
    assert g.n_qubits == 6
    assert g.generate().shape == (280,)


def test_probabilities_equal_qiskit_statevector_of_bound_circuit():
    g = make_generator(dtype=torch.float64)
    bound = g.circuit()
    assert bound.num_parameters == 0
    expected = Statevector(bound).probabilities()
    np.testing.assert_allclose(g.probabilities().detach().numpy(), expected, atol=1e-12)
    assert "Ry(" in str(bound.draw(output="text"))


def test_each_state_is_paired_with_its_own_index():
    g = make_generator()
    bits = basis_bits(6, 3)
    assert bits.tolist()[5] == [1, -1, 1]  # 5 = 0b101: qubits 0 and 2 set
    # deterministic: the same parameters always give the same weights (no random re-pairing per call)
    torch.testing.assert_close(g.generate(), g.generate(), rtol=0, atol=0)
    # the mapping input row of state i carries i's bits: swapping two states' probabilities changes only their chunks
    with torch.no_grad():
        probs = g.probabilities()[: g.n_chunks]
        x = g.postprocess(probs).unsqueeze(1)
        rows = torch.cat([g.basis_bits, x], 1)
        out = g.mapping(rows)
        row3 = torch.cat([g.basis_bits[3], x[3]])
        torch.testing.assert_close(out[3], g.mapping(row3))


def test_mapping_is_nonlinear():
    g = make_generator()
    assert any(isinstance(m, torch.nn.GELU) for m in g.mapping)
    a, b = torch.randn(7), torch.randn(7)
    with torch.no_grad():
        midpoint = g.mapping((a + b) / 2)
        average = (g.mapping(a) + g.mapping(b)) / 2
    assert (midpoint - average).abs().max() > 1e-4


def test_initial_tensors_are_the_specs_init():
    g = make_generator()
    tensors = g.split(g.generate())
    assert torch.count_nonzero(tensors["b"]) == 0
    bound = 1 / math.sqrt(40)
    assert tensors["a"].abs().max() <= bound + 1e-6
    assert tensors["a"].std() > bound / 4
    # same seed, same init; another seed, another init
    torch.testing.assert_close(make_generator().generate(), g.generate())
    assert not torch.allclose(make_generator(seed=1).generate(), g.generate())


def test_every_parameter_gets_a_gradient_at_the_first_step():
    g = make_generator()
    tensors = g.split(g.generate())
    # a LoRA-like loss: depends on B @ A, which is zero at init
    loss = ((tensors["b"] @ tensors["a"][:, :30]) - torch.eye(30)).square().sum()
    loss.backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def _saved_numel_and_grads(g):
    """Numbers autograd keeps for the backward of one generate(), and the resulting gradients."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flat = g.generate()
    g.zero_grad()
    (flat * torch.linspace(-1, 1, flat.numel())).sum().backward()
    return sum(saved), {n: p.grad.clone() for n, p in g.named_parameters()}


def test_mapping_activations_are_recomputed_not_kept(monkeypatch):
    # Issue 5: at N >= 12 the MLP's activations (n_chunks x widths) held through the model's forward and
    # backward cost more memory than LoRA's optimizer state; they are recomputed in the backward instead.
    g = make_generator(hidden_sizes=(64, 64, 64), chunk_size=4, specs=[TensorSpec("a", (4, 200), "kaiming_uniform")])
    activations = g.n_chunks * (3 * 64)
    recomputed_numel, recomputed_grads = _saved_numel_and_grads(g)
    import peft_qpa.generator.generator as generator_module

    monkeypatch.setattr(generator_module, "checkpoint", lambda fn, *args, **kwargs: fn(*args))  # keep them
    kept_numel, kept_grads = _saved_numel_and_grads(g)
    assert kept_numel > 2 * activations  # each Linear keeps its input, each GELU its input
    assert recomputed_numel < kept_numel - 2 * activations
    for name in kept_grads:  # same ops on the same inputs: the same gradients, bit for bit
        assert torch.equal(kept_grads[name], recomputed_grads[name]), name


def test_raw_output_without_init_weights_is_nonzero():
    g = make_generator(init_weights=False)
    assert torch.count_nonzero(g.split(g.generate())["b"]) > 0


def test_fills_arbitrary_named_shapes():
    specs = [
        TensorSpec("dora.magnitude", (64,), "ones"),
        TensorSpec("prefix.key", (2, 5, 16), "zeros"),
        TensorSpec("bottleneck.down", (8, 32), "kaiming_uniform"),
        TensorSpec("bottleneck.up", (32, 8), "zeros"),
    ]
    g = make_generator(specs=specs)
    tensors = g.split(g.generate())
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {s.name: s.shape for s in specs}
    torch.testing.assert_close(tensors["dora.magnitude"], torch.ones(64))


def test_zero_probabilities_keep_finite_gradients():
    g = make_generator()
    probs = torch.zeros(2**g.n_qubits)
    probs[0] = 1.0
    probs.requires_grad_(True)
    g.postprocess(probs[: g.n_chunks]).sum().backward()
    assert torch.isfinite(probs.grad).all()


def test_too_many_qubits_is_refused_with_advice():
    with pytest.raises(ValueError, match="Raise chunk_size to at least"):
        make_generator(specs=[TensorSpec("big", (1000, 1000))], chunk_size=1, max_qubits=12)


def test_summary_reports_the_facts():
    g = make_generator()
    text = g.summary(280, "LoRA with the same r and targets")
    assert "qubits N: 6" in text and "depth L: 3" in text and "generated numbers M: 280" in text
    assert f"trainable total: {g.num_trainable()}" in text and "ratio to LoRA" in text
