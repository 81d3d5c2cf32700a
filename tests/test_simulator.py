"""The torch statevector simulator against Qiskit's Statevector, and its gradients."""

from pathlib import Path

import numpy as np
import pytest
import torch
from qiskit.quantum_info import Statevector

from peft_qpa.generator.circuit import build_ansatz, circuit_parameters, circuit_program, n_qubits_for
from peft_qpa.generator.backends.statevector import StatevectorSimulator


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


# --------------------------------------------------------------------------------------------------
# Adjoint backward (gradient="adjoint") against autograd
# --------------------------------------------------------------------------------------------------


def _loss_and_grad(sim, angles, weights):
    a = angles.clone().requires_grad_(True)
    probs = sim(a)
    (probs * weights).sum().backward()
    return probs.detach(), a.grad


@pytest.mark.parametrize("kernel", ["torch", "fused"])
@pytest.mark.parametrize("n_qubits, depth", [(1, 1), (1, 3), (2, 2), (5, 1), (5, 4), (7, 3), (11, 2), (11, 8), (15, 2)])
def test_adjoint_gradient_matches_autograd(n_qubits, depth, kernel):
    if kernel == "fused":
        _require_fused_kernel()
    qc = build_ansatz(n_qubits, depth)
    adjoint = StatevectorSimulator(qc, gradient="adjoint", kernel=kernel)
    autograd = StatevectorSimulator(qc, gradient="autograd", kernel="torch")
    assert adjoint.use_adjoint and not autograd.use_adjoint
    gen = torch.Generator().manual_seed(n_qubits * 100 + depth)
    angles = torch.rand(qc.num_parameters, dtype=torch.float64, generator=gen) * 4 * np.pi - 2 * np.pi
    weights = torch.randn(2**n_qubits, dtype=torch.float64, generator=gen)
    p_adj, g_adj = _loss_and_grad(adjoint, angles, weights)
    p_auto, g_auto = _loss_and_grad(autograd, angles, weights)
    if kernel == "torch":
        assert torch.equal(p_adj, p_auto)  # the forward is the same computation
    else:  # the same circuit, other rounding
        torch.testing.assert_close(p_adj, p_auto, rtol=0, atol=1e-14)
    torch.testing.assert_close(g_adj, g_auto, rtol=1e-10, atol=1e-12 * float(g_auto.abs().max()))


def test_adjoint_forward_bit_identical_float32():
    qc = build_ansatz(9, 5)
    angles = torch.rand(qc.num_parameters, generator=torch.Generator().manual_seed(3)) * 6
    weights = torch.randn(2**9, generator=torch.Generator().manual_seed(4))
    p_adj, g_adj = _loss_and_grad(StatevectorSimulator(qc, gradient="adjoint", kernel="torch"), angles, weights)
    p_auto, g_auto = _loss_and_grad(StatevectorSimulator(qc, gradient="autograd", kernel="torch"), angles, weights)
    assert p_adj.dtype == torch.float32 and torch.equal(p_adj, p_auto)
    torch.testing.assert_close(g_adj, g_auto, rtol=1e-4, atol=1e-5 * float(g_auto.abs().max()))


