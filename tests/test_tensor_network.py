"""The tensor-network (MPS) mapping and the distributed circuit ansatz of Quantum-Train with Tensor Network Mapping
Model and Distributed Circuit Ansatz (arXiv:2409.06992): shapes, parameter counts, contraction, gradients, seeding,
agreement with Qiskit, training, saving and the refused values."""

import itertools
import math

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from qiskit.quantum_info import Statevector

import peft_qpa
from peft_qpa.generator.circuit import build_ansatz, circuit_parameters
from peft_qpa.generator.config import GeneratorConfig
from peft_qpa.generator.features import DistributedFeatures, basis_bits
from peft_qpa.generator.generator import QPAGenerator, TensorSpec
from peft_qpa.generator.mapping import MPSMapping, MLPMapping

from tiny_models import tiny_llama, train_steps

SMALL = dict(target_modules=["q_proj", "v_proj"], chunk_size=16, qnn_depth=2, mapping_hidden_sizes=[8], seed=0)
SPECS = [TensorSpec("a", (4, 40), "kaiming_uniform"), TensorSpec("b", (30, 4), "zeros")]  # M = 280, N = 6 at chunk 8


def rows_of(n_qubits, n_rows, width=1, seed=0):
    features = 0.3 * torch.randn(n_rows, width, generator=torch.Generator().manual_seed(seed))
    return torch.cat([basis_bits(n_rows, n_qubits), features], 1)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------------ the MPS mapping


@pytest.mark.parametrize("in_features, chunk_size, bond_dim", [(1, 5, 3), (2, 8, 4), (7, 16, 4), (13, 64, 8), (9, 3, 1)])
def test_mps_shapes_and_parameter_count(in_features, chunk_size, bond_dim):
    mapping = MPSMapping(in_features, chunk_size, torch.float32, seed=0, bond_dim=bond_dim)
    rows = torch.randn(11, in_features)
    assert mapping(rows).shape == (11, chunk_size)
    assert mapping(rows[3]).shape == (chunk_size,)  # one row, as the MLP takes it
    torch.testing.assert_close(mapping(rows[3]), mapping(rows)[3])
    assert mapping.output_dtype == torch.float32
    count = sum(p.numel() for p in mapping.parameters())
    assert count == MPSMapping.parameter_count(in_features, chunk_size, bond_dim)
    # the formula: bond k of the half left of the output core is min(chi, 2^k), of the right half min(chi, 2^(S-k))
    p = in_features // 2
    left = [min(bond_dim, 2**k) for k in range(p + 1)]
    right = [min(bond_dim, 2 ** (in_features - k)) for k in range(p, in_features + 1)]
    expected = sum(2 * a * b for a, b in zip(left, left[1:])) + sum(2 * a * b for a, b in zip(right, right[1:]))
    assert count == expected + left[-1] * right[0] * chunk_size


def test_mps_parameter_count_of_the_documented_example_is_far_below_the_mlp():
    # N = 12 qubits, one probability feature: 13 sites; chunk 64, chi = 8
    mps = MPSMapping.parameter_count(13, 64, 8)
    mlp = sum(p.numel() for p in MLPMapping(13, 64, torch.float32, seed=0).parameters())
    assert (mps, mlp) == (5160, 39840)
    # with every bond at chi (no capping at the ends) the count would be 4 chi + 2 (S - 2) chi^2 + chi^2 chunk
    assert mps <= 4 * 8 + 2 * 11 * 64 + 64 * 64


