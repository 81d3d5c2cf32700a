"""PEFT's own compatibility matrix, run against QPA.

PEFT's ``tests/test_custom_models.py`` (``TestPeftCustomModel``, built on ``testing_common.PeftCommonTester``)
declares its cases as ``TEST_CASES`` tuples ``(test_name, model_id, config_cls, config_kwargs)`` on tiny local
models (``MLP``, ``EmbConv1D``, ...). Its source is fetched at test time from the sdist of the installed peft
version (see ``tests/peft_upstream.py``; never copied here). This module subclasses the upstream class and
re-parametrizes every upstream test method that runs over ``TEST_CASES`` with the QPA cases below, exactly as the
VB-LoRA and VeRA cases are declared upstream; methods parametrized over ``ALL_PEFT_CONFIG_CLASSES`` run with
``QPAConfig``. Upstream tests that need a nonzero delta at init switch ``init_weights=False`` themselves
(``testing_utils.set_init_weights_false``), as they do for VeRA. The QPA-DoRA cases (``use_dora=True``) mirror
upstream's "... LoRA with DoRA" cases, the Conv2d and Embedding cases its LoRA ones. Upstream tests specific to other
methods or to PEFT's own LoRA classes (LoRA bias warnings, trainable tokens, ...) are not collected.

Run: ``python -m pytest tests/test_peft_common.py -q``. Offline (the sdist cannot be fetched), the module is
skipped with the reason.
"""

from __future__ import annotations

import types

import pytest
import torch

import peft_qpa
from peft_qpa import BottleneckConfig, QPABottleneckConfig, QPAConfig, QTConfig

try:
    from . import peft_upstream  # tests/ imported as a package
    from .bottleneck_cases import BOTTLENECK_TEST_CASES, MERGE_SKIP_REASON, skips_merging
    from .qt_cases import QT_TEST_CASES
except ImportError:
    import peft_upstream
    from bottleneck_cases import BOTTLENECK_TEST_CASES, MERGE_SKIP_REASON, skips_merging
    from qt_cases import QT_TEST_CASES

try:
    upstream = peft_upstream.load_custom_models_module()
except peft_upstream.UpstreamUnavailable as exc:
    pytest.skip(f"PEFT's upstream test suite is unavailable (offline?): {exc}", allow_module_level=True)

CASE_ARGNAMES = "test_name, model_id, config_cls, config_kwargs"

# Small generators so that each case runs in well under a second: a few qubits, depth 2, a tiny mapping MLP.
SMALL = {"chunk_size": 8, "qnn_depth": 2, "mapping_hidden_sizes": [8], "seed": 0}

