"""Every change ``import peft_qpa`` makes to PEFT's own objects, in one table: :data:`PATCHES`.

PEFT 0.21 offers a public way to register a method (``register_peft_method``, used by ``peft_types.register``)
but none for the rest this package needs: new ``PeftType`` members, a safe save, and prefix tuning whose encoder
PEFT builds, saves and runs inside ``PeftModel`` itself. Those points are patched here, and only here: each
wrapper hands plain PEFT adapters straight to PEFT's code and calls the behaviour in ``tuners/`` for ours.

:func:`apply_patches` installs them all (``import peft_qpa`` calls it); a second call changes nothing, as every
wrapper carries the ``__peft_qpa__`` marker and a ``PeftType`` member is added once. Before wrapping, each patch checks that its target still exists and
has the kind and parameters it was written for, and otherwise raises :class:`PeftPatchError` naming the object
and the versions it was tested with: a renamed or changed PEFT function fails at import, not later as a wrong
result.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .peft_types import BOTTLENECK, QPA, QPA_BOTTLENECK, QPA_PREFIX_TUNING, QT, ensure_peft_type
from .tuners.prefix.model import is_qpa_prefix, merge_refusal, prepare_prefixed_inputs, setup_qpa_prefix_encoder
from .tuners.saving import save_staged

TESTED_WITH = "peft 0.21.x, transformers 5.x"
TESTED_PINS = "pip install 'peft>=0.21,<0.22' 'transformers>=5,<6'"
MARKER = "__peft_qpa__"  # set on every wrapper (its value: the patched object's name)
PEFT_TYPE_MEMBERS = (QPA, QT, QPA_BOTTLENECK, BOTTLENECK, QPA_PREFIX_TUNING)


class PeftPatchError(ImportError):
    """The installed PEFT no longer has an object peft_qpa patches in the form it was written for."""


@dataclass(frozen=True)
class Patch:
    """One change to a PEFT object: what it is, why, what it was tested with, and how it is installed."""

    target: str  # the patched object, by its import path
    fixes: str  # what goes wrong without it (user-facing)
    install: Callable[[], None]  # checks the target, then installs the patch (a no-op when installed)
    installed: Optional[Callable[[], bool]] = None  # default: the target carries the marker
    tested_with: str = TESTED_WITH

    def is_installed(self) -> bool:
        if self.installed is not None:
            return self.installed()
        return _marked(_lookup(self.target))


# --- checking and wrapping ---------------------------------------------------------------------------------
def _error(patch_target: str, problem: str) -> PeftPatchError:
    import peft
    import transformers

    return PeftPatchError(
        f"peft_qpa cannot patch {patch_target}: {problem}. The patch was written and tested with {TESTED_WITH}; "
        f"installed are peft {peft.__version__} and transformers {transformers.__version__}. Install a tested "
        f"version ({TESTED_PINS}), or a peft_qpa release made for this PEFT."
    )


def _lookup(target: str) -> Any:
    """The object at ``target`` ("package.module.Class.attribute"), found without running descriptors: a
    classmethod comes back as the ``classmethod`` object, as the class holds it."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for end in range(cut + 1, len(parts) + 1):
            obj = inspect.getattr_static(obj, parts[end - 1], None)
            if obj is None:
                raise _error(target, f"{'.'.join(parts[:end])} does not exist (renamed or removed)")
        return obj
    raise _error(target, f"no module of {target} can be imported")


def _marked(obj: Any) -> bool:
    return bool(getattr(getattr(obj, "__func__", obj), MARKER, False))


def _parameters(function: Callable) -> tuple[str, ...]:
    """Parameter names as written: ``*args`` and ``**kwargs`` keep their stars."""
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return tuple(stars.get(p.kind, "") + p.name for p in inspect.signature(function).parameters.values())


def _wrap(target: str, parameters: tuple[str, ...], make_wrapper: Callable, *, kind: str = "function") -> None:
    """Replace the method at ``target`` by ``make_wrapper(original)``, unless it is ours already.

    ``kind`` is what PEFT defines there ("function" or "classmethod"), ``parameters`` its parameters as written
    (``self``/``cls`` first); anything else raises :class:`PeftPatchError` before PEFT is touched."""
    current = _lookup(target)
    if _marked(current):
        return
    if kind == "classmethod":
        if not isinstance(current, classmethod):
            raise _error(target, f"it is a {type(current).__name__}, not the classmethod it was written for")
        function = current.__func__
    else:
        if not inspect.isfunction(current):
            raise _error(target, f"it is a {type(current).__name__}, not the plain method it was written for")
        function = current
    found = _parameters(function)
    if found != parameters:
        raise _error(target, f"its parameters are ({', '.join(found)}) where ({', '.join(parameters)}) were expected")
    owner_path, name = target.rsplit(".", 1)
    owner = _lookup(owner_path)
    wrapper = make_wrapper(getattr(owner, name))  # a classmethod comes bound to ``owner``, as PEFT calls it
    setattr(wrapper, MARKER, target)
    setattr(owner, name, classmethod(wrapper) if kind == "classmethod" else wrapper)


