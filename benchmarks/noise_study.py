"""Noise study: QPA trained under the noise models of offline fake IBM devices, with and without generative
interpolation (GI) and readout-error mitigation, against the ideal statevector and shots alone.

The harness of ``benchmarks/evidence.py`` (imported, not copied: the same model, data, budget, optimiser, cached
trunk and records) in its ``lm_head`` regime, at ``BASE_BUDGET`` training tokens (80 steps of 4 x 128 tokens), for two
designs at lm_head's main settings (chunk 256, depth 8: N = 10 qubits on SmolLM2-135M's ``lm_head``):
``pub_affine_shuffled`` (the QPA authors' configuration) and ``multi4_affine`` (four readout settings). Each design
trains at the best seed-0 learning rate recorded for it in ``benchmarks/results/evidence_runs/lm_head.jsonl``.

Conditions (each at seeds 0, 1, 2):

* ``ideal``: the exact statevector (``backend='statevector'``);
* ``shots`` / ``shots_gi``: ``backend='aer_shots'``, ``shots_per_state=20`` (the QPA paper's c), straight-through
  gradient (``shot_gradient='exact'``), no noise, without / with GI;
* ``<device>`` / ``<device>_gi``: the same shots under the device's noise model (gate errors, thermal relaxation,
  readout error, on the qubits the transpiled circuit uses), without / with GI;
* ``<device>_mit`` / ``<device>_mit_gi``: the same with ``readout_mitigation=True``.

The QPA paper is Liu et al., "A Quantum Circuit-Based Compression Perspective for Parameter-Efficient Learning",
ICLR 2025, arXiv:2410.09846.

Devices (:data:`DEVICES`): four with >= 10 qubits and clearly different median two-qubit gate errors; ``devices``
prints each one's median two-qubit (ECR/CZ/CX) error and median readout error from its ``Target``, and every run
records them, with the errors of the gates and qubits its transpiled circuit actually uses.

The run order is a priority order (``list`` prints it): the published design first (seed 0: ideal, shots, every
device without and with GI; then seeds 1 and 2; then readout mitigation), then ``multi4_affine`` in the same order.
``--only`` keeps the runs whose name, design, condition or device is listed; ``--max-runs`` stops after that many new
runs. Runs already recorded are skipped, so an interrupted invocation resumes.

Commands:

    python benchmarks/noise_study.py devices                 # the devices and their error rates
    python benchmarks/noise_study.py list                    # the runs, in priority order, and which are done
    python benchmarks/noise_study.py time                    # a few steps per condition: seconds per step, per run
    python benchmarks/noise_study.py run [--max-runs K] [--only NAME ...]
    python benchmarks/noise_study.py report                  # benchmarks/results/noise_study.json and .png
    python benchmarks/noise_study.py sampler                 # a few steps through the sampler backend on a fake device

``--smoke`` runs a tiny version (CI: tests/test_noise_study_bench.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peft_qpa  # noqa: E402
from evidence import (  # noqa: E402  (the shared harness)
    BASE_BUDGET,
    BATCH,
    RESULTS,
    SEEDS,
    Regime,
    Spec,
    _qpa,
    _stats,
    append,
    best_lr,
    build,
    load_data,
    read_records,
    specs_for,
    train_one,
)
from evidence import RUNS_DIR as EVIDENCE_RUNS_DIR  # noqa: E402
from peft_qpa.apps.evaluation import perplexity  # noqa: E402
from quality import _git_state  # noqa: E402

REGIME = "lm_head"
RUNS_DIR = RESULTS / "noise_study_runs"
SHOTS_PER_STATE = 20  # the QPA paper's c
STUDY_DESIGNS = ("pub_affine_shuffled", "multi4_affine")
# >= 10 qubits, median two-qubit error from low to high (qiskit-ibm-runtime 0.51's calibration snapshots):
# Heron (CZ), Eagle (ECR), a noisier Eagle (ECR), Hummingbird-era (CX).
DEVICES = ("fake_marrakesh", "fake_kyiv", "fake_cusco", "fake_rochester")
SMOKE_DEVICES = ("fake_perth",)
TWO_QUBIT_GATES = ("ecr", "cz", "cx")
FALLBACK_LR = 1e-2  # --smoke only: the tiny model has no recorded lr


# --------------------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------------------
def _median(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(values) if values else float("nan")


def device_errors(name: str) -> dict:
    """Median two-qubit (ECR/CZ/CX) gate error and median readout error over the whole device, from its Target."""
    from peft_qpa.generator.noise import load_fake_backend

    backend = load_fake_backend(name)
    target = backend.target
    gates = [g for g in TWO_QUBIT_GATES if g in target.operation_names]
    two = [p.error for g in gates for qargs, p in target[g].items() if qargs and p is not None and p.error is not None]
    readout = [p.error for qargs, p in target["measure"].items() if qargs and p is not None and p.error is not None]
    return {"device": name, "num_qubits": backend.num_qubits, "two_qubit_gates": gates,
            "median_2q_error": _median(two), "median_readout_error": _median(readout),
            "fraction_2q_error_ge_1": sum(e >= 1 for e in two) / max(1, len(two)), "n_couplers": len(two)}


def layout_errors(pm) -> dict:
    """The errors the trained circuit met: median over the two-qubit gates of its transpiled circuit and over the
    readout of the qubits it measures (the transpiler picks good qubits, so these are lower than the device's)."""
    from peft_qpa.generator.backends.aer import AerProbabilities
    from peft_qpa.generator.noise import load_fake_backend

    modules = [m for m in pm.modules() if isinstance(m, AerProbabilities) and isinstance(m.noise_model_spec, str)]
    if not modules:
        return {}
    m = modules[0]
    target = load_fake_backend(m.noise_model_spec).target
    circuit = m.executed_circuit
    two = []
    for inst in circuit.data:
        if inst.operation.name in TWO_QUBIT_GATES:
            qargs = tuple(circuit.find_bit(q).index for q in inst.qubits)
            two.append(target[inst.operation.name][qargs].error)
    readout = [target["measure"][(q,)].error for q in m.physical_qubits]
    return {"layout_median_2q_error": _median(two), "layout_median_readout_error": _median(readout),
            "physical_qubits": list(m.physical_qubits), "transpiled_depth": circuit.depth(),
            "transpiled_ops": {k: int(v) for k, v in circuit.count_ops().items()}}


# --------------------------------------------------------------------------------------------------------
# conditions and the plan
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    name: str
    device: Optional[str] = None
    shots: bool = True
    gi: bool = False
    mitigation: bool = False

    def fields(self) -> dict:
        if not self.shots:
            return {}
        out = dict(backend="aer_shots", shots_per_state=SHOTS_PER_STATE, shot_gradient="exact",
                   generative_interpolation=self.gi)
        if self.device:
            out["noise_model"] = self.device
        if self.mitigation:
            out["readout_mitigation"] = True
        return out


def conditions(devices) -> dict[str, Condition]:
    out = {"ideal": Condition("ideal", shots=False), "shots": Condition("shots"), "shots_gi": Condition("shots_gi", gi=True)}
    for d in devices:
        for gi in (False, True):
            for mit in (False, True):
                name = d + ("_mit" if mit else "") + ("_gi" if gi else "")
                out[name] = Condition(name, d, gi=gi, mitigation=mit)
    return out


@dataclass(frozen=True)
class Job:
    design: str
    condition: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.design}__{self.condition}"


