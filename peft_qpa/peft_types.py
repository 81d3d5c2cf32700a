"""The ``PeftType`` members of this package's methods, and their registration with PEFT.

A leaf module: it imports nothing of ``peft_qpa``. PEFT 0.21 dispatches every load on the ``peft_type`` string
through its mappings and has no entry-point discovery, so ``import peft_qpa`` must run before an adapter is
loaded. Both steps are idempotent: importing (or reloading) the package twice does not fail.

Registration is PEFT's public API; extending ``PeftType`` is not, so it is one of the patches listed in
``peft_qpa.patches``, which checks the enum before :func:`ensure_peft_type` first extends it.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

QPA = "QPA"  # QPA-LoRA and QPA-DoRA
QT = "QT"  # Quantum-Train: full weight generation
QPA_BOTTLENECK = "QPA_BOTTLENECK"  # bottleneck (feed-forward) adapters whose tensors are generated
BOTTLENECK = "BOTTLENECK"  # the classical bottleneck adapter (tensors trained directly), the baseline
QPA_PREFIX_TUNING = "QPA_PREFIX_TUNING"  # prefix tuning whose prefixes are generated


def ensure_peft_type(name: str) -> PeftType:
    """Add ``PeftType.<name>`` to PEFT's ``str`` Enum if it is not there yet and return it (through the Enum's
    member tables: the Enum has no public way to add a member)."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._member_names_.append(name)
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)
    return member


def register(name: str, config_cls: type, model_cls: type) -> None:
    """Register ``config_cls``/``model_cls`` under ``PeftType.<name>`` with ``model_cls.prefix`` (no-op when
    already registered)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type(name)
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    prefix = model_cls.prefix
    clashing = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == prefix and t != peft_type]
    if clashing:
        raise RuntimeError(f"The PEFT prefix {prefix!r} is already used by {clashing}; peft_qpa cannot register {name}.")
    register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