QPA_TEST_CASES = [
    # mirrors the "Vanilla MLP n VBLoRA/VeRA" and "Embedding + transformers Conv1D 1 VBLoRA/VeRA" cases upstream
    ("Vanilla MLP 1 QPA", "MLP", QPAConfig, {"target_modules": "lin0", **SMALL}),
    ("Vanilla MLP 2 QPA", "MLP", QPAConfig, {"target_modules": ["lin0", "lin1"], **SMALL}),
    (
        "Vanilla MLP 3 QPA",
        "MLP",
        QPAConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **SMALL},
    ),
    (
        "Vanilla MLP 4 QPA rx_cnot dropout",
        "MLP",
        QPAConfig,
        {"target_modules": ["lin1"], "ansatz": "rx_cnot", "lora_dropout": 0.1, "r": 2, **SMALL},
    ),
    ("Embedding + transformers Conv1D 1 QPA", "EmbConv1D", QPAConfig, {"target_modules": ["conv1d"], **SMALL}),
    # mirror the LoRA cases on embeddings and Conv2d upstream ("Embedding + transformers Conv1D n LoRA", "Conv2d n
    # LoRA", "Conv2d Groups LoRA", ...); Conv2dGroups has groups=8, so r=8 (upstream's default r is 8)
    ("Embedding + transformers Conv1D 2 QPA", "EmbConv1D", QPAConfig, {"target_modules": ["emb"], **SMALL}),
    ("Embedding + transformers Conv1D 3 QPA", "EmbConv1D", QPAConfig, {"target_modules": ["emb", "conv1d"], **SMALL}),
    ("Conv2d 1 QPA", "Conv2d", QPAConfig, {"target_modules": ["conv2d"], **SMALL}),
    ("Conv2d 2 QPA", "Conv2d", QPAConfig, {"target_modules": ["conv2d", "lin0"], **SMALL}),
    ("Conv2d 1x1 QPA", "Conv2d1x1", QPAConfig, {"target_modules": ["conv2d"], **SMALL}),
    ("Conv2d Groups QPA", "Conv2dGroups", QPAConfig, {"target_modules": ["conv2d"], "r": 8, **SMALL}),
    ("Conv2d Groups2 QPA", "Conv2dGroups2", QPAConfig, {"target_modules": ["conv2d"], **SMALL}),
    # QPA-DoRA: mirror the "... LoRA with DoRA" / "... DoRA" cases upstream (upstream's generic tests key their DoRA
    # learning rates and tolerances on config_kwargs["use_dora"], so these cases get the same ones)
    ("Vanilla MLP 5 QPA-DoRA", "MLP", QPAConfig, {"target_modules": ["lin0"], "use_dora": True, **SMALL}),
    ("Vanilla MLP 6 QPA-DoRA", "MLP", QPAConfig, {"target_modules": ["lin0", "lin1"], "use_dora": True, **SMALL}),
    (
        "Vanilla MLP 7 QPA-DoRA",
        "MLP",
        QPAConfig,
        {"target_modules": "lin1", "use_dora": True, **SMALL, "lora_alpha": 32},
    ),
    (
        "Embedding + transformers Conv1D 1 QPA-DoRA",
        "EmbConv1D",
        QPAConfig,
        {"target_modules": ["conv1d"], "use_dora": True, **SMALL},
    ),
    ("Embedding + transformers Conv1D 2 QPA-DoRA", "EmbConv1D", QPAConfig, {"target_modules": ["emb"], "use_dora": True, **SMALL}),
    (
        "Embedding + transformers Conv1D 3 QPA-DoRA",
        "EmbConv1D",
        QPAConfig,
        {"target_modules": ["emb", "conv1d"], "use_dora": True, **SMALL},
    ),
    ("Conv2d 1 QPA-DoRA", "Conv2d", QPAConfig, {"target_modules": ["conv2d"], "use_dora": True, **SMALL}),
    ("Conv2d 2 QPA-DoRA", "Conv2d", QPAConfig, {"target_modules": ["conv2d", "lin0"], "use_dora": True, **SMALL}),
    (
        "Conv2d Groups QPA-DoRA",
        "Conv2dGroups",
        QPAConfig,
        {"target_modules": ["conv2d"], "use_dora": True, "r": 8, **SMALL},
    ),
    ("Conv2d Groups2 QPA-DoRA", "Conv2dGroups2", QPAConfig, {"target_modules": ["conv2d"], "use_dora": True, **SMALL}),
]

# Two adapters on MLP (model "qpa" resolves to MLP(bias=True) upstream), as "VBLoRA Same"/"VBLoRA Different" and
# "VeRA Same" upstream. Different seeds, so that the two adapters differ; nonzero deltas (init_weights=False).
MULTI_ARGNAMES = "test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2"
QPA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "QPA Same",
        "qpa",
        QPAConfig,
        {"target_modules": ["lin0"], "init_weights": False, **SMALL},
        {"target_modules": ["lin0"], "init_weights": False, **{**SMALL, "seed": 1}},
    ),
    (
        "QPA Different",
        "qpa",
        QPAConfig,
        {"target_modules": ["lin0"], "init_weights": False, **SMALL},
        {"target_modules": ["lin1"], "init_weights": False, **{**SMALL, "seed": 1}},
    ),
    (
        "QPA-DoRA Same",
        "qpa",
        QPAConfig,
        {"target_modules": ["lin0"], "init_weights": False, "use_dora": True, **SMALL},
        {"target_modules": ["lin0"], "init_weights": False, "use_dora": True, **{**SMALL, "seed": 1}},
    ),
    (
        "QPA-DoRA Different",
        "qpa",
        QPAConfig,
        {"target_modules": ["lin0"], "init_weights": False, "use_dora": True, **SMALL},
        {"target_modules": ["lin1"], "init_weights": False, "use_dora": True, **{**SMALL, "seed": 1}},
    ),
]

