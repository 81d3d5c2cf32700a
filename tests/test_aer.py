"""Aer backends: exact probabilities, parameter-shift gradients, shots, seeding, noise."""

import json

import numpy as np
import pytest
import torch
from qiskit import transpile
from qiskit.quantum_info import Statevector
from qiskit_aer import AerSimulator
from qiskit_aer.noise import NoiseModel, ReadoutError, depolarizing_error
from scipy import stats

from peft_qpa.generator.backends.aer import (
    MAX_DENSITY_MATRIX_QUBITS,
    AerProbabilities,
    _exact_simulator,
    _restricted_device_noise_model,
    apply_readout_error,
    available_fake_backends,
    derive_seed,
    load_fake_backend,
    noise_model_from_json,
    noise_model_to_json,
    resolve_shots,
)
from peft_qpa.generator.circuit import build_ansatz

N, L = 4, 3  # small on purpose: the whole file must stay fast on 2 cores


def make(circuit, backend="aer_statevector", shots=None, shot_gradient="parameter_shift", noise_model=None, seed=0):
    return AerProbabilities(
        circuit, backend=backend, shots=shots, shot_gradient=shot_gradient, noise_model=noise_model,
        seed=seed, dtype=torch.float64,
    )


def angles(n_angles, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 2 * np.pi, n_angles))


def reference_probs(circuit, theta):
    return Statevector(circuit.assign_parameters(np.asarray(theta, dtype=float))).probabilities()


def multinomial_chi2_pvalue(counts, probs, min_expected=5.0):
    """Pearson chi-square p-value of counts against probs, merging cells with expected count < 5."""
    counts = np.asarray(counts, dtype=float)
    expected = np.asarray(probs, dtype=float) * counts.sum()
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] < min_expected:  # fold a still-small remainder into the smallest regular cell
        i = np.argmin(exp[:-1])
        obs[i] += obs[-1]
        exp[i] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp).pvalue


@pytest.fixture(scope="module", params=["ry_cnot", "rx_cnot"])
def circuit(request):
    return build_ansatz(N, L, request.param)


# ---------------------------------------------------------------------------------------- exact


def test_statevector_probabilities_match_qiskit(circuit):
    theta = angles(circuit.num_parameters)
    probs, counts = make(circuit)(theta, step=0)
    assert counts is None
    assert probs.dtype == torch.float64 and probs.shape == (2**N,)
    np.testing.assert_allclose(probs.numpy(), reference_probs(circuit, theta), atol=1e-12)


def test_float32_output():
    qc = build_ansatz(N, L)
    m = AerProbabilities(qc, backend="aer_statevector", shots=None, shot_gradient="parameter_shift",
                         noise_model=None, seed=0)
    probs, _ = m(angles(qc.num_parameters).float(), 0)
    assert probs.dtype == torch.float32


def test_parameter_shift_gradient_matches_exact(circuit):
    theta = angles(circuit.num_parameters, seed=1)
    w = torch.from_numpy(np.random.default_rng(2).normal(size=2**N))
    a = theta.clone().requires_grad_(True)
    probs, _ = make(circuit)(a, step=0)
    (grad,) = torch.autograd.grad((probs * w).sum(), a)

    exact = _exact_simulator(circuit)  # the torch statevector backend
    b = theta.clone().requires_grad_(True)
    (grad_exact,) = torch.autograd.grad((exact(b) * w).sum(), b)
    np.testing.assert_allclose(grad.numpy(), grad_exact.numpy(), atol=1e-10)

    # and against central finite differences of Qiskit's own Statevector (independent of torch)
    eps, theta = 1e-6, theta.numpy()
    fd = np.array([
        (reference_probs(circuit, theta + eps * e) - reference_probs(circuit, theta - eps * e)) @ w.numpy() / (2 * eps)
        for e in np.eye(len(theta))
    ])
    np.testing.assert_allclose(grad.numpy(), fd, atol=1e-6)


