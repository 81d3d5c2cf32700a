"""PEFT's own decoder-model matrix (upstream ``tests/test_decoder_models.py``), run against QPA.

Upstream ``TestDecoderModels`` (built on ``testing_common.PeftCommonTester``) parametrizes its generic test methods
over ``ALL_CONFIGS`` (one ``(config_cls, config_kwargs)`` entry per PEFT method, VeRA and VB-LoRA among them) and
``PEFT_DECODER_MODELS_TO_TEST`` (Hub ids of tiny random models). Its source is fetched at test time from the sdist of
the installed peft version (``tests/peft_upstream.py``; never copied here). This module subclasses the upstream
class and re-parametrizes every upstream method that runs over ``ALL_CONFIGS`` with the single QPA entry
``QPA_CONFIGS`` below, declared like upstream's VeRA / VB-LoRA entries (``task_type``, ``target_modules=None`` so
that PEFT's default targets for the architecture are used, a dropout) plus a small generator. The other upstream
methods (LoRA-, prompt-tuning-, Trainer-specific) are not collected. Upstream test bodies are unchanged, including
their own skips (e.g. "Mixed adapter batches not supported for this config.", which upstream gives VeRA too).

Models: upstream loads ``self.transformers_class.from_pretrained(model_id)``. Here ``transformers_class`` is
``tiny_hub.TinyHub.auto_class(AutoModelForCausalLM)``: the same Hub ids resolve to tiny models of the same
architectures built from configs and saved once per session with ``save_pretrained`` (``tests/tiny_hub.py``); no
tokenizer is needed by the collected tests. All six upstream architectures are run (OPT, GPT-2 (Conv1D), GPT-J,
Llama, Qwen2, Gemma3), as they are cheap at this size.

Deviations from a plain run, all listed in tables below and applied by one autouse fixture:

* ``KNOWN``: a ``pytest.skip`` with the reason PEFT gives VeRA / VB-LoRA / UniLoRA (shared generator), or a strict
  ``xfail`` for a bug in peft_qpa's core, keyed by test method and, where it depends on it, model id.
* ``SEED_BUMPED``: upstream makes the two adapters of ``test_merge_layers_multi`` differ by reseeding the global torch
  RNG between them and, for VB-LoRA, by scaling its init ("or else the two adapters are too similar"). QPA seeds its
  generator from ``config.seed`` only, so the adapter added second gets ``seed + <adapters so far>``, the test body is
  unchanged.
* ``UPSTREAM_HELPERS_PASSED``: two upstream skip helpers that misfire for QPA are passed for ``QPAConfig`` only:
  ``testing_common._skip_if_conv1d_not_supported`` (an allowlist of LoRA / IA3 / LoHa / LoKr for GPT-2; QPA handles
  ``Conv1D``, see the EmbConv1D cases of test_peft_common.py) and ``test_decoder_models.check_beft_config`` (meant to
  skip Llama / Gemma3 merge tests for BEFT only, which needs biases, but tests ``isinstance(config_cls, BeftConfig)``
  on a class, so it skips them for every method). Other configs keep upstream's behaviour.

Tests of our own (``_QPAComplements``) cover what a skip leaves out: ``layers_to_transform`` on each model.

Run: ``python -m pytest tests/test_peft_decoder.py -q`` (230 tests, about a minute on 2 cores; ``-k Llama`` etc. to
narrow). Offline (the sdist cannot be fetched and is not cached), the module is skipped with the reason.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import types

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import AutoModelForCausalLM

import peft_qpa
from peft_qpa import QPAConfig

try:
    from . import peft_upstream  # tests/ imported as a package
    from .tiny_hub import TINY_CONFIGS, TinyHub
except ImportError:
    import peft_upstream
    from tiny_hub import TINY_CONFIGS, TinyHub

try:
    upstream = peft_upstream.load_decoder_models_module()
except peft_upstream.UpstreamUnavailable as exc:
    pytest.skip(f"PEFT's upstream test suite is unavailable (offline?): {exc}", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings(
    # get_peft_model replaces the config's Hub id by the local directory the stand-in model was loaded from
    "ignore:The PEFT config's `base_model_name_or_path` was renamed:UserWarning"
)

# Small generator, as in test_peft_common.py: a few qubits, depth 2, a tiny mapping MLP.
SMALL = {"chunk_size": 8, "qnn_depth": 2, "mapping_hidden_sizes": [8], "seed": 0}

# Declared like upstream's VeRA / VB-LoRA entries of ALL_CONFIGS.
QPA_CONFIGS = [
    (
        QPAConfig,
        {
            "task_type": "CAUSAL_LM",
            "target_modules": None,
            "lora_dropout": 0.05,
            **SMALL,
        },
    ),
]

# The upstream model ids, each with a local stand-in (all of them: they are tiny).
DECODER_MODELS = [model_id for model_id in upstream.PEFT_DECODER_MODELS_TO_TEST if model_id in TINY_CONFIGS]

# (test method, model id or None for all models) -> ("skip" | "xfail", reason).
KNOWN: dict[tuple[str, str | None], tuple[str, str]] = {
    # Upstream `_test_training_layer_indexing` skips VB-LoRA, VeRA and UniLoRA with this reason. The test trains and
    # round-trips a model with layers_to_transform=[0] (passes for QPA), then asserts that fewer *trainable tensors*
    # exist than without it; QPA's trainable tensors are the one shared generator's, the same for any number of
    # adapted layers. `_QPAComplements.test_layers_to_transform` checks the layer selection itself.
    ("test_training_decoders_layer_indexing", None): (
        "skip",
        "QPA (like VBLoRA, VeRA, and UniLora) uses shared weights, so this generic layer-indexing count check is "
        "skipped.",
    ),
}

# Tests whose second adapter (added with the same config as the first) gets a different QPA seed; see docstring.
SEED_BUMPED = {"test_merge_layers_multi"}


def _model_label(model_id: str) -> str:
    return model_id.rsplit("/", 1)[-1]


REPLACEMENTS = {
    "config_cls,config_kwargs": ("ALL_CONFIGS", QPA_CONFIGS, ["QPAConfig"]),
    "model_id": ("PEFT_DECODER_MODELS_TO_TEST", DECODER_MODELS, [_model_label(m) for m in DECODER_MODELS]),
}


def _reparametrized(class_name: str, name: str, func):
    """A copy of ``func`` (same code, globals and closure) with upstream's config and model lists replaced by ours,
    or None if ``func`` does not run over ``ALL_CONFIGS`` (i.e. is specific to other methods)."""
    marks, replaced = [], set()
    for mark in getattr(func, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] in REPLACEMENTS:
            upstream_list, values, ids = REPLACEMENTS[mark.args[0]]
            if mark.args[1] is getattr(upstream, upstream_list):
                marks.append(pytest.mark.parametrize(mark.args[0], values, ids=ids).mark)
                replaced.add(mark.args[0])
                continue
        marks.append(mark)  # other parametrizations (dtype, use_reentrant) are kept
    if "config_cls,config_kwargs" not in replaced:
        return None
    copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__dict__.update({k: v for k, v in func.__dict__.items() if k != "pytestmark"})
    copy.__qualname__ = f"{class_name}.{name}"
    copy.__doc__ = func.__doc__
    copy.pytestmark = marks
    return copy


UPSTREAM_METHODS: list[str] = []


class _QPAComplements:
    """Checks of our own on the same models, for what the skips in ``KNOWN`` leave out."""

    @pytest.mark.parametrize("model_id", DECODER_MODELS, ids=[_model_label(m) for m in DECODER_MODELS])
    def test_layers_to_transform(self, model_id):
        # What the skipped upstream layer-indexing test checks, minus the trainable-tensor count: layers_to_transform
        # selects fewer layers, the shared generator's tensors are the same, and a trained adapter round-trips.
        config_cls, config_kwargs = QPA_CONFIGS[0]

        def tuner_layers(model):
            return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]

        def trainable(model):
            return [name for name, param in model.named_parameters() if param.requires_grad]

        model_all = get_peft_model(self.transformers_class.from_pretrained(model_id), config_cls(**config_kwargs))
        model = get_peft_model(
            self.transformers_class.from_pretrained(model_id), config_cls(layers_to_transform=[0], **config_kwargs)
        )
        assert 0 < len(tuner_layers(model)) < len(tuner_layers(model_all))
        assert len(trainable(model)) == len(trainable(model_all)) > 0

        inputs = self.prepare_inputs_for_testing()
        model(**inputs)[0].sum().backward()
        assert all(param.grad is not None for name, param in model.named_parameters() if param.requires_grad)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(**inputs)[0]
        with tempfile.TemporaryDirectory() as tmp_dirname:
            model.save_pretrained(tmp_dirname)
            loaded = PeftModel.from_pretrained(self.transformers_class.from_pretrained(model_id), tmp_dirname)
            assert tuner_layers(loaded) == tuner_layers(model)
            with torch.no_grad():
                assert torch.allclose(logits, loaded(**inputs)[0], atol=1e-4, rtol=1e-4)


def _qpa_subclass(base, class_name: str):
    namespace = {}
    for name in dir(base):
        func = getattr(base, name)
        if not name.startswith("test_") or not isinstance(func, types.FunctionType):
            continue
        method = _reparametrized(class_name, name, func)
        namespace[name] = method  # None hides a method-specific upstream test
        if method is not None:
            UPSTREAM_METHODS.append(name)
    namespace["__doc__"] = f"Upstream ``{base.__name__}`` methods, parametrized with the QPA entry and tiny local models."
    namespace["__module__"] = __name__
    return type(class_name, (_QPAComplements, base), namespace)


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory):
    return TinyHub(tmp_path_factory.mktemp("tiny_hub"))


TestQPADecoderModels = _qpa_subclass(upstream.TestDecoderModels, "TestQPADecoderModels")


def _passed_for_qpa(helper):
    """``helper`` (an upstream skip helper), returning at once when one of its arguments is ``QPAConfig``."""

    def helper_unless_qpa(*args, **kwargs):
        if any(isinstance(arg, type) and issubclass(arg, QPAConfig) for arg in (*args, *kwargs.values())):
            return None
        return helper(*args, **kwargs)

    helper_unless_qpa.__wrapped__ = helper
    return helper_unless_qpa


# (upstream module, helper name): upstream skip helpers that misfire for QPA (see module docstring).
UPSTREAM_HELPERS_PASSED = [
    (sys.modules[upstream.PeftCommonTester.__module__], "_skip_if_conv1d_not_supported"),  # testing_common
    (upstream, "check_beft_config"),  # test_decoder_models
]


@pytest.fixture(autouse=True)
def _local_models_and_known_deviations(request, tiny_hub, monkeypatch):
    instance = request.instance
    if isinstance(instance, TestQPADecoderModels):
        instance.transformers_class = tiny_hub.auto_class(AutoModelForCausalLM)
    callspec = getattr(request.node, "callspec", None)
    model_id = callspec.params.get("model_id") if callspec is not None else None
    name = getattr(request.node, "originalname", request.node.name)
    for module, helper_name in UPSTREAM_HELPERS_PASSED:
        if hasattr(module, helper_name):
            monkeypatch.setattr(module, helper_name, _passed_for_qpa(getattr(module, helper_name)))
    if name in SEED_BUMPED:
        add_adapter = PeftModel.add_adapter

        def add_adapter_new_seed(self, adapter_name, peft_config, *args, **kwargs):
            if isinstance(peft_config, QPAConfig):
                peft_config = copy.copy(peft_config)
                peft_config.seed += len(self.peft_config)
            return add_adapter(self, adapter_name, peft_config, *args, **kwargs)

        monkeypatch.setattr(PeftModel, "add_adapter", add_adapter_new_seed)
    for key in ((name, model_id), (name, None)):
        if key in KNOWN:
            kind, reason = KNOWN[key]
            if kind == "skip":
                pytest.skip(reason)
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
            break
    yield


def test_upstream_methods_collected():
    # Guard against a silent empty matrix (e.g. upstream renaming ALL_CONFIGS or its model list).
    assert len(UPSTREAM_METHODS) >= 30, UPSTREAM_METHODS
    assert len(DECODER_MODELS) >= 2, DECODER_MODELS
    assert any("GPT2" in m for m in DECODER_MODELS) and any("Llama" in m for m in DECODER_MODELS)
    assert peft_qpa.QPAModel.uses_shared_state
