"""Evidence benchmark: QPA against classical PEFT with seeds, at several budgets, in two regimes, with ablations.

One harness (extending ``benchmarks/quality.py``: the same model, data split, optimiser, perplexity and cached
frozen trunk) runs named *groups* of jobs and appends one JSON record per run to
``benchmarks/results/evidence_runs/<regime>.jsonl``; ``report`` turns those records into
``benchmarks/results/evidence.json`` and the plots ``evidence_*.png``. docs/quality.md is written from that JSON.

Regimes (SmolLM2-135M-Instruct, 30 decoder layers):

* ``lm_head``: the QPA paper's regime, only ``lm_head`` adapted. The frozen decoder's final hidden states are
  cached (exact: nothing before ``lm_head`` changes).
* ``all_linear``: the common LoRA regime, the seven projections (q, k, v, o, gate, up, down) of the top
  ``--top-layers`` (default 8) decoder layers. The input of the first adapted layer is cached (exact: the
  layers below are frozen and deterministic) and the adapted layers, the final norm and ``lm_head`` run.

Both regimes check their cache once per invocation on a trained adapter: the batch loss and the held-out
perplexity with the cache and with the real layers put back must agree to 1e-4 relative (``kind:
"equivalence"`` records; the run stops otherwise).

Data: the training blocks (``--block-size`` 128 tokens, 4 per step) are drawn once from the training plays
with a fixed data seed; a budget of B tokens uses the first B / 512 of them (budgets are nested), and each
run's ``seed`` sets the order of those blocks and the adapter's initialisation (QPA generators included). The
held-out plays and windows are fixed (the demo's). So runs at different seeds differ only in initialisation
and data order.

Learning rates: each config's grid runs at seed 0; the other seeds run at the grid's best value
(``lr_from`` names the config whose best value a job reuses, e.g. the ablations reuse the full QPA config's).

Commands (docs/quality.md):

    python benchmarks/evidence.py run lm_head_grid lm_head_seeds lm_head_ablations lm_head_family
    python benchmarks/evidence.py run all_linear_grid all_linear_seeds all_linear_ablations
    python benchmarks/evidence.py run lm_head_budget
    python benchmarks/evidence.py run lm_head_designs_grid lm_head_designs_seeds lm_head_designs_controls
    python benchmarks/evidence.py run lm_head_designs_more_grid lm_head_designs_more_seeds lm_head_designs_more_controls
    python benchmarks/evidence.py report
    python benchmarks/evidence.py tables                    # the markdown tables of docs/quality.md
    python benchmarks/evidence.py list                      # every group and its jobs

Runs already recorded (same regime, config, budget, lr, seed) are skipped, so an interrupted invocation
resumes. ``--smoke`` runs a tiny version (CI: tests/test_evidence_bench.py).
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
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peft_qpa  # noqa: E402  (registers the QPA types)
from peft_qpa.apps.demo import evenly_spaced_windows, lr_at  # noqa: E402
from peft_qpa.apps.evaluation import perplexity, tokenize_and_group  # noqa: E402
from quality import (  # noqa: E402  (the shared harness)
    EQUIVALENCE_RTOL,
    CachedTrunk,
    HiddenStates,
    _git_state,
    _row_key,
    _vblora_vector_length,
    load_model_and_texts,
    model_fingerprint,
    qpa_facts,
)

RESULTS = Path(__file__).resolve().parent / "results"
RUNS_DIR = RESULTS / "evidence_runs"
BATCH = 4
DATA_SEED = 0
SEEDS = (0, 1, 2)
BASE_BUDGET = 40_960
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What config factories need to know about the regime."""

    regime: str
    targets: object  # list or regex string
    mlp_targets: Optional[str] = None  # bottleneck: the adapted layers' MLP blocks


@dataclass(frozen=True)
class Spec:
    name: str
    method: str  # the method label of the record (lora, qpa, qpa-ablation-const, ...)
    make: Callable[[Ctx], object]
    r: Optional[int] = None
    info: dict = field(default_factory=dict)
    angle_lr_scale: float = 1.0  # QPA: the circuit angles' lr = lr * angle_lr_scale
    design: str = ""  # the generator design (gelu-bits, published-code, ...); "" : design_of() decides

    @property
    def design_name(self) -> str:
        return self.design or design_of(self.method)


def design_of(method: str) -> str:
    """The design of a record made before designs were recorded: QPA members used today's default (a GELU MLP
    with each state's own bits); classical methods have none."""
    return "gelu-bits" if method.startswith("qpa") else "classical"


def _lora(r, **kw):
    from peft import LoraConfig

    return lambda c: LoraConfig(r=r, lora_alpha=2 * r, target_modules=c.targets, lora_dropout=0.0, **kw)


def _qpa(r=4, **kw):
    return lambda c: peft_qpa.QPAConfig(r=r, lora_alpha=2 * r, target_modules=c.targets, seed=0, **kw)


# The improved input scaling (a documented GeneratorConfig option; see docs/config.md).
STD = {"probability_scaling": "standardize"}


def specs_for(regime: str, smoke: bool = False) -> dict[str, Spec]:
    from peft import FourierFTConfig, VBLoRAConfig, VeraConfig

    s: list[Spec] = [
        Spec("lora_r1", "lora", _lora(1), 1),
        Spec("lora_r2", "lora", _lora(2), 2),
        Spec("lora_r4", "lora", _lora(4), 4),
        Spec("lora_r8", "lora", _lora(8), 8),
        Spec("dora_r4", "dora", _lora(4, use_dora=True), 4),
    ]
    if regime == "lm_head":
        main = dict(chunk_size=256, qnn_depth=8)  # published MLP [32, 64, 128, 128, 64, 32]
        s += [
            Spec("qpa_c256_L8", "qpa", _qpa(**main), 4, main),
            Spec("qpa_c256_L8_std", "qpa", _qpa(**main, **STD), 4, {**main, **STD}),
            Spec("qpa_dora_c256_L8_std", "qpa-dora", _qpa(**main, **STD, use_dora=True), 4, {**main, **STD, "use_dora": True}),
            Spec("vera_r256", "vera", lambda c: VeraConfig(r=256, target_modules=c.targets, vera_dropout=0.0, save_projection=False), 256),
            Spec("vblora_nv16", "vblora", lambda c: VBLoRAConfig(r=4, target_modules=c.targets, num_vectors=16,
                                                               vector_length=_vblora_vector_length(576, 49152, 192) if not smoke else 4,
                                                               topk=2, vblora_dropout=0.0), 4, {"num_vectors": 16, "topk": 2}),
            Spec("fourierft_n12k", "fourierft", lambda c: FourierFTConfig(n_frequency=12_000 if not smoke else 64, target_modules=c.targets,
                                                                        scaling=150.0, init_weights=True), None, {"n_frequency": 12_000}),
        ]
        ablate = {"qpa_c256_L8": main, "qpa_c256_L8_std": {**main, **STD}}
        s += design_specs(main)
    else:
        sizes = {  # (name, MLP hidden widths, chunk): ~2 %, 5 %, 10 % of LoRA r = 4's parameters on the top 8 layers
            "qpa_2pct": ([32, 32], 128),
            "qpa_5pct": ([64, 64], 192),
            "qpa_10pct": ([64, 128, 64], 256),
            "qpa_published": ([32, 64, 128, 128, 64, 32], 64),
            "qpa_10pct_wide": ([64, 256], 64),  # the 10 % size with a 4x wider last hidden layer
        }
        for name, (hidden, chunk) in sizes.items():
            kw = dict(mapping_hidden_sizes=hidden, chunk_size=chunk, qnn_depth=8)
            s.append(Spec(name, "qpa", _qpa(**kw), 4, kw))
            s.append(Spec(name + "_std", "qpa", _qpa(**kw, **STD), 4, {**kw, **STD}))
        kw = dict(mapping_hidden_sizes=[64, 64], chunk_size=192, qnn_depth=8)
        s += [
            Spec("qpa_5pct_r16", "qpa", _qpa(r=16, **kw), 16, kw),
            Spec("qpa_5pct_r16_std", "qpa", _qpa(r=16, **kw, **STD), 16, {**kw, **STD}),
            Spec("qpa_dora_5pct_std", "qpa-dora", _qpa(**kw, **STD, use_dora=True), 4, {**kw, **STD, "use_dora": True}),
            Spec("bottleneck_b16", "bottleneck", lambda c: peft_qpa.BottleneckConfig(target_modules=c.mlp_targets, bottleneck_size=16), None,
                 {"bottleneck_size": 16}),
            Spec("qpa_bottleneck_b16", "qpa-bottleneck", lambda c: peft_qpa.QPABottleneckConfig(
                target_modules=c.mlp_targets, bottleneck_size=16, mapping_hidden_sizes=[64, 64], chunk_size=192, seed=0,
                **STD), None, {"bottleneck_size": 16, "mapping_hidden_sizes": [64, 64], "chunk_size": 192, **STD}),
            Spec("vblora_nv32", "vblora", lambda c: VBLoRAConfig(r=4, target_modules=c.targets, num_vectors=32,
                                                               vector_length=192 if not smoke else 4, topk=2, vblora_dropout=0.0),
                 4, {"num_vectors": 32, "topk": 2}),
        ]
        s += peer_specs(smoke) + design_specs_all_linear()
        ablate = {k: v for k, v in [("qpa_5pct", dict(mapping_hidden_sizes=[64, 64], chunk_size=192, qnn_depth=8)),
                                    ("qpa_5pct_std", dict(mapping_hidden_sizes=[64, 64], chunk_size=192, qnn_depth=8, **STD))]}
    # Ablations of the quantum part, at a QPA config (suffixes: const, frozen, L1, L2, rx, c1, c1_gi, c20, c20_gi).
    for base, kw in ablate.items():
        variants = {
            "const": ("qpa-ablation-const", dict(probability_input="constant")),
            "frozen": ("qpa-ablation-frozen", dict(freeze_angles=True)),
            "L1": ("qpa-ablation-depth", dict(qnn_depth=1)),
            "L2": ("qpa-ablation-depth", dict(qnn_depth=2)),
            "rx": ("qpa-ablation-ansatz", dict(ansatz="rx_cnot")),
        }
        for c in (1, 20):
            for gi in (False, True):
                variants[f"c{c}{'_gi' if gi else ''}"] = ("qpa-ablation-shots", dict(
                    backend="aer_shots", shots_per_state=c, shot_gradient="exact", generative_interpolation=gi))
        for suffix, (method, extra) in variants.items():
            cfg = {**kw, **extra}
            s.append(Spec(f"{base}__{suffix}", method, _qpa(**cfg), 4, cfg))
        s.append(Spec(f"{base}__angle_lr10", "qpa", _qpa(**kw), 4, {**kw, "angle_lr_scale": 10.0}, angle_lr_scale=10.0))
    return {x.name: x for x in s}


