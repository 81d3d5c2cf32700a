"""The members' PEFT prefixes nest as substrings (``qpa_`` in ``qpa_bottleneck_`` and ``qpa_prefix_``,
``bottleneck_`` in ``qpa_bottleneck_``), and PEFT matches prefixes by substring in places. These tests pin down that
no member's keys are taken for another's: what each member saves, loads and trains, alone (with
``modules_to_save``) and where two adapters share one model (a classical bottleneck injected with
``inject_adapter_in_model`` under a QPA member, the one way PEFT lets two of these types meet).

Keys are attributed by segment: a key belongs to the member whose prefix is the longest one that some ``.``-separated
segment of it starts with (so ``qpa_bottleneck_down_weight`` is the QPA bottleneck's, never the classical
bottleneck's or QPA-LoRA's)."""

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import tiny_llama

import peft_qpa

SMALL = {"chunk_size": 8, "qnn_depth": 2, "mapping_hidden_sizes": [8], "seed": 0}
SAVED_HEAD = "base_model.model.lm_head."  # a modules_to_save module, saved under its plain name
TRAINED_HEAD = "base_model.model.lm_head.modules_to_save."
# The prefixes saved adapters were written with: changing one renames every key of old adapters.
PREFIXES = {"QPA": "qpa_", "QT": "qt_", "QPA_BOTTLENECK": "qpa_bottleneck_", "BOTTLENECK": "bottleneck_",
            "QPA_PREFIX_TUNING": "qpa_prefix_"}

CONFIGS = {
    "QPA": lambda **kw: peft_qpa.QPAConfig(r=2, target_modules=["q_proj", "v_proj"], **SMALL, **kw),
    "QPA-DoRA": lambda **kw: peft_qpa.QPAConfig(r=2, target_modules=["q_proj"], use_dora=True, **SMALL, **kw),
    "QT": lambda **kw: peft_qpa.QTConfig(target_modules=["q_proj"], **SMALL, **kw),
    "QPA_BOTTLENECK": lambda **kw: peft_qpa.QPABottleneckConfig(
        target_modules=["mlp"], bottleneck_size=4, hidden_size=32, **SMALL, **kw
    ),
    "BOTTLENECK": lambda **kw: peft_qpa.BottleneckConfig(
        target_modules=["mlp"], bottleneck_size=4, hidden_size=32, init_weights=False, **kw
    ),
}
PEFT_TYPE = {"QPA-DoRA": "QPA"}


def owners(key: str) -> set[str]:
    """The members that own a segment of ``key`` (by the longest registered prefix it starts with)."""
    found = set()
    for segment in key.split("."):
        matches = [(len(p), t) for t, p in PREFIXES.items() if segment.startswith(p)]
        if matches:
            found.add(max(matches)[1])
    return found


def build(case, adapter_name="default", base=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base if base is not None else tiny_llama(), CONFIGS[case](**kw), adapter_name=adapter_name)


