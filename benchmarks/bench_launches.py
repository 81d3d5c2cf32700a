"""Operator launches of one training step's generation: a CPU-measurable proxy for the GPU's launch overhead.

On a GPU the generator's work at N = 12 is tiny (4,096 amplitudes, a 4,096-row MLP) and its time is set by how
many kernels it launches, each costing a few microseconds of CPU and GPU latency (docs/performance.md, "GPU
check": 29 ms of generator forward+backward per step on an H200). CI has no GPU, so this script counts what would
be launched instead of timing it.

**How it counts.** A :class:`torch.utils._python_dispatch.TorchDispatchMode` (:class:`OpCounter`) sees every aten
operator call that reaches the dispatcher's Python key: after autograd (so backward ops are counted, as the autograd
engine runs them on the calling thread for CPU tensors) and after CompositeImplicit decompositions (so a
``torch.nn.functional.linear`` shows up as the ``addmm``/``mm`` it becomes, close to what launches a kernel). It
is exact and deterministic (a profiler would give the same names plus timing noise we do not need). Two counts:

* ``ops``: every aten call;
* ``launches``: the calls that would run a device kernel: all but views and metadata-only ops (``view``,
  ``_unsafe_view``, ``t``, ``expand``, ``detach``, ``empty`` ...; see :func:`launches_kernel`);
* ``host_syncs``: ``aten._local_scalar_dense`` (``.item()``, ``int(tensor)``, ``bool(tensor)``): on a GPU each
  waits for the device.

**What is counted:** one training step's generation on the torch path that CUDA takes (the compiled CPU kernel
off: ``StatevectorSimulator(kernel="torch")`` / ``PEFT_QPA_FUSED_KERNEL=0``), exactly as the tuner runs it: the
forward is ``GeneratedCache._make_live`` (the finiteness check, the circuit, post-processing, the mapping MLP, the
pieces of every LoRA tensor, the step counter), the backward is ``torch.autograd.backward`` of every generated
piece with a given gradient (what the model's layers send back). The generated tensors are those of the GPU check's
timing model (Llama, hidden 1024, 8 layers, ``q_proj``/``v_proj``, r = 8: M = 262,144) with ``qnn_depth`` 8 and
the default mapping; ``chunk_size`` 64 gives N = 12, ``chunk_size`` 4 gives N = 16. No model is built: the specs
are the ones the tuner would derive from it. M = 262,144 >= ``BLOCKWISE_MIN_GENERATED``, so the mapping runs
block by block (``peft_qpa/generator/blockwise.py``) with the block budget of a CUDA device (``blocks_of="cuda"``,
larger than the CPU's); ``step_with_cpu_blocks`` gives the step's count with the CPU's smaller blocks.

    python benchmarks/bench_launches.py                    # writes benchmarks/results/bench_launches.json
    python benchmarks/bench_launches.py --qubits 12        # one size

``tests/test_launches.py`` bounds the N = 12 count with :func:`count_generation`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import peft_qpa  # noqa: E402
from peft_qpa.generator import QPAGenerator, TensorSpec, blockwise  # noqa: E402
from peft_qpa.tuners.cache import GeneratedCache  # noqa: E402

# The GPU check's timing model (benchmarks/gpu_check.py FULL_TIMING): its q_proj/v_proj LoRA tensors at r = 8.
HIDDEN, LAYERS, R = 1024, 8, 8
CHUNK_FOR_QUBITS = {12: 64, 16: 4}  # M = 262,144: 4,096 chunks of 64 (N = 12), 65,536 chunks of 4 (N = 16)

_METADATA_OPS = {
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty", "aten::empty_strided", "aten::empty_like",
    "aten::new_empty", "aten::new_empty_strided", "aten::_local_scalar_dense", "aten::sym_size", "aten::sym_stride",
    "aten::sym_numel", "aten::sym_storage_offset", "aten::set_", "aten::_reshape_alias", "aten::is_same_size",
    "aten::resize_", "aten::_has_compatible_shallow_copy_type", "aten::_unsafe_view",
}


def launches_kernel(func) -> bool:
    """Whether an aten overload would run a device kernel: not a view (``func.is_view``), not metadata-only."""
    return not func.is_view and func._schema.name not in _METADATA_OPS


class OpCounter(TorchDispatchMode):
    """Counts aten operator calls by name (see the module docstring). Use as a context manager."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.launches: collections.Counter = collections.Counter()
        self.host_syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops[name] += 1
        if launches_kernel(func):
            self.launches[name] += 1
        if name == "aten::_local_scalar_dense":
            self.host_syncs += 1
        return func(*args, **(kwargs or {}))

    def summary(self, top: int = 12) -> dict:
        return {"ops": sum(self.ops.values()), "launches": sum(self.launches.values()), "host_syncs": self.host_syncs,
                "top_launches": dict(self.launches.most_common(top))}


