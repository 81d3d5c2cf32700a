"""Generative interpolation (GI) of zero-count basis states."""

import io

import numpy as np
import pytest
import torch

from peft_qpa.generator.backends.aer import AerProbabilities
from peft_qpa.generator.circuit import build_ansatz
from peft_qpa.generator.interpolation import GenerativeInterpolation

N = 5


def sample(seed=0, shots_per_state=1):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(2**N))
    counts = rng.multinomial(shots_per_state * 2**N, p)
    probs = torch.tensor(counts / counts.sum(), dtype=torch.float64)
    return probs, torch.from_numpy(counts)


def test_replaces_exactly_the_zero_count_states():
    gi = GenerativeInterpolation(N, [16, 16], seed=0).double()
    probs, counts = sample()
    zero = counts == 0
    assert 0 < int(zero.sum()) < 2**N  # c = 1 leaves many states unobserved
    out = gi(probs, counts)
    assert torch.isclose(out.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (out >= 0).all() and (out[zero] > 0).all()
    # observed states keep their frequencies up to the one global renormalisation factor
    scale = out[~zero] / probs[~zero]
    torch.testing.assert_close(scale, scale[0].expand_as(scale))
    # unobserved states get F's estimate, with the same factor
    torch.testing.assert_close(out[zero], gi.estimate(probs)[zero] * scale[0])


def test_no_zero_counts_is_identity():
    gi = GenerativeInterpolation(N, [8], seed=0).double()
    probs, _ = sample()
    probs = (probs + 0.01) / (probs + 0.01).sum()
    counts = torch.ones(2**N, dtype=torch.int64)
    torch.testing.assert_close(gi(probs, counts), probs)


def test_estimate_reads_only_hamming_neighbours():
    gi = GenerativeInterpolation(N, [8, 8], seed=1).double()
    probs, _ = sample(seed=2)
    p = probs.clone().requires_grad_(True)
    i = 13
    (g,) = torch.autograd.grad(gi.estimate(p)[i], p)
    neighbours = {i ^ (1 << q) for q in range(N)}
    assert {int(j) for j in torch.nonzero(g).flatten()} == neighbours


def test_gradients_reach_f_and_probabilities():
    gi = GenerativeInterpolation(N, [16, 16], seed=0).double()
    probs, counts = sample(seed=3)
    p = probs.clone().requires_grad_(True)
    target = torch.linspace(0, 1, 2**N, dtype=torch.float64)
    loss = (gi(p, counts) * target).sum()
    loss.backward()
    for name, param in gi.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert p.grad is not None and p.grad.abs().sum() > 0
    # F can actually be trained: a few SGD steps move the unobserved mass towards the target
    opt = torch.optim.Adam(gi.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(20):
        opt.zero_grad()
        loss = -(gi(probs, counts) * target).sum()
        loss.backward()
        opt.step()
    assert -loss.item() > first


def test_seeded_and_saves_loads():
    a = GenerativeInterpolation(N, [8, 4], seed=5)
    b = GenerativeInterpolation(N, [8, 4], seed=5)
    c = GenerativeInterpolation(N, [8, 4], seed=6)
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert any(not torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
    assert "neighbours" not in sd_a  # derived buffer, not saved
    buffer = io.BytesIO()
    torch.save(c.state_dict(), buffer)
    buffer.seek(0)
    a.load_state_dict(torch.load(buffer, weights_only=True))
    probs, counts = sample(seed=4)
    torch.testing.assert_close(a(probs.float(), counts), c(probs.float(), counts))


def test_with_aer_shots_end_to_end():
    qc = build_ansatz(N, 2)
    aer = AerProbabilities(qc, backend="aer_shots", shots=2**N, shot_gradient="exact", noise_model=None, seed=0)
    gi = GenerativeInterpolation(N, [16], seed=0)
    theta = torch.rand(qc.num_parameters, requires_grad=True)
    probs, counts = aer(theta, step=0)
    out = gi(probs, counts)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    (out * torch.arange(2**N)).sum().backward()
    assert theta.grad.abs().sum() > 0 and gi.net[0].weight.grad.abs().sum() > 0


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        GenerativeInterpolation(3, [4], seed=0)(torch.ones(4) / 4, torch.ones(4))
    with pytest.raises(ValueError, match="hidden"):
        GenerativeInterpolation(3, [0], seed=0)
