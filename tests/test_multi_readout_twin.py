"""probability_input="multi_readout_twin": the classical twin of the K-readout circuit, as large as it."""

import pytest
import torch

from peft_qpa.generator import GeneratorConfig
from peft_qpa.generator.generator import QPAGenerator, TensorSpec


def _gen(source, k=3, depth=4, n_qubits=5, freeze_angles=False):
    """A generator of 2^N chunks of 2 numbers (N = ``n_qubits``) with K = ``k`` readouts or twin distributions."""
    return QPAGenerator([TensorSpec("a", (2**n_qubits, 2), "kaiming_uniform")], depth=depth, chunk_size=2,
                        hidden_sizes=(8,), seed=0, probability_input=source, freeze_angles=freeze_angles,
                        source_options={"readout_settings": k})


def test_twin_matches_the_k_readout_circuits_parameter_count():
    for k, depth in ((2, 1), (3, 4), (4, 8)):
        circuit, twin = _gen("multi_readout", k, depth), _gen("multi_readout_twin", k, depth)
        n = circuit.n_qubits
        assert twin.twin_weights.numel() == circuit.angles.numel() + circuit.readout_angles.numel() == n * depth + k * n
        assert circuit.num_trainable() == twin.num_trainable()


def test_twin_gives_k_distinct_distributions_and_k_feature_columns():
    g = _gen("multi_readout_twin", k=3)
    probs = g.probabilities()
    assert probs.shape == (3, 2 ** g.n_qubits)
    torch.testing.assert_close(probs.sum(1), torch.ones(3, dtype=probs.dtype))
    assert (probs[0] - probs[1]).abs().max() > 1e-3  # the readout fields make them differ from the start
    assert g.features(0).shape == (g.n_chunks, 3)


def test_twin_is_trained_and_frozen_twin_is_not():
    g = _gen("multi_readout_twin")
    out = g.generate()
    out.square().sum().backward()
    assert g.twin_weights.grad is not None and g.twin_weights.grad.abs().sum() > 0
    frozen = _gen("multi_readout_twin", freeze_angles=True).requires_grad_(True)  # as PEFT activates an adapter
    assert not frozen.twin_weights.requires_grad
    assert frozen.num_trainable() == g.num_trainable() - g.twin_weights.numel()


def test_readout_fields_enter_only_their_own_distribution():
    g = _gen("multi_readout_twin", k=2)
    n, body = g.n_qubits, g.source.body_parameters
    probs = g.probabilities()
    with torch.no_grad():
        g.twin_weights[body + n: body + 2 * n] += 0.5  # readout 1's fields
    after = g.probabilities()
    torch.testing.assert_close(after[0], probs[0])
    assert (after[1] - probs[1]).abs().max() > 1e-3


def test_config_refuses_a_backend_and_keeps_readout_settings():
    with pytest.raises(ValueError, match="runs no circuit"):
        GeneratorConfig(probability_input="multi_readout_twin", backend="aer_statevector")
    GeneratorConfig(probability_input="multi_readout_twin", readout_settings=4)
    with pytest.raises(ValueError, match="readout_settings"):
        GeneratorConfig(probability_input="classical_twin", readout_settings=4)