def test_all_shifted_circuits_in_one_job(monkeypatch):
    qc = build_ansatz(N, L)
    m = make(qc)
    calls = []
    original = m.simulator.run

    def counting_run(circuits, **kwargs):
        calls.append(len(next(iter(kwargs["parameter_binds"][0].values()))))
        return original(circuits, **kwargs)

    monkeypatch.setattr(m.simulator, "run", counting_run)
    a = angles(qc.num_parameters).requires_grad_(True)
    probs, _ = m(a, 0)
    probs.sum().backward()
    assert calls == [2 * qc.num_parameters + 1] == [m.circuits_per_step()]
    with torch.no_grad():  # no gradient wanted: only the forward circuit
        m(a, 0)
    assert calls[-1] == 1 == m.circuits_per_step(with_gradient=False)


# ---------------------------------------------------------------------------------------- shots


def test_shot_frequencies_are_multinomial_samples_of_exact_probs(circuit):
    theta = angles(circuit.num_parameters, seed=3)
    shots = 20_000
    m = make(circuit, "aer_shots", shots=shots, shot_gradient="exact", seed=11)
    p_exact = reference_probs(circuit, theta)
    pvalues = []
    for step in range(3):
        probs, counts = m(theta, step)
        assert counts.dtype == torch.int64 and int(counts.sum()) == shots
        np.testing.assert_allclose(probs.numpy(), counts.numpy() / shots)
        pvalues.append(multinomial_chi2_pvalue(counts.numpy(), p_exact))
    # Deterministic (fixed seeds); under H0 each p-value is uniform, so 1e-3 fails a correct sampler
    # with probability ~0.3% for these seeds' draws, and a wrong distribution has p ~ 0.
    assert min(pvalues) > 1e-3, pvalues
    # a wrong distribution is rejected by the same test
    assert multinomial_chi2_pvalue(counts.numpy(), reference_probs(circuit, theta.numpy() + 0.3)) < 1e-6


def test_shots_reproducible_by_seed_and_step():
    qc = build_ansatz(N, L)
    theta = angles(qc.num_parameters, seed=4)
    a = make(qc, "aer_shots", shots=500, seed=7)
    b = make(qc, "aer_shots", shots=500, seed=7)  # as in another process: a fresh module
    c = make(qc, "aer_shots", shots=500, seed=8)
    ca0 = a(theta, 0)[1]
    assert torch.equal(ca0, a(theta, 0)[1])
    assert torch.equal(ca0, b(theta, 0)[1])
    assert not torch.equal(ca0, a(theta, 1)[1])
    assert not torch.equal(ca0, c(theta, 0)[1])
    assert derive_seed(7, 0) == derive_seed(7, 0) != derive_seed(7, 1)


def test_shot_parameter_shift_gradient_is_unbiased():
    qc = build_ansatz(3, 2)
    theta = angles(qc.num_parameters, seed=5)
    shots = 50_000
    w = np.random.default_rng(6).normal(size=8)
    m = make(qc, "aer_shots", shots=shots, shot_gradient="parameter_shift", seed=1)
    a = theta.clone().requires_grad_(True)
    probs, _ = m(a, 0)
    (grad,) = torch.autograd.grad((probs * torch.from_numpy(w)).sum(), a)

    # exact value and the multinomial standard deviation of (f+ - f-)·w / 2
    expected, sigma, theta = [], [], theta.numpy()
    for e in np.eye(len(theta)):
        pp, pm = reference_probs(qc, theta + np.pi / 2 * e), reference_probs(qc, theta - np.pi / 2 * e)
        expected.append((pp - pm) @ w / 2)
        var = sum((p @ w**2 - (p @ w) ** 2) / shots for p in (pp, pm)) / 4
        sigma.append(np.sqrt(var))
    z = (grad.numpy() - np.array(expected)) / np.array(sigma)
    assert np.all(np.abs(z) < 4.5), z  # deterministic seed; 4.5 sigma over 6 components
    assert m.circuits_per_step() == 2 * qc.num_parameters + 1


