"""One optimizer step of plain PEFT LoRA vs QPA (same r, same targets) on a SmolLM2-135M-shaped model.

The model is built from SmolLM2-135M's config with random weights (no download):
``LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)``; ``--layers`` shrinks it for quick
runs. Each variant is a deep copy of the same base model wrapped by ``get_peft_model``: LoRA, and QPA
with each ``--chunk-sizes`` value (which sets the qubit count N = ceil(log2(ceil(M / chunk_size)))).

Measured:

* **train step**: ``loss = model(ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad()``
  with AdamW on the trainable parameters; median over ``--steps`` after ``--warmup``, the variants
  interleaved in a rotating order within every repeat so that drift (other jobs on a shared machine)
  hits all of them alike. The overhead over LoRA is reported twice: the ratio of the medians, and the
  median over repeats of the per-repeat ratio QPA / LoRA (``overhead_vs_lora_paired``), which cancels
  the slow drift of a shared machine that the ratio of medians still picks up;
* **generator alone**: forward+backward of the QPA generator (circuit + MLP) with a random upstream
  gradient, median;
* **peak memory**: in one fresh subprocess per variant (``MALLOC_MMAP_THRESHOLD_=65536`` so RSS follows
  live tensors; peak reset with ``/proc/self/clear_refs``): the peak RSS increase of the first step
  (which allocates gradients and the AdamW state) and of a later step; plus the exact AdamW state
  bytes and trainable parameter counts;
* **eval forward** (``model.eval()``, ``torch.no_grad()``): LoRA vs QPA (QPA reads its cached snapshot)
  vs the base model; then after ``merge_and_unload()``: merged LoRA and merged QPA vs the base model;
* **profile**: ``torch.profiler`` of one QPA step (``--profile-chunk-size``), with the generator's
  forward marked by ``record_function``; the top operators by self CPU time.

Example (the command used for docs/performance.md):

    python benchmarks/bench_step.py

Threads: ``--threads`` (default 1) for ``torch.set_num_threads`` (see bench_simulator.py for why).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_simulator import machine_info, peak_rss_delta, redraw, run_memory_probe, write_results  # noqa: E402

warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
warnings.filterwarnings("ignore", category=FutureWarning)

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                    hidden_act="silu")


def build_base(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def variant_names(args) -> list[str]:
    return ["lora"] + [f"qpa_c{c}" for c in args.chunk_sizes]


def wrap(base, name: str, args):
    """A deep copy of ``base`` with the named adapter, and its AdamW optimizer."""
    import peft_qpa
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    if name == "lora":
        config = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=args.targets, lora_dropout=0.0)
    else:
        config = peft_qpa.QPAConfig(r=args.r, lora_alpha=2 * args.r, target_modules=args.targets,
                                    qnn_depth=args.depth, chunk_size=int(name.split("_c")[1]))
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def inputs(args):
    return torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))


def make_step(model, optimizer, ids):
    def step():
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_eval(model, ids):
    def forward():
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)

    return forward


def optimizer_state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0)


def interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time every callable ``repeats`` times, in a rotating order per repeat, after ``warmup`` calls each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for n in order:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


def generator_fwd_bwd(model, repeats: int) -> float:
    gen = model.base_model.get_generator()
    grad = torch.randn(gen.num_generated, generator=torch.Generator().manual_seed(0), dtype=gen.offset.dtype)

    def run():
        gen.generate().backward(grad)
        gen.zero_grad(set_to_none=True)

    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_probe(name: str, args) -> dict:
    """(subprocess) peak RSS increases of a first and a later training step of one variant."""
    base = build_base(args)
    model, optimizer = wrap(base, name, args)
    del base
    step = make_step(model, optimizer, inputs(args))
    first = peak_rss_delta(step)
    step()
    later = peak_rss_delta(step)
    return {"peak_first_step_bytes": first, "peak_later_step_bytes": later,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer)}


def profile_step(model, optimizer, ids, top: int = 15) -> dict:
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    gen = model.base_model.get_generator()
    original = gen.generate

    def generate(*args, **kwargs):
        with record_function("qpa.generator.forward"):
            return original(*args, **kwargs)

    gen.generate = generate
    step = make_step(model, optimizer, ids)
    step()
    try:
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        wall = time.perf_counter() - t
    finally:
        del gen.generate
    averages = prof.key_averages()
    by_name = {e.key: e for e in averages}
    gen_fwd = by_name.get("qpa.generator.forward")
    total_self = sum(e.self_cpu_time_total for e in averages)
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "profiled_step_wall_s": wall,
        "self_cpu_total_s": total_self / 1e6,
        "generator_forward_cpu_s": gen_fwd.cpu_time_total / 1e6 if gen_fwd else None,
        "top_ops": [{"name": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                     "share": e.self_cpu_time_total / total_self} for e in rows],
    }


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = payload["variants"]
    names = list(variants)
    labels = [n if n == "lora" else f"QPA N={variants[n]['n_qubits']}\n(chunk {variants[n]['chunk_size']})" for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    ax = axes[0]
    step = [variants[n]["step_s_median"] for n in names]
    gen = [variants[n].get("generator_fwd_bwd_s") or 0 for n in names]
    ax.bar(labels, step, color=["C0"] + ["C1"] * (len(names) - 1), label="train step (median)")
    ax.bar(labels, gen, color="C3", label="of which: generator fwd+bwd (measured alone)")
    for i, n in enumerate(names):
        if n != "lora":
            ax.text(i, step[i], f"{variants[n]['overhead_vs_lora']:+.1%}", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="seconds", title="Optimizer step (fwd+bwd+AdamW)")
    ax.legend(fontsize=7)
    ax = axes[1]
    width = 0.4
    xs = range(len(names))
    peak = [(variants[n].get("peak_first_step_bytes") or 0) / 2**20 for n in names]
    opt = [variants[n]["optimizer_state_bytes"] / 2**20 for n in names]
    ax.bar([x - width / 2 for x in xs], peak, width, label="peak RSS increase, first step")
    ax.bar([x + width / 2 for x in xs], opt, width, label="AdamW state")
    ax.set_xticks(list(xs), labels)
    ax.set(ylabel="MiB", title="Memory")
    ax.legend(fontsize=7)
    ax = axes[2]
    ev = payload["eval"]
    keys = list(ev["forward_s_median"])
    ax.bar(keys, [ev["forward_s_median"][k] for k in keys], color="C2")
    ax.set(ylabel="seconds (median)", title="Eval forward (no_grad), before/after merge_and_unload")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    m = payload["meta"]
    fig.suptitle(f"SmolLM2-135M shape, {m['args']['layers']} layers, batch {m['args']['batch']} x seq {m['args']['seq']}, "
                 f"r={m['args']['r']}, targets {m['args']['targets']}, {m['machine']['torch_threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30)")
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--depth", type=int, default=8, help="QPA circuit depth L")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 256, 64, 16],
                        help="QPA chunk sizes (30 layers, r=4, q/v: N = 8, 10, 12, 14)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--eval-repeats", type=int, default=5)
    parser.add_argument("--profile-chunk-size", type=int, default=None,
                        help="chunk size of the QPA variant to profile (default: the largest N <= 12)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="bench_step")
    parser.add_argument("--plot-only", metavar="JSON")
    parser.add_argument("--memory-probe", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.memory_probe:
        print("MEMORY_PROBE " + json.dumps(memory_probe(args.memory_probe, args)))
        return None
    if args.plot_only:
        return redraw(args.plot_only, plot)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = machine_info(args.threads)
    names = variant_names(args)

    # Memory first, one fresh process per variant (the timing process holds every variant at once).
    memory = {}
    if not args.no_memory:
        common = ["--layers", str(args.layers), "--r", str(args.r), "--targets", *args.targets, "--depth", str(args.depth),
                  "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
        for name in names:
            memory[name] = run_memory_probe(Path(__file__), ["--memory-probe", name, *common], timeout=600)
            print(f"memory {name}: {memory[name]}", flush=True)

    base = build_base(args)
    ids = inputs(args)
    models, optimizers, variants = {}, {}, {}
    for name in names:
        models[name], optimizers[name] = wrap(base, name, args)
        trainable = sum(p.numel() for p in models[name].parameters() if p.requires_grad)
        row = {"trainable_params": trainable}
        if name != "lora":
            gen = models[name].base_model.get_generator()
            row.update(chunk_size=gen.chunk_size, n_qubits=gen.n_qubits, depth=gen.depth,
                       generated_numbers_M=gen.num_generated, circuit_params=gen.angles.numel())
        variants[name] = row
    lora_numbers = variants["lora"]["trainable_params"]
    for name in names[1:]:
        assert variants[name]["generated_numbers_M"] == lora_numbers, "QPA must generate exactly LoRA's matrices"

    # Training steps, interleaved.
    steps = {n: make_step(models[n], optimizers[n], ids) for n in names}
    times = interleaved(steps, args.steps, args.warmup)
    for name in names:
        variants[name].update(step_s_median=statistics.median(times[name]), step_s_all=times[name],
                              optimizer_state_bytes=optimizer_state_bytes(optimizers[name]))
        variants[name].update({k: v for k, v in memory.get(name, {}).items() if k != "optimizer_state_bytes"})
        if "error" in memory.get(name, {}):
            print(f"memory probe {name} failed: {memory[name]['error']}", flush=True)
    for name in names[1:]:
        variants[name]["overhead_vs_lora"] = variants[name]["step_s_median"] / variants["lora"]["step_s_median"] - 1
        variants[name]["overhead_vs_lora_paired"] = statistics.median(
            q / l for q, l in zip(times[name], times["lora"])) - 1
        variants[name]["generator_fwd_bwd_s"] = generator_fwd_bwd(models[name], max(3, args.steps))
    for name in names:
        v = variants[name]
        print(f"{name:10s} N={v.get('n_qubits', '-')!s:>2} step {v['step_s_median']:.3f} s "
              f"overhead {v.get('overhead_vs_lora', 0):+.1%} (paired {v.get('overhead_vs_lora_paired', 0):+.1%})  generator {v.get('generator_fwd_bwd_s', 0) * 1e3:.1f} ms  "
              f"AdamW state {v['optimizer_state_bytes'] / 2**20:.2f} MiB", flush=True)

    # Profile one QPA step.
    candidates = [n for n in names[1:] if variants[n]["n_qubits"] <= 12] or names[1:]
    if args.profile_chunk_size is not None:
        profiled = f"qpa_c{args.profile_chunk_size}"
    else:
        profiled = max(candidates, key=lambda n: variants[n]["n_qubits"])
    profile = profile_step(models[profiled], optimizers[profiled], ids)
    profile.update(variant=profiled, n_qubits=variants[profiled]["n_qubits"],
                   generator_fwd_bwd_s=variants[profiled]["generator_fwd_bwd_s"],
                   step_s_median=variants[profiled]["step_s_median"])
    profile["generator_share_of_step"] = profile["generator_fwd_bwd_s"] / profile["step_s_median"]
    print(f"profile {profiled}: generator fwd+bwd {profile['generator_share_of_step']:.1%} of the step; top ops:", flush=True)
    for op in profile["top_ops"][:8]:
        print(f"   {op['name']:45s} {op['self_cpu_s'] * 1e3:8.1f} ms ({op['share']:.1%}, {op['calls']} calls)")

    # Eval forward: adapters (QPA from its cached snapshot) vs base; then merged vs base.
    evals = {n: make_eval(models[n], ids) for n in names}
    evals["base"] = make_eval(base, ids)
    eval_times = interleaved(evals, args.eval_repeats, 1)
    with torch.no_grad():
        reference = {n: models[n](input_ids=ids).logits for n in names}
    merged = {"base": base}
    for n in names:
        merged[f"{n} merged"] = models[n].merge_and_unload()
    merge_diff = {}
    with torch.no_grad():
        for n in names:
            merge_diff[n] = float((merged[f"{n} merged"](input_ids=ids).logits - reference[n]).abs().max())
    del reference
    merged_times = interleaved({k: make_eval(m, ids) for k, m in merged.items()}, args.eval_repeats, 1)
    eval_median = {**{f"{k} (adapter)" if k != "base" else "base": statistics.median(v) for k, v in eval_times.items()},
                   **{k: statistics.median(v) for k, v in merged_times.items() if k != "base"}}
    eval_median["base (merged round)"] = statistics.median(merged_times["base"])
    eval_payload = {"forward_s_median": eval_median,
                    "forward_s_all": {**{f"{k} (adapter)" if k != "base" else "base": v for k, v in eval_times.items()},
                                      **{k if k != "base" else "base (merged round)": v for k, v in merged_times.items()}},
                    "merged_vs_unmerged_logits_max_abs_diff": merge_diff}
    for k, v in eval_median.items():
        print(f"eval {k:22s} {v * 1e3:8.1f} ms", flush=True)

    machine["loadavg_end"] = list(os.getloadavg())
    import peft
    import transformers

    payload = {
        "meta": {
            "command": "python benchmarks/bench_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine, "transformers": transformers.__version__, "peft": peft.__version__,
            "args": {k: v for k, v in vars(args).items() if k not in ("plot_only", "memory_probe")},
            "model": {**SMOLLM2_135M, "num_hidden_layers": args.layers, "weights": "random (seed 0), built from config"},
            "timed": "model.train(); model(ids, labels=ids).loss.backward(); AdamW.step(); zero_grad(); "
                     "median over steps, variants interleaved in rotating order",
            "memory": "peak RSS increase during a step, fresh subprocess per variant, MALLOC_MMAP_THRESHOLD_=65536, "
                      "VmHWM reset via /proc/self/clear_refs; first step includes allocating grads and AdamW state",
            "total_s": time.perf_counter() - t_start,
        },
        "variants": variants,
        "profile": profile,
        "eval": eval_payload,
    }
    return write_results(payload, out, args.name, plot)


if __name__ == "__main__":
    main()