# --------------------------------------------------------------------------------------------------------
# the plan: groups of jobs
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    spec: str
    regime: str
    budget: int
    seeds: tuple = SEEDS
    lrs: Optional[tuple] = None  # None: the best seed-0 lr of ``lr_from`` at this regime and budget
    lr_from: Optional[str] = None


# Designs in which the circuit may carry the generated tensors (docs/config.md, "The published configuration"): the
# authors' code (an affine mapping with shuffled bits), its deterministic equivalent (no bits), and each of its two
# choices alone; each with the controls a reviewer asks for.
PUBLISHED_MLP = [32, 64, 128, 128, 64, 32, 32]
DESIGNS = {  # name: (design, generator fields)
    "pub_affine_shuffled": ("published-code", dict(mapping_hidden_sizes=PUBLISHED_MLP, mapping_activation="none",
                                                   basis_features="shuffled")),
    "pub_affine_none": ("published-nobits", dict(mapping_hidden_sizes=PUBLISHED_MLP, mapping_activation="none",
                                                 basis_features="none")),
    "pub_affine_bits": ("affine-bits", dict(mapping_hidden_sizes=PUBLISHED_MLP, mapping_activation="none")),
    "pub_gelu_none": ("gelu-nobits", dict(mapping_hidden_sizes=PUBLISHED_MLP, basis_features="none")),
}
# Designs in which the circuit carries more of the degrees of freedom, at 2-5 % of LoRA r = 4's parameters in
# lm_head (affine mappings without bits unless named otherwise): K readout settings, the MPS mapping, the
# distributed ansatz, a deep circuit.
AFFINE_NOBITS = dict(mapping_activation="none", basis_features="none", mapping_hidden_sizes=[32])
DESIGNS_MORE = {
    "multi4_affine": ("multi-feature", dict(probability_input="multi_readout", readout_settings=4, **AFFINE_NOBITS)),
    "mps4": ("mps-mapping", dict(mapping="mps", mps_bond_dim=4)),
    "dist2_affine": ("distributed", dict(probability_input="distributed", circuit_groups=2, **AFFINE_NOBITS)),
    "deep64_affine": ("deep", dict(**AFFINE_NOBITS, qnn_depth=64)),
}
TWINS = {"multi_readout": "multi_readout_twin", "distributed": "distributed_twin"}  # a source: its classical twin
DESIGN_CONTROLS = {  # suffix: (method, fields)
    "const": ("qpa-ablation-const", dict(probability_input="constant")),
    "frozen": ("qpa-ablation-frozen", dict(freeze_angles=True)),
    "classical": ("qpa-ablation-classical", dict(probability_input="classical_twin")),
}


# lm_head: the designs of DESIGNS_MORE at their other two sizes (about 2 %, 5 % or 10 % of LoRA r = 4's 198,912
# parameters on lm_head; at chunk 256 they are 2.2 % (mps4) and 4.3-4.6 % (the others)). Only the chunk changes, so N
# changes with it (N = ceil(log2(ceil(198912 / chunk)))).
DESIGNS_LM_SIZES = {  # name: (design, generator fields)
    "multi4_affine_2pct": ("multi-feature", dict(DESIGNS_MORE["multi4_affine"][1], chunk_size=112)),  # 3,988
    "multi4_affine_10pct": ("multi-feature", dict(DESIGNS_MORE["multi4_affine"][1], chunk_size=576)),  # 19,276
    "mps4_5pct": ("mps-mapping", dict(DESIGNS_MORE["mps4"][1], chunk_size=512)),  # 8,496
    "mps4_10pct": ("mps-mapping", dict(DESIGNS_MORE["mps4"][1], chunk_size=1216)),  # 19,720
    "dist2_affine_2pct": ("distributed", dict(DESIGNS_MORE["dist2_affine"][1], chunk_size=112)),  # 3,848
    "dist2_affine_10pct": ("distributed", dict(DESIGNS_MORE["dist2_affine"][1], chunk_size=576)),  # 19,144
    "deep64_affine_2pct": ("deep", dict(DESIGNS_MORE["deep64_affine"][1], chunk_size=96)),  # 4,000
    "deep64_affine_10pct": ("deep", dict(DESIGNS_MORE["deep64_affine"][1], chunk_size=576)),  # 19,648
}


def design_specs(main: dict) -> list[Spec]:
    """The designs of :data:`DESIGNS`, :data:`DESIGNS_MORE` and :data:`DESIGNS_LM_SIZES` at ``main``'s settings (a
    design's own fields win), and their controls (the classical twin only where this version of peft_qpa has it)."""
    from peft_qpa.generator.config import PROBABILITY_INPUTS

    out = []
    for name, (design, fields) in {**DESIGNS, **DESIGNS_MORE, **DESIGNS_LM_SIZES}.items():
        kw = {**main, **fields}
        out.append(Spec(name, "qpa", _qpa(**kw), 4, kw, design=design))
        for suffix, (method, extra) in DESIGN_CONTROLS.items():
            # Each source's own twin: the classical twin replaces a one-feature circuit, the K-feature twin a K-readout
            # one, the distributed twin the distributed ansatz (each keeps its source's readout_settings or
            # circuit_groups; the constant and the one-circuit twin drop them).
            source = fields.get("probability_input", "circuit")
            if suffix == "classical" and source in TWINS:
                extra = {"probability_input": TWINS[source]}
            if extra.get("probability_input", "circuit") in PROBABILITY_INPUTS:
                cfg = {**kw, **extra}
                if extra.get("probability_input") in ("constant", "classical_twin"):  # the replaced source's settings go
                    cfg = {k: v for k, v in cfg.items() if k not in ("readout_settings", "circuit_groups")}
                out.append(Spec(f"{name}__{suffix}", method, _qpa(**cfg), 4, cfg, design=design))
    return out