def plan(designs, devices, seeds) -> list[Job]:
    """Every run, in priority order: per design (the published one first), seed 0 of the references and of every
    device without and with GI; then the other seeds of those; then readout mitigation (without, then with GI)."""
    jobs = []
    seeds = list(seeds)
    first, rest = seeds[:1], seeds[1:]
    for design in designs:
        base = ["ideal", "shots", "shots_gi"] + [d + s for d in devices for s in ("", "_gi")]
        mitigated = [d + s for s in ("_mit", "_mit_gi") for d in devices]
        jobs += [Job(design, c, s) for s in first for c in base]
        jobs += [Job(design, c, s) for s in rest for c in base]
        jobs += [Job(design, c, s) for s in seeds for c in mitigated]
    return jobs


def spec_for(design: str, cond: Condition, smoke: bool) -> Spec:
    """The design's evidence spec (lm_head's main settings) with the condition's backend fields."""
    base = specs_for(REGIME, smoke)[design]
    cfg = {**base.info, **cond.fields()}
    return Spec(f"{design}__{cond.name}", "qpa-noise", _qpa(**cfg), base.r, cfg, design=base.design_name)


def _select(jobs: list[Job], only, conds: dict[str, Condition]) -> list[Job]:
    """The jobs whose name, design, condition or device is in ``only`` (all of them without ``only``)."""
    if not only:
        return jobs
    keep = set(only)
    return [j for j in jobs if keep & {j.name, j.design, j.condition, conds[j.condition].device}]


def _lr_for(design: str, args) -> float:
    if args.lr is not None:
        return args.lr
    lr = best_lr(read_records(Path(args.evidence_runs)), REGIME, design, BASE_BUDGET)
    if lr is None:
        if args.smoke:
            return FALLBACK_LR
        raise SystemExit(f"{design}: no seed-0 lr grid recorded in {args.evidence_runs} for {REGIME} at {BASE_BUDGET} tokens; "
                         "run `python benchmarks/evidence.py run lm_head_designs_grid lm_head_designs_more_grid` first, or pass --lr")
    return lr