# --- the wrappers: plain PEFT adapters go straight to PEFT's code -------------------------------------------
def _staged_save(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        return save_staged(original, self, save_directory, *args, **kwargs)

    return save_pretrained


def _prefix_encoder_setup(original):
    @functools.wraps(original)
    def _setup_prompt_encoder(self, adapter_name: str):
        if not is_qpa_prefix(self.peft_config[adapter_name]):
            return original(self, adapter_name)
        return setup_qpa_prefix_encoder(self, adapter_name, original)

    return _setup_prompt_encoder


def _prefix_state_dict(original):
    # ``original`` is PEFT's classmethod, bound to PrefixEncoder; the wrapper is made a classmethod again.
    @functools.wraps(original)
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        if is_qpa_prefix(config):
            return model.prompt_encoder[adapter_name].adapter_state_dict()
        return original(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )

    return _get_adapter_state_dict


def _prefix_generation(original):
    @functools.wraps(original)
    def prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
        if not is_qpa_prefix(self.active_peft_config):
            return original(self, *args, task_ids=task_ids, **kwargs)
        return prepare_prefixed_inputs(self, *args, **kwargs)

    return prepare_inputs_for_generation


def _merge_message(original):
    @functools.wraps(original)
    def __getattr__(self, name: str):
        try:
            return original(self, name)
        except AttributeError as error:
            message = merge_refusal(self, name)
            if message is None:
                raise
            raise AttributeError(message) from error

    return __getattr__


# --- the installers -----------------------------------------------------------------------------------------
def install_peft_types() -> None:
    """Add this package's members to PEFT's ``PeftType`` (``peft_types.ensure_peft_type``), after checking that
    it is still the ``str`` Enum whose member tables ``ensure_peft_type`` extends."""
    target = "peft.utils.peft_types.PeftType"
    peft_type = _lookup(target)
    tables = {"_member_map_": dict, "_member_names_": list, "_value2member_map_": dict}
    if not (isinstance(peft_type, type) and issubclass(peft_type, enum.Enum) and issubclass(peft_type, str)):
        raise _error(target, "it is not the str Enum it was written for")
    wrong = [n for n, kind in tables.items() if not isinstance(getattr(peft_type, n, None), kind)]
    if wrong:
        raise _error(target, f"its Enum tables {wrong} are not the ones extended")
    for name in PEFT_TYPE_MEMBERS:
        ensure_peft_type(name)


def _peft_types_present() -> bool:
    from peft.utils.peft_types import PeftType

    return all(name in PeftType.__members__ for name in PEFT_TYPE_MEMBERS)


def install_staged_save() -> None:
    _wrap(
        "peft.PeftModel.save_pretrained",
        ("self", "save_directory", "safe_serialization", "selected_adapters", "save_embedding_layers",
         "is_main_process", "path_initial_model_for_weight_conversion", "**kwargs"),
        _staged_save,
    )


def install_prefix_encoder_setup() -> None:
    _wrap("peft.PeftModel._setup_prompt_encoder", ("self", "adapter_name"), _prefix_encoder_setup)


def install_prefix_state_dict() -> None:
    _wrap(
        "peft.tuners.prefix_tuning.model.PrefixEncoder._get_adapter_state_dict",
        ("cls", "model", "config", "adapter_name", "state_dict", "unwanted_adapter_names"),
        _prefix_state_dict,
        kind="classmethod",
    )


def install_prefix_generation() -> None:
    _wrap(
        "peft.PeftModelForCausalLM.prepare_inputs_for_generation",
        ("self", "*args", "task_ids", "**kwargs"),
        _prefix_generation,
    )


def install_merge_message() -> None:
    _wrap("peft.PeftModel.__getattr__", ("self", "name"), _merge_message)


PATCHES: tuple[Patch, ...] = (
    Patch(
        target="peft.utils.peft_types.PeftType",
        fixes="Adds the members QPA, QT, QPA_BOTTLENECK, BOTTLENECK and QPA_PREFIX_TUNING, so that configs of this "
        "package carry a PEFT type PEFT can dispatch on; PEFT has no public way to add one.",
        install=install_peft_types,
        installed=_peft_types_present,
    ),
    Patch(
        target="peft.PeftModel.save_pretrained",
        fixes="A save of a model with a QPA adapter is written to a temporary directory and published when complete, "
        "so an interrupted save never leaves new weights beside an old config (tuners/saving.py); a state_dict passed in "
        "(DeepSpeed ZeRO-3's consolidated one, taken without the hooks that refresh them) gets fresh snapshots.",
        install=install_staged_save,
    ),
    Patch(
        target="peft.PeftModel._setup_prompt_encoder",
        fixes="For a QPA prefix-tuning config, replaces the PrefixEncoder PEFT builds by QPAPrefixEncoder, whose "
        "prefixes are generated; refuses adapters of another model's shape and gradient checkpointing.",
        install=install_prefix_encoder_setup,
    ),
    Patch(
        target="peft.tuners.prefix_tuning.model.PrefixEncoder._get_adapter_state_dict",
        fixes="Saves a QPA prefix adapter's generator beside its generated prefixes; PEFT's version saves only the "
        "prefixes.",
        install=install_prefix_state_dict,
    ),
    Patch(
        target="peft.PeftModelForCausalLM.prepare_inputs_for_generation",
        fixes="generate() with a QPA prefix adapter: PEFT's version looks for transformers 4's cache arguments and "
        "loses the prefix under transformers 5; ours puts it in the cache and shifts the mask and positions.",
        install=install_prefix_generation,
    ),
    Patch(
        target="peft.PeftModel.__getattr__",
        fixes="merge_and_unload() and the other merge methods on a QPA prefix model say that prefix tuning cannot be "
        "merged and what to do, instead of an AttributeError about the base model.",
        install=install_merge_message,
    ),
)


def apply_patches() -> None:
    """Install every patch of :data:`PATCHES` (``import peft_qpa`` does; a second call changes nothing)."""
    for patch in PATCHES:
        patch.install()
