"""Correctness and speed of QPA on a GPU (CUDA), in one short run: the checks that CPU tests cannot make.

Tiny Llama and GPT-2 models built from configs (random weights, no download) and a mid-size Llama for the
timing. Checked, and written to ``--out`` (JSON: booleans, numbers, versions, the GPU's name):

a. zero delta at step 0: a training-mode forward under ``torch.autocast(<device>, bfloat16)`` (and float16)
   gives exactly the logits of the same forward with ``model.disable_adapter()``; also without autocast
   (float32 logits), where a B that is not exactly 0 would show;
b. ``model.to(torch.bfloat16)`` after wrapping: still exactly the base model's logits (training and eval);
c. 20 AdamW steps (4 with ``--quick``; lr 1e-2) on one batch under bf16 autocast lower the loss (first / last loss);
d. ``save_pretrained`` + ``PeftModel.from_pretrained`` on the device reproduce the logits exactly;
e. ``merge_adapter`` / ``unmerge_adapter`` restore the base weights (max |difference|);
f. gradient checkpointing (``use_reentrant`` False and True) gives the generator the same gradients as
   without (max relative difference);
g. timing: mean wall time of a QPA training step (forward + backward + AdamW) against plain PEFT LoRA with
   the same r and targets on a mid-size Llama (hidden 1024, 8 layers, vocab 32000, batch 8 x seq 256,
   bf16 autocast, q_proj/v_proj, chunk_size 64, qnn_depth 8), 10 warm-up and 20 timed steps, with
   ``torch.cuda.synchronize`` around each.
h. step-time matrix: QPA against LoRA on the same model at N = 12 and N = 16 (chunk_size 64 and 4, M = 262,144),
   in three scenarios under bf16 autocast (plain, gradient checkpointing, gradient accumulation over 4
   micro-batches), and each generator's forward+backward alone on the tuner's path; the goals (QPA / LoRA <= 1.05
   at N = 12 and <= 1.15 at N = 16, generator <= 2 ms at N = 12) are written under ``targets`` with the measured
   value and ``met`` computed from it (None where that N was not measured, as with ``--quick``); they do not
   enter ``all_ok``;
i. a realistic size (CUDA, not with ``--quick``): a ~1.1B-parameter Llama from a config (random weights) in bf16,
   every linear layer adapted, step time and ``torch.cuda.max_memory_allocated`` of QPA against LoRA.

Every check runs on its own: one that raises is recorded (``errors``, with its traceback) and the rest still
run. The exit status is 1 if any check failed or raised.

    python benchmarks/gpu_check.py                         # CUDA, full sizes (~15 s for a-g after the imports on an H200)
    python benchmarks/gpu_check.py --device cpu --quick    # the same checks, tiny sizes (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import peft_qpa  # noqa: E402  (registers QPA)

warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 97
# Correctness booleans written under "checks"; all must be true.
CHECK_KEYS = (
    "zero_delta_bf16_autocast", "zero_delta_fp16_autocast", "zero_delta_fp32", "zero_delta_after_to_bf16", "training_lowers_loss",
    "save_load_identical", "merge_unmerge_restores", "checkpointing_same_grads",
)
# Relative tolerance for the gradient-checkpointing comparison (the recomputed forward may round differently).
GRAD_RTOL = 1e-4
# Largest |W_after - W_before| / max|W_before| accepted after merge + unmerge (float32 add then subtract).
MERGE_RTOL = 1e-6


# --- tiny models (the configs of tests/tiny_models.py; nothing imported from tests/) -------------------------
def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "v_proj", "down_proj"]}


def small_config(arch: str, **overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS[arch], chunk_size=32, qnn_depth=2,
                  mapping_hidden_sizes=[16, 16], seed=0)
    kwargs.update(overrides)
    return peft_qpa.QPAConfig(**kwargs)


def adapted(arch: str, device: str, **overrides):
    """A tiny base model moved to ``device``, then wrapped (the usual order: model on the GPU, then PEFT)."""
    from peft import get_peft_model

    base = FACTORIES[arch]().to(device)
    return get_peft_model(base, small_config(arch, **overrides))


def batch(device: str, size=(2, 12), seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(1, vocab, size, generator=torch.Generator().manual_seed(seed)).to(device)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def generator_of(model):
    return model.base_model.get_generator()


def lora_b_max(model) -> float:
    """max |B| over all adapted layers as this (training) forward generates it: 0 at step 0 with init_weights."""
    generator = generator_of(model)
    with torch.no_grad():
        tensors = generator.split(generator.generate())
    return max(float(t.abs().max()) for name, t in tensors.items() if name.endswith(".lora_B"))


def forward_logits(model, ids, autocast_dtype=None, train=True, grad=True):
    model.train(train)
    ctx = torch.autocast(ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    with ctx, torch.set_grad_enabled(grad):
        return model(ids).logits.detach().float()


def adapter_vs_base(model, ids, autocast_dtype=None, train=True, grad=True) -> tuple[bool, float]:
    """(exactly equal, max |diff|) between the adapted model's logits and the same forward with the adapter off."""
    adapted_logits = forward_logits(model, ids, autocast_dtype, train, grad)
    with model.disable_adapter():
        base_logits = forward_logits(model, ids, autocast_dtype, train, grad)
    return bool(torch.equal(adapted_logits, base_logits)), max_abs(adapted_logits, base_logits)