def _budget(args) -> int:
    return 0 if args.smoke else BASE_BUDGET  # 0: evidence.train_one runs --smoke-steps steps


def _real_budget(args) -> int:
    return args.smoke_steps * BATCH * args.block_size if args.smoke else (BASE_BUDGET // (BATCH * args.block_size)) * BATCH * args.block_size


def _key(design, condition, seed, lr, budget):
    return (design, condition, int(seed), float(f"{lr:.6g}"), int(budget))


def _done(records) -> set:
    return {_key(r["design"], r["condition"], r["seed"], r["lr"], r["budget_tokens"]) for r in records if r.get("kind") == "run"}


# --------------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------------
class Session:
    """The data and the cached regime, loaded once per invocation; device facts, computed once per device."""

    def __init__(self, args, steps: int):
        args.max_budget = max(steps, 1) * BATCH * args.block_size
        self.args = args
        self.data = load_data(args)
        self.regime = Regime(REGIME, self.data, max(steps, 1) * BATCH, args)
        self._devices: dict[str, dict] = {}

    def device(self, name: Optional[str]) -> dict:
        if name is None:
            return {"median_2q_error": None, "median_readout_error": None}
        if name not in self._devices:
            self._devices[name] = device_errors(name)
        return self._devices[name]

    def base_record(self, directory: Path) -> None:
        if any(r.get("kind") == "base" for r in read_records(directory)):
            return
        base = perplexity(self.regime.shell(), self.data.eval_rows, batch_size=self.args.eval_batch_size, progress=False)
        append(directory, REGIME, {"kind": "base", "regime": REGIME, "eval_ppl": base.perplexity, "eval_nll": base.nll,
                                   "model": self.data.source, "data": self.data.info, "git": _git_state(),
                                   "created": datetime.datetime.now().isoformat(timespec="seconds"),
                                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}})

    def train(self, job: Job, cond: Condition, lr: float, budget: int) -> tuple[dict, object]:
        spec = spec_for(job.design, cond, self.args.smoke)
        rec, pm = train_one(self.regime, spec, lr, job.seed, budget, self.args)
        dev = self.device(cond.device)
        if "device" in rec:  # evidence's compute device (cpu, cuda): "device" here is the noise model's
            rec["compute_device"] = rec.pop("device")
        rec.update({"study": "noise", "design": job.design, "design_family": spec.design_name, "condition": cond.name,
                    "device": cond.device, "backend": "statevector" if not cond.shots else "aer_shots",
                    "shots_per_state": SHOTS_PER_STATE if cond.shots else None, "gi": cond.gi, "mitigation": cond.mitigation,
                    "median_2q_error": dev["median_2q_error"], "median_readout_error": dev["median_readout_error"],
                    **layout_errors(pm)})
        return rec, pm