# all_linear: the designs at about 2 %, 5 % and 10 % of LoRA r = 4's parameters (325,632 on the top 8 layers) and the
# authors' configuration at its own size (its fixed hidden stack alone is 38k numbers: 12.6 % at chunk 64).
DESIGNS_AL = {  # name: (design, generator fields)
    "pub_affine_shuffled": ("published-code", dict(DESIGNS["pub_affine_shuffled"][1], chunk_size=64, qnn_depth=8)),
    "multi4_affine_2pct": ("multi-feature", dict(DESIGNS_MORE["multi4_affine"][1], chunk_size=192, qnn_depth=8)),
    "multi4_affine_5pct": ("multi-feature", dict(DESIGNS_MORE["multi4_affine"][1], chunk_size=512, qnn_depth=8)),
    "multi4_affine_10pct": ("multi-feature", dict(DESIGNS_MORE["multi4_affine"][1], chunk_size=960, qnn_depth=8)),
    "mps4_5pct": ("mps-mapping", dict(DESIGNS_MORE["mps4"][1], chunk_size=1024, qnn_depth=8)),
    "mps4_2pct": ("mps-mapping", dict(DESIGNS_MORE["mps4"][1], chunk_size=384, qnn_depth=8)),  # 6,488 parameters
    "mps4_10pct": ("mps-mapping", dict(DESIGNS_MORE["mps4"][1], chunk_size=1984, qnn_depth=8)),  # 32,008 parameters
    # the authors' two choices alone, and their deterministic configuration, at the published configuration's size
    "pub_affine_none": ("published-nobits", dict(DESIGNS["pub_affine_none"][1], chunk_size=64, qnn_depth=8)),
    "pub_affine_bits": ("affine-bits", dict(DESIGNS["pub_affine_bits"][1], chunk_size=64, qnn_depth=8)),
    "pub_gelu_none": ("gelu-nobits", dict(DESIGNS["pub_gelu_none"][1], chunk_size=64, qnn_depth=8)),
    # the distributed ansatz and the deep circuit at about 5 % (the four-readout design's chunk)
    "dist2_affine_5pct": ("distributed", dict(DESIGNS_MORE["dist2_affine"][1], chunk_size=512, qnn_depth=8)),
    "deep64_affine_5pct": ("deep", dict(DESIGNS_MORE["deep64_affine"][1], chunk_size=512)),
    # the depth-64 circuit at about 2 % (the size at which, in lm_head, it beats its frozen random circuit)
    "deep64_affine_2pct": ("deep", dict(DESIGNS_MORE["deep64_affine"][1], chunk_size=192)),
    # the distributed ansatz at about 2 % and 10 %, and the deep circuit at about 10 % (the four-readout design's chunks)
    "dist2_affine_2pct": ("distributed", dict(DESIGNS_MORE["dist2_affine"][1], chunk_size=192, qnn_depth=8)),
    "dist2_affine_10pct": ("distributed", dict(DESIGNS_MORE["dist2_affine"][1], chunk_size=960, qnn_depth=8)),
    "deep64_affine_10pct": ("deep", dict(DESIGNS_MORE["deep64_affine"][1], chunk_size=960)),
}


def design_specs_all_linear() -> list[Spec]:
    from peft_qpa.generator.config import PROBABILITY_INPUTS

    out = []
    for name, (design, kw) in DESIGNS_AL.items():
        out.append(Spec(name, "qpa", _qpa(**kw), 4, kw, design=design))
        for suffix, (method, extra) in DESIGN_CONTROLS.items():
            source = kw.get("probability_input", "circuit")
            extra = dict(extra)
            if suffix == "classical" and source in TWINS:
                extra["probability_input"] = TWINS[source]  # keeps readout_settings or circuit_groups
            elif suffix == "classical" and source != "circuit":
                continue
            if extra.get("probability_input", "circuit") not in PROBABILITY_INPUTS:
                continue
            cfg = {**kw, **extra}
            if cfg.get("probability_input") == "constant":
                cfg.pop("readout_settings", None)
            out.append(Spec(f"{name}__{suffix}", method, _qpa(**cfg), 4, cfg, design=design))
    # The constant control at its own best lr (a check that it is not worse only for diverging at the full config's
    # lr; it can only make the control look better). Not one of the goals' controls, which share the full config's lr.
    for name in ("multi4_affine_5pct", "multi4_affine_10pct"):
        kw = {k: v for k, v in DESIGNS_AL[name][1].items() if k != "readout_settings"}
        cfg = {**kw, "probability_input": "constant"}
        out.append(Spec(f"{name}__const_own_lr", "qpa-ablation-const", _qpa(**cfg), 4, cfg, design="multi-feature"))
    return out


def peer_specs(smoke: bool = False) -> list[Spec]:
    """Classical peers at QPA's sizes in all_linear (<= 10 % of LoRA r = 4's parameters): VeRA on the top 4 of the 8
    adapted layers (VeRA's per-output scaling vectors alone are 12.7 % on all 8), FourierFT, VB-LoRA, LoRA r = 1 on
    the top 3 layers."""
    from peft import FourierFTConfig, LoraConfig, VBLoRAConfig, VeraConfig

    def top(c, k):  # the regime's target pattern, restricted to its top k layers
        layers = re.search(r"\(([\d|]+)\)", c.targets)
        kept = layers.group(1).split("|")[-k:]
        return c.targets.replace(layers.group(0), "(" + "|".join(kept) + ")", 1)

    return [
        Spec("vera_r256_top4", "vera", lambda c: VeraConfig(r=256, target_modules=top(c, 4), vera_dropout=0.0,
                                                            save_projection=False), 256, {"layers": "top 4"}),
        Spec("fourierft_n500", "fourierft", lambda c: FourierFTConfig(n_frequency=500 if not smoke else 64, target_modules=c.targets,
                                                                    scaling=150.0, init_weights=True), None, {"n_frequency": 500}),
        Spec("vblora_nv16", "vblora", lambda c: VBLoRAConfig(r=4, target_modules=c.targets, num_vectors=16,
                                                           vector_length=192 if not smoke else 4, topk=2, vblora_dropout=0.0),
             4, {"num_vectors": 16, "topk": 2}),
        Spec("lora_r1_top3", "lora", lambda c: LoraConfig(r=1, lora_alpha=2, target_modules=top(c, 3), lora_dropout=0.0), 1,
             {"layers": "top 3"}),
    ]


def _grid(regime, budget, grids: dict) -> list[Job]:
    return [Job(name, regime, budget, (0,), tuple(lrs)) for name, lrs in grids.items()]


def _seeds(regime, budget, names, seeds=(1, 2)) -> list[Job]:
    return [Job(n, regime, budget, seeds, None, n) for n in names]


def _reuse(regime, budget, names, lr_from, seeds=SEEDS) -> list[Job]:
    return [Job(n, regime, budget, seeds, None, lr_from) for n in names]


def _controls(regime, budget, designs, known) -> list[Job]:
    """Each design's controls of :data:`DESIGN_CONTROLS` that ``known`` (the regime's spec names) has, three seeds
    at the design's best seed-0 lr."""
    return [j for n in designs for j in _reuse(regime, budget, [f"{n}__{c}" for c in DESIGN_CONTROLS if f"{n}__{c}" in known], n)]


ABLATIONS_CORE = ("const", "frozen")
ABLATIONS_MORE = ("L1", "L2", "rx", "c1", "c1_gi", "c20", "c20_gi", "angle_lr10")

LM_GRID = {  # a fourth, lower rate where the seed-0 best of the first three sat at the grid's low edge
    "lora_r1": (1e-3, 3e-3, 1e-2, 3e-2),
    "lora_r4": (1e-3, 3e-3, 1e-2, 3e-2),
    "qpa_c256_L8": (1e-3, 3e-3, 1e-2, 3e-2),
    "qpa_c256_L8_std": (1e-3, 3e-3, 1e-2, 3e-2),
    "vblora_nv16": (3e-3, 1e-2, 3e-2),
    "fourierft_n12k": (1e-1, 3e-1, 1.0, 3.0, 10.0),
    "vera_r256": (1e-2, 3e-2, 1e-1),
}
LM_SIZES_GRID = {  # three rates around each design's best at its first size; the 2 % sizes first
    "multi4_affine_2pct": (1e-3, 3e-3, 1e-2),
    "dist2_affine_2pct": (3e-4, 1e-3, 3e-3),
    "deep64_affine_2pct": (1e-4, 3e-4, 1e-3),
    "mps4_5pct": (1e-3, 3e-3, 1e-2),
    "multi4_affine_10pct": (1e-3, 3e-3, 1e-2),
    "dist2_affine_10pct": (3e-4, 1e-3, 3e-3),
    "deep64_affine_10pct": (1e-4, 3e-4, 1e-3),
    "mps4_10pct": (1e-3, 3e-3, 1e-2),
}
AL_GRID = {
    "lora_r4": (1e-3, 3e-3, 1e-2, 3e-2),
    "qpa_5pct": (3e-3, 1e-2, 3e-2),
    "qpa_5pct_std": (3e-3, 1e-2, 3e-2),
}


AL_SIZES_GRID = {  # three rates around the design's best at 5 % (dist2: 1e-3, deep64: 3e-3, also its best at 2 %)
    "dist2_affine_2pct": (3e-4, 1e-3, 3e-3),
    "dist2_affine_10pct": (3e-4, 1e-3, 3e-3),
    "deep64_affine_10pct": (1e-3, 3e-3, 1e-2),
}


AL_PEER_GRID = {
    "lora_r1_top3": (3e-3, 1e-2, 3e-2),
    "vblora_nv16": (3e-3, 1e-2, 3e-2),
    "vera_r256_top4": (1e-2, 3e-2, 1e-1),
    "fourierft_n500": (1.0, 3.0, 10.0),
}