def record_zero_delta(results, prefix: str, arch: str, model, ids, autocast_dtype=None) -> bool:
    """Adapter vs base in a training forward with gradients and in an eval forward without (the cached
    snapshot); records ``{prefix}[_eval][_max_abs_diff]_{arch}`` and returns whether both were exact."""
    ok, diff = adapter_vs_base(model, ids, autocast_dtype, train=True, grad=True)
    ok_eval, diff_eval = adapter_vs_base(model, ids, autocast_dtype, train=False, grad=False)
    results[f"{prefix}_{arch}"] = ok
    results[f"{prefix}_max_abs_diff_{arch}"] = diff
    results[f"{prefix}_eval_{arch}"] = ok_eval
    results[f"{prefix}_eval_max_abs_diff_{arch}"] = diff_eval
    return ok and ok_eval


# --- the checks -----------------------------------------------------------------------------------------
def check_zero_delta_autocast(args, results):
    """(a) zero delta at step 0 in a training-mode forward under bf16 and fp16 autocast."""
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        ok_all = True
        for arch in FACTORIES:
            model = adapted(arch, args.device)
            ids = batch(args.device)
            results[f"zero_delta_{name}_lora_B_max_abs_{arch}"] = lora_b_max(model)
            ok_all &= record_zero_delta(results, f"zero_delta_{name}_autocast", arch, model, ids, dtype)
        results["checks"][f"zero_delta_{name}_autocast"] = ok_all


def check_zero_delta_fp32(args, results):
    """(a') zero delta at step 0 without autocast (float32 logits): B must be exactly 0, not merely below bf16's
    rounding. Also records how far the generator's initial output on the device is from the same generator's
    output on the CPU (where the offset that cancels it is computed when the adapter is built)."""
    ok_all = True
    for arch in FACTORIES:
        model = adapted(arch, args.device)
        ids = batch(args.device)
        generator = generator_of(model)
        with torch.no_grad():
            on_device = generator.generate().detach().double().cpu()
            on_cpu = copy.deepcopy(generator).cpu().generate().detach().double()
        results[f"generator_device_vs_cpu_max_abs_{arch}"] = float((on_device - on_cpu).abs().max())
        results[f"zero_delta_fp32_lora_B_max_abs_{arch}"] = lora_b_max(model)
        ok_all &= record_zero_delta(results, "zero_delta_fp32", arch, model, ids)
    results["checks"]["zero_delta_fp32"] = ok_all


def check_to_bf16(args, results):
    """(b) model.to(torch.bfloat16) after wrapping keeps the adapted model equal to the base model."""
    ok_all = True
    for arch in FACTORIES:
        model = adapted(arch, args.device).to(torch.bfloat16)
        ids = batch(args.device)
        results[f"to_bf16_generator_dtype_{arch}"] = str(generator_of(model).angles.dtype)
        results[f"to_bf16_lora_B_max_abs_{arch}"] = lora_b_max(model)
        ok_all &= record_zero_delta(results, "zero_delta_after_to_bf16", arch, model, ids)
    results["checks"]["zero_delta_after_to_bf16"] = ok_all


def train(model, ids, steps: int, lr: float = 1e-2, autocast_dtype=torch.bfloat16) -> list[float]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        with torch.autocast(ids.device.type, dtype=autocast_dtype):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
    model.eval()
    return losses