def run(args) -> list[dict]:
    devices = args.devices or (SMOKE_DEVICES if args.smoke else DEVICES)
    conds = conditions(devices)
    jobs = _select(plan(args.designs, devices, args.seeds), args.only, conds)
    directory = Path(args.runs_dir)
    budget, real = _budget(args), _real_budget(args)
    lrs = {d: _lr_for(d, args) for d in {j.design for j in jobs}}
    done = _done(read_records(directory))
    todo = [j for j in jobs if _key(j.design, j.condition, j.seed, lrs[j.design], real) not in done]
    print(f"[noise] {len(jobs)} runs selected, {len(jobs) - len(todo)} already recorded", end="", flush=True)
    if args.max_runs is not None:
        todo = todo[: args.max_runs]
    print(f"; running {len(todo)}", flush=True)
    if not todo:
        return []
    session = Session(args, real // (BATCH * args.block_size))
    session.base_record(directory)
    out = []
    for job in todo:
        if _key(job.design, job.condition, job.seed, lrs[job.design], real) in _done(read_records(directory)):
            continue  # recorded meanwhile (another invocation)
        rec, pm = session.train(job, conds[job.condition], lrs[job.design], budget)
        append(directory, REGIME, rec)
        out.append(rec)
        print(f"[noise] {job.name:<40} seed={job.seed} lr={rec['lr']:g} ppl={rec['eval_ppl']:.4f} {rec['wall_s']:.0f}s "
              f"({rec['s_per_step']:.2f} s/step)", flush=True)
        del pm
    return out


# --------------------------------------------------------------------------------------------------------
# timing: a few steps per condition, extrapolated to a full run
# --------------------------------------------------------------------------------------------------------
def time_runs(args) -> list[dict]:
    """Trains ``--time-steps`` steps per (design, condition) at seed 0 (evidence.train_one with its short budget,
    evaluation included) and extrapolates: full run = (wall - steps x s/step) + full steps x s/step."""
    devices = args.devices or (SMOKE_DEVICES if args.smoke else DEVICES)
    conds = conditions(devices)
    names = ["ideal", "shots", "shots_gi"] + [d + s for d in devices for s in ("", "_gi", "_mit")]
    jobs = _select([Job(d, c, 0) for d in args.designs for c in names], args.only, conds)
    full_steps = BASE_BUDGET // (BATCH * args.block_size)
    args.smoke_steps = args.time_steps  # evidence.train_one with budget 0 trains smoke_steps steps
    session = Session(args, args.time_steps)
    out = []
    for job in jobs:
        rec, pm = session.train(job, conds[job.condition], _lr_for(job.design, args), 0)
        overhead = rec["wall_s"] - rec["s_per_step"] * rec["steps"]
        row = {"kind": "timing", "design": job.design, "condition": job.condition, "device": conds[job.condition].device,
               "steps_timed": rec["steps"], "s_per_step": rec["s_per_step"], "overhead_s": round(overhead, 1),
               "full_steps": full_steps, "estimated_run_s": round(overhead + full_steps * rec["s_per_step"], 1),
               "n_qubits": rec.get("n_qubits"), "threads": rec["threads"], "aer_threads": 1,
               "created": datetime.datetime.now().isoformat(timespec="seconds"), "machine_load": os.getloadavg()[0]}
        out.append(row)
        append(Path(args.runs_dir), "timing", row)
        print(f"[noise] time {job.name:<40} {row['s_per_step']:.2f} s/step -> one full run ~{row['estimated_run_s'] / 60:.1f} min "
              f"(load {row['machine_load']:.1f})", flush=True)
        del pm
    return out


# --------------------------------------------------------------------------------------------------------
# the sampler backend on a fake device (qiskit_ibm_runtime SamplerV2, local mode)
# --------------------------------------------------------------------------------------------------------
def sampler_check(args) -> dict:
    """A few training steps through ``backend='sampler'`` on a fake device at a small N, the measured wall time per
    step beside the package's cost estimate. Needs the sampler backend (``peft_qpa.use_sampler``,
    ``peft_qpa.estimate_cost``)."""
    missing = [name for name in ("use_sampler", "estimate_cost") if not hasattr(peft_qpa, name)]
    if missing:
        raise SystemExit(f"this peft_qpa has no {', '.join(missing)}: the sampler backend is not installed here")
    from qiskit_ibm_runtime import SamplerV2

    from peft_qpa.generator.noise import load_fake_backend

    device = args.sampler_device
    backend = load_fake_backend(device)
    session = Session(args, args.sampler_steps)
    model = session.data.model
    m = 4 * (model.lm_head.in_features + model.lm_head.out_features)  # LoRA r = 4 on lm_head
    chunk = math.ceil(m / 2**args.sampler_qubits)
    design = args.designs[0]
    base = specs_for(REGIME, args.smoke)[design]
    cfg = {**base.info, "chunk_size": chunk, "backend": "sampler", "shots_per_state": SHOTS_PER_STATE, "shot_gradient": "exact",
           **({"readout_mitigation": True} if args.sampler_mitigation else {})}
    spec = Spec(f"{design}__sampler_{device}", "qpa-noise", _qpa(**cfg), base.r, cfg, design=base.design_name)
    pm = build(session.regime, spec, 0)
    with warnings.catch_warnings():  # qiskit-ibm-runtime 0.50+ deprecates SamplerV2 for a client-side Sampler
        warnings.simplefilter("ignore", DeprecationWarning)
        sampler = SamplerV2(mode=backend)
    peft_qpa.use_sampler(pm, sampler)
    estimate = peft_qpa.estimate_cost(pm, steps=args.sampler_steps)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=_lr_for(design, args))
    rows = session.data.pool
    times = []
    pm.train()
    for step in range(args.sampler_steps):
        x = torch.tensor(rows[step * BATCH:(step + 1) * BATCH])
        t = time.perf_counter()
        loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    generator = pm.base_model.get_generator()
    out = {"kind": "sampler", "design": design, "device": device, "n_qubits": generator.n_qubits, "chunk_size": chunk,
           "shots_per_state": SHOTS_PER_STATE, "steps": len(times), "wall_s_per_step": times,
           "wall_s_per_step_median": statistics.median(times), "estimate": _jsonable(estimate),
           "created": datetime.datetime.now().isoformat(timespec="seconds")}
    append(Path(args.runs_dir), "sampler", out)
    print(f"[noise] sampler on {device} (local mode: Aer with the device's noise model): N = {out['n_qubits']}, "
          f"{out['wall_s_per_step_median']:.2f} s of wall time per training step measured; the package's estimate for the "
          f"device itself: {estimate.device_seconds_per_step:.3g} s of device time per step ({estimate.method})", flush=True)
    return out


