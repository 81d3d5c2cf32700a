"""Readout-error mitigation (peft_qpa/generator/backends/mitigation.py) and the readout_mitigation config field."""

import json

import numpy as np
import pytest
import torch
from qiskit.quantum_info import Statevector
from qiskit_aer.noise import NoiseModel, ReadoutError
from qiskit_aer.noise.device import basic_device_readout_errors

from peft_qpa.generator import GeneratorConfig, QPAGenerator, TensorSpec
from peft_qpa.generator.backends import aer as aer_module
from peft_qpa.generator.backends.aer import AerProbabilities
from peft_qpa.generator.backends.mitigation import (
    apply_readout_error,
    inverse_matrices,
    mitigate,
    project_to_simplex,
    readout_matrices,
    readout_matrices_from_target,
    unmix,
)
from peft_qpa.generator.circuit import build_ansatz
from peft_qpa.generator.noise import load_fake_backend

N, L = 4, 2  # small on purpose: fast on 2 cores
DEVICE = "fake_kyiv"


def make(circuit, backend="aer_shots", shots=None, shot_gradient="exact", noise_model=None, seed=0, **kw):
    return AerProbabilities(circuit, backend=backend, shots=shots, shot_gradient=shot_gradient, noise_model=noise_model,
                            seed=seed, dtype=torch.float64, **kw)


def angles(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 2 * np.pi, n))