def check_train_save_merge(args, results):
    """(c) training lowers the loss, (d) save/load reproduces logits, (e) merge/unmerge restores the weights."""
    from peft import PeftModel

    train_ok = save_ok = merge_ok = True
    for arch in FACTORIES:
        model = adapted(arch, args.device)
        ids = batch(args.device, seed=2)
        losses = train(model, ids, steps=args.train_steps)
        results[f"train_first_loss_{arch}"] = losses[0]
        results[f"train_last_loss_{arch}"] = losses[-1]
        results[f"train_steps_{arch}"] = len(losses)
        lowered = all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
        results[f"training_lowers_loss_{arch}"] = lowered
        train_ok &= lowered

        # (d) save / load on the device; the trained model's eval logits (cached snapshot) are the reference
        with torch.no_grad():
            expected = model(ids).logits.float()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.save_pretrained(tmp)
            base = FACTORIES[arch]().to(args.device)
            reloaded = PeftModel.from_pretrained(base, tmp).to(args.device)
            reloaded.eval()
            with torch.no_grad():
                got = reloaded(ids).logits.float()
            disagreement = [str(w.message)[:300] for w in caught if "disagree" in str(w.message)]
            regenerated = max_abs(generator_of(reloaded).generate().detach(), generator_of(model).generate().detach())
        diff = max_abs(got, expected)
        results[f"save_load_max_abs_diff_{arch}"] = diff
        results[f"save_load_regenerated_max_abs_diff_{arch}"] = regenerated
        results[f"save_load_snapshot_warnings_{arch}"] = disagreement
        results[f"save_load_device_{arch}"] = str(next(reloaded.parameters()).device)
        ok = diff == 0.0 and not disagreement
        results[f"save_load_identical_{arch}"] = ok
        save_ok &= ok

        # (e) merge / unmerge on the trained model
        layers = [m for m in model.modules() if isinstance(m, peft_qpa.QPALayer)]
        before = [m.get_base_layer().weight.detach().clone() for m in layers]
        scale = max(float(w.abs().max()) for w in before)
        model.merge_adapter()
        with torch.no_grad():
            merged = model(ids).logits.float()
        model.unmerge_adapter()
        after = [m.get_base_layer().weight.detach() for m in layers]
        weight_diff = max(max_abs(a, b) for a, b in zip(after, before))
        with torch.no_grad():
            unmerged = model(ids).logits.float()
        results[f"merge_unmerge_weight_max_abs_diff_{arch}"] = weight_diff
        results[f"merge_unmerge_weight_max_rel_diff_{arch}"] = weight_diff / scale
        results[f"merged_vs_adapter_logits_max_abs_diff_{arch}"] = max_abs(merged, expected)
        results[f"unmerged_vs_adapter_logits_max_abs_diff_{arch}"] = max_abs(unmerged, expected)
        ok = (weight_diff / scale <= MERGE_RTOL and max_abs(merged, expected) <= 1e-3 * max(1.0, float(expected.abs().max()))
              and not any(m.merged for m in layers))
        results[f"merge_unmerge_restores_{arch}"] = ok
        merge_ok &= ok
    results["checks"]["training_lowers_loss"] = train_ok
    results["checks"]["save_load_identical"] = save_ok
    results["checks"]["merge_unmerge_restores"] = merge_ok


def check_checkpointing(args, results):
    """(f) generator gradients with gradient checkpointing (non-reentrant and reentrant) equal those without."""
    ids = batch(args.device, seed=3)

    def grads(mode):
        model = adapted("llama", args.device, init_weights=False)
        if mode is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode})
        model.train()
        model(ids, labels=ids).loss.backward()
        named = {n: p.grad.detach().clone() for n, p in generator_of(model).named_parameters() if p.grad is not None}
        trainable = [n for n, p in generator_of(model).named_parameters() if p.requires_grad]
        return named, trainable

    plain, trainable = grads(None)
    ok_all = set(plain) == set(trainable) and bool(plain)
    results["checkpointing_generator_params_with_grad"] = len(plain)
    for mode, label in ((False, "non_reentrant"), (True, "reentrant")):
        got, _ = grads(mode)
        same_keys = set(got) == set(plain)
        worst = 0.0
        for name in plain:
            if name in got:
                ref = plain[name].double()
                worst = max(worst, float((got[name].double() - ref).abs().max()) / max(float(ref.abs().max()), 1e-30))
        ok = same_keys and worst <= GRAD_RTOL
        results[f"checkpointing_{label}_grad_max_rel_diff"] = worst if same_keys else float("inf")
        results[f"checkpointing_{label}_same_grads"] = ok
        ok_all &= ok
    results["checks"]["checkpointing_same_grads"] = ok_all