def test_exact_shot_gradient_is_straight_through(circuit):
    theta = angles(circuit.num_parameters, seed=8)
    w = torch.from_numpy(np.random.default_rng(9).normal(size=2**N))
    m = make(circuit, "aer_shots", shots=100, shot_gradient="exact")
    a = theta.clone().requires_grad_(True)
    probs, counts = m(a, 0)
    np.testing.assert_allclose(probs.detach().numpy(), counts.numpy() / 100)
    (grad,) = torch.autograd.grad((probs * w).sum(), a)
    b = theta.clone().requires_grad_(True)
    (grad_exact,) = torch.autograd.grad((_exact_simulator(circuit)(b) * w).sum(), b)
    np.testing.assert_allclose(grad.numpy(), grad_exact.numpy(), atol=1e-12)
    assert m.circuits_per_step() == 1


def test_resolve_shots():
    assert resolve_shots(None, 20, 6) == 20 * 64
    assert resolve_shots(1000, None, 6) == 1000
    with pytest.raises(ValueError, match="exactly one"):
        resolve_shots(10, 2, 3)
    with pytest.raises(ValueError, match="shots"):
        resolve_shots(0, None, 3)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("shots", [0, -5, 2.5, None, True])
def test_bad_shots(shots):
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        make(build_ansatz(2, 1), "aer_shots", shots=shots)


def test_other_errors():
    qc = build_ansatz(2, 1)
    with pytest.raises(ValueError, match="fake_kyiv.*fake_sherbrooke|fake_sherbrooke.*fake_torino"):
        make(qc, "aer_shots", shots=10, noise_model="fake_nowhere")
    with pytest.raises(ValueError, match="aer_shots"):
        make(qc, "aer_statevector", shots=10)
    with pytest.raises(ValueError, match="backend"):
        make(qc, "qpu")
    with pytest.raises(ValueError, match="shot_gradient"):
        make(qc, shot_gradient="spsa")
    with pytest.raises(ValueError, match="density"):
        make(build_ansatz(MAX_DENSITY_MATRIX_QUBITS + 1, 1), noise_model=NoiseModel())
    with pytest.raises(ValueError, match="shape"):
        make(qc)(torch.zeros(3, dtype=torch.float64), 0)


def test_fake_backend_names():
    names = available_fake_backends()
    assert {"fake_kyiv", "fake_sherbrooke", "fake_torino"} <= set(names)
    for name in ("fake_perth", "fake_athens"):
        assert load_fake_backend(name).name == name


# ---------------------------------------------------------------------------------------- noise


def test_apply_readout_error_matches_kron():
    rng = np.random.default_rng(0)
    mats = []
    for _ in range(3):
        e0, e1 = rng.uniform(0, 0.2, 2)
        mats.append(np.array([[1 - e0, e0], [e1, 1 - e1]]))
    p = rng.dirichlet(np.ones(8))
    # little-endian: qubit 2 is the most significant bit, so it is the left factor of the kron
    full = np.kron(np.kron(mats[2], mats[1]), mats[0])
    np.testing.assert_allclose(apply_readout_error(p, mats), p @ full, atol=1e-15)


@pytest.fixture(scope="module")
def noisy_circuit():
    return build_ansatz(N, 2)