def test_adjoint_gradcheck():
    qc = build_ansatz(4, 3)
    sim = StatevectorSimulator(qc, gradient="adjoint")
    weights = torch.linspace(-1, 1, 16, dtype=torch.float64)
    angles = torch.rand(qc.num_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 6
    assert torch.autograd.gradcheck(lambda a: (sim(a) * weights).sum(), (angles.clone().requires_grad_(),),
                                    eps=1e-6, atol=1e-7)
    # the full Jacobian of the probabilities, not only one weighted sum
    assert torch.autograd.gradcheck(sim, (angles.clone().requires_grad_(),), eps=1e-6, atol=1e-7)


def test_adjoint_partial_layers_and_cnots_first():
    """A circuit that is not build_ansatz: CNOTs before any rotation, rotations on some qubits only
    (partial-layer blocks), a shared parameter. Forward bit-identical to autograd, gradients equal."""
    from qiskit import QuantumCircuit
    from qiskit.circuit import ParameterVector

    theta = ParameterVector("θ", 6)
    qc = QuantumCircuit(7)
    qc.ry(theta[5], 6)  # no full first layer: the simulation starts from |0...0>
    qc.cx(6, 0)
    for q, p in [(0, 0), (1, 1), (3, 2), (4, 3)]:
        qc.ry(theta[p], q)
    qc.cx(1, 2)
    qc.cx(4, 5)
    for q in range(7):
        qc.ry(theta[q % 5], q)  # full layer reusing parameters
    qc.cx(0, 3)
    qc.ry(theta[4], 2)
    angles = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 6
    weights = torch.randn(2**7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    p_adj, g_adj = _loss_and_grad(StatevectorSimulator(qc, gradient="adjoint"), angles, weights)
    p_auto, g_auto = _loss_and_grad(StatevectorSimulator(qc, gradient="autograd"), angles, weights)
    assert torch.equal(p_adj, p_auto)
    torch.testing.assert_close(g_adj, g_auto, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(p_adj.numpy(), qiskit_probabilities(qc, angles.numpy()), atol=1e-12)


def test_adjoint_second_call_and_retain_graph():
    qc = build_ansatz(6, 3)
    sim = StatevectorSimulator(qc, gradient="adjoint")
    angles = torch.rand(qc.num_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 6
    weights = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    p1, g1 = _loss_and_grad(sim, angles, weights)
    p2, g2 = _loss_and_grad(sim, angles, weights)  # results do not depend on earlier calls
    assert torch.equal(p1, p2) and torch.equal(g1, g2)
    # a graph kept with retain_graph (the generator's reentrant-checkpointing path) can be backwarded again
    a = angles.clone().requires_grad_(True)
    loss = (sim(a) * weights).sum()
    (first,) = torch.autograd.grad(loss, a, retain_graph=True)
    (second,) = torch.autograd.grad(loss, a)
    assert torch.equal(first, g1) and torch.equal(second, g1)


def test_adjoint_without_grad():
    qc = build_ansatz(5, 2)
    sim = StatevectorSimulator(qc, gradient="adjoint")
    reference = StatevectorSimulator(qc, gradient="autograd")
    angles = torch.rand(qc.num_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 6
    probs = sim(angles)  # angles do not require grad
    assert not probs.requires_grad
    assert torch.equal(probs, reference(angles))
    with torch.no_grad():
        assert torch.equal(sim(angles.clone().requires_grad_(True)), probs)


def test_gradient_modes():
    ry, rx = build_ansatz(3, 2), build_ansatz(3, 2, "rx_cnot")
    assert StatevectorSimulator(ry).gradient == "auto"
    assert StatevectorSimulator(ry).use_adjoint  # the default for real-amplitude circuits
    assert not StatevectorSimulator(rx).use_adjoint  # complex amplitudes: autograd
    assert not StatevectorSimulator(ry, gradient="autograd").use_adjoint
    with pytest.raises(ValueError, match="real-amplitude"):
        StatevectorSimulator(rx, gradient="adjoint")
    with pytest.raises(ValueError, match="gradient must be one of"):
        StatevectorSimulator(ry, gradient="parameter_shift")


# --------------------------------------------------------------------------------------------------
# The fused CPU kernel (peft_qpa/generator/backends/csrc/ry_layers.cpp)
# --------------------------------------------------------------------------------------------------


def _require_fused_kernel():
    from peft_qpa.generator.backends import fused_kernel

    if fused_kernel.load() is None:
        pytest.skip(f"the fused CPU kernel is unavailable here: {fused_kernel.error() or 'turned off'}")


@pytest.mark.parametrize("n_qubits", [13, 14, 16])  # one tile / tiles and strips / several strips
def test_fused_kernel_matches_qiskit(n_qubits):
    _require_fused_kernel()
    qc = build_ansatz(n_qubits, 3)
    sim = StatevectorSimulator(qc, kernel="fused")
    angles = np.random.default_rng(n_qubits).uniform(-2 * np.pi, 2 * np.pi, qc.num_parameters)
    probs = sim(torch.tensor(angles, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(probs, qiskit_probabilities(qc, angles), atol=1e-12)


def test_fused_kernel_is_the_default_where_it_applies():
    _require_fused_kernel()
    angles = torch.zeros(build_ansatz(4, 2).num_parameters)
    assert StatevectorSimulator(build_ansatz(4, 2))._fused_module(angles) is not None
    assert StatevectorSimulator(build_ansatz(4, 2), kernel="torch")._fused_module(angles) is None
    assert StatevectorSimulator(build_ansatz(4, 2, "rx_cnot"))._fused_steps is None  # complex amplitudes


def test_fused_kernel_general_cnot_pattern_and_threads(monkeypatch):
    """CNOTs that are not the q -> q+1 chain use the kernel's index path; strips run at N = 15.
    Results do not depend on the number of threads (partial sums are added in a fixed order; with one
    thread the state-sized elementwise ops run in numpy, with two in torch: the same IEEE operations)."""
    _require_fused_kernel()
    from qiskit import QuantumCircuit
    from qiskit.circuit import ParameterVector

    from peft_qpa.generator.backends import fused_kernel

    n = 15
    theta = ParameterVector("θ", 3 * n)
    qc = QuantumCircuit(n)
    for layer in range(3):
        for q in range(n):
            qc.ry(theta[layer * n + q], q)
        for control, target in [(3, 0), (14, 7), (1, 2), (9, 13)]:
            qc.cx(control, target)
    fused = StatevectorSimulator(qc, kernel="fused")
    assert not any(step.permutation.chain for step in fused._fused_steps if step.permutation is not None)
    angles = torch.rand(3 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 6
    weights = torch.randn(2**n, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    p_ref, g_ref = _loss_and_grad(StatevectorSimulator(qc, gradient="autograd", kernel="torch"), angles, weights)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            monkeypatch.setenv(fused_kernel.THREADS_ENV_VAR, str(count))
            assert fused_kernel.threads(n) == count
            results.append(_loss_and_grad(fused, angles.float(), weights.float()))
            p, g = _loss_and_grad(fused, angles, weights)
            torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-14)
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12 * float(g_ref.abs().max()))
    finally:
        torch.set_num_threads(threads)
    (p1, g1), (p2, g2) = results
    assert torch.equal(p1, p2) and torch.equal(g1, g2)


@pytest.mark.parametrize("n_qubits, dtype", [(18, torch.float64), (19, torch.float32)])
def test_fused_kernel_blocks_and_high_passes(n_qubits, dtype):
    """Above a tile (2^12 float32 / 2^11 float64 amplitudes) and an L2 block (2^15 / 2^14) the kernel
    turns the remaining qubits in passes over the whole state (here a pass of three and one of one)."""
    _require_fused_kernel()
    qc = build_ansatz(n_qubits, 2)
    gen = torch.Generator().manual_seed(n_qubits)
    angles = torch.rand(qc.num_parameters, dtype=torch.float64, generator=gen) * 4 * np.pi - 2 * np.pi
    weights = torch.randn(2**n_qubits, dtype=torch.float64, generator=gen)
    p_ref, g_ref = _loss_and_grad(StatevectorSimulator(qc, gradient="adjoint", kernel="torch"), angles, weights)
    p, g = _loss_and_grad(StatevectorSimulator(qc, kernel="fused"), angles.to(dtype), weights.to(dtype))
    if dtype == torch.float64:
        torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-14)
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12 * float(g_ref.abs().max()))
    else:
        torch.testing.assert_close(p.double(), p_ref, rtol=1e-4, atol=1e-11)
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-3, atol=1e-4 * float(g_ref.abs().max()))


def test_fused_workspace_never_leaks_into_results():
    """The scratch buffers kept between calls are never returned or kept for a backward: two graphs
    alive at once (the second forward reuses the buffers of the first) give the results of fresh
    simulators; copies start without buffers; release_workspace frees them."""
    import copy

    _require_fused_kernel()
    n = 13
    qc = build_ansatz(n, 3)
    gen = torch.Generator().manual_seed(11)
    a1, a2 = (torch.rand(qc.num_parameters, dtype=torch.float64, generator=gen) * 6 for _ in range(2))
    weights = torch.randn(2**n, dtype=torch.float64, generator=gen)
    expected = [_loss_and_grad(StatevectorSimulator(qc), a, weights) for a in (a1, a2)]
    sim = StatevectorSimulator(qc)
    x1, x2 = a1.clone().requires_grad_(True), a2.clone().requires_grad_(True)
    p1, p2 = sim(x1), sim(x2)
    (p1 * weights).sum().backward()
    (p2 * weights).sum().backward()
    for (p_ref, g_ref), p, x in zip(expected, (p1, p2), (x1, x2)):
        assert torch.equal(p.detach(), p_ref) and torch.equal(x.grad, g_ref)
    assert 0 < sim._workspace.nbytes() <= 3 * 2**n * 8
    assert copy.deepcopy(sim)._workspace.nbytes() == 0
    sim.release_workspace()
    assert sim._workspace.nbytes() == 0


def test_fused_kernel_refuses_aliased_buffers():
    _require_fused_kernel()
    from peft_qpa.generator.backends import fused_kernel

    module = fused_kernel.load()
    z, mu, out = torch.rand(32), torch.rand(32), torch.empty(32)
    c, s = torch.full((5,), 0.6), torch.full((5,), 0.8)
    with pytest.raises(RuntimeError, match="two buffers"):
        module.ry_layer_backward(z, z, None, True, c, s, out, torch.empty(32))
    with pytest.raises(RuntimeError, match="other buffers"):
        module.ry_layer_backward(z, mu, None, True, c, s, z, out)  # a gather cannot run in place
    with pytest.raises(RuntimeError, match="not be the input"):
        module.ry_layer_forward(z, None, True, c, s, z)


def test_fused_kernel_unavailable_falls_back_or_errors(monkeypatch):
    from peft_qpa.generator.backends import fused_kernel

    qc = build_ansatz(5, 2)
    angles = torch.rand(qc.num_parameters, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 6
    expected = StatevectorSimulator(qc, kernel="torch")(angles)
    monkeypatch.setenv(fused_kernel.ENV_VAR, "0")  # turned off: auto runs the torch path, bit for bit
    assert fused_kernel.load() is None
    assert torch.equal(StatevectorSimulator(qc)(angles), expected)
    with pytest.raises(RuntimeError, match="unavailable"):
        StatevectorSimulator(qc, kernel="fused")(angles)
    monkeypatch.setenv(fused_kernel.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="must be 0"):
        fused_kernel.load()


def test_fused_kernel_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="full RY layers"):
        StatevectorSimulator(build_ansatz(3, 2, "rx_cnot"), kernel="fused")
    with pytest.raises(ValueError, match="kernel must be one of"):
        StatevectorSimulator(build_ansatz(3, 2), kernel="cuda")
    _require_fused_kernel()
    sim = StatevectorSimulator(build_ansatz(3, 2), kernel="fused")
    with pytest.raises(ValueError, match="CPU float32/float64"):
        sim(torch.zeros(6, dtype=torch.float16))


def test_stale_build_lock_is_removed(tmp_path):
    import os
    import time

    from peft_qpa.generator.backends import fused_kernel

    lock = tmp_path / "lock"
    lock.touch()
    fused_kernel._remove_stale_lock(tmp_path)
    assert lock.exists()  # a build may be running in another process
    old = time.time() - fused_kernel.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    fused_kernel._remove_stale_lock(tmp_path)
    assert not lock.exists()  # left by a killed build: it would block every later build


def test_build_directory_follows_torch_extensions_dir(monkeypatch, tmp_path):
    from peft_qpa.generator.backends import fused_kernel

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = fused_kernel.build_directory()
    assert directory.parent.parent == tmp_path and directory.name.startswith("peft_qpa_ry_layers_")


def test_build_directory_is_keyed_by_the_source(monkeypatch, tmp_path):
    """Two different sources (two checkouts at different versions) get different build directories
    and module names; the same source, wherever it lies, the same ones."""
    from peft_qpa.generator.backends import fused_kernel

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    source = fused_kernel.SOURCE.read_bytes()
    changed = source + b"\n// another version\n"
    assert fused_kernel.build_directory(source) == fused_kernel.build_directory(bytes(source))
    assert fused_kernel.build_directory(source) == fused_kernel.build_directory()  # the package's own source
    assert fused_kernel.build_directory(changed) != fused_kernel.build_directory(source)
    assert fused_kernel.source_key(source) != fused_kernel.source_key(source, flags=("-O2",))  # flags count
    for directory in (fused_kernel.build_directory(source), fused_kernel.build_directory(changed)):
        assert directory.name.isidentifier() and directory.name.startswith("peft_qpa_ry_layers_")


def test_checkouts_of_one_source_share_one_build(monkeypatch, tmp_path):
    """load() compiles a copy of the source inside the build directory: two checkouts (two paths) of
    the same source hand torch the same name, directory and source file, so neither rebuilds the
    other's kernel; a different source gets its own."""
    import torch.utils.cpp_extension

    from peft_qpa.generator.backends import fused_kernel

    calls = []

    def fake_load(name, build_directory, sources, extra_cflags, verbose):
        calls.append({"name": name, "build_directory": build_directory, "sources": list(sources),
                      "flags": list(extra_cflags)})
        return object()

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(fused_kernel.ENV_VAR, raising=False)
    source = fused_kernel.SOURCE.read_bytes()
    for checkout, text in (("a", source), ("b", source), ("c", source + b"\n// edited\n")):
        path = tmp_path / checkout / "csrc" / "ry_layers.cpp"
        path.parent.mkdir(parents=True)
        path.write_bytes(text)
        monkeypatch.setattr(fused_kernel, "SOURCE", path)
        monkeypatch.setattr(fused_kernel, "_module", None)
        monkeypatch.setattr(fused_kernel, "_error", None)
        assert fused_kernel.load() is not None, fused_kernel.error()
    a, b, c = calls
    assert a == b
    compiled = Path(a["sources"][0])
    assert compiled.parent == Path(a["build_directory"]) and compiled.read_bytes() == source
    assert a["flags"] == list(fused_kernel.CFLAGS)
    assert c["name"] != a["name"] and c["build_directory"] != a["build_directory"]
    assert Path(c["sources"][0]).read_bytes() == source + b"\n// edited\n"


def test_kernel_threads_policy(monkeypatch):
    """One thread below PARALLEL_MIN_QUBITS and wherever fewer than two CPUs are idle; the idle CPUs (at
    most torch's count) above; PEFT_QPA_KERNEL_THREADS fixes the count (at most torch's)."""
    from peft_qpa.generator.backends import fused_kernel

    threads = torch.get_num_threads()
    big, small = fused_kernel.PARALLEL_MIN_QUBITS, fused_kernel.PARALLEL_MIN_QUBITS - 1
    monkeypatch.delenv(fused_kernel.THREADS_ENV_VAR, raising=False)
    try:
        torch.set_num_threads(4)
        for idle, expected in ((8, 4), (3, 3), (2, 2), (1, 1), (0, 1)):
            monkeypatch.setattr(fused_kernel, "idle_cpus", lambda idle=idle: idle)
            assert fused_kernel.threads(big) == expected
            assert fused_kernel.threads(small) == 1
        monkeypatch.setattr(fused_kernel, "idle_cpus", lambda: 8)
        monkeypatch.setenv(fused_kernel.THREADS_ENV_VAR, "auto")
        assert fused_kernel.threads(big) == 4
        monkeypatch.setenv(fused_kernel.THREADS_ENV_VAR, "1")
        assert fused_kernel.threads(big) == 1
        monkeypatch.setenv(fused_kernel.THREADS_ENV_VAR, "3")
        assert fused_kernel.threads(small) == 3
        monkeypatch.setenv(fused_kernel.THREADS_ENV_VAR, "16")
        assert fused_kernel.threads(big) == 4  # at most torch's thread count
        torch.set_num_threads(1)
        monkeypatch.delenv(fused_kernel.THREADS_ENV_VAR)
        assert fused_kernel.threads(big) == 1
        for bad in ("0", "-2", "many"):
            monkeypatch.setenv(fused_kernel.THREADS_ENV_VAR, bad)
            with pytest.raises(ValueError, match=fused_kernel.THREADS_ENV_VAR):
                fused_kernel.threads(big)
    finally:
        torch.set_num_threads(threads)


def test_busy_processes_leave_no_idle_cpu():
    """Busy-loop processes count as runnable elsewhere and take their CPUs off the idle ones; with one
    per CPU (machines of up to 4 CPUs) none is idle and the kernel takes one thread at any size: a second
    thread would stall every pass of the kernel waiting for a CPU."""
    import os
    import subprocess
    import sys
    import time

    from peft_qpa.generator.backends import fused_kernel

    if not Path("/proc/loadavg").exists():
        pytest.skip("needs Linux /proc")
    cpus = os.cpu_count() or 1
    count = min(cpus, 4)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    threads = torch.get_num_threads()
    try:
        time.sleep(0.3)
        torch.set_num_threads(max(2, cpus))
        assert fused_kernel._runnable_elsewhere() >= count
        idle = fused_kernel.idle_cpus(max_age=0)
        assert idle <= cpus - count
        # the same count, reused
        assert fused_kernel.threads(fused_kernel.PARALLEL_MIN_QUBITS) == (idle if idle >= 2 else 1)
        if count == cpus:
            assert idle == 0 and fused_kernel.threads(fused_kernel.PARALLEL_MIN_QUBITS) == 1
    finally:
        torch.set_num_threads(threads)
        for proc in busy:
            proc.kill()
        for proc in busy:
            proc.wait()


SERIAL_PROBE = """
import os, sys, torch
torch.set_num_threads(2)
from peft_qpa.generator.circuit import build_ansatz
from peft_qpa.generator.backends.statevector import StatevectorSimulator
def threads_of_this_process():
    return len(os.listdir("/proc/self/task"))
before = threads_of_this_process()
for setting, n in (("auto", int(sys.argv[1])), ("1", 18), ("2", 16)):  # a team stays: "2" goes last
    os.environ["PEFT_QPA_KERNEL_THREADS"] = setting
    sim = StatevectorSimulator(build_ansatz(n, 2), kernel="fused")
    a, w = torch.rand(sim.num_parameters), torch.randn(2**n)
    for _ in range(2):
        sim(a.clone().requires_grad_()).backward(w)
        with torch.no_grad():
            sim(a)
    print("THREADS", setting, n, threads_of_this_process() - before)
"""


def test_one_kernel_thread_starts_no_thread_team():
    """With one kernel thread (PEFT_QPA_KERNEL_THREADS=1, or auto below PARALLEL_MIN_QUBITS) the whole
    fused forward+backward (kernel passes and the simulator's state-sized elementwise ops) runs in the
    calling thread: the OpenMP team that torch starts at its first parallel region never appears, so
    nothing waits at a barrier for a descheduled thread. Two threads do start it (which shows that the
    probe can see it). In a fresh process, with torch set to two threads."""
    import os
    import subprocess
    import sys

    _require_fused_kernel()
    from peft_qpa.generator.backends import fused_kernel

    if not Path("/proc/self/task").exists():
        pytest.skip("needs Linux /proc")
    below = fused_kernel.PARALLEL_MIN_QUBITS - 1
    env = {k: v for k, v in os.environ.items() if k != fused_kernel.THREADS_ENV_VAR}
    proc = subprocess.run([sys.executable, "-c", SERIAL_PROBE, str(below)], capture_output=True, text=True,
                          timeout=300, env=env)
    started = {tuple(line.split()[1:3]): int(line.split()[3])
               for line in proc.stdout.splitlines() if line.startswith("THREADS")}
    assert len(started) == 3, proc.stderr[-3000:]
    assert started[("auto", str(below))] == 0 and started[("1", "18")] == 0
    assert started[("2", "16")] > 0
