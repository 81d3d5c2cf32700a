"""A CPU-measurable guard on the generator's GPU cost, and the optional torch.compile of its mapping.

On a GPU the generator's forward+backward at N = 12 is set by how many kernels it launches (docs/performance.md,
"Operator launches"). CI has no GPU, so the first test counts the aten operators that would launch a kernel in one
training step's generation on the path CUDA takes (``benchmarks/bench_launches.py``) and bounds the count.
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_launches  # noqa: E402
from peft_qpa.generator import blockwise, compiled  # noqa: E402
from peft_qpa.generator.generator import QPAGenerator, TensorSpec  # noqa: E402

# Launches of one training step's generation (forward + backward) at N = 12, L = 8 on the torch path with the CUDA
# block budget, as measured by `python benchmarks/bench_launches.py` (benchmarks/results/bench_launches.json,
# counts["12"]["stages"]["step"]["launches"]): 305 (3,259 before the rotation blocks were built in batches and reused
# by the adjoint backward, and before the accelerator block budget and the one-block backward of blockwise.py). The
# bound leaves ~10% for harmless changes; a change that adds launches per block, per layer or per generated tensor
# exceeds it. To update: rerun the script, check that the change in the count is intended, set MEASURED to the new
# count and the bound to it plus ~10%, and update the table in docs/performance.md ("Operator launches").
MEASURED_LAUNCHES_N12 = 305
LAUNCH_BOUND_N12 = 340


def test_generator_launches_at_n12_are_bounded():
    counts = bench_launches.count_generation(12, depth=8, kernel="torch", blocks_of="cuda")
    assert counts["n_qubits"] == 12 and counts["block_rows"] >= counts["mapping_rows"]  # one block on CUDA
    step = counts["stages"]["step"]
    assert step["launches"] <= LAUNCH_BOUND_N12, step["top_launches"]
    assert step["launches"] >= MEASURED_LAUNCHES_N12 // 2  # it counts something real
    # the circuit's rotation blocks are built in batches: its launches do not grow with the number of blocks
    assert counts["stages"]["circuit_forward"]["launches"] <= 70
    assert step["host_syncs"] <= 2  # the finiteness check and the step counter


def test_counter_counts_backward_and_skips_views():
    x = torch.randn(4, 3, requires_grad=True)
    with bench_launches.OpCounter() as counter:
        y = (x.t().reshape(-1) * 2).sum()
        y.backward()
    assert counter.launches["aten::mul"] >= 2  # forward and its backward
    assert "aten::t" not in counter.launches and counter.ops["aten::t"] >= 1


# --- the optional torch.compile of the mapping (PEFT_QPA_COMPILE_MAPPING) --------------------------------------
def _generator(m: int) -> QPAGenerator:
    torch.manual_seed(0)
    specs = [TensorSpec("a", (4, m // 8), "kaiming_uniform"), TensorSpec("b", (m // 8, 4), "zeros")]
    g = QPAGenerator(specs, depth=2, chunk_size=16, hidden_sizes=(16, 32), seed=3)
    with torch.no_grad():  # away from the zero start, so that every gradient is nonzero
        for i, p in enumerate(g.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return g


def _two_accumulated_steps(m: int):
    """Outputs and gradients accumulated over two generations (gradient accumulation), as the tuner runs them."""
    g = _generator(m)
    outs = []
    for step in range(2):
        pieces = g.generate_pieces(training=True)
        weights = [torch.linspace(-1, 1 + step, t.numel()).view(t.shape) for t in pieces.values()]
        torch.autograd.backward(list(pieces.values()), weights)
        outs.append(torch.cat([t.detach().reshape(-1) for t in pieces.values()]))
    return torch.cat(outs), {n: p.grad.clone() for n, p in g.named_parameters()}


@pytest.fixture
def fresh_compile(monkeypatch):
    compiled.reset()
    yield monkeypatch
    compiled.reset()


@pytest.mark.parametrize("path", ["whole", "blockwise"])
def test_compiled_mapping_matches_eager(fresh_compile, path):
    """The compiled mapping gives the eager values and gradients, on the whole-mapping path (recomputed under
    torch.utils.checkpoint) and on the blockwise path (several blocks), with gradients accumulated over two steps.
    ``aot_eager`` (no C++ compiler needed) traces and runs the same graph machinery as inductor."""
    m = 2048
    if path == "blockwise":
        fresh_compile.setattr(blockwise, "BLOCKWISE_MIN_GENERATED", 0)
        fresh_compile.setattr(blockwise, "BLOCK_ELEMENTS_MIN", 2000)
        assert _generator(m).block_rows() < _generator(m).n_chunks
    eager_out, eager_grads = _two_accumulated_steps(m)
    fresh_compile.setenv(compiled.ENV_VAR, "aot_eager")
    got_out, got_grads = _two_accumulated_steps(m)
    assert compiled.failure() is None and compiled._ready  # it did run compiled
    torch.testing.assert_close(got_out, eager_out, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_compiled_mapping_falls_back_with_one_warning(fresh_compile):
    expected = _generator(2048).generate().detach()
    g = _generator(2048)
    fresh_compile.setenv(compiled.ENV_VAR, "no_such_backend")
    with pytest.warns(RuntimeWarning, match="eager mapping runs instead") as caught:
        first = g.generate().detach()
        second = g.generate().detach()
    assert len([w for w in caught if compiled.ENV_VAR in str(w.message)]) == 1
    assert compiled.failure() is not None
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_compile_is_off_by_default(fresh_compile):
    fresh_compile.delenv(compiled.ENV_VAR, raising=False)
    assert compiled.backend() is None
    _generator(2048).generate()
    assert not compiled._ready and not compiled._compiled
    fresh_compile.setenv(compiled.ENV_VAR, "1")
    assert compiled.backend() == "inductor"