def _jsonable(value):
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    elif hasattr(value, "__dataclass_fields__"):
        import dataclasses

        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=lambda v: v if isinstance(v, (int, float)) else str(v)))


def mitigation_check(args, devices) -> dict:
    """What readout mitigation does to one step's shot probabilities and to the features the mapping sees.

    One readout circuit of the study's shape (N = ``--mitigation-qubits``, depth 8, angles drawn uniformly with seed
    0), ``shots_per_state`` 20, on each device without and with ``readout_mitigation``, at two shot seeds (steps 0
    and 1): the fraction of states at exactly zero, the total-variation distance to the ideal distribution and
    between the two steps, and the published post-processing's feature spread over the states and its change from
    step to step (root mean square)."""
    from peft_qpa.generator.backends.aer import AerProbabilities
    from peft_qpa.generator.circuit import build_ansatz, readout_circuit
    from peft_qpa.generator.features import PostProcessing
    from peft_qpa.generator.noise import load_fake_backend

    n, depth = args.mitigation_qubits, 8
    circuit = readout_circuit(build_ansatz(n, depth))
    angles = (torch.rand(circuit.num_parameters, generator=torch.Generator().manual_seed(0)) * 2 * math.pi).double()
    post = PostProcessing()
    with torch.no_grad():
        ideal = AerProbabilities(circuit, backend="aer_statevector", shots=None, shot_gradient="exact", noise_model=None,
                                 seed=0, dtype=torch.float64)(angles, 0)[0]
    rows = []
    for device in devices:
        row = {"device": device, **{k: v for k, v in device_errors(device).items() if k.startswith("median")}}
        for mitigated in (False, True):
            backend = AerProbabilities(circuit, backend="aer_shots", shots=SHOTS_PER_STATE * 2**n, shot_gradient="exact",
                                       noise_model=device, seed=0, readout_mitigation=mitigated, dtype=torch.float64)
            with torch.no_grad():
                probs = [backend(angles, step)[0] for step in (0, 1)]
            feats = [post(p, n) for p in probs]
            row["mitigated" if mitigated else "raw"] = {
                "zero_fraction": float((probs[0] == 0).double().mean()),
                "tv_to_ideal": float(0.5 * (probs[0] - ideal).abs().sum()),
                "tv_step_to_step": float(0.5 * (probs[0] - probs[1]).abs().sum()),
                "feature_std": float(feats[0].std()),
                "feature_rms_step_to_step": float((feats[0] - feats[1]).pow(2).mean().sqrt()),
            }
        target = load_fake_backend(device).target  # the qubits this circuit was placed on, as in layout_errors
        row["layout_median_readout_error"] = _median([target["measure"][(q,)].error for q in backend.physical_qubits])
        rows.append(row)
        raw, mit = row["raw"], row["mitigated"]
        print(f"[noise] mitigation on {device}: zeros {raw['zero_fraction']:.3f} -> {mit['zero_fraction']:.3f}, "
              f"TV to ideal {raw['tv_to_ideal']:.3f} -> {mit['tv_to_ideal']:.3f}, feature change per step "
              f"{raw['feature_rms_step_to_step']:.3f} -> {mit['feature_rms_step_to_step']:.3f} "
              f"(feature spread {raw['feature_std']:.3f} -> {mit['feature_std']:.3f})", flush=True)
    out = {"kind": "mitigation_check", "n_qubits": n, "depth": depth, "shots_per_state": SHOTS_PER_STATE,
           "angles": "uniform in [0, 2 pi), seed 0", "devices": rows,
           "created": datetime.datetime.now().isoformat(timespec="seconds")}
    append(Path(args.runs_dir), "mitigation", out)
    return out


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------
def summarize(runs: list[dict]) -> list[dict]:
    by: dict[tuple, list[dict]] = {}
    for r in runs:
        by.setdefault((r["design"], r["condition"], r["budget_tokens"]), []).append(r)
    out = []
    for (design, condition, budget), rs in sorted(by.items()):
        rs = sorted(rs, key=lambda r: r["seed"])
        st = _stats([r["eval_ppl"] for r in rs])
        first = rs[0]
        out.append({
            "design": design, "condition": condition, "device": first["device"], "gi": first["gi"],
            "mitigation": first["mitigation"], "backend": first["backend"], "budget_tokens": budget, "lr": first["lr"],
            "median_2q_error": first["median_2q_error"], "median_readout_error": first["median_readout_error"],
            "layout_median_2q_error": first.get("layout_median_2q_error"),
            "layout_median_readout_error": first.get("layout_median_readout_error"),
            "seeds": [r["seed"] for r in rs], "eval_ppl_per_seed": [r["eval_ppl"] for r in rs],
            "eval_ppl_mean": st["mean"], "eval_ppl_std": st["std"], "n_seeds": st["n"],
            "s_per_step_mean": statistics.fmean(r["s_per_step"] for r in rs),
            "wall_s_mean": statistics.fmean(r["wall_s"] for r in rs), "n_qubits": first.get("n_qubits"),
        })
    for row in out:
        row["paired"] = {ref: _paired(row, _find(out, row["design"], ref, row["budget_tokens"])) for ref in PAIRED_REFERENCES
                         if ref != row["condition"] and _find(out, row["design"], ref, row["budget_tokens"])}
    return out