def perturb(model):
    """Move every trainable tensor off its initial value, so that a round trip that dropped one shows."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(7)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    for cache in getattr(model.base_model, "_caches", dict)().values():
        cache.refresh(force=True)
    return model


def test_member_prefixes_are_the_ones_saved_adapters_use():
    registered = {t.value: p for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if t.value in PREFIXES}
    assert registered == PREFIXES


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_saved_keys_are_the_members_own(case):
    model = build(case, modules_to_save=["lm_head"])
    member = PEFT_TYPE.get(case, case)
    saved = get_peft_model_state_dict(model)
    strays = [k for k in saved if not k.startswith(SAVED_HEAD) and owners(k) != {member}]
    assert not strays, f"{case} saves keys that are not its own: {strays}"
    assert any(k.startswith(SAVED_HEAD) for k in saved), "modules_to_save was not saved"
    assert any(owners(k) == {member} for k in saved)
    assert not [k for k in saved if ".original_module." in k or ".modules_to_save." in k]


def test_prefix_tuning_saves_only_its_own_keys():
    config = peft_qpa.QPAPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, **SMALL)
    saved = get_peft_model_state_dict(get_peft_model(tiny_llama(), config))
    assert "prompt_embeddings" in saved
    assert {frozenset(owners(k)) for k in saved if k != "prompt_embeddings"} == {frozenset({"QPA_PREFIX_TUNING"})}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_only_the_members_own_parameters_and_modules_to_save_train(case):
    model = build(case, modules_to_save=["lm_head"])
    member = PEFT_TYPE.get(case, case)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    expected = {n for n in params if owners(n) == {member} or n.startswith(TRAINED_HEAD)}
    assert trainable == expected
    assert any(owners(n) == {member} for n in trainable)
    assert any(n.startswith(TRAINED_HEAD) for n in trainable)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_save_and_load_round_trip_with_modules_to_save(case, tmp_path):
    model = perturb(build(case, modules_to_save=["lm_head"])).eval()
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / "adapter_model.safetensors"))) == set(before)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    after = get_peft_model_state_dict(loaded)
    assert set(after) == set(before)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("case", ["QPA", "BOTTLENECK"])
def test_adapter_named_like_a_prefix_loads_into_its_own_slots(case, tmp_path):
    # "qpa" lies inside "qpa_", "bottleneck" inside "bottleneck_": PEFT warns about such names; they must still load.
    # (PEFT's load report then also lists the other adapter's keys as missing, since it matches the adapter name by
    # substring too; none of the loaded adapter's own keys may be among them.)
    model = perturb(build(case, modules_to_save=["lm_head"])).eval()
    model.save_pretrained(tmp_path)
    name = PREFIXES[case].rstrip("_")
    other = build(case, modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = other.load_adapter(tmp_path, adapter_name=name)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
    saved = get_peft_model_state_dict(model)
    renamed = get_peft_model_state_dict(other, adapter_name=name)
    assert set(renamed) == set(saved)
    for key in saved:
        torch.testing.assert_close(renamed[key], saved[key], rtol=0, atol=0, msg=key)
    untouched = get_peft_model_state_dict(build(case, modules_to_save=["lm_head"]))
    for key, value in get_peft_model_state_dict(other).items():
        torch.testing.assert_close(value, untouched[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(
    "target, source", [("QPA", "QPA_BOTTLENECK"), ("BOTTLENECK", "QPA_BOTTLENECK"), ("QPA_BOTTLENECK", "BOTTLENECK"),
                       ("QPA", "QT")]
)
def test_another_members_checkpoint_fills_no_adapter_slot(target, source):
    # Its keys contain the target's prefix as a substring: none of them may be taken for the target's.
    model = build(target)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    foreign = get_peft_model_state_dict(perturb(build(source)))
    result = set_peft_model_state_dict(model, foreign)
    assert len(result.unexpected_keys) == len(foreign)
    for key, value in get_peft_model_state_dict(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("config", ["QPA", "QPA_BOTTLENECK"])
def test_two_members_on_one_model_are_refused_where_peft_would_mix_them(config):
    other = {"QPA": "QPA_BOTTLENECK", "QPA_BOTTLENECK": "QPA"}[config]
    with pytest.raises(ValueError, match="not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_llama(), CONFIGS[config](), mixed=True)
    with pytest.raises(ValueError, match="different peft types"):
        build(config).add_adapter("other", CONFIGS[other]())
    with pytest.raises(ValueError, match="shared state"):
        inject_adapter_in_model(CONFIGS[config](), tiny_llama())


@pytest.fixture(params=["QPA", "QPA_BOTTLENECK"])
def stacked(request):
    """A classical bottleneck ("bn") injected into the base model, then a QPA member ("default") on top."""
    base = inject_adapter_in_model(CONFIGS["BOTTLENECK"](), tiny_llama(), adapter_name="bn")
    return request.param, perturb(build(request.param, base=base))


def test_stacked_adapters_each_save_only_their_own_keys(stacked):
    member, model = stacked
    assert set(model.peft_config) == {"bn", "default"}
    own = get_peft_model_state_dict(model, adapter_name="default")
    classical = get_peft_model_state_dict(model, adapter_name="bn")
    assert own and classical
    assert {frozenset(owners(k)) for k in own} == {frozenset({member})}
    assert {frozenset(owners(k)) for k in classical} == {frozenset({"BOTTLENECK"})}


def test_stacked_adapters_both_train_and_deleting_one_keeps_the_other(stacked):
    member, model = stacked
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {frozenset(owners(n)) for n in trainable} == {frozenset({member}), frozenset({"BOTTLENECK"})}
    classical = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name="bn").items()}
    model.delete_adapter("default")
    assert not [n for n, _ in model.named_parameters() if owners(n) == {member}]
    left = get_peft_model_state_dict(model, adapter_name="bn")
    assert set(left) == set(classical)
    for key in classical:
        torch.testing.assert_close(left[key], classical[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("member", ["QPA", "QPA_BOTTLENECK"])
def test_a_member_refuses_the_adapter_name_an_injected_adapter_already_uses(member):
    # Under one name, PEFT would replace the injected adapter's config and save its weights as the member's.
    base = inject_adapter_in_model(CONFIGS["BOTTLENECK"](), tiny_llama())  # adapter "default"
    with pytest.raises(ValueError, match="default"):
        build(member, base=base)