def plan(smoke: bool = False) -> dict[str, list[Job]]:
    lm, al, b = "lm_head", "all_linear", BASE_BUDGET
    lm_specs, al_specs = specs_for(lm, smoke), specs_for(al, smoke)  # once: each builds every spec of its regime
    groups = {
        "lm_head_grid": _grid(lm, b, LM_GRID),
        "lm_head_seeds": _seeds(lm, b, list(LM_GRID)),
        "lm_head_ablations": [j for base in ("qpa_c256_L8", "qpa_c256_L8_std")
                              for j in _reuse(lm, b, [f"{base}__{a}" for a in ABLATIONS_CORE], base)],
        "lm_head_ablations_more": _reuse(lm, b, [f"qpa_c256_L8_std__{a}" for a in ABLATIONS_MORE], "qpa_c256_L8_std", (0,)),
        "lm_head_ablations_more_seeds": _reuse(lm, b, [f"qpa_c256_L8_std__{a}" for a in ABLATIONS_MORE], "qpa_c256_L8_std", (1, 2)),
        "lm_head_family": _reuse(lm, b, ["dora_r4"], "lora_r4") + _reuse(lm, b, ["qpa_dora_c256_L8_std"], "qpa_c256_L8_std"),
        "lm_head_designs_grid": _grid(lm, b, {n: (1e-3, 3e-3, 1e-2, 3e-2) for n in DESIGNS}),
        "lm_head_designs_seeds": _seeds(lm, b, list(DESIGNS)),
        "lm_head_designs_more_grid": _grid(lm, b, {n: (1e-3, 3e-3, 1e-2, 3e-2) for n in DESIGNS_MORE}),
        "lm_head_designs_more_seeds": _seeds(lm, b, list(DESIGNS_MORE)),
        "lm_head_designs_more_controls": _controls(lm, b, ("mps4", "multi4_affine"), lm_specs),
        "lm_head_designs_more_low": _grid(lm, b, {"dist2_affine": (3e-4,), "deep64_affine": (3e-4,)}),  # 1e-3 was the edge
        "lm_head_designs_more_controls_2": _controls(lm, b, ("dist2_affine", "deep64_affine"), lm_specs),
        "lm_head_designs_controls": _controls(lm, b, ("pub_affine_shuffled", "pub_affine_none"), lm_specs),
        # the designs at their other sizes: grids of three centred on each design's best rate at its first size (all
        # grids first, so that an edge is widened before seeds and controls use the rate), then per design its
        # seeds and controls
        "lm_head_designs_sizes_grid": _grid(lm, b, LM_SIZES_GRID),
        "lm_head_designs_sizes_edges": _grid(lm, b, {"dist2_affine_2pct": (1e-2,), "multi4_affine_10pct": (3e-4,),
                                                     "dist2_affine_10pct": (1e-4,)}),
        "lm_head_designs_sizes": [j for n in LM_SIZES_GRID for j in _seeds(lm, b, [n]) + _controls(lm, b, (n,), lm_specs)],
        "lm_head_deep_low": _grid(lm, b, {"deep64_affine": (1e-4,)}),  # 3e-4 was the edge
        "lm_head_budget": [Job(n, lm, 4 * b, (0,), lrs) for n, lrs in
                           {"lora_r4": (1e-3, 3e-3, 1e-2, 3e-2), "qpa_c256_L8_std": (1e-3, 3e-3, 1e-2)}.items()],
        "all_linear_grid": _grid(al, b, AL_GRID),
        "all_linear_seeds": (_seeds(al, b, list(AL_GRID))
                             + _reuse(al, b, ["qpa_10pct_std", "qpa_10pct_wide_std", "qpa_2pct_std"], "qpa_5pct_std")
                             + _reuse(al, b, ["lora_r1", "lora_r2", "lora_r8"], "lora_r4")
                             + _reuse(al, b, ["qpa_5pct_r16_std"], "qpa_5pct_std")),
        "all_linear_ablations": [j for base in ("qpa_5pct_std",) for j in _reuse(al, b, [f"{base}__{a}" for a in ABLATIONS_CORE], base)],
        "all_linear_family": (_reuse(al, b, ["dora_r4"], "lora_r4", (0, 1)) + _reuse(al, b, ["qpa_dora_5pct_std"], "qpa_5pct_std", (0, 1))
                              + _reuse(al, b, ["bottleneck_b16"], "lora_r4", (0, 1))
                              + _reuse(al, b, ["qpa_bottleneck_b16"], "qpa_5pct_std", (0, 1))),
        "all_linear_family_seeds": (_reuse(al, b, ["dora_r4"], "lora_r4", (2,)) + _reuse(al, b, ["qpa_dora_5pct_std"], "qpa_5pct_std", (2,))
                                    + _reuse(al, b, ["bottleneck_b16"], "lora_r4", (2,))
                                    + _reuse(al, b, ["qpa_bottleneck_b16"], "qpa_5pct_std", (2,))),
        "all_linear_peers_grid": _grid(al, b, AL_PEER_GRID),
        "all_linear_designs_grid": _grid(al, b, {"multi4_affine_5pct": (1e-3, 3e-3, 1e-2, 3e-2),  # 1e-2 was the edge
                                                 "pub_affine_shuffled": (3e-4, 1e-3, 3e-3, 1e-2)}),  # 1e-3 was the edge
        "all_linear_designs_seeds": _seeds(al, b, ["multi4_affine_5pct", "pub_affine_shuffled"]),
        "all_linear_designs_controls": _controls(al, b, ("multi4_affine_5pct", "pub_affine_shuffled"), al_specs),
        "all_linear_peers_seeds": _seeds(al, b, list(AL_PEER_GRID)),
        "all_linear_const_own_lr": (_grid(al, b, {"multi4_affine_5pct__const_own_lr": (1e-3, 3e-3)})
                                    + _seeds(al, b, ["multi4_affine_5pct__const_own_lr"])),
        "all_linear_const_own_lr_10": (_grid(al, b, {"multi4_affine_10pct__const_own_lr": (1e-4, 3e-4, 1e-3, 3e-3)})
                                       + _seeds(al, b, ["multi4_affine_10pct__const_own_lr"])),
        "all_linear_designs_sizes": (_grid(al, b, {n: (1e-3, 3e-3, 1e-2) for n in ("mps4_5pct", "multi4_affine_2pct", "multi4_affine_10pct")})
                                     + _seeds(al, b, ["mps4_5pct", "multi4_affine_2pct", "multi4_affine_10pct"])),
        # grid edges of the sizes/peers grids (the peers' edges too: a peer left at its edge would flatter QPA)
        "all_linear_edges": _grid(al, b, {"mps4_5pct": (3e-2,), "multi4_affine_10pct": (3e-2,), "vera_r256_top4": (3e-1,),
                                          "fourierft_n500": (3e-1,), "vblora_nv16": (1e-1,)}),
        "all_linear_edges_seeds": _seeds(al, b, ["mps4_5pct", "multi4_affine_10pct", "vera_r256_top4", "fourierft_n500", "vblora_nv16"]),
        "all_linear_edges_2": (_grid(al, b, {"fourierft_n500": (1e-1,)}) + _seeds(al, b, ["fourierft_n500"])),  # 0.3 was the edge
        "all_linear_mps_sizes": (_grid(al, b, {n: (3e-3, 1e-2, 3e-2) for n in ("mps4_2pct", "mps4_10pct")})
                                 + _seeds(al, b, ["mps4_2pct", "mps4_10pct"])),
        "all_linear_mps10_controls": _reuse(al, b, ["mps4_10pct__const", "mps4_10pct__frozen"], "mps4_10pct"),
        "all_linear_mps_controls": _controls(al, b, ("mps4_5pct",), al_specs),
        "all_linear_sizes_controls": (_controls(al, b, ("multi4_affine_10pct", "multi4_affine_2pct", "mps4_2pct"), al_specs)
                                      + _reuse(al, b, ["mps4_10pct__classical"], "mps4_10pct")),
        "all_linear_pub_choices": (_grid(al, b, {n: (3e-4, 1e-3, 3e-3, 1e-2) for n in ("pub_affine_none", "pub_affine_bits", "pub_gelu_none")})
                                   + _grid(al, b, {"pub_affine_none": (3e-2,), "pub_gelu_none": (3e-2,)})  # 1e-2 was the edge
                                   + _seeds(al, b, ["pub_affine_none", "pub_affine_bits", "pub_gelu_none"])
                                   + _controls(al, b, ("pub_affine_none",), al_specs)),
        "all_linear_dist_deep": (_grid(al, b, {n: (3e-4, 1e-3, 3e-3, 1e-2) for n in ("dist2_affine_5pct", "deep64_affine_5pct")})
                                 + _seeds(al, b, ["dist2_affine_5pct", "deep64_affine_5pct"])
                                 + _controls(al, b, ("dist2_affine_5pct", "deep64_affine_5pct"), al_specs)),
        "all_linear_deep_2pct": (_grid(al, b, {"deep64_affine_2pct": (1e-3, 3e-3, 1e-2)}) + _seeds(al, b, ["deep64_affine_2pct"])
                                 + _controls(al, b, ("deep64_affine_2pct",), al_specs)),
        # the distributed and deep designs at their other sizes: all grids first (three rates around each design's best
        # at 5 %), then per design its seeds and controls
        "all_linear_dist_deep_sizes_grid": _grid(al, b, AL_SIZES_GRID),
        "all_linear_dist_deep_edges": _grid(al, b, {"dist2_affine_2pct": (1e-2,),  # 3e-3 was the edge
                                                    "dist2_affine_10pct": (1e-4, 3e-5)}),  # 3e-4 was the edge (3e-5 in case 1e-4 is one too)
        "all_linear_dist_deep_sizes": [j for n in AL_SIZES_GRID for j in _seeds(al, b, [n]) + _controls(al, b, (n,), al_specs)],
        # declared before they ran: at 3 seeds the depth-64 circuit at 2 % beat its frozen random circuit by only 1.8
        # pooled sd because that control's seeds spread 0.60; two more seeds of the design and of each control
        "all_linear_deep_2pct_more_seeds": _reuse(al, b, ["deep64_affine_2pct"] + [f"deep64_affine_2pct__{c}" for c in DESIGN_CONTROLS],
                                                  "deep64_affine_2pct", (3, 4)),
        # the distributed design's classical twin, built after its other controls had run: at each size in lm_head,
        # and at 5 % in all_linear (at 2 and 10 % it is one of all_linear_dist_deep_sizes' controls)
        "distributed_twins": ([j for n in ("dist2_affine", "dist2_affine_2pct", "dist2_affine_10pct")
                               for j in _reuse(lm, b, [f"{n}__classical"], n)]
                              + _reuse(al, b, ["dist2_affine_5pct__classical"], "dist2_affine_5pct")),
        # the last best rates at a grid's edge: the four-readout design at 2 % in all_linear (1e-2) and VeRA in lm_head
        # (1e-2; a peer left at its edge would flatter QPA)
        "edges_late": _grid(al, b, {"multi4_affine_2pct": (3e-2,)}) + _grid(lm, b, {"vera_r256": (3e-3,)}),
        "all_linear_more": (_reuse(al, b, ["qpa_published"], "qpa_5pct")
                            + _reuse(al, b, ["vblora_nv32"], "lora_r4")),
    }
    if smoke:
        groups = {
            "smoke": [Job("lora_r4", lm, 0, (0,), (1e-2,)), Job("qpa_c256_L8_std", lm, 0, (0,), (1e-2,)),
                      Job("qpa_c256_L8_std__const", lm, 0, (0, 1), None, "qpa_c256_L8_std"),
                      Job("lora_r4", al, 0, (0,), (1e-2,)), Job("qpa_5pct", al, 0, (0,), (1e-2,))],
        }
    return groups


