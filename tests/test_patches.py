"""The patches ``import peft_qpa`` makes to PEFT's own objects (``peft_qpa.patches.PATCHES``): all installed, once,
documented, and each refusing loudly a PEFT whose target changed."""

import enum
import inspect
import re
import subprocess
import sys
from pathlib import Path

import peft
import peft.utils.peft_types
import pytest
from peft import PeftModel, PeftModelForCausalLM
from peft.tuners.prefix_tuning.model import PrefixEncoder

import peft_qpa
from peft_qpa.patches import MARKER, PATCHES, TESTED_WITH, PeftPatchError, apply_patches

ROOT = Path(__file__).resolve().parent.parent
TARGETS = [patch.target for patch in PATCHES]


OWNERS = {
    "peft.utils.peft_types": peft.utils.peft_types,
    "peft.PeftModel": PeftModel,
    "peft.PeftModelForCausalLM": PeftModelForCausalLM,
    "peft.tuners.prefix_tuning.model.PrefixEncoder": PrefixEncoder,
}


def _current(target):
    """What PEFT holds at ``target`` now, without running descriptors (a classmethod stays one)."""
    owner, name = target.rsplit(".", 1)
    return inspect.getattr_static(OWNERS[owner], name)


def test_the_table_names_each_patch_once_with_what_it_fixes_and_the_tested_versions():
    assert len(set(TARGETS)) == len(TARGETS) == 6
    for patch in PATCHES:
        assert patch.target.startswith("peft.") and len(patch.fixes) > 40, patch
        assert patch.tested_with == TESTED_WITH == "peft 0.21.x, transformers 5.x"
        assert callable(patch.install) and patch.install.__module__ == "peft_qpa.patches"
    # the tested versions are those setup.cfg allows
    setup = (ROOT / "setup.cfg").read_text()
    assert "peft>=0.21,<0.22" in setup and "transformers>=5,<6" in setup


@pytest.mark.parametrize("patch", PATCHES, ids=TARGETS)
def test_every_patch_is_installed_by_import(patch):
    assert patch.is_installed()
    current = _current(patch.target)
    if isinstance(current, type):  # PeftType: our members are there
        assert {"QPA", "QT", "QPA_BOTTLENECK", "BOTTLENECK", "QPA_PREFIX_TUNING"} <= set(current.__members__)
        return
    function = current.__func__ if isinstance(current, classmethod) else current
    assert getattr(function, MARKER) == patch.target
    original = function.__wrapped__
    assert not getattr(getattr(original, "__func__", original), MARKER, False)  # wrapped once, PEFT's inside


def test_apply_patches_twice_changes_nothing():
    before = {target: _current(target) for target in TARGETS}
    members = list(peft.utils.peft_types.PeftType.__members__)
    apply_patches()
    apply_patches()
    peft_qpa.register_qpa()
    after = {target: _current(target) for target in TARGETS}
    assert all(after[t] is before[t] for t in TARGETS), [t for t in TARGETS if after[t] is not before[t]]
    assert list(peft.utils.peft_types.PeftType.__members__) == members


# --- a PEFT whose target changed is refused, naming it -----------------------------------------------------------
class _NotAStrEnum(enum.Enum):
    A = 1


def _plain_function(*args, **kwargs):
    return None


def _other_signature(self, directory, **kwargs):
    return None


BREAKS = {
    # target -> ways PEFT could change it (each applied with monkeypatch on the real object, then restored)
    "peft.utils.peft_types.PeftType": [
        ("missing", lambda mp: mp.delattr(peft.utils.peft_types, "PeftType")),
        ("not a str Enum", lambda mp: mp.setattr(peft.utils.peft_types, "PeftType", _NotAStrEnum)),
    ],
    "peft.PeftModel.save_pretrained": [
        ("missing", lambda mp: mp.delattr(PeftModel, "save_pretrained")),
        ("other parameters", lambda mp: mp.setattr(PeftModel, "save_pretrained", _other_signature)),
    ],
    "peft.PeftModel._setup_prompt_encoder": [
        ("missing", lambda mp: mp.delattr(PeftModel, "_setup_prompt_encoder")),
        ("other parameters", lambda mp: mp.setattr(PeftModel, "_setup_prompt_encoder", _other_signature)),
    ],
    "peft.tuners.prefix_tuning.model.PrefixEncoder._get_adapter_state_dict": [
        ("not a classmethod", lambda mp: mp.setattr(PrefixEncoder, "_get_adapter_state_dict", _plain_function)),
        ("other parameters", lambda mp: mp.setattr(
            PrefixEncoder, "_get_adapter_state_dict", classmethod(lambda cls, model, config, adapter_name: {}))),
    ],
    "peft.PeftModelForCausalLM.prepare_inputs_for_generation": [
        ("owner missing", lambda mp: mp.delattr(peft, "PeftModelForCausalLM")),
        ("other parameters", lambda mp: mp.setattr(
            PeftModelForCausalLM, "prepare_inputs_for_generation", _other_signature)),
    ],
    "peft.PeftModel.__getattr__": [
        ("a property", lambda mp: mp.setattr(PeftModel, "__getattr__", property(lambda self: None))),
        ("other parameters", lambda mp: mp.setattr(PeftModel, "__getattr__", lambda self, key: None)),
    ],
}


def test_every_patch_has_its_breaking_cases():
    assert list(BREAKS) == TARGETS


@pytest.mark.parametrize(
    "patch, change",
    [pytest.param(p, change, id=f"{p.target}-{name}") for p in PATCHES for name, change in BREAKS[p.target]],
)
def test_a_changed_target_is_refused_naming_it(patch, change, monkeypatch):
    with monkeypatch.context() as mp:
        change(mp)
        with pytest.raises(PeftPatchError) as caught:
            patch.install()
    message = str(caught.value)
    assert f"cannot patch {patch.target}" in message
    assert TESTED_WITH in message and f"peft {peft.__version__}" in message
    assert "pip install 'peft>=0.21,<0.22'" in message
    assert isinstance(caught.value, ImportError)
    assert patch.is_installed()  # restored: the real PEFT objects keep their (single) patch


def test_import_fails_loudly_on_a_changed_peft():
    code = (
        "import peft\n"
        "del peft.PeftModel._setup_prompt_encoder\n"
        "try:\n"
        "    import peft_qpa\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("PeftPatchError peft_qpa cannot patch peft.PeftModel._setup_prompt_encoder:")
    assert "does not exist" in done.stdout and TESTED_WITH in done.stdout


# --- the documentation lists them ---------------------------------------------------------------------------------
def test_architecture_doc_lists_every_patch():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("### Patches to PEFT", 1)[1].split("\n#", 1)[0]
    listed = re.findall(r"^\| `([\w.]+)` \|", section, re.M)
    assert listed == TARGETS
    assert "peft 0.21.x" in section and "transformers 5.x" in section and "PeftPatchError" in section