def check_timing(args, results):
    """(g) mean wall time of a training step: QPA against plain PEFT LoRA, same r and targets."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = args.timing
    config = LlamaConfig(
        hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"], num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"], num_key_value_heads=sizes["heads"], vocab_size=sizes["vocab"],
        max_position_embeddings=max(2048, sizes["seq"]), bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.config.use_cache = False
    ids = batch(args.device, size=(sizes["batch"], sizes["seq"]), seed=4, vocab=sizes["vocab"])
    targets = ["q_proj", "v_proj"]
    r = sizes["r"]
    results["timing_config"] = {**sizes, "targets": targets, "autocast": "bfloat16", "base_dtype": "float32",
                                "chunk_size": args.chunk_size, "qnn_depth": args.qnn_depth,
                                "warmup": args.warmup, "timed": args.timed}

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def measure(name, adapter_config):
        model = get_peft_model(copy.deepcopy(base).to(args.device), adapter_config)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()

        def step():
            with torch.autocast(ids.device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        for _ in range(args.warmup):
            step()
        sync()
        times = []
        for _ in range(args.timed):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        extra = {}
        if name == "qpa":
            generator = generator_of(model)
            extra = {"timing_qubits_N": generator.n_qubits, "timing_generated_M": generator.num_generated}
            # the generator alone: forward + backward of all M numbers
            grad = torch.randn(generator.num_generated, generator=torch.Generator().manual_seed(0)).to(args.device)
            for _ in range(max(1, args.warmup // 2)):
                generator.generate().backward(grad)
            sync()
            gen_times = []
            for _ in range(args.timed):
                sync()
                start = time.perf_counter()
                generator.generate().backward(grad)
                sync()
                gen_times.append(time.perf_counter() - start)
            generator.zero_grad(set_to_none=True)
            extra["timing_generator_fwd_bwd_mean_ms"] = 1e3 * statistics.fmean(gen_times)
        if args.device.startswith("cuda"):
            extra[f"timing_{name}_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        del model, optimizer
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return times, trainable, extra

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    lora_times, lora_params, lora_extra = measure(
        "lora", LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    qpa_times, qpa_params, qpa_extra = measure(
        "qpa", peft_qpa.QPAConfig(r=r, lora_alpha=2 * r, target_modules=targets, chunk_size=args.chunk_size,
                                  qnn_depth=args.qnn_depth))
    results.update(lora_extra)
    results.update(qpa_extra)
    results["timing_lora_step_mean_ms"] = 1e3 * statistics.fmean(lora_times)
    results["timing_lora_step_median_ms"] = 1e3 * statistics.median(lora_times)
    results["timing_qpa_step_mean_ms"] = 1e3 * statistics.fmean(qpa_times)
    results["timing_qpa_step_median_ms"] = 1e3 * statistics.median(qpa_times)
    results["timing_qpa_over_lora"] = results["timing_qpa_step_mean_ms"] / results["timing_lora_step_mean_ms"]
    results["timing_lora_trainable_params"] = lora_params
    results["timing_qpa_trainable_params"] = qpa_params


# --- (h) the step-time matrix and (i) a realistic size -----------------------------------------------------
# The goals for the generator's launch overhead (docs/performance.md, "Operator launches"): QPA's training step against
# LoRA's on the timing model of (g), at N = 12 and N = 16, in every scenario; the generator's forward+backward at
# N = 12. Written into the JSON with the measured value and whether it is met (None where that N was not measured,
# e.g. with --quick); they do not enter all_ok, which is about correctness.
GOALS = {"step_ratio": {12: 1.05, 16: 1.15}, "generator_fwd_bwd_ms": {12: 2.0}}
SCENARIOS = ("bf16_autocast", "checkpointing", "accumulation")
ACCUMULATION_STEPS = 4
# chunk_size per target N with M = 262,144 (the timing model's q_proj/v_proj at r = 8): 4,096 chunks of 64 (N = 12),
# 65,536 chunks of 4 (N = 16); LoRA is the same in both. With --quick (M = 256): N = 4 and N = 6.
MATRIX_CHUNKS = {12: 64, 16: 4}
QUICK_MATRIX_CHUNKS = {12: 16, 16: 4}
# (i): a TinyLlama-1.1B-shaped decoder (random weights), bf16, every linear layer adapted (r = 8).
LARGE = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=4, seq=512, r=8)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, warmup: int, timed: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(timed):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _stats(times: list[float]) -> dict:
    return {"mean_ms": 1e3 * statistics.fmean(times), "median_ms": 1e3 * statistics.median(times),
            "min_ms": 1e3 * min(times), "n": len(times)}


def _train_step(model, optimizer, ids, scenario: str):
    """One optimizer step under bf16 autocast: ``accumulation`` runs ACCUMULATION_STEPS forward+backward passes
    (the loss divided by their number) before it; ``checkpointing`` expects the model's gradient checkpointing on."""
    micro = ACCUMULATION_STEPS if scenario == "accumulation" else 1

    def step():
        for _ in range(micro):
            with torch.autocast(ids.device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / micro
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def generation_timer(model):
    """One training step's generation as the tuner runs it (``GeneratedCache``: every LoRA tensor of the step,
    forward, then backward of a fixed incoming gradient), without the model."""
    cache = model.base_model.generated_cache()
    cache._make_live(advance=False)
    grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)).to(t)
             for i, t in enumerate(cache._live.values())]
    cache.drop_live()

    def once():
        cache._make_live(advance=False)
        torch.autograd.backward(list(cache._live.values()), grads)
        cache.drop_live()

    return once


