"""Quality benchmark: held-out perplexity vs trainable parameters at one fixed token budget.

Two suites share one harness:

* ``--suite methods`` (default): plain LoRA (r = 1, 4), QPA (several chunk sizes / depths) and
  PEFT's compact methods VeRA, VB-LoRA and FourierFT, all on ``lm_head`` of SmolLM2-135M-Instruct, each with
  a small learning-rate sweep. Writes ``quality.json`` and a Pareto plot ``quality.png`` (perplexity vs
  trainable parameters, log x).
* ``--suite backends``: QPA at one fixed config small enough for Aer (chunk 1024 -> 8 qubits on
  SmolLM2's lm_head), exact statevector vs ``aer_shots`` with c = 1, 5, 20 shots per basis state, each with
  and without generative interpolation (GI), and c = 20 on the ``fake_kyiv`` noise model (with and without
  GI); straight-through (``shot_gradient="exact"``) gradients. Writes ``backend_quality.json``/``.png``.

Data: the Shakespeare plays split by play (``peft_qpa.apps.assets.split_plays``); ``--steps`` x ``--batch-size``
training blocks of ``--block-size`` tokens, drawn once with a fixed seed and identical for every run (one
pass, no repeats); held-out perplexity on ``--eval-tokens`` tokens in ``--eval-block-size`` windows evenly
spaced over the held-out plays (``peft_qpa.apps.demo.evenly_spaced_windows``), scored by the one perplexity
implementation, ``peft_qpa.apps.evaluation.perplexity`` (token-weighted mean NLL). Optimiser: AdamW, no weight
decay, 5 warm-up steps then cosine to 10 % (``peft_qpa.apps.demo.lr_at``), gradient clipping 1.0.

Speed trick (exact, not an approximation): every method adapts only ``lm_head`` and uses no dropout, so the
frozen decoder's final hidden states do not depend on the adapter. They are computed once per (model,
data, block settings), cached on disk (``--hidden-cache``, default ``$PEFT_QPA_CACHE/hidden_states``), and
each run uses a copy of the model whose decoder is replaced by :class:`CachedTrunk`, a lookup of those
states by input ids. Training and evaluation then go through the ordinary PEFT model forward (``labels=``
loss, QPA's once-per-forward generator hook, ``perplexity(...)``), only without recomputing the trunk. Every
invocation checks this once on a trained adapter: the training loss of one batch and the held-out
perplexity, with the cached trunk vs the real one, must agree to 1e-4 relative (``equivalence_check`` in
the JSON; the run stops otherwise).

Commands used for docs/quality.md (assets cached in $PEFT_QPA_CACHE):

    python benchmarks/quality.py --suite methods
    python benchmarks/quality.py --suite backends --threads 1 --aer-threads 1

``--quick`` is a tiny smoke run (few steps, one lr, one config per method).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peft_qpa  # noqa: E402  (registers QPA)
from peft_qpa.apps.demo import evenly_spaced_windows, lr_at  # noqa: E402
from peft_qpa.apps.evaluation import perplexity, tokenize_and_group  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = "lm_head"
EQUIVALENCE_RTOL = 1e-4


# --------------------------------------------------------------------------------------------------------
# the cached trunk
# --------------------------------------------------------------------------------------------------------
def _row_key(ids: torch.Tensor) -> bytes:
    return ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()


class HiddenStates:
    """Final hidden states of the frozen decoder for a fixed set of token rows, looked up by the row's ids."""

    def __init__(self, rows: list[list[int]], states: list[torch.Tensor]):
        self.states = states
        self.index = {_row_key(torch.tensor(r)): i for i, r in enumerate(rows)}

    @classmethod
    @torch.no_grad()
    def compute(cls, trunk: nn.Module, rows: list[list[int]], batch_size: int = 8, progress: bool = True) -> "HiddenStates":
        from tqdm.auto import tqdm

        trunk.eval()
        states: list[Optional[torch.Tensor]] = [None] * len(rows)
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_len.setdefault(len(r), []).append(i)
        batches = [idx[j : j + batch_size] for idx in by_len.values() for j in range(0, len(idx), batch_size)]
        for idx in tqdm(batches, desc="trunk hidden states", unit="batch", disable=not progress):
            x = torch.tensor([rows[i] for i in idx])
            h = trunk(input_ids=x).last_hidden_state
            for k, i in enumerate(idx):
                states[i] = h[k].clone()
        return cls(rows, states)

    def lookup(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, t = input_ids.shape
        d = self.states[0].shape[-1]
        out = torch.zeros(b, t, d, dtype=self.states[0].dtype)
        for i in range(b):
            n = t if attention_mask is None else int(attention_mask[i].sum())
            if attention_mask is not None and not bool(attention_mask[i, :n].all()):
                raise ValueError("CachedTrunk supports right padding only.")
            j = self.index.get(_row_key(input_ids[i, :n]))
            if j is None:
                raise KeyError("CachedTrunk: this row's hidden states were not cached.")
            out[i, :n] = self.states[j][:n]
        return out


class CachedTrunk(nn.Module):
    """Stands in for the decoder (``model.model``): returns cached final hidden states for known rows.

    Valid only when nothing before ``lm_head`` is adapted and nothing is stochastic (no dropout). Keeps a
    reference to the real input embedding so ``get_input_embeddings()`` (tied weights) still works.
    """

    def __init__(self, embed_tokens: nn.Module, cache: HiddenStates):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.cache = cache

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        if input_ids is None:
            raise ValueError("CachedTrunk needs input_ids.")
        h = self.cache.lookup(input_ids, attention_mask).to(input_ids.device)
        return BaseModelOutputWithPast(last_hidden_state=h)


def trunk_of(model) -> nn.Module:
    """The decoder stack whose output feeds ``lm_head`` (``model.model`` for Llama-style models)."""
    trunk = getattr(model, "model", None)
    if trunk is None or not hasattr(model, TARGET):
        raise ValueError("quality.py needs a causal LM with .model (decoder) and .lm_head (e.g. Llama, SmolLM2).")
    return trunk


def head_only_copy(model, cached: CachedTrunk):
    """A copy of ``model`` whose decoder is ``cached`` and whose frozen lm_head weight is shared, not copied."""
    memo = {id(trunk_of(model)): cached, id(model.lm_head.weight): model.lm_head.weight}
    return copy.deepcopy(model, memo)


def model_fingerprint(model, source: str) -> str:
    h = hashlib.sha256(source.encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        params = list(model.parameters())
        for p in (params[0], params[len(params) // 2], params[-1]):
            h.update(p.detach().float().cpu().numpy().tobytes()[:1 << 16])
            h.update(repr(float(p.double().sum())).encode())
    return h.hexdigest()


def cached_hidden_states(model, source: str, rows: list[list[int]], cache_dir: Optional[Path], progress: bool) -> tuple[HiddenStates, dict]:
    """Hidden states for ``rows``, from ``cache_dir`` if present (keyed by model + exact token rows)."""
    h = hashlib.sha256(model_fingerprint(model, source).encode())
    for r in rows:
        h.update(len(r).to_bytes(4, "little"))
        h.update(_row_key(torch.tensor(r)))
    key = h.hexdigest()[:24]
    path = cache_dir / f"{key}.pt" if cache_dir is not None else None
    t0 = time.perf_counter()
    if path is not None and path.is_file():
        states = torch.load(path, weights_only=True)  # tensors only: never unpickle code from the cache
        info = {"key": key, "path": str(path), "from_disk": True}
        hs = HiddenStates(rows, states)
    else:
        hs = HiddenStates.compute(trunk_of(model), rows, progress=progress)
        info = {"key": key, "path": str(path) if path else None, "from_disk": False}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(hs.states, tmp)
            os.replace(tmp, path)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return hs, info


# --------------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------------
@dataclass
class Method:
    name: str  # unique config name
    family: str  # "lora", "qpa", "vera", "vblora", "fourierft"
    make_config: Callable  # (in_features, out_features) -> PeftConfig
    lrs: list[float]
    info: dict = field(default_factory=dict)


def _vblora_vector_length(in_f: int, out_f: int, target: int) -> int:
    g = math.gcd(in_f, out_f)
    return max(d for d in range(1, min(g, target) + 1) if g % d == 0)


def methods_suite(quick: bool) -> list[Method]:
    from peft import FourierFTConfig, LoraConfig, VBLoRAConfig, VeraConfig

    def lora(r):
        return lambda i, o: LoraConfig(r=r, lora_alpha=2 * r, target_modules=[TARGET], lora_dropout=0.0)

    def qpa(chunk, depth):
        return lambda i, o: peft_qpa.QPAConfig(r=4, lora_alpha=8, target_modules=[TARGET], chunk_size=chunk, qnn_depth=depth, seed=0)

    def vera(r):
        return lambda i, o: VeraConfig(r=r, target_modules=[TARGET], vera_dropout=0.0, save_projection=False)

    def vblora(nv):
        return lambda i, o: VBLoRAConfig(r=4, target_modules=[TARGET], num_vectors=nv, vector_length=_vblora_vector_length(i, o, 192),
                                         topk=2, vblora_dropout=0.0)

    def fourier(n):
        return lambda i, o: FourierFTConfig(n_frequency=min(n, i * o), target_modules=[TARGET], scaling=150.0, init_weights=True)

    # Learning-rate grids: kept small (the whole suite must fit ~25 min on 2 shared cores); centred on what the
    # demo's sweep found (LoRA 3e-3, QPA 1e-2) and on the usual ranges of the peers (their trainable vectors
    # need high rates). The extra QPA configs reuse QPA's best rate.
    runs = [
        Method("lora_r1", "lora", lora(1), [3e-3, 1e-2], {"r": 1, "lora_alpha": 2}),
        Method("lora_r4", "lora", lora(4), [3e-3, 1e-2], {"r": 4, "lora_alpha": 8}),
        Method("qpa_c256_L8", "qpa", qpa(256, 8), [3e-3, 1e-2, 3e-2], {"chunk_size": 256, "qnn_depth": 8}),
        Method("qpa_c64_L8", "qpa", qpa(64, 8), [1e-2], {"chunk_size": 64, "qnn_depth": 8}),
        Method("qpa_c256_L2", "qpa", qpa(256, 2), [1e-2], {"chunk_size": 256, "qnn_depth": 2}),
        Method("qpa_c1024_L8", "qpa", qpa(1024, 8), [1e-2], {"chunk_size": 1024, "qnn_depth": 8}),
        Method("vera_r256", "vera", vera(256), [3e-2, 1e-1], {"r": 256}),
        Method("vblora_nv16", "vblora", vblora(16), [1e-2, 3e-2], {"r": 4, "num_vectors": 16, "vector_length": "gcd<=192", "topk": 2}),
        Method("vblora_nv32", "vblora", vblora(32), [1e-2], {"r": 4, "num_vectors": 32, "vector_length": "gcd<=192", "topk": 2}),
        Method("fourierft_n12k", "fourierft", fourier(12_000), [1e-1, 3e-1], {"n_frequency": 12_000, "scaling": 150.0, "init_weights": True}),
        Method("fourierft_n48k", "fourierft", fourier(48_000), [1e-1], {"n_frequency": 48_000, "scaling": 150.0, "init_weights": True}),
    ]
    if quick:
        keep = {"lora_r4": 3e-3, "qpa_c256_L8": 1e-2, "vera_r256": 3e-2, "vblora_nv16": 1e-2, "fourierft_n12k": 1e-1}
        runs = [Method(m.name, m.family, m.make_config, [keep[m.name]], m.info) for m in runs if m.name in keep]
    return runs


BACKEND_CHUNK, BACKEND_DEPTH = 1024, 8


def backends_suite(quick: bool, lr: float, aer_threads: int) -> list[Method]:
    def qpa(**kw):
        return lambda i, o: peft_qpa.QPAConfig(r=4, lora_alpha=8, target_modules=[TARGET], chunk_size=BACKEND_CHUNK,
                                              qnn_depth=BACKEND_DEPTH, seed=0, aer_max_parallel_threads=aer_threads, **kw)

    runs = [Method("exact", "qpa", qpa(), [lr], {"backend": "statevector"})]
    cs = [1] if quick else [1, 5, 20]
    for c in cs:
        for gi in (False, True):
            kw = dict(backend="aer_shots", shots_per_state=c, shot_gradient="exact", generative_interpolation=gi)
            runs.append(Method(f"shots_c{c}{'_gi' if gi else ''}", "qpa", qpa(**kw), [lr], kw))
    if not quick:
        for gi in (False, True):
            kw = dict(backend="aer_shots", shots_per_state=20, shot_gradient="exact", generative_interpolation=gi, noise_model="fake_kyiv")
            runs.append(Method(f"shots_c20_fake_kyiv{'_gi' if gi else ''}", "qpa", qpa(**kw), [lr], kw))
    return runs


# --------------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------------
@dataclass
class Task:
    model: object
    tokenizer: object
    source: str
    train_rows: list[list[int]]  # steps * batch_size blocks, in training order
    eval_rows: list[list[int]]
    data_info: dict
    cached: Optional[CachedTrunk] = None
    cache_info: Optional[dict] = None


def load_model_and_texts(args, split_seed: int):
    """The model (eval mode), its tokenizer and source, the training and held-out texts, and what the split was:
    ``--train-file/--eval-file`` if given, else the Shakespeare plays split by play with ``split_seed``."""
    from peft_qpa.apps import assets

    loaded = assets.load_model_and_tokenizer(args.model, cache=args.cache_dir, progress=not args.no_progress)
    loaded.model.eval()
    if args.train_file:
        train_texts, eval_texts = assets.read_texts([args.train_file]), assets.read_texts([args.eval_file])
        split_info = {"train_files": [str(args.train_file)], "eval_files": [str(args.eval_file)]}
    else:
        split = assets.split_plays(assets.fetch_shakespeare(args.cache_dir, progress=not args.no_progress), seed=split_seed)
        train_texts, eval_texts = assets.read_texts(split.train_files), assets.read_texts(split.eval_files)
        split_info = {"train_works": split.train_works, "eval_works": split.eval_works}
    return loaded, train_texts, eval_texts, split_info


def load_task(args) -> Task:
    loaded, train_texts, eval_texts, split_info = load_model_and_texts(args, args.split_seed)
    model, tok = loaded.model, loaded.tokenizer
    need = args.steps * args.batch_size
    blocks = tokenize_and_group(tok, train_texts, args.block_size, max_tokens=None)
    order = list(range(len(blocks)))
    random.Random(args.seed).shuffle(order)
    if len(order) < need:  # tiny texts (tests): cycle
        order = (order * math.ceil(need / max(1, len(order))))
    train_rows = [blocks[i] for i in order[:need]]
    stream = tokenize_and_group(tok, eval_texts, 10**12, drop_last=False)[0]
    eval_rows = evenly_spaced_windows(stream, args.eval_block_size, args.eval_tokens)
    data_info = {
        **split_info,
        "train_blocks_available": len(blocks),
        "train_tokens": need * args.block_size,
        "heldout_stream_tokens": len(stream),
        "eval_windows": len(eval_rows),
        "eval_window_tokens": sum(len(r) for r in eval_rows),
    }
    return Task(model, tok, loaded.source, train_rows, eval_rows, data_info)


def attach_cache(task: Task, args) -> None:
    cache_dir = None if args.hidden_cache == "none" else Path(args.hidden_cache)
    hs, info = cached_hidden_states(task.model, task.source, task.train_rows + task.eval_rows, cache_dir, not args.no_progress)
    task.cached = CachedTrunk(trunk_of(task.model).embed_tokens, hs)
    task.cache_info = info


# --------------------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------------------
def build(task: Task, config):
    from peft import get_peft_model

    shell = head_only_copy(task.model, task.cached)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied lm_head / embeddings warnings
        return get_peft_model(shell, config)


def qpa_facts(pm) -> dict:
    base = pm.base_model
    if not hasattr(base, "get_generator"):
        return {}
    g = base.get_generator()
    return {"n_qubits": g.n_qubits, "qnn_depth": g.depth, "chunk_size": g.chunk_size, "num_generated": g.num_generated}


def evaluate(pm, rows, batch_size: int) -> dict:
    pm.eval()
    res = perplexity(pm, rows, batch_size=batch_size, progress=False)
    return {"ppl": res.perplexity, "nll": res.nll, "n_tokens": res.n_tokens}


def train_run(task: Task, method: Method, lr: float, args) -> tuple[dict, object]:
    in_f, out_f = task.model.lm_head.in_features, task.model.lm_head.out_features
    torch.manual_seed(args.seed)
    t_build = time.perf_counter()
    config = method.make_config(in_f, out_f)
    if isinstance(config, peft_qpa.GeneratorConfig):  # the generator's seed follows the run's (validated again)
        config = replace(config, seed=args.seed)
    pm = build(task, config)
    build_s = time.perf_counter() - t_build
    params = [p for p in pm.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bs = args.batch_size
    losses = []
    pm.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, args.warmup, args.steps)
        x = torch.tensor(task.train_rows[step * bs : (step + 1) * bs])
        loss = pm(input_ids=x, labels=x).loss
        if not torch.isfinite(loss):
            losses.append(float("nan"))
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    ev = evaluate(pm, task.eval_rows, args.eval_batch_size) if math.isfinite(losses[-1]) else {"ppl": float("nan"), "nll": float("nan"), "n_tokens": 0}
    eval_s = time.perf_counter() - t1
    tail = losses[-10:]
    row = {
        "name": method.name,
        "method": method.family,
        "config": method.info,
        **qpa_facts(pm),
        "trainable_params": n_train,
        "lr": lr,
        "steps_done": len(losses),
        "train_loss_first": losses[0],
        "train_loss_final": losses[-1],
        "train_loss_last10_mean": sum(tail) / len(tail),
        "eval_ppl": ev["ppl"],
        "eval_nll": ev["nll"],
        "eval_tokens_scored": ev["n_tokens"],
        "wall_s": round(build_s + train_s + eval_s, 2),
        "train_s": round(train_s, 2),
        "eval_s": round(eval_s, 2),
        "s_per_step": round(train_s / max(1, len(losses)), 3),
        "losses": [round(v, 5) for v in losses],
    }
    return row, pm


def equivalence_check(task: Task, pm, args) -> dict:
    """The trained adapter with the cached trunk vs with the real decoder: same batch loss, same perplexity."""
    shell = pm.base_model.model
    real = trunk_of(task.model)
    x = torch.tensor(task.train_rows[: args.batch_size])
    pm.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        loss_cached = float(pm(input_ids=x, labels=x).loss)
        ppl_cached = perplexity(pm, task.eval_rows, batch_size=args.eval_batch_size, progress=False).perplexity
        shell.model = real
        try:
            loss_full = float(pm(input_ids=x, labels=x).loss)
            ppl_full = perplexity(pm, task.eval_rows, batch_size=args.eval_batch_size, progress=False).perplexity
        finally:
            shell.model = task.cached
    out = {
        "train_batch_loss_cached": loss_cached,
        "train_batch_loss_full": loss_full,
        "eval_ppl_cached": ppl_cached,
        "eval_ppl_full_model": ppl_full,
        "loss_rel_diff": abs(loss_cached - loss_full) / abs(loss_full),
        "ppl_rel_diff": abs(ppl_cached - ppl_full) / abs(ppl_full),
        "rtol": EQUIVALENCE_RTOL,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if not (out["loss_rel_diff"] <= EQUIVALENCE_RTOL and out["ppl_rel_diff"] <= EQUIVALENCE_RTOL):
        raise AssertionError(f"cached-hidden-state evaluation differs from the full model: {out}")
    return out


# --------------------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------------------
def best_per(runs: list[dict], key: str) -> dict:
    best: dict[str, dict] = {}
    for r in runs:
        if not math.isfinite(r["eval_ppl"]):
            continue
        k = r[key]
        if k not in best or r["eval_ppl"] < best[k]["eval_ppl"]:
            best[k] = r
    return {k: {kk: v for kk, v in r.items() if kk != "losses"} for k, r in best.items()}


def goal_statement(best_cfg: dict) -> dict:
    """The project's target for QPA (docs/quality.md: within 1 % of LoRA r = 4's perplexity with at most a quarter
    of its parameters, on or ahead of the compact methods' Pareto front), on the best learning rate of every config."""
    if "lora_r4" not in best_cfg:
        return {}
    ref = best_cfg["lora_r4"]
    budget = ref["trainable_params"] / 4
    qpa = [r for r in best_cfg.values() if r["method"] == "qpa" and r["trainable_params"] <= budget]
    peers = [r for r in best_cfg.values() if r["method"] != "qpa" and r["name"] != "lora_r4"]
    out = {"lora_r4_ppl": ref["eval_ppl"], "lora_r4_params": ref["trainable_params"], "param_budget_quarter": budget}
    if not qpa:
        out["qpa_within_budget"] = None
        return out
    q = min(qpa, key=lambda r: r["eval_ppl"])
    dominated_by = [p["name"] for p in peers if p["trainable_params"] <= q["trainable_params"] and p["eval_ppl"] < q["eval_ppl"]]
    out.update({
        "best_qpa_within_budget": q["name"],
        "best_qpa_ppl": q["eval_ppl"],
        "best_qpa_params": q["trainable_params"],
        "best_qpa_rel_gap_to_lora_r4": q["eval_ppl"] / ref["eval_ppl"] - 1,
        "matches_lora_r4_within_1pct": q["eval_ppl"] <= ref["eval_ppl"] * 1.01,
        "peers_dominating_best_qpa": dominated_by,
        "on_or_ahead_of_peer_pareto_front": not dominated_by,
    })
    return out


def plot_methods(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"lora": "tab:blue", "qpa": "tab:red", "vera": "tab:green", "vblora": "tab:purple", "fourierft": "tab:orange"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    best = result["best_per_config"]
    for fam, color in colors.items():
        pts = sorted((r["trainable_params"], r["eval_ppl"], r["name"]) for r in best.values() if r["method"] == fam)
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=fam, s=40, zorder=3)
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    pts = sorted((r["trainable_params"], r["eval_ppl"]) for r in best.values())
    front, lo = [], float("inf")
    for x, y in pts:
        if y < lo:
            front.append((x, y))
            lo = y
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="gray", lw=1, ls=":", label="Pareto front (all)")
    ax.axhline(result["base"]["ppl"], color="black", ls="--", lw=1, label=f"base model {result['base']['ppl']:.2f}")
    goal = result.get("goal", {})
    if goal:
        ax.axhline(goal["lora_r4_ppl"] * 1.01, color="tab:blue", ls=":", lw=1, label="LoRA r=4 ppl + 1%")
        ax.axvline(goal["param_budget_quarter"], color="tab:blue", ls="-.", lw=1, label="¼ of LoRA r=4 params")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("held-out perplexity (best lr)")
    a = result["args"]
    ax.set_title(f"lm_head adapters, {a['steps']}×{a['batch_size']}×{a['block_size']} training tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_backends(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if math.isfinite(r["eval_ppl"])]
    names = [r["name"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    colors = ["tab:gray" if r["name"] == "exact" else ("tab:red" if "kyiv" in r["name"] else "tab:blue") for r in runs]
    hatches = ["//" if r["config"].get("generative_interpolation") else "" for r in runs]
    for ax, key, label in ((axes[0], "eval_ppl", "held-out perplexity"), (axes[1], "train_loss_last10_mean", "train loss (mean of last 10 steps)"),
                           (axes[2], "wall_s", "wall time per run (s)")):
        bars = ax.bar(range(len(runs)), [r[key] for r in runs], color=colors)
        for b, h in zip(bars, hatches):
            b.set_hatch(h)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_title(label)
        if key == "eval_ppl":
            vals = [r[key] for r in runs] + [result["base"]["ppl"]]
            ax.axhline(result["base"]["ppl"], color="black", ls="--", lw=1, label="base")
            ax.set_ylim(min(vals) * 0.995, max(vals) * 1.003)
            ax.legend(fontsize=8)
        if key == "train_loss_last10_mean":
            vals = [r[key] for r in runs]
            ax.set_ylim(min(vals) * 0.99, max(vals) * 1.01)
    q = result["runs"][0] if result["runs"] else {}
    fig.suptitle(f"QPA backends on lm_head (N={q.get('n_qubits')}, L={q.get('qnn_depth')}, chunk {q.get('chunk_size')}); hatched = GI, red = fake_kyiv noise")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("methods", "backends"), default="methods")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: few steps, one lr, one config per method")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 80; quick: 4)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored (default 8192; quick: 1024)")
    p.add_argument("--eval-block-size", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="override every method's learning-rate grid (backends suite: the single lr, default 1e-2)")
    p.add_argument("--only", nargs="+", default=None, help="run only these config names (e.g. lora_r4 qpa_c256_L8)")
    p.add_argument("--output", type=Path, default=None,
                   help="JSON path (default benchmarks/results/quality.json or backend_quality.json); the PNG goes beside it")
    p.add_argument("--model", default=None, help="model dir / .gguf (default: cached SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--train-file", default=None)
    p.add_argument("--eval-file", default=None)
    p.add_argument("--cache-dir", default=None, help="asset cache (default $PEFT_QPA_CACHE or ~/.cache/peft_qpa)")
    p.add_argument("--hidden-cache", default=None, help="directory for cached trunk hidden states, or 'none'")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads (default 2). Aer runs between torch's matmuls in the same process, so torch 2 + "
                        "Aer 1 (--aer-threads) does not oversubscribe 2 cores")
    p.add_argument("--aer-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0,
                   help="Seed of the adapter's initialisation (QPA generators included) and of the training data's order.")
    p.add_argument("--split-seed", type=int, default=0,
                   help="Seed of which plays are held out: fixed across --seed values, so runs at different seeds share one split.")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if (args.train_file is None) != (args.eval_file is None):
        p.error("--train-file and --eval-file go together")
    if args.steps is None:
        args.steps = 4 if args.quick else 80
    if args.eval_tokens is None:
        args.eval_tokens = 1024 if args.quick else 8192
    if args.output is None:
        args.output = RESULTS / ("quality.json" if args.suite == "methods" else "backend_quality.json")
    if args.hidden_cache is None:
        from peft_qpa.apps.assets import cache_dir

        args.hidden_cache = str(cache_dir(args.cache_dir) / "hidden_states")
    return args


def _git_state() -> dict:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "peft_qpa"], cwd=root, capture_output=True, text=True, timeout=10).stdout
        return {"commit": head or None, "peft_qpa_dirty": bool(dirty.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "peft_qpa_dirty": None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    t_start = time.perf_counter()
    if args.suite == "methods":
        methods = methods_suite(args.quick)
    else:
        methods = backends_suite(args.quick, (args.lrs or [1e-2])[0], args.aer_threads)
    if args.lrs and args.suite == "methods":
        methods = [Method(m.name, m.family, m.make_config, list(args.lrs), m.info) for m in methods]
    if args.only:
        unknown = set(args.only) - {m.name for m in methods}
        if unknown:
            raise SystemExit(f"--only: unknown config(s) {sorted(unknown)}; known: {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in args.only]

    task = load_task(args)
    attach_cache(task, args)
    print(f"[quality] data {task.data_info['train_tokens']} train tokens, {task.data_info['eval_window_tokens']} held-out tokens; "
          f"hidden states {'from disk' if task.cache_info['from_disk'] else 'computed'} in {task.cache_info['seconds']} s", flush=True)

    base_pm = head_only_copy(task.model, task.cached)
    base = evaluate(base_pm, task.eval_rows, args.eval_batch_size)
    del base_pm
    print(f"[quality] base held-out ppl {base['ppl']:.4f}", flush=True)

    result = {
        "suite": args.suite,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "git": _git_state(),
        "model": task.source,
        "target_modules": [TARGET],
        "data": task.data_info,
        "hidden_state_cache": task.cache_info,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__, "peft": __import__("peft").__version__,
                    "transformers": __import__("transformers").__version__},
        "base": base,
        "runs": [],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["best_per_config"] = best_per(result["runs"], "name")
        result["best_per_method"] = best_per(result["runs"], "method")
        if args.suite == "methods":
            result["goal"] = goal_statement(result["best_per_config"])
        result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
        args.output.write_text(json.dumps(result, indent=1, default=float))

    checked = False
    has_qpa = any(m.family == "qpa" for m in methods)
    for method in methods:
        for lr in method.lrs:
            row, pm = train_run(task, method, lr, args)
            result["runs"].append(row)
            print(f"[quality] {row['name']:<24} lr={lr:<7g} params={row['trainable_params']:>8} loss(last10)={row['train_loss_last10_mean']:.4f} "
                  f"ppl={row['eval_ppl']:.4f} {row['wall_s']:.1f}s ({row['s_per_step']:.2f} s/step)", flush=True)
            if not checked and math.isfinite(row["eval_ppl"]) and (method.family == "qpa" or not has_qpa):
                result["equivalence_check"] = {"run": f"{row['name']} lr={lr:g}", **equivalence_check(task, pm, args)}
                print(f"[quality] equivalence check (cached trunk vs full model): {result['equivalence_check']}", flush=True)
                checked = True
            del pm
            save()
    if not checked and result["runs"]:
        raise AssertionError("no run finished with a finite perplexity, so the cached-trunk equivalence check did not run")
    save()
    png = args.output.with_suffix(".png")
    (plot_methods if args.suite == "methods" else plot_backends)(result, png)
    print(f"[quality] wrote {args.output} and {png} in {result['total_wall_s']} s", flush=True)
    return result


if __name__ == "__main__":
    main()
