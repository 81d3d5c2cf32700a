"""Making ``QPA`` a PEFT method: the ``PeftType`` member and the registry entries.

PEFT 0.21 dispatches every load on the ``peft_type`` string through its mappings and has no
entry-point discovery, so ``import peft_qpa`` must run before an adapter is loaded. Both steps are
idempotent: importing (or reloading) the package twice does not fail.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "QPA"
PREFIX = "qpa_"


def ensure_peft_type() -> PeftType:
    """Add ``PeftType.QPA`` to PEFT's ``str`` Enum if it is not there yet and return it."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member._sort_order_ = len(PeftType._member_names_)
    member.__objclass__ = PeftType
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    return member


def register_qpa() -> None:
    """Register ``QPAConfig``/``QPAModel`` under ``PeftType.QPA`` (no-op when already registered)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import register_peft_method

    from .config import QPAConfig
    from .model import QPAModel
    from .saving import install_staged_save

    install_staged_save()
    peft_type = ensure_peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    clashing = [t for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if p == PREFIX and t != peft_type]
    if clashing:
        raise RuntimeError(f"The PEFT prefix {PREFIX!r} is already used by {clashing}; peft_qpa cannot register.")
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=QPAConfig, model_cls=QPAModel, prefix=PREFIX)