# Upstream tests that PEFT itself refuses for tuners with ``uses_shared_state = True`` (none of the collected
# methods needs an entry today: test_save_load_roundtrip_direct_injection accepts the refusal by itself).
SHARED_STATE_SKIPS: dict[str, str] = {}


# Upstream lowers the SGD learning rate per method where plain training on its unbounded toy loss
# (``y_pred.sum()`` on inputs up to 89) diverges to nan: in ``test_parameters_after_loading_model`` VB-LoRA gets 0.01,
# AdaLoRA 1e-4 and PVeRA 1e-6 instead of 0.5 (the test only checks the save/load round trip of the trained
# weights). QPA needs the same: one step on a shared MLP weight moves every generated number of A and B at once, so
# the delta B @ A grows multiplicatively (nan by step 3 at lr 0.01, finite at 1e-4). The upstream test code is
# unchanged; only ``torch.optim.SGD``'s lr is capped for the listed tests.
SGD_LR_CAPS: dict[str, float] = {"test_parameters_after_loading_model": 1e-4}
# The same, for one test on one upstream model only: (test, model_id) -> cap. ``Conv2dGroups2`` feeds
# ``torch.arange(9 * 16 * 20 * 20)`` (inputs up to 57599) to its conv, and the base model's loss is about 1.5e3 before
# any training: in ``test_disable_adapters`` (SGD, lr 0.01), one step on the generator that fills the conv's A and B
# moves them all at once and the next loss is about 6e9 (inf and nan at step 3; 1e-3 and 1e-4 still diverge); at 1e-5
# the three steps stay finite and still change the outputs, which is what the test checks.
CASE_SGD_LR_CAPS: dict[tuple[str, str], float] = {("test_disable_adapters", "Conv2dGroups2"): 1e-5}


def _sgd_lr_cap(request) -> float | None:
    name = getattr(request.node, "originalname", "")
    callspec = getattr(request.node, "callspec", None)
    model_id = callspec.params.get("model_id") if callspec is not None else None
    return CASE_SGD_LR_CAPS.get((name, model_id), SGD_LR_CAPS.get(name))


@pytest.fixture(autouse=True)
def _qpa_sgd_lr_cap(request, monkeypatch):
    cap = _sgd_lr_cap(request)
    if cap is not None:
        original = torch.optim.SGD

        class CappedSGD(original):
            def __init__(self, params, lr=1e-3, *args, **kwargs):
                super().__init__(params, min(lr, cap), *args, **kwargs)

        monkeypatch.setattr(torch.optim, "SGD", CappedSGD)
    yield


# Upstream skips the merge checks for LoRA on ``Conv2dGroups*`` models (``testing_common._skip_if_merging_not_supported``:
# "Merging conv layers with groups>1 and LoRA is not supported.", keyed on ``config_cls == LoraConfig``). QPA's Conv2d
# layer is PEFT LoRA's and refuses to merge with groups > 1 as PEFT does (NotImplementedError), so the same skip,
# at the same point of each test (after the forward checks that precede it), applies to QPAConfig.
_upstream_skip_if_merging_not_supported = upstream._skip_if_merging_not_supported


def _skip_if_merging_not_supported(model_id, config_cls, config_kwargs):
    if skips_merging(config_cls):
        pytest.skip(MERGE_SKIP_REASON)
    if isinstance(model_id, str) and model_id.startswith("Conv2dGroups") and issubclass(config_cls, QPAConfig):
        pytest.skip("Merging conv layers with groups>1 is not supported by QPA, as by LoRA (upstream skips it for LoRA).")
    _upstream_skip_if_merging_not_supported(model_id, config_cls, config_kwargs)


@pytest.fixture(autouse=True)
def _qpa_merge_skips(monkeypatch):
    import sys

    for module in (upstream, sys.modules[upstream._skip_if_merging_not_supported.__module__]):
        monkeypatch.setattr(module, "_skip_if_merging_not_supported", _skip_if_merging_not_supported)
    yield