# The seed changes the data order and the initialisation, and it moves a design more than most conditions do (the
# four-readout design's ideal seeds spread 0.2): a condition is compared with a reference seed by seed.
PAIRED_REFERENCES = ("ideal", "shots")


def _find(rows: list[dict], design: str, condition: str, budget: int) -> Optional[dict]:
    return next((r for r in rows if (r["design"], r["condition"], r["budget_tokens"]) == (design, condition, budget)), None)


def _paired(row: dict, ref: dict) -> dict:
    """The per-seed difference ``row - ref`` over the seeds both have: the seeds, the differences, their mean and
    sample std (n - 1; 0 for one seed)."""
    theirs = dict(zip(ref["seeds"], ref["eval_ppl_per_seed"]))
    seeds = [s for s in row["seeds"] if s in theirs]
    diffs = [p - theirs[s] for s, p in zip(row["seeds"], row["eval_ppl_per_seed"]) if s in theirs]
    st = _stats(diffs)
    return {"seeds": seeds, "diff_per_seed": diffs, "diff_mean": st["mean"], "diff_std": st["std"], "n_seeds": st["n"]}


LINES = {  # condition family (gi, mitigation): (label, colour, marker, x offset factor so the error bars stay apart)
    (False, False): ("noisy shots", "tab:red", "o", 0.96),
    (True, False): ("noisy shots + GI", "tab:orange", "s", 0.987),
    (False, True): ("noisy shots + readout mitigation", "tab:blue", "^", 1.013),
    (True, True): ("noisy shots + mitigation + GI", "tab:purple", "v", 1.04),
}
REFERENCES = {"ideal": ("ideal statevector", "black", "-"), "shots": ("shots, no noise", "dimgray", "--"),
              "shots_gi": ("shots + GI, no noise", "gray", ":")}


OFF_SCALE = 1.0  # a mean this far above the base model's perplexity (a run that broke) is drawn at the top edge


def _cap_off_scale(ax, ceiling: float) -> None:
    """Keep the y-axis on the runs that trained: points above ``ceiling`` are drawn at the top edge with their
    value written beside them, so one broken run does not flatten the rest."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    high = [y for y in ys if y > ceiling]
    if not high:
        return
    low, top = min(ys), max(y for y in ys if y <= ceiling)
    pad = 0.1 * max(top - low, 0.1)
    ax.set_ylim(low - pad, top + 2 * pad)
    for line in ax.get_lines():
        if line.get_marker() in ("_", "|"):  # an error bar's caps, not a data point
            continue
        for x, y in zip(line.get_xdata(), line.get_ydata()):
            if math.isfinite(y) and y > ceiling:
                ax.annotate(f"{y:.1f} ↑", (x, top + 1.5 * pad), color=line.get_color(), fontsize=8, ha="center")


def _plot_paired(ax, rows: list[dict], ceiling: float = math.inf) -> None:
    """Each condition's difference from the ideal run of the same seed (mean ± std over the paired seeds)."""
    for (gi, mit), (label, color, marker, shift) in LINES.items():
        pts = sorted((r for r in rows if r["device"] and r["gi"] == gi and r["mitigation"] == mit
                      and r["paired"].get("ideal", {}).get("n_seeds")), key=lambda r: r["median_2q_error"])
        if pts:
            ax.errorbar([r["median_2q_error"] * shift for r in pts], [r["paired"]["ideal"]["diff_mean"] for r in pts],
                        yerr=[r["paired"]["ideal"]["diff_std"] for r in pts], color=color, marker=marker, capsize=3,
                        label=f"{label} (seeds: {', '.join(str(r['paired']['ideal']['n_seeds']) for r in pts)})")
    ax.axhline(0.0, color="black", lw=1.2, label="ideal statevector (same seed)")
    for cond, (label, color, ls) in REFERENCES.items():
        ref = next((r for r in rows if r["condition"] == cond and r["paired"].get("ideal", {}).get("n_seeds")), None)
        if ref:
            d = ref["paired"]["ideal"]
            ax.axhline(d["diff_mean"], color=color, ls=ls, lw=1.2, label=f"{label} {d['diff_mean']:+.2f} ({d['n_seeds']} seeds)")
    _finish_axis(ax, rows, "perplexity − the ideal run's, seed by seed", ceiling)


