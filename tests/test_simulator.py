"""The torch statevector simulator against Qiskit's Statevector, and its gradients."""

import numpy as np
import pytest
import torch
from qiskit.quantum_info import Statevector

from peft_qpa.circuit import build_ansatz, circuit_parameters, circuit_program, n_qubits_for
from peft_qpa.simulator import StatevectorSimulator


def qiskit_probabilities(qc, angles):
    bound = qc.assign_parameters(dict(zip(circuit_parameters(qc), angles)))
    return Statevector(bound).probabilities()


@pytest.mark.parametrize("ansatz", ["ry_cnot", "rx_cnot"])
@pytest.mark.parametrize("n_qubits", [1, 2, 3, 5, 6, 7, 9, 11, 12])
def test_probabilities_match_qiskit(ansatz, n_qubits):
    depth = 3 if n_qubits > 9 else 4
    qc = build_ansatz(n_qubits, depth, ansatz)
    sim = StatevectorSimulator(qc)
    rng = np.random.default_rng(100 + n_qubits)
    for _ in range(4 if n_qubits > 9 else 10):
        angles = rng.uniform(-2 * np.pi, 2 * np.pi, qc.num_parameters)
        ours = sim(torch.tensor(angles, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(ours, qiskit_probabilities(qc, angles), atol=1e-12)


def test_float32_close_to_float64():
    qc = build_ansatz(8, 4)
    sim = StatevectorSimulator(qc)
    angles = torch.rand(qc.num_parameters, dtype=torch.float64) * 6
    p64 = sim(angles)
    p32 = sim(angles.float())
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), p64, atol=1e-6, rtol=0)
    assert abs(float(p32.sum()) - 1) < 1e-5


@pytest.mark.parametrize("ansatz", ["ry_cnot", "rx_cnot"])
def test_gradient_matches_finite_differences(ansatz):
    qc = build_ansatz(4, 3, ansatz)
    sim = StatevectorSimulator(qc)
    weights = torch.linspace(-1, 1, 16, dtype=torch.float64)
    angles = torch.rand(qc.num_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 6

    def objective(a):
        return (sim(a) * weights).sum()

    assert torch.autograd.gradcheck(objective, (angles.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_circuit_structure_is_the_published_ansatz():
    qc = build_ansatz(3, 2)
    names = [(g.name, g.qubits, g.param_index) for g in circuit_program(qc)]
    layer = lambda l: [("ry", (q,), l * 3 + q) for q in range(3)] + [("cx", (0, 1), None), ("cx", (1, 2), None)]
    assert names == layer(0) + layer(1)
    assert qc.num_parameters == 6


@pytest.mark.parametrize("m, chunk, expected", [(1, 1, 1), (2, 1, 1), (3, 1, 2), (1024, 1, 10), (1025, 1, 11), (204100, 2048, 7), (100, 200, 1)])
def test_qubit_count(m, chunk, expected):
    assert n_qubits_for(m, chunk) == expected


def test_bad_inputs():
    with pytest.raises(ValueError, match="ansatz"):
        build_ansatz(3, 2, "rz_cz")
    with pytest.raises(ValueError, match="depth"):
        build_ansatz(3, 0)
    sim = StatevectorSimulator(build_ansatz(3, 2))
    with pytest.raises(ValueError, match="Expected 6 angles"):
        sim(torch.zeros(5))
