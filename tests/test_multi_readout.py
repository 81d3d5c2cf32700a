"""probability_input="multi_readout": the circuit measured in K trainable bases, K features per chunk."""

import math

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from qiskit.quantum_info import Statevector

import peft_qpa
from peft_qpa.generator import GeneratorConfig, QPAGenerator, TensorSpec
from peft_qpa.generator.backends.aer import AerProbabilities
from tiny_models import tiny_llama, train_steps

SPECS = [TensorSpec("a", (4, 40), "kaiming_uniform"), TensorSpec("b", (30, 4), "zeros")]
SMALL = dict(target_modules=["q_proj", "v_proj"], chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[8], seed=0)


def make_generator(readout_settings=3, **overrides):
    kwargs = dict(depth=3, chunk_size=8, hidden_sizes=(16, 16), seed=0, probability_input="multi_readout",
                  source_options={"readout_settings": readout_settings})
    kwargs.update(overrides)
    return QPAGenerator(SPECS, **kwargs)


def _ids(seed=0):
    return torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ansatz", ["ry_cnot", "rx_cnot"])
def test_each_readout_equals_qiskit_statevector_of_its_bound_circuit(ansatz):
    g = make_generator(dtype=torch.float64, ansatz=ansatz)
    probs = g.probabilities().detach().numpy()
    assert probs.shape == (3, 2**g.n_qubits)
    for k in range(3):
        bound = g.source.readout_bound_circuit(g, k)
        assert bound.num_parameters == 0
        np.testing.assert_allclose(probs[k], Statevector(bound).probabilities(), atol=1e-12)
    # one parameterized definition for every readout: the body, then one RY per qubit
    definition = g.source.readout_bound_circuit(g, 0, bound=False)
    assert definition.num_parameters == g.angles.numel() + g.n_qubits
    assert all(backend.simulator.num_parameters == definition.num_parameters for backend in g.readout_backends)
    # generator.circuit() is the shared body, bound
    body = g.circuit()
    assert body.num_parameters == 0 and body.num_qubits == g.n_qubits
    assert g.circuit(bound=False).num_parameters == g.angles.numel()


def test_body_angles_are_drawn_as_the_circuit_source_draws_them():
    multi, single = make_generator(), make_generator(probability_input="circuit", source_options=None)
    torch.testing.assert_close(multi.angles, single.angles, rtol=0, atol=0)
    assert multi.readout_angles.shape == (3, multi.n_qubits)
    readout = multi.readout_angles.detach()
    assert float(readout.min()) >= 0 and float(readout.max()) < 2 * math.pi


def test_features_have_one_column_per_readout_and_the_columns_differ():
    g = make_generator()
    features = g.features(0)
    assert features.shape == (g.n_chunks, 3)
    assert g.mapping[0].in_features == g.n_qubits + 3
    for j in range(3):
        for k in range(j + 1, 3):
            assert (features[:, j] - features[:, k]).abs().max() > 1e-3
    # each column is its readout's post-processed probabilities of the states used
    probs = g.probabilities()
    torch.testing.assert_close(features[:, 1], g.postprocess(probs[1, : g.n_chunks]))
    assert g.generate().shape == (g.num_generated,)


def test_gradients_reach_body_angles_readout_angles_and_mapping():
    g = make_generator()
    (g.generate() * torch.linspace(-1, 1, g.num_generated)).sum().backward()
    assert g.angles.grad is not None and g.angles.grad.abs().max() > 0
    assert g.readout_angles.grad is not None
    assert all(row.abs().max() > 0 for row in g.readout_angles.grad)  # every readout setting learns
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in g.mapping.parameters())


def test_summary_reports_both_angle_sets_and_the_cost():
    g = make_generator()
    summary = g.summary()
    assert f"circuit parameters: {g.angles.numel()} body + {3 * g.n_qubits} readout" in summary
    assert "circuit runs per step: 3" in summary
    assert f"trainable total: {sum(p.numel() for p in g.parameters())}" in summary


