"""PEFT's own compatibility matrix, run against QPA.

PEFT's ``tests/test_custom_models.py`` (``TestPeftCustomModel``, built on ``testing_common.PeftCommonTester``)
declares its cases as ``TEST_CASES`` tuples ``(test_name, model_id, config_cls, config_kwargs)`` on tiny local
models (``MLP``, ``EmbConv1D``, ...). Its source is fetched at test time from the sdist of the installed peft
version (see ``tests/peft_upstream.py``; never copied here). This module subclasses the upstream class and
re-parametrizes every upstream test method that runs over ``TEST_CASES`` with the QPA cases below, exactly as the
VB-LoRA and VeRA cases are declared upstream; methods parametrized over ``ALL_PEFT_CONFIG_CLASSES`` run with
``QPAConfig``. Upstream tests that need a nonzero delta at init switch ``init_weights=False`` themselves
(``testing_utils.set_init_weights_false``), as they do for VeRA. Upstream tests specific to other methods (LoRA
bias warnings, trainable tokens, DoRA, ...) are not collected.

Run: ``python -m pytest tests/test_peft_common.py -q``. Offline (the sdist cannot be fetched), the module is
skipped with the reason.
"""

from __future__ import annotations

import types

import pytest
import torch

import peft_qpa
from peft_qpa import QPAConfig

try:
    from . import peft_upstream  # tests/ imported as a package
except ImportError:
    import peft_upstream

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


@pytest.fixture(autouse=True)
def _qpa_sgd_lr_cap(request, monkeypatch):
    cap = SGD_LR_CAPS.get(request.node.originalname if hasattr(request.node, "originalname") else "")
    if cap is not None:
        original = torch.optim.SGD

        class CappedSGD(original):
            def __init__(self, params, lr=1e-3, *args, **kwargs):
                super().__init__(params, min(lr, cap), *args, **kwargs)

        monkeypatch.setattr(torch.optim, "SGD", CappedSGD)
    yield


def _case_ids(cases) -> list[str]:
    return [case[0] for case in cases]


# Upstream case list -> ours, per argnames of the upstream ``parametrize`` mark. A test method whose parametrization
# is none of these is specific to other methods (LoRA bias warnings, DoRA, trainable tokens, ...) and not collected.
REPLACEMENTS = {
    CASE_ARGNAMES: ("TEST_CASES", QPA_TEST_CASES, _case_ids(QPA_TEST_CASES)),
    MULTI_ARGNAMES: ("MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES", QPA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES,
                     _case_ids(QPA_MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES)),
    "config_cls": ("ALL_PEFT_CONFIG_CLASSES", [QPAConfig], ["QPAConfig"]),
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