def lora_specs(hidden: int = HIDDEN, layers: int = LAYERS, r: int = R) -> list[TensorSpec]:
    """The specs the tuner derives from q_proj/v_proj (hidden x hidden) of ``layers`` decoder layers at rank r."""
    specs = []
    for layer in range(layers):
        for target in ("q_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{target}"
            specs.append(TensorSpec(f"{name}.lora_A", (r, hidden), "kaiming_uniform"))
            specs.append(TensorSpec(f"{name}.lora_B", (hidden, r), "zeros"))
    return specs


def make_generator(n_qubits: int, depth: int = 8, kernel: str = "torch", **config) -> QPAGenerator:
    """The generator the tuner would build for the GPU check's timing model at ``n_qubits`` (by chunk size), with
    the simulator's ``kernel`` ("torch": the path CUDA takes)."""
    chunk = CHUNK_FOR_QUBITS[n_qubits]
    qpa = peft_qpa.QPAConfig(r=R, lora_alpha=2 * R, target_modules=["q_proj", "v_proj"], chunk_size=chunk,
                             qnn_depth=depth, **config)
    generator = QPAGenerator.from_config(qpa, lora_specs(), init_weights=True)
    assert generator.n_qubits == n_qubits, (generator.n_qubits, n_qubits)
    for module in generator.modules():
        if hasattr(module, "kernel") and hasattr(module, "_fused_steps"):
            module.kernel = kernel
    generator.requires_grad_(True)
    return generator


def incoming_gradients(pieces: dict[str, torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    rng = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=rng, dtype=t.dtype).to(t.device) for t in pieces.values()]


def training_generation(generator: QPAGenerator):
    """``(forward, backward)`` callables of one training step's generation as the tuner runs it."""
    cache = GeneratedCache(generator, {})
    state = {}

    def forward():
        cache._make_live(advance=True)
        state["pieces"] = cache._live
        return state["pieces"]

    def backward(grads):
        pieces = state.pop("pieces")
        torch.autograd.backward(list(pieces.values()), grads)
        cache.drop_live()

    return forward, backward


@contextlib.contextmanager
def block_budget(device_type: str):
    """Run the blockwise mapping with the block budget it uses on ``device_type`` ("cuda": the larger accelerator
    blocks, :data:`peft_qpa.generator.blockwise.ACCELERATOR_BLOCK_ELEMENTS_MIN`) although the tensors are on the CPU."""
    saved = blockwise.BLOCK_ELEMENTS_MIN
    blockwise.BLOCK_ELEMENTS_MIN = blockwise.block_elements_min(torch.device(device_type))
    try:
        yield
    finally:
        blockwise.BLOCK_ELEMENTS_MIN = saved


def count_generation(n_qubits: int, depth: int = 8, kernel: str = "torch", blocks_of: str = "cuda", **config) -> dict:
    """Op counts of one training step's generation (after one warm-up step), by stage:
    ``circuit_forward`` / ``circuit_backward`` (the probabilities alone, with a random incoming gradient),
    ``step_forward`` / ``step_backward`` (the tuner's whole generation and its backward) and ``step`` (both).
    ``blocks_of``: the device type whose block budget the blockwise mapping uses (see :func:`block_budget`)."""
    with block_budget(blocks_of):
        return _count_generation(n_qubits, depth, kernel, **config) | {"blocks_of": blocks_of}


def _count_generation(n_qubits: int, depth: int, kernel: str, **config) -> dict:
    generator = make_generator(n_qubits, depth, kernel, **config)
    forward, backward = training_generation(generator)
    grads = None
    for _ in range(2):  # a warm-up step, then the counted one
        pieces = forward()
        grads = grads or incoming_gradients(pieces)
        backward(grads)
    result = {"n_qubits": n_qubits, "depth": depth, "kernel": kernel, "chunk_size": generator.chunk_size,
              "generated_M": generator.num_generated, "mapping_rows": generator.n_chunks,
              "blockwise": generator.num_generated >= blockwise.BLOCKWISE_MIN_GENERATED,
              "block_rows": generator.block_rows()}

    generator.zero_grad(set_to_none=True)  # as optimizer.zero_grad() leaves it: the backward assigns .grad
    with OpCounter() as fwd:
        forward()
    with OpCounter() as bwd:
        backward(grads)
    probs_grad = torch.randn(2**n_qubits, generator=torch.Generator().manual_seed(1)).to(generator.angles)
    generator.zero_grad(set_to_none=True)
    with OpCounter() as circuit_fwd:
        probs = generator.probabilities()
    with OpCounter() as circuit_bwd:
        probs.backward(probs_grad)
    generator.zero_grad(set_to_none=True)
    result["stages"] = {"circuit_forward": circuit_fwd.summary(), "circuit_backward": circuit_bwd.summary(),
                        "step_forward": fwd.summary(), "step_backward": bwd.summary()}
    total = fwd.launches + bwd.launches
    result["stages"]["step"] = {
        "ops": sum(fwd.ops.values()) + sum(bwd.ops.values()), "launches": sum(total.values()),
        "host_syncs": fwd.host_syncs + bwd.host_syncs, "top_launches": dict(total.most_common(12))}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qubits", type=int, nargs="*", default=sorted(CHUNK_FOR_QUBITS), choices=sorted(CHUNK_FOR_QUBITS))
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_launches.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    import transformers

    payload = {
        "command": "python benchmarks/" + Path(__file__).name + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "env": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "peft_qpa": peft_qpa.__version__, "machine": platform.machine(),
                "PEFT_QPA_FUSED_KERNEL": os.environ.get("PEFT_QPA_FUSED_KERNEL")},
        "workload": {"hidden": HIDDEN, "layers": LAYERS, "r": R, "targets": ["q_proj", "v_proj"],
                     "chunk_for_qubits": CHUNK_FOR_QUBITS, "depth": args.depth, "kernel": "torch"},
        "counts": {},
    }
    for n in args.qubits:
        counts = count_generation(n, args.depth, blocks_of="cuda")
        cpu_blocks = count_generation(n, args.depth, blocks_of="cpu")
        counts["step_with_cpu_blocks"] = cpu_blocks["stages"]["step"] | {"block_rows": cpu_blocks["block_rows"]}
        payload["counts"][str(n)] = counts
        stages = counts["stages"]
        print(f"N = {n}: " + ", ".join(f"{k} {v['launches']} launches / {v['ops']} ops" for k, v in stages.items())
              + f", host syncs per step {stages['step']['host_syncs']}; with the CPU's blocks: step "
              f"{counts['step_with_cpu_blocks']['launches']} launches", flush=True)
    payload["wall_s"] = round(time.perf_counter() - start, 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