def test_tiny_llama_trains_saves_reloads_and_starts_at_the_base_model(tmp_path):
    ids = _ids()
    base = tiny_llama()
    with torch.no_grad():
        reference = base(ids).logits
    config = peft_qpa.QPAConfig(**SMALL, probability_input="multi_readout", readout_settings=3)
    model = get_peft_model(tiny_llama(), config)
    generator = model.base_model.get_generator()
    assert len(generator.readout_backends) == 3 and generator.source.width == 3
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=1e-5)  # the zero start
    angles, readout = generator.angles.detach().clone(), generator.readout_angles.detach().clone()
    losses = train_steps(model, ids, steps=8, lr=1e-2)
    assert losses[-1] < losses[0], losses
    assert not torch.equal(generator.angles, angles) and not torch.equal(generator.readout_angles, readout)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    saved = loaded.peft_config["default"]
    assert saved.probability_input == "multi_readout" and saved.readout_settings == 3
    reloaded = loaded.base_model.get_generator()
    torch.testing.assert_close(reloaded.readout_angles, generator.readout_angles, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_aer_shots_backend_with_generative_interpolation():
    config = GeneratorConfig(qnn_depth=2, chunk_size=32, mapping_hidden_sizes=[8], backend="aer_shots",
                             shots_per_state=4, generative_interpolation=True, probability_input="multi_readout",
                             readout_settings=2)
    g = QPAGenerator.from_config(config, [TensorSpec("w", (8, 16))])  # 128 numbers: N = 2
    assert g.n_qubits == 2
    assert all(isinstance(backend, AerProbabilities) for backend in g.readout_backends)
    assert len(g.interpolation) == 2  # one GI network per readout
    probs = g.probabilities(step=0)
    assert probs.shape == (2, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, dtype=probs.dtype))
    torch.testing.assert_close(g.probabilities(step=0), probs, rtol=0, atol=0)  # seeded by (seed, step)
    (g.generate() * torch.linspace(-1, 1, g.num_generated)).sum().backward()
    assert g.angles.grad.abs().max() > 0 and g.readout_angles.grad.abs().max() > 0
    assert "interpolation network parameters" in g.summary()


def test_aer_shots_readouts_sample_with_their_own_seeds():
    config = GeneratorConfig(qnn_depth=2, chunk_size=32, mapping_hidden_sizes=[8], backend="aer_shots",
                             shots_per_state=4, probability_input="multi_readout", readout_settings=3)
    g = QPAGenerator.from_config(config, [TensorSpec("w", (8, 16))])
    with torch.no_grad():
        probs = g.probabilities(step=5)
        for k, backend in enumerate(g.readout_backends):
            angles = torch.cat([g.angles, g.readout_angles[k]])
            own, counts = backend(angles, 5 * 3 + k)  # step s, readout k: the shot seed of (seed, s * K + k)
            torch.testing.assert_close(probs[k], own, rtol=0, atol=0)
            torch.testing.assert_close(counts.to(own.dtype), own * backend.shots, rtol=0, atol=1e-4)


def test_tiny_llama_on_aer_shots():
    config = peft_qpa.QPAConfig(**{**SMALL, "chunk_size": 256}, backend="aer_shots", shots_per_state=8,
                                probability_input="multi_readout")
    model = get_peft_model(tiny_llama(), config)
    generator = model.base_model.get_generator()
    assert generator.n_qubits <= 3
    ids = _ids()
    model.train()
    model(ids, labels=ids).loss.backward()
    assert generator.readout_angles.grad is not None and generator.readout_angles.grad.abs().max() > 0


def test_freeze_angles_freezes_body_and_readout_angles():
    config = peft_qpa.QPAConfig(**SMALL, probability_input="multi_readout", freeze_angles=True)
    model = get_peft_model(tiny_llama(), config)
    generator = model.base_model.get_generator()
    assert not generator.angles.requires_grad and not generator.readout_angles.requires_grad
    angles, readout = generator.angles.detach().clone(), generator.readout_angles.detach().clone()
    mlp = [p.detach().clone() for p in generator.mapping.parameters()]
    ids = _ids()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(generator.angles, angles) and torch.equal(generator.readout_angles, readout)
    assert all(not torch.equal(p, q) for p, q in zip(generator.mapping.parameters(), mlp))
    model.base_model.set_requires_grad("default", True)
    assert not generator.readout_angles.requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert generator.num_trainable() == trainable
    assert "(frozen: the freeze_angles control)" in model.base_model.generator_summary()


@pytest.mark.parametrize("value", [1, 0, -2, "2", 2.0, True, None])
@pytest.mark.parametrize("config_cls", [peft_qpa.QPAConfig, peft_qpa.QTConfig, GeneratorConfig])
def test_bad_readout_settings_name_the_field(config_cls, value):
    kwargs = {} if config_cls is GeneratorConfig else {"target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match=rf"{config_cls.__name__}\.readout_settings must be an integer >= 2"):
        config_cls(**kwargs, probability_input="multi_readout", readout_settings=value)


@pytest.mark.parametrize("probability_input", ["circuit", "constant"])
def test_readout_settings_without_multi_readout_is_refused(probability_input):
    with pytest.raises(ValueError, match=r"QPAConfig\.readout_settings=3 only applies to probability_input='multi_readout'"):
        peft_qpa.QPAConfig(target_modules=["q_proj"], probability_input=probability_input, readout_settings=3)
    # the default is accepted with every source (configs saved before the field existed load unchanged)
    assert peft_qpa.QPAConfig(target_modules=["q_proj"], probability_input=probability_input).readout_settings == 2


def test_numpy_readout_settings_is_stored_as_an_int():
    config = GeneratorConfig(probability_input="multi_readout", readout_settings=np.int64(4))
    assert type(config.readout_settings) is int and config.readout_settings == 4