def tv(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


def confusion(e0, e1):
    return np.array([[1 - e0, e0], [e1, 1 - e1]])


def readout_only_model(matrices):
    """A NoiseModel with only per-qubit readout errors (qubit q: matrices[q])."""
    model = NoiseModel()
    for q, m in enumerate(matrices):
        model.add_readout_error(ReadoutError(m), [q])
    return model


def device_readout_model(name, scale=1.0):
    """A NoiseModel with only the readout errors of a fake device's qubits (scaled, capped at 0.4)."""
    model = NoiseModel()
    for qubits, error in basic_device_readout_errors(target=load_fake_backend(name).target):
        p = np.clip(np.asarray(error.probabilities) * scale, 0, 0.4)
        p[0, 0], p[1, 1] = 1 - p[0, 1], 1 - p[1, 0]
        model.add_readout_error(ReadoutError(p), qubits)
    return model


def sgs_projection(mu):
    """The algorithm of Smolin, Gambetta and Smith (PRL 108, 070502, 2012), on a vector, as the paper states it."""
    order = np.argsort(-mu)
    m, lam, a, i = mu[order], np.zeros(len(mu)), 0.0, len(mu)
    while i > 0 and m[i - 1] + a / i < 0:
        a += m[i - 1]
        i -= 1
    lam[:i] = m[:i] + a / i
    out = np.zeros(len(mu))
    out[order] = lam
    return out


# ------------------------------------------------------------------------------------------- the maths


def test_unmix_inverts_the_readout_map_with_batch_dimensions():
    rng = np.random.default_rng(0)
    mats = [confusion(*rng.uniform(0, 0.2, 2)) for _ in range(3)]
    mats[1] = None  # an ideal qubit
    p = rng.dirichlet(np.ones(8), size=(2, 3))
    noisy = apply_readout_error(p, mats)
    np.testing.assert_allclose(unmix(noisy, mats), p, atol=1e-14)
    np.testing.assert_allclose(mitigate(noisy, mats), p, atol=1e-14)  # exact input: the projection does nothing
    # the same as the 2^N x 2^N inverse of the Kronecker product (little-endian: qubit 2 is the left factor)
    full = np.kron(np.kron(mats[2], np.eye(2)), mats[0])
    np.testing.assert_allclose(unmix(noisy[0, 0], mats), noisy[0, 0] @ np.linalg.inv(full), atol=1e-14)


def test_projection_is_the_nearest_probability_vector():
    rng = np.random.default_rng(1)
    for _ in range(50):
        q = rng.normal(size=16) * 0.1
        q += (1 - q.sum()) / 16  # a quasi-probability vector: sums to 1, some entries negative
        p = project_to_simplex(q)
        np.testing.assert_allclose(p, sgs_projection(q), atol=1e-12)
        assert (p >= 0).all() and abs(p.sum() - 1) < 1e-12
        # nearer to q than other probability vectors
        for other in rng.dirichlet(np.ones(16), size=20):
            assert np.linalg.norm(p - q) <= np.linalg.norm(other - q) + 1e-12
    batch = np.array([[0.5, 0.7, -0.2], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(project_to_simplex(batch), [[0.4, 0.6, 0.0], [1.0, 0.0, 0.0]], atol=1e-15)
    np.testing.assert_allclose(project_to_simplex(batch[0], "clip"), [0.5 / 1.2, 0.7 / 1.2, 0.0], atol=1e-15)
    with pytest.raises(ValueError, match="projection must be one of"):
        project_to_simplex(batch, "nope")


def test_uninvertible_readout_is_refused():
    with pytest.raises(ValueError, match="qubit 1 cannot be mitigated"):
        inverse_matrices([confusion(0.01, 0.02), confusion(0.5, 0.5)])


def test_matrices_from_a_device_target_and_its_noise_model_agree():
    backend = load_fake_backend("fake_perth")
    qubits = [3, 0, 5]
    from_target = readout_matrices_from_target(backend.target, qubits)
    for q, m in zip(qubits, from_target):
        e = backend.target["measure"][(q,)].error
        np.testing.assert_allclose(m, confusion(e, e))  # symmetric, from target['measure'][(q,)].error
    for device in ("fake_perth", backend, backend.target, NoiseModel.from_backend(backend)):
        for a, b in zip(readout_matrices(device, qubits), from_target):
            np.testing.assert_allclose(a, b)
    with pytest.raises(ValueError, match="fake IBM device name"):
        readout_matrices(3.0, qubits)


# ------------------------------------------------------------------------------------------- on Aer


def test_mitigation_inverts_readout_error_on_exact_probabilities():
    """The exact path (density matrix + readout confusion) with a readout-only noise model, mitigated: the ideal."""
    qc = build_ansatz(N, L)
    theta = angles(qc.num_parameters, seed=2)
    mats = [confusion(0.02, 0.05), confusion(0.08, 0.03), confusion(0.01, 0.10), confusion(0.04, 0.04)]
    module = make(qc, "aer_statevector", noise_model=readout_only_model(mats), shot_gradient="parameter_shift")
    noisy = module(theta, 0)[0].numpy()
    ideal = Statevector(qc.assign_parameters(theta.numpy())).probabilities()
    assert tv(noisy, ideal) > 0.02  # the readout error does something
    found = readout_matrices(module.noise_model, module.physical_qubits)
    np.testing.assert_allclose(np.stack(found), np.stack(mats))
    np.testing.assert_allclose(mitigate(noisy, found), ideal, atol=1e-12)


@pytest.fixture(scope="module")
def shots_pair():
    """aer_shots at the same seed, with and without mitigation, under a fake device's readout error (x3, so that
    it stands well above the shot noise at N = 4)."""
    qc = build_ansatz(N, L)
    model = device_readout_model(DEVICE, scale=3.0)
    raw = make(qc, shots=40_000, noise_model=model, seed=5)
    mitigated = make(qc, shots=40_000, noise_model=model, seed=5, readout_mitigation=True)
    return qc, raw, mitigated


def test_mitigation_reduces_the_distance_to_the_ideal_under_shots(shots_pair):
    qc, raw, mitigated = shots_pair
    for k in range(3):
        theta = angles(qc.num_parameters, seed=10 + k)
        ideal = Statevector(qc.assign_parameters(theta.numpy())).probabilities()
        p_raw, c_raw = raw(theta, k)
        p_mit, c_mit = mitigated(theta, k)
        assert torch.equal(c_raw, c_mit)  # counts stay the raw counts
        p_mit = p_mit.numpy()
        assert (p_mit >= 0).all() and abs(p_mit.sum() - 1) < 1e-12  # a probability vector
        np.testing.assert_allclose(p_mit, mitigate(p_raw.numpy(), mitigated.readout_matrices), atol=1e-14)
        assert tv(p_mit, ideal) < 0.6 * tv(p_raw.numpy(), ideal), (tv(p_mit, ideal), tv(p_raw.numpy(), ideal))


def test_gradients_with_mitigation(shots_pair):
    qc, raw, mitigated = shots_pair
    theta = angles(qc.num_parameters, seed=20)
    w = torch.from_numpy(np.random.default_rng(21).normal(size=2**N))

    def grad(module):
        a = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((module(a, 0)[0] * w).sum(), a)
        return g

    # straight-through: the exact noiseless Jacobian, with or without mitigation
    torch.testing.assert_close(grad(mitigated), grad(raw), rtol=0, atol=0)
    # parameter shift: the shifted frequencies are unmixed like the forward (linear), same job, same seed
    model = device_readout_model(DEVICE, scale=3.0)
    ps_raw = make(qc, shots=20_000, noise_model=model, seed=6, shot_gradient="parameter_shift")
    ps_mit = make(qc, shots=20_000, noise_model=model, seed=6, shot_gradient="parameter_shift", readout_mitigation=True)
    _, _, jac = ps_raw._evaluate(theta.numpy(), 0, True)
    expected = unmix(jac, ps_mit.readout_matrices) @ w.numpy()
    np.testing.assert_allclose(grad(ps_mit).numpy(), expected, atol=1e-12)
    assert not np.allclose(expected, jac @ w.numpy())


def test_module_refuses_mitigation_without_noisy_shots():
    qc = build_ansatz(N, L)
    with pytest.raises(ValueError, match="readout_mitigation=True .* needs backend='aer_shots' and a noise_model"):
        make(qc, shots=100, readout_mitigation=True)
    with pytest.raises(ValueError, match="readout_mitigation=True"):
        make(qc, "aer_statevector", noise_model=DEVICE, readout_mitigation=True)


# ------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "fields",
    [
        dict(),  # statevector
        dict(backend="aer_statevector"),
        dict(backend="aer_statevector", noise_model=DEVICE),
        dict(backend="aer_shots", shots=100),  # no noise
    ],
)
def test_config_refuses_mitigation_without_a_noisy_device(fields):
    with pytest.raises(ValueError, match=r"GeneratorConfig\.readout_mitigation=True .* needs backend='aer_shots' with a noise_model"):
        GeneratorConfig(readout_mitigation=True, **fields)


def test_config_field_is_a_bool_and_round_trips():
    with pytest.raises(ValueError, match="readout_mitigation must be True or False"):
        GeneratorConfig(backend="aer_shots", shots=100, noise_model=DEVICE, readout_mitigation="yes")
    config = GeneratorConfig(backend="aer_shots", shots_per_state=20, noise_model=DEVICE, readout_mitigation=True)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["readout_mitigation"] is True and GeneratorConfig(**data) == config


def test_generator_with_mitigation_and_gi_trains():
    """Through the config and the generator: mitigated probabilities, GI from the raw counts, gradients reach the
    angles, the mapping and the GI network."""
    config = GeneratorConfig(qnn_depth=2, chunk_size=4, mapping_hidden_sizes=[8], backend="aer_shots", shots_per_state=2,
                             noise_model=device_readout_model(DEVICE, scale=3.0), readout_mitigation=True,
                             generative_interpolation=True, simulator_dtype="float64")
    generator = QPAGenerator.from_config(config, [TensorSpec("w", (16, 4))])
    assert generator.n_qubits == N and generator.backend.readout_mitigation
    with torch.no_grad():
        probs, counts = generator.backend(generator.angles, 0)
    assert (counts == 0).any()  # 2 shots per state leave states unobserved: GI has something to fill
    assert (probs >= 0).all() and abs(float(probs.sum()) - 1) < 1e-12
    out = generator.generate()
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)).sum().backward()
    assert generator.angles.grad.abs().max() > 0
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in generator.interpolation.parameters())


def test_old_import_paths_still_work():
    assert aer_module.apply_readout_error is apply_readout_error
    assert callable(aer_module._readout_matrices) and callable(aer_module.load_fake_backend)