ALL_CASES = QPA_TEST_CASES + QT_TEST_CASES + BOTTLENECK_TEST_CASES


def _case_ids(cases) -> list[str]:
    return [case[0] for case in cases]


# Upstream case list -> ours, per argnames of the upstream ``parametrize`` mark. A test method whose parametrization
# is none of these is specific to other methods (LoRA bias warnings, DoRA, trainable tokens, ...) and not collected.
REPLACEMENTS = {
    CASE_ARGNAMES: ("TEST_CASES", ALL_CASES, _case_ids(ALL_CASES)),
    MULTI_ARGNAMES: ("MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES", QPA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
                     _case_ids(QPA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)),
    "config_cls": (
        "ALL_PEFT_CONFIG_CLASSES",
        [QPAConfig, QTConfig, QPABottleneckConfig, BottleneckConfig],
        ["QPAConfig", "QTConfig", "QPABottleneckConfig", "BottleneckConfig"],
    ),
}


def _selection(func):
    """(upstream mark, our mark) for a generic upstream test method, or None."""
    for mark in getattr(func, "pytestmark", []):
        if mark.name != "parametrize" or mark.args[0] not in REPLACEMENTS:
            continue
        upstream_list, cases, ids = REPLACEMENTS[mark.args[0]]
        if mark.args[1] is getattr(upstream, upstream_list):
            return mark, pytest.mark.parametrize(mark.args[0], cases, ids=ids)
    return None


def _reparametrized(class_name: str, name: str, func, old_mark, new_mark):
    """A copy of ``func`` (same code, globals and closure, so fixtures and ``super()`` work) with the upstream
    case list replaced by ours; other marks (extra parametrizations such as dtype) are kept."""
    copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__dict__.update({k: v for k, v in func.__dict__.items() if k != "pytestmark"})
    copy.__qualname__ = f"{class_name}.{name}"
    copy.__doc__ = func.__doc__
    marks = [m for m in getattr(func, "pytestmark", []) if m is not old_mark]
    marks.append(new_mark.mark)
    if name in SHARED_STATE_SKIPS:
        marks.append(pytest.mark.skip(reason=SHARED_STATE_SKIPS[name]).mark)
    copy.pytestmark = marks
    return copy


UPSTREAM_METHODS: dict[str, list[str]] = {}


def _qpa_subclass(base, class_name: str):
    """Subclass of an upstream test class that runs its generic methods with QPA cases and hides the others."""
    namespace, selected = {}, []
    for name in dir(base):
        func = getattr(base, name)
        if not name.startswith("test_") or not isinstance(func, types.FunctionType):
            continue
        selection = _selection(func)
        if selection is None:
            namespace[name] = None  # hide method-specific upstream tests
            continue
        namespace[name] = _reparametrized(class_name, name, func, *selection)
        selected.append(name)
    namespace["__doc__"] = f"Upstream ``{base.__name__}`` methods, parametrized with QPA cases."
    namespace["__module__"] = __name__
    UPSTREAM_METHODS[class_name] = selected
    return type(class_name, (base,), namespace)


TestQPAPeftCustomModel = _qpa_subclass(upstream.TestPeftCustomModel, "TestQPAPeftCustomModel")
TestQPAMultipleActiveAdapters = _qpa_subclass(upstream.TestMultipleActiveAdapters, "TestQPAMultipleActiveAdapters")
TestQPARequiresGrad = _qpa_subclass(upstream.TestRequiresGrad, "TestQPARequiresGrad")


def test_upstream_methods_collected():
    # Guard against a silent empty matrix (e.g. upstream renaming its case lists).
    assert len(UPSTREAM_METHODS["TestQPAPeftCustomModel"]) >= 40, UPSTREAM_METHODS
    assert len(UPSTREAM_METHODS["TestQPAMultipleActiveAdapters"]) >= 4, UPSTREAM_METHODS
    assert len(UPSTREAM_METHODS["TestQPARequiresGrad"]) >= 2, UPSTREAM_METHODS
    assert peft_qpa.QPAModel.uses_shared_state