def test_mps_is_the_contraction_of_its_cores():
    """chunk(x)[o] = sum over i_0..i_{S-1} of W[i_0, ..., i_{S-1}, o] * prod_s phi(x_s)[i_s] with phi(x) = [1, x] and
    W the product of the cores with the output core between sites p - 1 and p."""
    mapping = MPSMapping(5, 3, torch.float64, seed=4, bond_dim=3)
    with torch.no_grad():
        for core in mapping.cores:  # away from the identity start, so every term of W matters
            core.add_(0.3 * torch.randn(core.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    cores, p = list(mapping.cores), mapping.output_site
    rows = torch.randn(6, 5, dtype=torch.float64)
    expected = torch.zeros(6, 3, dtype=torch.float64)
    for index in itertools.product((0, 1), repeat=5):
        matrices = [core[:, i, :] for core, i in zip(cores, index)]
        left = torch.linalg.multi_dot([torch.ones(1, 1, dtype=torch.float64), *matrices[:p]])
        right = torch.linalg.multi_dot([*matrices[p:], torch.ones(1, 1, dtype=torch.float64)])
        weights = torch.einsum("al,lmo,mb->o", left, mapping.output_core, right)  # W[index, :]
        phi = torch.stack([rows[:, s] if i else torch.ones(6, dtype=torch.float64) for s, i in enumerate(index)]).prod(0)
        expected += phi[:, None] * weights[None, :]
    torch.testing.assert_close(mapping(rows), expected)


def test_mps_gradients_are_exact_and_reach_every_entry():
    mapping = MPSMapping(6, 4, torch.float64, seed=0, bond_dim=3)
    rows = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r, *params: mapping(r), (rows, *mapping.parameters()))
    (mapping(rows) * torch.randn(5, 4, dtype=torch.float64)).sum().backward()
    for name, parameter in mapping.named_parameters():
        assert (parameter.grad != 0).all(), f"{name} has entries without a gradient at the start"
    assert (rows.grad != 0).all()  # the features (the circuit's probabilities) get a gradient too


def test_mps_init_is_seeded_and_leaves_the_callers_rng_alone():
    state = torch.get_rng_state()
    a = MPSMapping(9, 16, torch.float32, seed=3, bond_dim=5)
    assert torch.equal(torch.get_rng_state(), state)  # not advanced, not used
    b = MPSMapping(9, 16, torch.float32, seed=3, bond_dim=5)
    c = MPSMapping(9, 16, torch.float32, seed=4, bond_dim=5)
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(a.output_core, c.output_core)
    wide = MPSMapping(9, 16, torch.float64, seed=3, bond_dim=5)  # the same values, in the other dtype
    for p, q in zip(a.parameters(), wide.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=0, atol=1e-7)


@pytest.mark.parametrize("n_qubits", [1, 4, 12, 20, 24])
@pytest.mark.parametrize("bond_dim", [2, 8, 32])
def test_mps_output_scale_stays_reasonable_with_many_sites(n_qubits, bond_dim):
    mapping = MPSMapping(n_qubits + 1, 32, torch.float32, seed=0, bond_dim=bond_dim)
    rows = rows_of(n_qubits, min(2**n_qubits, 2048))
    rows[:, -1] *= 3  # a standardized feature: the bits' scale and beyond
    with torch.no_grad():
        out = mapping(rows)
    assert torch.isfinite(out).all()
    assert 0.03 < out.std().item() < 0.5 and out.abs().max().item() < 3
    if n_qubits > 1:
        assert (out - out.mean(0)).std().item() > 0.01  # rows differ: the input matters from the start


def test_mps_generator_through_the_blockwise_path_equals_the_whole():
    from peft_qpa.generator import blockwise

    specs = [TensorSpec("w", (300, 300))]  # M = 90,000: the blockwise path
    g = QPAGenerator(specs, depth=1, chunk_size=64, seed=0, mapping="mps", mapping_options={"bond_dim": 3})
    assert g.num_generated >= blockwise.BLOCKWISE_MIN_GENERATED
    with torch.no_grad():
        whole = g._mapped(g.mapping_input(g.features(0)))
        flat = g.generate() - g.offset
    torch.testing.assert_close(flat, whole, atol=1e-5, rtol=0)
    (g.generate() * torch.randn(g.num_generated)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


# ------------------------------------------------------------------------------------- the distributed ansatz


@pytest.mark.parametrize("n_qubits, groups, sizes", [(6, 2, (3, 3)), (7, 3, (3, 2, 2)), (5, 5, (1, 1, 1, 1, 1))])
@pytest.mark.parametrize("ansatz", ["ry_cnot", "rx_cnot"])
def test_distributed_probabilities_equal_qiskit_statevector_of_the_product_circuit(n_qubits, groups, sizes, ansatz):
    specs = [TensorSpec("w", (2 ** (n_qubits - 1) + 1, 4))]  # 2^(N-1) + 1 chunks of 4: N qubits
    g = QPAGenerator(specs, depth=2, chunk_size=4, ansatz=ansatz, seed=1, dtype=torch.float64,
                     probability_input="distributed", source_options={"circuit_groups": groups})
    assert g.n_qubits == n_qubits and g.source.group_sizes == sizes
    probs = g.probabilities().detach().numpy()
    # the product circuit, as the generator reports it
    bound = g.circuit()
    assert bound.num_qubits == n_qubits and bound.num_parameters == 0
    np.testing.assert_allclose(probs, Statevector(bound).probabilities(), atol=1e-12)
    # and built here from the groups' own circuits, each bound to its slice of group_angles
    values = g.group_angles.detach().double().tolist()
    state, first = None, 0
    for size in sizes:
        qc = build_ansatz(size, 2, ansatz)
        part = qc.assign_parameters(dict(zip(circuit_parameters(qc), values[first : first + qc.num_parameters])))
        first += qc.num_parameters
        state = Statevector(part) if state is None else Statevector(part).tensor(state)  # later groups: higher bits
    np.testing.assert_allclose(probs, state.probabilities(), atol=1e-12)
    assert first == g.group_angles.numel() == 2 * n_qubits
    # no gate joins two groups
    group_of = [g for g, size in enumerate(sizes) for _ in range(size)]
    for instruction in g.circuit(bound=False).data:
        qubits = [g.circuit(bound=False).find_bit(q).index for q in instruction.qubits]
        assert len({group_of[q] for q in qubits}) == 1


def test_distributed_gradients_match_finite_differences():
    g = QPAGenerator(SPECS, depth=2, chunk_size=8, seed=0, dtype=torch.float64, hidden_sizes=(8,),
                     probability_input="distributed", source_options={"circuit_groups": 3})
    weights = torch.randn(2**g.n_qubits, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (g.probabilities() * weights).sum().backward()
    grad = g.group_angles.grad.clone()
    assert (grad != 0).all()
    eps = 1e-6
    for k in range(g.group_angles.numel()):
        with torch.no_grad():
            g.group_angles[k] += eps
            up = (g.probabilities() * weights).sum()
            g.group_angles[k] -= 2 * eps
            down = (g.probabilities() * weights).sum()
            g.group_angles[k] += eps
        assert abs((up - down).item() / (2 * eps) - grad[k].item()) < 1e-6
    # through the whole generator: every parameter gets a gradient at the first step
    g.zero_grad()
    (g.generate() * torch.randn(g.num_generated, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_distributed_under_shots_samples_each_group_on_its_own_stream():
    config = GeneratorConfig(probability_input="distributed", circuit_groups=2, backend="aer_shots",
                             shots_per_state=50, qnn_depth=2, chunk_size=8, mapping_hidden_sizes=[8])
    g = QPAGenerator.from_config(config, SPECS)
    marginals = g.source.group_probabilities(g, step=0)
    assert [m.numel() for m in marginals] == [8, 8]
    joint = g.probabilities(0)
    assert joint.shape == (64,) and abs(joint.sum().item() - 1) < 1e-5
    torch.testing.assert_close(joint, torch.outer(marginals[1], marginals[0]).reshape(-1))
    assert not torch.equal(g.probabilities(0), g.probabilities(1))


# ---------------------------------------------------------------------------------------- as a QPA adapter


def test_mps_adapter_starts_at_zero_trains_saves_and_reloads(input_ids, tmp_path):
    base = tiny_llama()
    expected = logits(base, input_ids)
    model = get_peft_model(base, peft_qpa.QPAConfig(**SMALL, mapping="mps", mps_bond_dim=4))
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=0)  # zero delta at step 0
    generator = model.base_model.get_generator()
    assert isinstance(generator.mapping, MPSMapping) and generator.mapping.bond_dim == 4
    mps = sum(p.numel() for p in generator.mapping.parameters())
    assert mps == MPSMapping.parameter_count(generator.n_qubits + 1, 16, 4)
    assert f"mapping MPS (bond dimension 4) parameters: {mps}" in model.base_model.generator_summary()
    losses = train_steps(model, input_ids, steps=8)
    assert losses[-1] < losses[0]
    trained = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(k.endswith("mapping.output_core") for k in keys) and any(".mapping.cores.0" in k for k in keys)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert reloaded.peft_config["default"].mapping == "mps"
    torch.testing.assert_close(logits(reloaded, input_ids), trained, rtol=0, atol=0)
    torch.testing.assert_close(reloaded.base_model.get_generator().generate(), generator.generate())


@pytest.mark.parametrize("mapping", ["mlp", "mps"])
def test_distributed_adapter_trains_with_either_mapping(mapping, input_ids, tmp_path):
    base = tiny_llama()
    expected = logits(base, input_ids)
    config = peft_qpa.QPAConfig(**SMALL, mapping=mapping, probability_input="distributed", circuit_groups=3)
    model = get_peft_model(base, config)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=0, atol=0)
    generator = model.base_model.get_generator()
    assert len(generator.group_backends) == 3 and sum(generator.source.group_sizes) == generator.n_qubits
    angles = generator.group_angles.detach().clone()
    losses = train_steps(model, input_ids, steps=8)
    assert losses[-1] < losses[0]
    assert not torch.equal(generator.group_angles, angles)  # the sub-circuits train
    assert "sub-circuits" in model.base_model.generator_summary()
    trained = logits(model, input_ids)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(reloaded, input_ids), trained, rtol=0, atol=0)


def test_distributed_with_frozen_angles_keeps_them():
    model = get_peft_model(tiny_llama(), peft_qpa.QPAConfig(**SMALL, probability_input="distributed",
                                                            freeze_angles=True))
    generator = model.base_model.get_generator()
    angles = generator.group_angles.detach().clone()
    assert not generator.group_angles.requires_grad
    train_steps(model, torch.randint(1, 97, (2, 8)), steps=2)
    assert torch.equal(generator.group_angles, angles)


# ------------------------------------------------------------------------------------------ refused values


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("mapping", dict(mapping="tt")),
        ("mapping", dict(mapping=None)),
        ("mps_bond_dim", dict(mapping="mps", mps_bond_dim=0)),
        ("mps_bond_dim", dict(mapping="mps", mps_bond_dim="4")),
        ("mps_bond_dim", dict(mapping="mps", mps_bond_dim=2.5)),
        ("mps_bond_dim", dict(mapping="mps", mps_bond_dim=True)),
        ("mps_bond_dim", dict(mps_bond_dim=4)),  # set without mapping="mps"
        ("circuit_groups", dict(probability_input="distributed", circuit_groups=1)),
        ("circuit_groups", dict(probability_input="distributed", circuit_groups="2")),
        ("circuit_groups", dict(probability_input="distributed", circuit_groups=25)),  # more than max_qubits = 24
        ("circuit_groups", dict(circuit_groups=3)),  # set without probability_input="distributed"
    ],
)
def test_bad_values_are_refused(field, kwargs):
    with pytest.raises(ValueError, match=rf"QPAConfig\.{field}\b") as info:
        peft_qpa.QPAConfig(**{**SMALL, **kwargs})
    assert "must be" in str(info.value) or "only applies" in str(info.value)