def test_noisy_device_run_trains_and_matches_exact_noisy_probs(noisy_circuit):
    qc = noisy_circuit
    theta = angles(qc.num_parameters, seed=10)
    shots = 20_000
    noisy = make(qc, "aer_shots", shots=shots, shot_gradient="exact", noise_model="fake_kyiv", seed=3)
    exact_noisy = make(qc, "aer_statevector", noise_model="fake_kyiv", seed=3)  # density matrix + readout
    assert noisy.executed_circuit.count_ops().get("ecr", 0) > 0  # really transpiled to the device
    a = theta.clone().requires_grad_(True)
    probs, counts = noisy(a, 0)
    (probs * torch.arange(2**N, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0

    p_noisy = exact_noisy(theta, 0)[0].numpy()
    p_ideal = reference_probs(qc, theta)
    assert abs(p_noisy.sum() - 1) < 1e-12
    assert np.abs(p_noisy - p_ideal).sum() > 1e-3  # the noise does something
    # Aer's own noisy sampling (gate + readout errors) is a multinomial draw of the exact noisy
    # probabilities (density matrix, then per-qubit readout confusion matrices) ...
    assert multinomial_chi2_pvalue(counts.numpy(), p_noisy) > 1e-3
    # ... and not of the noiseless ones
    assert multinomial_chi2_pvalue(counts.numpy(), p_ideal) < 1e-6


def test_noisy_exact_parameter_shift_gradient(noisy_circuit):
    """The shift rule stays exact for parameter-independent noise: compare to finite differences."""
    qc = noisy_circuit
    theta = angles(qc.num_parameters, seed=12)
    m = make(qc, "aer_statevector", noise_model="fake_kyiv", seed=3)
    w = np.random.default_rng(13).normal(size=2**N)
    a = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((m(a, 0)[0] * torch.from_numpy(w)).sum(), a)
    eps = 1e-5
    with torch.no_grad():
        fd = np.array([
            (m(theta + eps * e, 0)[0] - m(theta - eps * e, 0)[0]).numpy() @ w / (2 * eps)
            for e in torch.eye(len(theta), dtype=torch.float64)
        ])
    np.testing.assert_allclose(grad.numpy(), fd, atol=1e-6)


def test_restricted_device_noise_model_gives_identical_counts():
    backend = load_fake_backend("fake_perth")  # 7 qubits: the full model is cheap here
    qc = build_ansatz(3, 2)
    qc.measure_all()
    qc = qc.assign_parameters(angles(qc.num_parameters, seed=14).numpy())
    tq = transpile(qc, backend, seed_transpiler=0)
    used = {tq.find_bit(q).index for inst in tq.data for q in inst.qubits}
    restricted = _restricted_device_noise_model("fake_perth", used)
    full = NoiseModel.from_backend(backend)
    run = lambda nm: AerSimulator(noise_model=nm).run(tq, shots=3000, seed_simulator=9).result().get_counts()
    assert run(restricted) == run(full)


def test_user_noise_model_and_json_roundtrip():
    nm = NoiseModel(basis_gates=["rz", "sx", "cx"])
    nm.add_all_qubit_quantum_error(depolarizing_error(0.02, 1), ["sx"])
    nm.add_all_qubit_quantum_error(depolarizing_error(0.05, 2), ["cx"])
    nm.add_all_qubit_readout_error(ReadoutError([[0.95, 0.05], [0.1, 0.9]]))
    encoded = noise_model_to_json(nm)
    text = json.dumps({"noise_model": encoded})
    decoded = noise_model_from_json(json.loads(text)["noise_model"])
    assert isinstance(decoded, NoiseModel)
    assert noise_model_to_json("fake_kyiv") == "fake_kyiv" and noise_model_from_json("fake_kyiv") == "fake_kyiv"
    assert noise_model_to_json(None) is None and noise_model_from_json(None) is None

    qc = build_ansatz(3, 2)
    theta = angles(qc.num_parameters, seed=15)
    counts = [make(qc, "aer_shots", shots=2000, shot_gradient="exact", noise_model=m, seed=2)(theta, 4)[1]
              for m in (nm, decoded)]
    assert torch.equal(counts[0], counts[1])
    exact = make(qc, noise_model=nm)(theta, 0)[0].numpy()
    assert multinomial_chi2_pvalue(counts[0].numpy(), exact) > 1e-3
    with pytest.raises(ValueError, match="noise_model"):
        noise_model_to_json(42)


def test_noisy_shots_training_lowers_the_loss():
    """A few Adam steps on a fake device (shots + noise, straight-through gradient) raise the
    probability of a target state, judged by the exact noisy probabilities."""
    qc = build_ansatz(3, 2)
    target = 0b101
    noisy = make(qc, "aer_shots", shots=2000, shot_gradient="exact", noise_model="fake_kyiv", seed=0)
    judge = make(qc, "aer_statevector", noise_model="fake_kyiv", seed=0)
    theta = angles(qc.num_parameters, seed=16).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.2)
    with torch.no_grad():
        before = 1 - judge(theta, 0)[0][target].item()
    for step in range(15):
        opt.zero_grad()
        loss = 1 - noisy(theta, step)[0][target]
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = 1 - judge(theta, 0)[0][target].item()
    assert after < before - 0.3, (before, after)