# --------------------------------------------------------------------------------------------------------
# the cached trunk of either regime
# --------------------------------------------------------------------------------------------------------
class CachedInput(nn.Module):
    """Stands in for decoder layer 0 when layers ``0..T-1`` are frozen: returns the cached input of layer T for the
    current rows (the model's ``input_ids`` are stashed by a forward pre-hook on the decoder)."""

    def __init__(self, cache: HiddenStates):
        super().__init__()
        self.cache = cache
        self.current = None

    def forward(self, hidden_states, *args, **kwargs):
        ids, mask = self.current
        return self.cache.lookup(ids, mask).to(hidden_states.device, hidden_states.dtype)


class Skip(nn.Module):
    """A frozen decoder layer below the cached one: its output is already in the cache."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@dataclass
class Data:
    model: object
    source: str
    pool: list  # training blocks in the fixed data order; a budget uses a prefix
    eval_rows: list
    info: dict


def load_data(args) -> Data:
    loaded, train_texts, eval_texts, split = load_model_and_texts(args, split_seed=0)
    model, tok = loaded.model.to(args.device), loaded.tokenizer
    blocks = tokenize_and_group(tok, train_texts, args.block_size, max_tokens=None)
    order = list(range(len(blocks)))
    random.Random(DATA_SEED).shuffle(order)
    need = args.max_budget // (BATCH * args.block_size) * BATCH
    if len(order) < need:  # tiny texts (tests): cycle
        order = order * math.ceil(need / max(1, len(order)))
    pool = [blocks[i] for i in order[:need]]
    stream = tokenize_and_group(tok, eval_texts, 10**12, drop_last=False)[0]
    eval_rows = evenly_spaced_windows(stream, args.eval_block_size, args.eval_tokens)
    info = {**split, "train_blocks_available": len(blocks), "block_size": args.block_size, "batch_size": BATCH,
            "eval_windows": len(eval_rows), "eval_window_tokens": sum(len(r) for r in eval_rows), "data_seed": DATA_SEED}
    return Data(model, loaded.source, pool, eval_rows, info)


def _segment_states(model, source, rows, layer: int, cache_dir: Optional[Path], progress: bool) -> list[torch.Tensor]:
    """Hidden states of ``rows`` at decoder depth ``layer`` (``hidden_states[layer]``: the input of layer ``layer``;
    ``-1``: the final, normed output), from ``cache_dir`` if present."""
    h = hashlib.sha256(model_fingerprint(model, source).encode())
    h.update(f"layer={layer}".encode())
    for r in rows:
        h.update(len(r).to_bytes(4, "little"))
        h.update(_row_key(torch.tensor(r)))
    path = cache_dir / f"ev_{h.hexdigest()[:24]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    from tqdm.auto import tqdm

    trunk = model.model
    states = []
    with torch.no_grad():
        for j in tqdm(range(0, len(rows), 8), desc=f"trunk states (layer {layer})", disable=not progress):
            x = torch.tensor(rows[j : j + 8], device=model.device)
            out = trunk(input_ids=x, output_hidden_states=True)
            hs = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
            states += [s.float().cpu().clone() for s in hs]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(states, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    return states


def trunk_states(data: Data, layer: int, rows_needed: int, args) -> HiddenStates:
    """Cached states for the eval windows and the first ``rows_needed`` training blocks, in 320-block segments
    (a 40,960-token budget) so that larger budgets reuse the smaller ones' files."""
    cache_dir = None if args.hidden_cache == "none" else Path(args.hidden_cache)
    seg = 320
    rows, states = [], []
    parts = [data.eval_rows] + [data.pool[i : i + seg] for i in range(0, rows_needed, seg)]
    for part in parts:
        rows += part
        states += _segment_states(data.model, data.source, part, layer, cache_dir, not args.no_progress)
    return HiddenStates(rows, states)


class Regime:
    """A cheap model for one regime: frozen weights shared with the loaded model, the frozen part cached."""

    def __init__(self, name: str, data: Data, rows_needed: int, args):
        self.name, self.data, self.rows = name, data, rows_needed
        model = data.model
        n_layers = model.config.num_hidden_layers
        if name == "lm_head":
            self.first = n_layers
            self.states = trunk_states(data, -1, rows_needed, args)
            self.targets = ["lm_head"]
            self.mlp_targets = None
        else:
            k = min(args.top_layers, n_layers)
            self.first = n_layers - k
            self.states = trunk_states(data, self.first, rows_needed, args) if self.first > 0 else None
            top = "|".join(str(i) for i in range(self.first, n_layers))
            self.targets = rf"model\.layers\.({top})\.(self_attn|mlp)\.({'|'.join(PROJECTIONS)})"
            self.mlp_targets = rf"model\.layers\.({top})\.mlp"
        self.ctx = Ctx(name, self.targets, self.mlp_targets)

    def shell(self):
        """A copy of the model (parameters shared, not copied) with the cached part in place."""
        model = self.data.model
        memo = {id(p): p for p in model.parameters()}
        memo.update({id(b): b for b in model.buffers()})
        if self.name == "lm_head":
            cached = CachedTrunk(model.model.embed_tokens, self.states)
            memo[id(model.model)] = cached
            return copy.deepcopy(model, memo)
        shell = copy.deepcopy(model, memo)
        if self.first > 0:
            cached = CachedInput(self.states)
            shell.model.layers[0] = cached
            for i in range(1, self.first):
                shell.model.layers[i] = Skip()

            def stash(module, a, kw):
                ids = kw.get("input_ids", a[0] if a else None)
                cached.current = (ids, kw.get("attention_mask"))

            shell.model.register_forward_pre_hook(stash, with_kwargs=True)
        return shell

    def restore_real(self, shell):
        """Put the real frozen layers back (for the equivalence check); returns an undo function."""
        model = self.data.model
        if self.name == "lm_head":
            cached = shell.model
            shell.model = model.model
            return lambda: setattr(shell, "model", cached)
        saved = [shell.model.layers[i] for i in range(self.first)]
        for i in range(self.first):
            shell.model.layers[i] = model.model.layers[i]

        def undo():
            for i, m in enumerate(saved):
                shell.model.layers[i] = m
        return undo