def _finish_axis(ax, rows: list[dict], ylabel: str, ceiling: float) -> None:
    """The axes both rows share: log two-qubit error, labels, grid, legend, and off-scale runs capped."""
    if any(r["device"] for r in rows):
        ax.set_xscale("log")
    ax.set_xlabel("device's median two-qubit gate error (log)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _cap_off_scale(ax, ceiling)


def plot(summary: list[dict], base_ppl: Optional[float], path: Path, model: Optional[str] = None) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    designs = sorted({r["design"] for r in summary}, key=lambda d: (d not in STUDY_DESIGNS, STUDY_DESIGNS.index(d) if d in STUDY_DESIGNS else 0, d))
    if not designs:
        return None
    fig, axes = plt.subplots(2, len(designs), figsize=(6.5 * len(designs), 8.6), squeeze=False,
                             gridspec_kw={"height_ratios": [1.15, 1]})
    for ax, design in zip(axes[1], designs):
        rows = [r for r in summary if r["design"] == design]
        ideal = next((r["eval_ppl_mean"] for r in rows if r["condition"] == "ideal"), None)
        known = base_ppl is not None and ideal is not None and math.isfinite(base_ppl)
        _plot_paired(ax, rows, base_ppl + OFF_SCALE - ideal if known else math.inf)
    for ax, design in zip(axes[0], designs):
        rows = [r for r in summary if r["design"] == design and math.isfinite(r["eval_ppl_mean"])]
        for (gi, mit), (label, color, marker, shift) in LINES.items():
            pts = sorted((r for r in rows if r["device"] and r["gi"] == gi and r["mitigation"] == mit),
                         key=lambda r: r["median_2q_error"])
            if pts:
                ax.errorbar([r["median_2q_error"] * shift for r in pts], [r["eval_ppl_mean"] for r in pts],
                            yerr=[r["eval_ppl_std"] for r in pts], color=color, marker=marker, capsize=3, label=label)
                if mit is False and gi is False:
                    for r in pts:
                        ax.annotate(r["device"].removeprefix("fake_"), (r["median_2q_error"] * shift, r["eval_ppl_mean"]),
                                    textcoords="offset points", xytext=(-10, -12), fontsize=7)
        for cond, (label, color, ls) in REFERENCES.items():
            ref = next((r for r in rows if r["condition"] == cond), None)
            if ref:
                ax.axhline(ref["eval_ppl_mean"], color=color, ls=ls, lw=1.2, label=f"{label} {ref['eval_ppl_mean']:.2f}")
                if ref["n_seeds"] > 1:
                    ax.axhspan(ref["eval_ppl_mean"] - ref["eval_ppl_std"], ref["eval_ppl_mean"] + ref["eval_ppl_std"],
                               color=color, alpha=0.08)
        if base_ppl is not None and math.isfinite(base_ppl):
            ax.set_title(f"{design} (base model {base_ppl:.2f})", fontsize=10)
        else:
            ax.set_title(design, fontsize=10)
        _finish_axis(ax, rows, "held-out perplexity (mean ± std over seeds)",
                     base_ppl + OFF_SCALE if base_ppl is not None and math.isfinite(base_ppl) else math.inf)
    fig.suptitle(f"QPA in lm_head under fake-device noise ({Path(model).name if model else 'model'}; {summary[0]['budget_tokens']:,} training "
                 f"tokens; shots: c = {SHOTS_PER_STATE} per state; x: offset slightly per line)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def report(args) -> dict:
    records = read_records(Path(args.runs_dir))
    runs = [r for r in records if r.get("kind") == "run"]
    summary = summarize(runs)
    base = next((r for r in records if r.get("kind") == "base"), {})
    devices = sorted({r["device"] for r in runs if r.get("device")})
    timing = {}
    for r in records:  # the latest timing per (design, condition)
        if r.get("kind") == "timing":
            timing[f"{r['design']}__{r['condition']}"] = r
    out = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/noise_study.py report",
        "git": _git_state(),
        "model": base.get("model"), "data": base.get("data"), "machine": base.get("machine"),
        "base_eval_ppl": base.get("eval_ppl"),
        "protocol": {"regime": REGIME, "budget_tokens": BASE_BUDGET, "batch_size": BATCH, "seeds": list(SEEDS),
                     "shots_per_state": SHOTS_PER_STATE, "shot_gradient": "exact",
                     "lr": "each design's best seed-0 lr in benchmarks/results/evidence_runs/lm_head.jsonl",
                     "std": "sample standard deviation over seeds (n - 1)"},
        "devices": {d: device_errors(d) for d in devices},
        "summary": summary,
        "runs": runs,
        "timing": list(timing.values()),
        "sampler": [r for r in records if r.get("kind") == "sampler"],
        "mitigation_check": [r for r in records if r.get("kind") == "mitigation_check"][-1:],
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    picture = plot(summary, base.get("eval_ppl"), output.with_suffix(".png"), base.get("model"))
    out["plots"] = [Path(picture).name] if picture else []  # beside the JSON: no machine's absolute path
    output.write_text(json.dumps(out, indent=1, default=float))
    print(f"[noise] wrote {output} ({len(runs)} runs) and {out['plots']}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    """This study's options; every other option (--model, --block-size, --eval-tokens, --hidden-cache, --threads,
    ...) is benchmarks/evidence.py's, with its defaults, so both harnesses read the same data the same way."""
    import evidence

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other options are those of benchmarks/evidence.py (--model, --train-file, --eval-file, "
                                       "--block-size, --eval-tokens, --hidden-cache, --threads, --no-progress, ...).")
    p.add_argument("command", choices=("run", "report", "list", "devices", "time", "sampler", "mitigation"))
    p.add_argument("--only", nargs="+", default=None, help="keep runs whose name, design, condition or device is listed")
    p.add_argument("--max-runs", type=int, default=None, help="run at most this many new runs (in priority order)")
    p.add_argument("--designs", nargs="+", default=list(STUDY_DESIGNS))
    p.add_argument("--devices", nargs="+", default=None, help=f"fake devices (default {' '.join(DEVICES)})")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--smoke: 0)")
    p.add_argument("--lr", type=float, default=None, help="override the recorded lr (default: each design's best)")
    p.add_argument("--smoke", action="store_true", help="tiny run for CI (a few steps, one small device)")
    p.add_argument("--smoke-steps", type=int, default=2)
    p.add_argument("--time-steps", type=int, default=4, help="`time`: steps per condition")
    p.add_argument("--sampler-device", default="fake_kyiv")
    p.add_argument("--sampler-qubits", type=int, default=5, help="`sampler`: N (the chunk size follows)")
    p.add_argument("--sampler-steps", type=int, default=3)
    p.add_argument("--sampler-mitigation", action="store_true", help="`sampler`: with readout_mitigation=True")
    p.add_argument("--mitigation-qubits", type=int, default=10, help="`mitigation`: N (the study's 10 by default)")
    p.add_argument("--runs-dir", type=Path, default=RUNS_DIR)
    p.add_argument("--evidence-runs", type=Path, default=EVIDENCE_RUNS_DIR, help="where the designs' lr grids are recorded")
    p.add_argument("--output", type=Path, default=RESULTS / "noise_study.json")
    mine, rest = p.parse_known_args(argv)
    args = evidence.parse_args(["report", *rest])  # evidence's options and defaults (unknown ones fail there)
    for key, value in vars(mine).items():
        setattr(args, key, value)
    if args.seeds is None:
        args.seeds = [0] if args.smoke else list(SEEDS)
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    devices = args.devices or (SMOKE_DEVICES if args.smoke else DEVICES)
    if args.command == "devices":
        rows = [device_errors(d) for d in devices]
        for r in rows:
            print(f"{r['device']:<16} {r['num_qubits']:>4} qubits  {'/'.join(r['two_qubit_gates']):<4} median 2q error "
                  f"{r['median_2q_error']:.4f}  median readout error {r['median_readout_error']:.4f}")
        return rows
    if args.command == "list":
        jobs = _select(plan(args.designs, devices, args.seeds), args.only, conditions(devices))
        done = _done(read_records(Path(args.runs_dir)))
        real = _real_budget(args)
        lrs = {}
        for j in jobs:
            if j.design not in lrs:
                try:
                    lrs[j.design] = _lr_for(j.design, args)
                except SystemExit:
                    lrs[j.design] = float("nan")
            mark = "done" if _key(j.design, j.condition, j.seed, lrs[j.design], real) in done else "    "
            print(f"{mark}  {j.name:<44} seed={j.seed} lr={lrs[j.design]:g}")
        return jobs
    if args.command == "run":
        return run(args)
    if args.command == "time":
        return time_runs(args)
    if args.command == "sampler":
        return sampler_check(args)
    if args.command == "mitigation":
        return mitigation_check(args, devices)
    return report(args)


if __name__ == "__main__":
    main()