def test_more_groups_than_qubits_is_refused_when_n_is_known():
    # q_proj of both layers: 2 * 4 * (32 + 32) = 512 numbers in chunks of 128: N = 2
    config = peft_qpa.QPAConfig(target_modules=["q_proj"], chunk_size=128, qnn_depth=1, mapping_hidden_sizes=[8],
                                probability_input="distributed", circuit_groups=3)
    with pytest.raises(ValueError, match=r"circuit_groups=3 needs at least 3 qubits.*N = 2"):
        get_peft_model(tiny_llama(), config)
    with pytest.raises(ValueError, match="circuit_groups must be an integer >= 2"):
        DistributedFeatures(4, 1, "ry_cnot", 16, None, circuit_groups=1)


def test_large_bond_dimension_is_refused_before_anything_is_allocated(monkeypatch):
    monkeypatch.setenv("PEFT_QPA_MEMORY_BUDGET_GB", "1")
    with pytest.raises(ValueError, match=r"QPAConfig\.mps_bond_dim=20000 needs about .*Lower mps_bond_dim"):
        peft_qpa.QPAConfig(**SMALL, mapping="mps", mps_bond_dim=20000)
    assert math.isfinite(MPSMapping.parameter_count(25, 64, 8))


def test_shot_budget_of_distributed_is_per_sub_circuit(monkeypatch):
    from peft_qpa.generator.backends import check_generator_memory

    monkeypatch.setenv("PEFT_QPA_MEMORY_BUDGET_GB", "0.05")
    kwargs = dict(backend="aer_shots", shots_per_state=1000, chunk_size=8, mapping_hidden_sizes=[8])
    num_generated = 8 * 600  # N = 10: one job of 1000 * 2^10 shots (131 MB) against two of 1000 * 2^5 (4 MB each)
    with pytest.raises(ValueError, match="shots_per_state"):
        check_generator_memory(GeneratorConfig(**kwargs), num_generated)
    check_generator_memory(GeneratorConfig(**kwargs, probability_input="distributed"), num_generated)