# --------------------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------------------
def build(regime: Regime, spec: Spec, seed: int):
    from peft import get_peft_model

    torch.manual_seed(seed)
    config = spec.make(regime.ctx)
    if isinstance(config, peft_qpa.GeneratorConfig):  # the generator's seed follows the run's
        config = replace(config, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(regime.shell(), config)


def train_one(regime: Regime, spec: Spec, lr: float, seed: int, budget: int, args) -> tuple[dict, object]:
    block = args.block_size
    steps = max(1, budget // (BATCH * block)) if budget else args.smoke_steps
    rows = regime.data.pool[: steps * BATCH]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    t0 = time.perf_counter()
    pm = build(regime, spec, seed)
    named = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    angles = [p for n, p in named if n.endswith("angles")]
    others = [p for n, p in named if not n.endswith("angles")]
    groups = [{"params": others, "scale": 1.0}] + ([{"params": angles, "scale": spec.angle_lr_scale}] if angles else [])
    params = others + angles
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    warmup = max(1, round(steps * 5 / 80))
    losses = []
    pm.train()
    t1 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup, steps) * g["scale"]
        x = torch.tensor([rows[i] for i in order[step * BATCH : (step + 1) * BATCH]], device=args.device)
        loss = pm(input_ids=x, labels=x).loss
        if not torch.isfinite(loss):
            losses.append(float("nan"))
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    train_s = time.perf_counter() - t1
    pm.eval()
    finite = math.isfinite(losses[-1])
    ev = perplexity(pm, regime.data.eval_rows, batch_size=args.eval_batch_size, progress=False) if finite else None
    tail = losses[-10:]
    rec = {
        "kind": "run",
        "name": spec.name,
        "method": spec.method,
        "design": spec.design_name,
        "regime": regime.name,
        "r": spec.r,
        "budget_tokens": steps * BATCH * block,
        "seed": seed,
        "lr": lr,
        "trainable_params": sum(p.numel() for p in params),
        "eval_ppl": ev.perplexity if ev else float("nan"),
        "eval_nll": ev.nll if ev else float("nan"),
        "eval_tokens_scored": ev.n_tokens if ev else 0,
        "config": spec.info,
        **qpa_facts(pm),
        "steps": len(losses),
        "train_loss_first": losses[0],
        "train_loss_last10_mean": sum(tail) / len(tail),
        "wall_s": round(time.perf_counter() - t0, 1),
        "s_per_step": round(train_s / max(1, len(losses)), 3),
        "threads": torch.get_num_threads(),
        "device": str(args.device),
    }
    return rec, pm


def equivalence(regime: Regime, pm, args) -> dict:
    shell = pm.base_model.model
    x = torch.tensor(regime.data.pool[:BATCH], device=args.device)
    pm.eval()
    with torch.no_grad():
        loss_c = float(pm(input_ids=x, labels=x).loss)
        ppl_c = perplexity(pm, regime.data.eval_rows, batch_size=args.eval_batch_size, progress=False).perplexity
        undo = regime.restore_real(shell)
        try:
            loss_f = float(pm(input_ids=x, labels=x).loss)
            ppl_f = perplexity(pm, regime.data.eval_rows, batch_size=args.eval_batch_size, progress=False).perplexity
        finally:
            undo()
    out = {"kind": "equivalence", "regime": regime.name, "loss_cached": loss_c, "loss_full": loss_f, "ppl_cached": ppl_c,
           "ppl_full": ppl_f, "loss_rel_diff": abs(loss_c - loss_f) / abs(loss_f), "ppl_rel_diff": abs(ppl_c - ppl_f) / ppl_f,
           "rtol": EQUIVALENCE_RTOL}
    if not (out["loss_rel_diff"] <= EQUIVALENCE_RTOL and out["ppl_rel_diff"] <= EQUIVALENCE_RTOL):
        raise AssertionError(f"the {regime.name} cache differs from the real model: {out}")
    return out


# --------------------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------------------
def runs_dir(args) -> Path:
    return Path(args.runs_dir)


def read_records(directory: Path) -> list[dict]:
    out = []
    for f in sorted(Path(directory).glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def append(directory: Path, regime: str, rec: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"{regime}.jsonl", "a") as f:
        f.write(json.dumps(rec, default=float) + "\n")


def _key(regime, name, budget, lr, seed):
    return (regime, name, int(budget), float(f"{lr:.6g}"), int(seed))


def best_lr(records: list[dict], regime: str, name: str, budget: int) -> Optional[float]:
    grid = [r for r in records if r.get("kind") == "run" and r["regime"] == regime and r["name"] == name
            and r["budget_tokens"] == budget and r["seed"] == 0 and math.isfinite(r["eval_ppl"])]
    return min(grid, key=lambda r: r["eval_ppl"])["lr"] if grid else None


# --------------------------------------------------------------------------------------------------------
# run groups
# --------------------------------------------------------------------------------------------------------
def run_groups(args) -> None:
    groups = plan(args.smoke)
    unknown = [g for g in args.groups if g not in groups]
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; known: {list(groups)}")
    jobs = [j for g in args.groups for j in groups[g]]
    if args.only:
        jobs = [j for j in jobs if j.spec in args.only]
    directory = runs_dir(args)
    budgets = [j.budget or args.smoke_steps * BATCH * args.block_size for j in jobs]
    args.max_budget = max(budgets + [BATCH * args.block_size])
    data = load_data(args)
    regimes: dict[str, Regime] = {}
    checked = {r["regime"] for r in read_records(directory) if r.get("kind") == "equivalence"} if not args.smoke else set()
    for job in jobs:
        records = read_records(directory)
        done = {_key(r["regime"], r["name"], r["budget_tokens"], r["lr"], r["seed"]) for r in records if r.get("kind") == "run"}
        rows = (job.budget or args.smoke_steps * BATCH * args.block_size) // (BATCH * args.block_size) * BATCH
        if job.regime not in regimes or regimes[job.regime].rows < rows:  # larger budgets extend the cache when reached
            regimes[job.regime] = reg = Regime(job.regime, data, rows, args)
            if not any(r.get("kind") == "base" and r["regime"] == job.regime for r in records):
                base = perplexity(reg.shell(), data.eval_rows, batch_size=args.eval_batch_size, progress=False)
                append(directory, job.regime, {"kind": "base", "regime": job.regime, "eval_ppl": base.perplexity,
                                               "eval_nll": base.nll, "eval_tokens_scored": base.n_tokens,
                                               "adapted_layers_from": reg.first, "model": data.source, "data": data.info,
                                               "created": datetime.datetime.now().isoformat(timespec="seconds"),
                                               "git": _git_state(),
                                               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                           "torch": torch.__version__, "peft": __import__("peft").__version__,
                                                           "transformers": __import__("transformers").__version__}})
                print(f"[evidence] {job.regime}: base held-out ppl {base.perplexity:.4f}", flush=True)
        reg = regimes[job.regime]
        spec = specs_for(job.regime, args.smoke)[job.spec]
        budget = job.budget
        real_budget = (budget // (BATCH * args.block_size)) * BATCH * args.block_size if budget else args.smoke_steps * BATCH * args.block_size
        if job.lrs is not None:
            lrs = job.lrs
        else:
            lr = best_lr(records, job.regime, job.lr_from, real_budget)
            if lr is None:
                raise SystemExit(f"{job.spec}: no seed-0 grid of {job.lr_from!r} in {job.regime} at {real_budget} tokens yet; "
                                 f"run its grid group first")
            lrs = (lr,)
        for lr in lrs:
            for seed in job.seeds:
                if _key(job.regime, spec.name, real_budget, lr, seed) in done:
                    continue
                rec, pm = train_one(reg, spec, lr, seed, budget, args)
                append(directory, job.regime, rec)
                print(f"[evidence] {job.regime:<10} {spec.name:<28} lr={lr:<7g} seed={seed} tokens={rec['budget_tokens']:>7} "
                      f"params={rec['trainable_params']:>8} ppl={rec['eval_ppl']:.4f} {rec['wall_s']:.0f}s "
                      f"({rec['s_per_step']:.2f} s/step)", flush=True)
                if job.regime not in checked and math.isfinite(rec["eval_ppl"]):
                    eq = equivalence(reg, pm, args)
                    append(directory, job.regime, {**eq, "run": f"{spec.name} lr={lr:g} seed={seed}"})
                    print(f"[evidence] {job.regime} cache equivalence: {eq}", flush=True)
                    checked.add(job.regime)
                del pm


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------
def _stats(vals: list[float]) -> dict:
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (regime, config, budget): the lr used for the seeds (the seed-0 grid's best), mean ± std
    (sample std, n - 1) of the held-out perplexity over the seeds run at that lr, and the grid."""
    by: dict[tuple, list[dict]] = {}
    for r in runs:
        by.setdefault((r["regime"], r["name"], r["budget_tokens"]), []).append(r)
    out = []
    for (regime, name, budget), rs in sorted(by.items()):
        grid = sorted({r["lr"] for r in rs if r["seed"] == 0})
        seed0 = {r["lr"]: r["eval_ppl"] for r in rs if r["seed"] == 0}
        finite = {lr: p for lr, p in seed0.items() if math.isfinite(p)}
        lr = min(finite, key=finite.get) if finite else max(rs, key=lambda r: r["seed"])["lr"]
        at = [r for r in rs if r["lr"] == lr]
        st = _stats([r["eval_ppl"] for r in at])
        first = at[0]
        out.append({
            "regime": regime, "name": name, "method": first["method"],
            "design": first.get("design") or design_of(first["method"]), "r": first["r"], "budget_tokens": budget,
            "trainable_params": first["trainable_params"], "lr": lr, "lr_grid": {f"{k:g}": seed0[k] for k in grid},
            "lr_interior": (len(grid) >= 3 and grid[0] < lr < grid[-1]) if len(grid) >= 3 else None,
            "seeds": sorted(r["seed"] for r in at), "eval_ppl_per_seed": [r["eval_ppl"] for r in sorted(at, key=lambda r: r["seed"])],
            "eval_ppl_mean": st["mean"], "eval_ppl_std": st["std"], "n_seeds": st["n"],
            "config": first["config"], **{k: first[k] for k in ("n_qubits", "chunk_size", "qnn_depth", "num_generated") if k in first},
        })
    return out


def _find(rows, regime, name, budget=BASE_BUDGET):
    return next((r for r in rows if r["regime"] == regime and r["name"] == name and r["budget_tokens"] == budget), None)


def _pooled(a, b) -> float:
    """The seed spread two configs are compared against: the pooled std, or the other's std where one has one seed."""
    stds = [r["eval_ppl_std"] for r in (a, b) if r["n_seeds"] > 1]
    return math.sqrt(sum(s * s for s in stds) / len(stds)) if stds else 0.0


def goals(rows: list[dict], bb: int = BASE_BUDGET) -> dict:
    out = {}
    # Goal 1: all_linear, QPA within 1 % of LoRA r = 4 with <= 10 % of its parameters; no cheaper peer better by > 1 std.
    ref = _find(rows, "all_linear", "lora_r4", bb)
    if ref:
        cap = 0.10 * ref["trainable_params"]
        qpas = [r for r in rows if r["regime"] == "all_linear" and r["method"] == "qpa" and r["budget_tokens"] == bb
                and r["trainable_params"] <= cap and r["n_seeds"] >= 2]
        g = {"lora_r4_ppl_mean": ref["eval_ppl_mean"], "lora_r4_ppl_std": ref["eval_ppl_std"], "lora_r4_params": ref["trainable_params"],
             "param_cap_10pct": cap}
        if qpas:
            q = min(qpas, key=lambda r: r["eval_ppl_mean"])
            peers = [r for r in rows if r["regime"] == "all_linear" and not r["method"].startswith("qpa") and r["budget_tokens"] == bb
                     and r["trainable_params"] <= q["trainable_params"]
                     and r["eval_ppl_mean"] < q["eval_ppl_mean"] - max(q["eval_ppl_std"], r["eval_ppl_std"])]
            within = q["eval_ppl_mean"] <= 1.01 * ref["eval_ppl_mean"]
            g.update({"best_qpa": q["name"], "best_qpa_ppl_mean": q["eval_ppl_mean"], "best_qpa_ppl_std": q["eval_ppl_std"],
                      "best_qpa_params": q["trainable_params"], "best_qpa_param_ratio": q["trainable_params"] / ref["trainable_params"],
                      "rel_gap_to_lora_r4": q["eval_ppl_mean"] / ref["eval_ppl_mean"] - 1, "within_1pct": within,
                      "cheaper_peers_better_beyond_1std": [p["name"] for p in peers], "met": within and not peers})
        out["all_linear_within_1pct_of_lora_r4_at_10pct_params"] = g
    # Goal 2: the circuit matters: control (a) worse than the full config by more than 2 pooled seed stds.
    checks = {}
    for r in rows:
        if r["name"].endswith("__const"):
            full = _find(rows, r["regime"], r["name"][: -len("__const")], r["budget_tokens"])
            if full and full["n_seeds"] >= 2 and r["n_seeds"] >= 2:
                sd = _pooled(full, r)
                diff = r["eval_ppl_mean"] - full["eval_ppl_mean"]
                checks[f"{r['regime']}/{full['name']}"] = {
                    "full_ppl_mean": full["eval_ppl_mean"], "full_ppl_std": full["eval_ppl_std"],
                    "const_ppl_mean": r["eval_ppl_mean"], "const_ppl_std": r["eval_ppl_std"],
                    "difference": diff, "pooled_std": sd, "difference_in_pooled_std": diff / sd if sd > 0 else float("inf"),
                    "met": diff > 2 * sd}
    out["circuit_matters_const_control_worse_by_2std"] = checks
    out["quantum_circuit_matters"] = quantum_checks(rows, bb)
    return out


def quantum_checks(rows: list[dict], bb: int = BASE_BUDGET) -> dict:
    """Per design with all three controls at >= 2 seeds: "the circuit matters" (the constant control is worse than
    the full config by more than 2 pooled seed stds) and "the quantum circuit matters" (so are the frozen random
    circuit and the equal-size classical twin)."""
    out = {}
    for full in rows:
        if "__" in full["name"] or full["budget_tokens"] != bb or full["n_seeds"] < 2:
            continue
        controls = {c: _find(rows, full["regime"], f"{full['name']}__{c}", bb) for c in ("const", "frozen", "classical")}
        if not all(r is not None and r["n_seeds"] >= 2 for r in controls.values()):
            continue
        entry = {"design": full.get("design"), "full_ppl_mean": full["eval_ppl_mean"], "full_ppl_std": full["eval_ppl_std"]}
        for c, r in controls.items():
            sd, diff = _pooled(full, r), r["eval_ppl_mean"] - full["eval_ppl_mean"]
            entry[c] = {"ppl_mean": r["eval_ppl_mean"], "ppl_std": r["eval_ppl_std"], "difference": diff,
                        "difference_in_pooled_std": diff / sd if sd > 0 else float("inf"), "worse_by_2std": diff > 2 * sd}
        entry["circuit_matters"] = entry["const"]["worse_by_2std"]
        entry["quantum_circuit_matters"] = all(entry[c]["worse_by_2std"] for c in ("const", "frozen", "classical"))
        out[f"{full['regime']}/{full['name']}"] = entry
    return out


def budget_gaps(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["regime"] != "lm_head" or r["method"] != "qpa" or "__" in r["name"]:
            continue
        ref = _find(rows, "lm_head", "lora_r4", r["budget_tokens"])
        if ref:
            out.append({"name": r["name"], "budget_tokens": r["budget_tokens"], "qpa_ppl_mean": r["eval_ppl_mean"],
                        "lora_r4_ppl_mean": ref["eval_ppl_mean"], "rel_gap": r["eval_ppl_mean"] / ref["eval_ppl_mean"] - 1,
                        "n_seeds": min(r["n_seeds"], ref["n_seeds"])})
    return out


COLORS = {"lora": "tab:blue", "dora": "tab:cyan", "qpa": "tab:red", "qpa-dora": "tab:pink", "vera": "tab:green",
          "vblora": "tab:purple", "fourierft": "tab:orange", "bottleneck": "tab:olive", "qpa-bottleneck": "tab:brown",
          "qpa-ablation-const": "black", "qpa-ablation-frozen": "dimgray"}


def plot(report: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]
    bb = report["protocol"]["base_budget_tokens"]
    written = []
    for regime in ("lm_head", "all_linear"):
        pts = [r for r in rows if r["regime"] == regime and r["budget_tokens"] == bb and r["method"] in COLORS
               and math.isfinite(r["eval_ppl_mean"]) and not _pm(r).startswith("unstable")  # unstable configs: tables only
               and "__" not in r["name"]]  # ablations: their own plot
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(9, 6))
        for fam, color in COLORS.items():
            ps = [r for r in pts if r["method"] == fam]
            if not ps:
                continue
            ax.errorbar([r["trainable_params"] for r in ps], [r["eval_ppl_mean"] for r in ps], yerr=[r["eval_ppl_std"] for r in ps],
                        fmt="o", color=color, label=fam, capsize=3, ms=5)
            for r in ps:
                ax.annotate(r["name"], (r["trainable_params"], r["eval_ppl_mean"]), textcoords="offset points", xytext=(4, 3), fontsize=6)
        base = report["base"].get(regime)
        if base:
            ax.axhline(base["eval_ppl"], color="black", ls="--", lw=1, label=f"base model {base['eval_ppl']:.2f}")
        ref = _find(rows, regime, "lora_r4", bb)
        if ref:
            ax.axhline(ref["eval_ppl_mean"] * 1.01, color="tab:blue", ls=":", lw=1, label="LoRA r=4 mean + 1 %")
            if regime == "all_linear":
                ax.axvline(0.1 * ref["trainable_params"], color="tab:blue", ls="-.", lw=1, label="10 % of LoRA r=4's parameters")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("held-out perplexity (mean ± std over seeds)")
        ax.set_title(f"{regime}: {bb:,} training tokens, SmolLM2-135M-Instruct, Shakespeare held-out plays")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"evidence_{regime}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    gaps = report["budget_gaps"]
    if gaps:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in sorted({g["name"] for g in gaps}):
            gs = sorted((g for g in gaps if g["name"] == name), key=lambda g: g["budget_tokens"])
            ax.plot([g["budget_tokens"] for g in gs], [100 * g["rel_gap"] for g in gs], "o-", label=name)
        ax.axhline(1.0, color="gray", ls=":", lw=1, label="+1 %")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (log)")
        ax.set_ylabel("held-out ppl gap to LoRA r=4 (%)")
        ax.set_title("lm_head: QPA's gap to LoRA r = 4 against the training budget")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "evidence_budget.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    abl = [r for r in rows if "__" in r["name"] and r["budget_tokens"] == bb]
    if abl:
        bases = sorted({(r["regime"], r["name"].split("__")[0]) for r in abl})
        fig, axes = plt.subplots(1, len(bases), figsize=(5.5 * len(bases), 4.5), squeeze=False)
        for ax, (regime, base) in zip(axes[0], bases):
            full = _find(rows, regime, base, bb)
            items = ([full] if full else []) + sorted((r for r in abl if r["regime"] == regime and r["name"].startswith(base + "__")),
                                                      key=lambda r: r["name"])
            ax.bar(range(len(items)), [r["eval_ppl_mean"] for r in items], yerr=[r["eval_ppl_std"] for r in items], capsize=3,
                   color=["tab:red"] + ["tab:gray"] * (len(items) - 1) if full else "tab:gray")
            ax.set_xticks(range(len(items)))
            ax.set_xticklabels(["full" if r is full else r["name"].split("__")[1] for r in items], rotation=45, ha="right", fontsize=8)
            vals = [r["eval_ppl_mean"] for r in items]
            ax.set_ylim(min(vals) - 0.5, max(vals) + 0.5)
            ax.set_title(f"{regime}: {base}", fontsize=9)
            ax.set_ylabel("held-out ppl (mean ± std)")
        fig.tight_layout()
        path = out_dir / "evidence_ablations.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written


def report(args) -> dict:
    records = read_records(runs_dir(args))
    runs = [r for r in records if r.get("kind") == "run"]
    rows = summarize(runs)
    budgets = sorted({r["budget_tokens"] for r in runs})
    bb = BASE_BUDGET if BASE_BUDGET in budgets or not budgets else budgets[0]
    base = {}
    for r in records:
        if r.get("kind") == "base":
            base[r["regime"]] = {k: r[k] for k in ("eval_ppl", "eval_nll", "eval_tokens_scored", "adapted_layers_from")}
    meta = next((r for r in records if r.get("kind") == "base"), {})
    out = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/evidence.py report",
        "model": meta.get("model"),
        "data": meta.get("data"),
        "machine": meta.get("machine"),
        "git": _git_state(),
        "protocol": {"batch_size": BATCH, "seeds": list(SEEDS), "base_budget_tokens": bb,
                     "lr_selection": "each config's lr grid runs at seed 0; seeds 1 and 2 run at the grid's best lr",
                     "std": "sample standard deviation over seeds (n - 1)"},
        "base": base,
        "equivalence": [r for r in records if r.get("kind") == "equivalence"],
        "runs": runs,
        "summary": rows,
        "budget_gaps": budget_gaps(rows),
        "goals": goals(rows, bb),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    out["plots"] = [Path(p).name for p in plot(out, output.parent)]  # beside the JSON: no machine's absolute path
    output.write_text(json.dumps(out, indent=1, default=float))
    print(f"[evidence] wrote {output} ({len(runs)} runs) and {out['plots']}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------------
# markdown tables for docs/quality.md (rendered from evidence.json, never typed by hand)
# --------------------------------------------------------------------------------------------------------
def _pm(r) -> str:
    if not math.isfinite(r["eval_ppl_mean"]):
        return "diverged"
    per = [p for p in r.get("eval_ppl_per_seed", []) if math.isfinite(p)]
    if per and max(per) > 1.5 * min(per):  # a seed blew up: the mean and std would hide which
        return "unstable, per seed: " + " / ".join(f"{p:,.2f}" for p in r["eval_ppl_per_seed"])
    return f"{r['eval_ppl_mean']:.2f} ± {r['eval_ppl_std']:.2f}" if r["n_seeds"] > 1 else f"{r['eval_ppl_mean']:.2f} (1 seed)"


def _grid_text(r) -> str:
    return " / ".join(f"{k}: {v:.2f}" if math.isfinite(v) else f"{k}: nan" for k, v in r["lr_grid"].items()) or "—"


def tables(report: dict) -> str:
    rows = report["summary"]
    bb = report["protocol"]["base_budget_tokens"]
    out = []
    for regime in ("lm_head", "all_linear"):
        rs = [r for r in rows if r["regime"] == regime and r["budget_tokens"] == bb and "__" not in r["name"]]
        if not rs:
            continue
        ref = _find(rows, regime, "lora_r4", bb)
        base = report["base"].get(regime, {}).get("eval_ppl", float("nan"))
        out += [f"#### {regime}: {bb:,} training tokens (base model {base:.2f})", "",
                "| config | method | design | r | trainable params | % of LoRA r=4 | lr grid at seed 0 (held-out ppl) | lr | seeds | held-out ppl, mean ± std |",
                "|---|---|---|---|---:|---:|---|---|---|---|"]
        for r in sorted(rs, key=lambda r: (r["trainable_params"], r["name"])):
            pct = f"{100 * r['trainable_params'] / ref['trainable_params']:.1f} %" if ref else ""
            out.append(f"| {r['name']} | {r['method']} | {r.get('design') or design_of(r['method'])} | "
                       f"{r['r'] if r['r'] is not None else ''} | {r['trainable_params']:,} | {pct} | "
                       f"{_grid_text(r)} | {r['lr']:g}{' (edge)' if r['lr_interior'] is False else ''} | {len(r['seeds'])} | {_pm(r)} |")
        out.append("")
    abl = [r for r in rows if "__" in r["name"] and r["budget_tokens"] == bb]
    if abl:
        out += ["#### Ablations (each at its full config's lr)", "",
                "| regime | full config | variant | method | seeds | held-out ppl, mean ± std | full config | difference / seed spread |",
                "|---|---|---|---|---|---|---|---|"]
        for r in sorted(abl, key=lambda r: (r["regime"], r["name"])):
            base, variant = r["name"].split("__")
            full = _find(rows, r["regime"], base, bb)
            if full is None:
                continue
            sd = _pooled(full, r)
            d = r["eval_ppl_mean"] - full["eval_ppl_mean"]
            z = f"{d:+.2f} / {sd:.2f} = {d / sd:+.1f}" if sd > 0 and math.isfinite(d) else f"{d:+.2f}"
            out.append(f"| {r['regime']} | {base} | {variant} | {r['method']} | {len(r['seeds'])} | {_pm(r)} | {_pm(full)} | {z} |")
        out.append("")
    quantum = (report.get("goals") or {}).get("quantum_circuit_matters") or {}
    if quantum:
        out += ["#### Does the circuit matter? Each design against its three controls", "",
                "| regime / config | design | full config | constant | frozen circuit | classical twin | circuit matters | quantum circuit matters |",
                "|---|---|---|---|---|---|---|---|"]
        for key, e in sorted(quantum.items()):
            cells = [f"{e[c]['ppl_mean']:.2f} ± {e[c]['ppl_std']:.2f} ({e[c]['difference_in_pooled_std']:+.1f} sd)"
                     for c in ("const", "frozen", "classical")]
            out.append(f"| {key} | {e['design']} | {e['full_ppl_mean']:.2f} ± {e['full_ppl_std']:.2f} | " + " | ".join(cells)
                       + f" | {'yes' if e['circuit_matters'] else 'no'} | {'yes' if e['quantum_circuit_matters'] else 'no'} |")
        out.append("")
    gaps = report.get("budget_gaps") or []
    if gaps:
        out += ["#### Budget (lm_head)", "", "| config | training tokens | seeds | QPA ppl | LoRA r=4 ppl | gap |", "|---|---:|---|---:|---:|---:|"]
        for g in sorted(gaps, key=lambda g: (g["name"], g["budget_tokens"])):
            out.append(f"| {g['name']} | {g['budget_tokens']:,} | {g['n_seeds']} | {g['qpa_ppl_mean']:.2f} | {g['lora_r4_ppl_mean']:.2f} | "
                       f"{100 * g['rel_gap']:+.2f} % |")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "report", "tables", "list"))
    p.add_argument("groups", nargs="*", help="groups to run (see `list`)")
    p.add_argument("--only", nargs="+", default=None, help="run only these config names from the groups")
    p.add_argument("--smoke", action="store_true", help="tiny run for CI: group 'smoke' only")
    p.add_argument("--smoke-steps", type=int, default=3)
    p.add_argument("--top-layers", type=int, default=8, help="all_linear: adapted decoder layers, counted from the top")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-block-size", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    p.add_argument("--output", type=Path, default=RESULTS / "evidence.json")
    p.add_argument("--model", default=None)
    p.add_argument("--train-file", default=None)
    p.add_argument("--eval-file", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--hidden-cache", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:1, ... (the trunk cache stays on the CPU)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.hidden_cache is None:
        from peft_qpa.apps.assets import cache_dir

        args.hidden_cache = str(cache_dir(args.cache_dir) / "hidden_states")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.command == "list":
        for g, jobs in plan(args.smoke).items():
            print(g)
            for j in jobs:
                print(f"   {j.regime:<10} {j.spec:<30} tokens={j.budget} seeds={j.seeds} lr={j.lrs or 'best of ' + str(j.lr_from)}")
        return None
    if args.command == "run":
        if not args.groups:
            raise SystemExit("name the groups to run (see `python benchmarks/evidence.py list`)")
        run_groups(args)
        return None
    if args.command == "tables":
        text = tables(json.loads(Path(args.output).read_text()))
        print(text)
        return text
    return report(args)


if __name__ == "__main__":
    main()