def _timing_base(sizes: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"], num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"], num_key_value_heads=sizes.get("kv_heads", sizes["heads"]),
        vocab_size=sizes["vocab"], max_position_embeddings=max(2048, sizes["seq"]), bos_token_id=0, eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.config.use_cache = False
    return base


def _target(kind: str, n_target: int, n_measured: int, value: float) -> dict:
    limit = GOALS[kind][n_target]
    applies = n_measured == n_target
    return {"limit": limit, "at_N": n_target, "measured_N": n_measured, "value": value,
            "met": (value <= limit) if applies else None}


def check_step_matrix(args, results):
    """(h) training step of QPA against LoRA (same r and targets) at N = 12 and N = 16 in three scenarios, all under
    bf16 autocast: plain, gradient checkpointing (non-reentrant), gradient accumulation (ACCUMULATION_STEPS
    micro-batches per optimizer step); plus each QPA generator's forward+backward alone (the tuner's path). LoRA and
    QPA run in the same process on the same device, one model at a time."""
    from peft import LoraConfig, get_peft_model

    sizes, chunks = args.timing, (QUICK_MATRIX_CHUNKS if args.quick else MATRIX_CHUNKS)
    base = _timing_base(sizes)
    ids = batch(args.device, size=(sizes["batch"], sizes["seq"]), seed=5, vocab=sizes["vocab"])
    targets = ["q_proj", "v_proj"]
    r = sizes["r"]
    matrix = {"config": {**sizes, "targets": targets, "autocast": "bfloat16", "base_dtype": "float32",
                         "qnn_depth": args.qnn_depth, "chunk_size_by_N": {str(k): v for k, v in chunks.items()},
                         "accumulation_steps": ACCUMULATION_STEPS, "checkpointing": "non-reentrant",
                         "warmup": args.warmup, "timed": args.timed,
                         "compile_mapping": os.environ.get("PEFT_QPA_COMPILE_MAPPING")},
              "rows": [], "generator": {}}

    def run(adapter_config, scenario):
        model = get_peft_model(copy.deepcopy(base).to(args.device), adapter_config)
        if scenario == "checkpointing":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = _time(_train_step(model, optimizer, ids, scenario), args.device, args.warmup, args.timed)
        return model, _stats(times)

    for scenario in SCENARIOS:
        lora_model, lora = run(LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0), scenario)
        del lora_model
        for n_target, chunk in chunks.items():
            model, qpa = run(peft_qpa.QPAConfig(r=r, lora_alpha=2 * r, target_modules=targets, chunk_size=chunk,
                                                qnn_depth=args.qnn_depth), scenario)
            generator = generator_of(model)
            row = {"scenario": scenario, "target_N": n_target, "n_qubits": generator.n_qubits, "chunk_size": chunk,
                   "generated_M": generator.num_generated, "lora": lora, "qpa": qpa,
                   "qpa_over_lora": qpa["mean_ms"] / lora["mean_ms"]}
            matrix["rows"].append(row)
            if scenario == SCENARIOS[0]:  # the generator alone does not depend on the model's scenario
                gen = _stats(_time(generation_timer(model), args.device, max(1, args.warmup // 2), args.timed))
                matrix["generator"][str(n_target)] = {"n_qubits": generator.n_qubits, **gen}
            del model
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    goals = {}
    for row in matrix["rows"]:
        goals[f"step_ratio_N{row['target_N']}_{row['scenario']}"] = _target(
            "step_ratio", row["target_N"], row["n_qubits"], row["qpa_over_lora"])
    for n_target, gen in matrix["generator"].items():
        if int(n_target) in GOALS["generator_fwd_bwd_ms"]:
            goals[f"generator_fwd_bwd_ms_N{n_target}"] = _target(
                "generator_fwd_bwd_ms", int(n_target), gen["n_qubits"], gen["mean_ms"])
    results["step_matrix"] = matrix
    results["targets"] = goals
    results["targets_all_met"] = all(g["met"] for g in goals.values()) if all(
        g["met"] is not None for g in goals.values()) else None


def check_large(args, results):
    """(i) a realistic size: a ~1.1B-parameter Llama (LARGE, random weights) in bf16 under bf16 autocast, every
    linear layer adapted (target_modules="all-linear", r = 8), QPA with the default chunk_size against LoRA: step
    time and peak memory (torch.cuda.max_memory_allocated over the timed steps, the weights included). CUDA only;
    skipped with --quick."""
    if args.quick or not args.device.startswith("cuda"):
        results["large"] = {"skipped": "--quick" if args.quick else "CUDA only"}
        return
    from peft import LoraConfig, get_peft_model

    sizes = LARGE
    ids = batch(args.device, size=(sizes["batch"], sizes["seq"]), seed=6, vocab=sizes["vocab"])
    r = sizes["r"]
    large = {"config": {**sizes, "targets": "all-linear", "dtype": "bfloat16", "autocast": "bfloat16",
                        "qnn_depth": args.qnn_depth, "warmup": 3, "timed": 10}}
    configs = {"lora": LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0),
               "qpa": peft_qpa.QPAConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", qnn_depth=args.qnn_depth)}
    for name, adapter_config in configs.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = _timing_base(sizes).to(args.device, torch.bfloat16)
        model = get_peft_model(base, adapter_config)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        _sync(args.device)
        entry = {"parameters": sum(p.numel() for p in model.parameters()),
                 "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                 "allocated_after_build_gb": torch.cuda.memory_allocated() / 1e9}
        torch.cuda.reset_peak_memory_stats()
        entry.update(_stats(_time(_train_step(model, optimizer, ids, "bf16_autocast"), args.device, 3, 10)))
        entry["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if name == "qpa":
            generator = generator_of(model)
            entry.update({"n_qubits": generator.n_qubits, "generated_M": generator.num_generated,
                          "chunk_size": generator.chunk_size})
            entry["generator_fwd_bwd"] = _stats(_time(generation_timer(model), args.device, 2, 10))
        large[name] = entry
        del model, base, optimizer
    large["qpa_over_lora_step"] = large["qpa"]["mean_ms"] / large["lora"]["mean_ms"]
    large["qpa_over_lora_peak_memory"] = large["qpa"]["peak_memory_gb"] / large["lora"]["peak_memory_gb"]
    results["large"] = large


CHECKS = (
    ("zero_delta_autocast", check_zero_delta_autocast),
    ("zero_delta_fp32", check_zero_delta_fp32),
    ("to_bf16", check_to_bf16),
    ("train_save_merge", check_train_save_merge),
    ("checkpointing", check_checkpointing),
    ("timing", check_timing),
    ("step_matrix", check_step_matrix),
    ("large", check_large),
)

FULL_TIMING = dict(hidden=1024, intermediate=2816, layers=8, heads=16, vocab=32000, batch=8, seq=256, r=8)
QUICK_TIMING = dict(hidden=32, intermediate=64, layers=1, heads=2, vocab=128, batch=1, seq=8, r=2)


def environment(args) -> dict:
    import peft
    import transformers

    info = {
        "device": args.device,
        "quick": args.quick,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_path": str(Path(peft.__file__).parent),
        "peft_qpa": peft_qpa.__version__,
        "PEFT_QPA_FUSED_KERNEL": os.environ.get("PEFT_QPA_FUSED_KERNEL"),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    try:
        import qiskit

        info["qiskit"] = qiskit.__version__
    except Exception as exc:  # pragma: no cover - reported, not fatal
        info["qiskit"] = f"unavailable: {exc}"
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def summary(results) -> str:
    lines = [f"device {results['env']['device']} ({results['env'].get('gpu')}), torch {results['env']['torch']}, "
             f"transformers {results['env']['transformers']}, peft {results['env']['peft']}"]
    for key in CHECK_KEYS:
        lines.append(f"  {key:28s} {results['checks'].get(key)}")
    for key in ("train_first_loss_llama", "train_last_loss_llama", "train_first_loss_gpt2", "train_last_loss_gpt2",
                "save_load_max_abs_diff_llama", "save_load_max_abs_diff_gpt2",
                "merge_unmerge_weight_max_abs_diff_llama", "merge_unmerge_weight_max_abs_diff_gpt2",
                "checkpointing_non_reentrant_grad_max_rel_diff", "checkpointing_reentrant_grad_max_rel_diff",
                "timing_qubits_N", "timing_lora_step_mean_ms", "timing_qpa_step_mean_ms", "timing_qpa_over_lora",
                "timing_generator_fwd_bwd_mean_ms"):
        if key in results:
            value = results[key]
            lines.append(f"  {key:44s} {value:.6g}" if isinstance(value, float) else f"  {key:44s} {value}")
    for row in results.get("step_matrix", {}).get("rows", []):
        lines.append(f"  step {row['scenario']:14s} N = {row['n_qubits']:2d}: LoRA {row['lora']['mean_ms']:.4g} ms, "
                     f"QPA {row['qpa']['mean_ms']:.4g} ms, QPA / LoRA {row['qpa_over_lora']:.3f}")
    for n, gen in results.get("step_matrix", {}).get("generator", {}).items():
        lines.append(f"  generator fwd+bwd (tuner path) N = {gen['n_qubits']}: {gen['mean_ms']:.4g} ms")
    for name, goal in results.get("targets", {}).items():
        lines.append(f"  target {name:40s} {goal['value']:.4g} <= {goal['limit']}: met {goal['met']}")
    large = results.get("large", {})
    if "qpa" in large:
        lines.append(f"  large: LoRA {large['lora']['mean_ms']:.4g} ms {large['lora']['peak_memory_gb']:.3g} GB, "
                     f"QPA (N = {large['qpa']['n_qubits']}) {large['qpa']['mean_ms']:.4g} ms "
                     f"{large['qpa']['peak_memory_gb']:.3g} GB")
    if results["errors"]:
        lines.append(f"  ERRORS in: {', '.join(results['errors'])}")
    lines.append(f"  all_ok {results['all_ok']}   total {results['wall_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (to debug the script)")
    parser.add_argument("--quick", action="store_true", help="tiny timing model and few steps (CPU smoke run)")
    parser.add_argument("--only", nargs="*", choices=[name for name, _ in CHECKS], help="run only these checks")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available; use --device cpu")
    args.train_steps = 4 if args.quick else 20
    args.timing = QUICK_TIMING if args.quick else FULL_TIMING
    args.warmup, args.timed = (1, 1) if args.quick else (10, 20)
    args.chunk_size, args.qnn_depth = (16, 2) if args.quick else (64, 8)

    start = time.perf_counter()
    results: dict = {"env": environment(args), "checks": {}, "errors": {}, "wall_s_per_check": {}}
    print(json.dumps(results["env"]), flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name, check in CHECKS:
            if args.only and name not in args.only:
                continue
            t = time.perf_counter()
            try:
                check(args, results)
            except Exception:  # recorded, and the other checks still run
                results["errors"][name] = traceback.format_exc()
                print(f"--- {name} raised:\n{results['errors'][name]}", flush=True)
            results["wall_s_per_check"][name] = round(time.perf_counter() - t, 3)
            print(f"{name}: {results['wall_s_per_check'][name]:.1f} s", flush=True)
    results["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught})
    expected = [k for k in CHECK_KEYS if not args.only or k in results["checks"]]
    results["all_ok"] = not results["errors"] and all(results["checks"].get(k) is True for k in expected)
    results["wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    print(summary(results), flush=True)
    print(f"wrote {out}", flush=True)
    return 0 if results["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
