"""QPA prefix tuning (``QPAPrefixTuningConfig``, saved as PEFT type ``QPA_PREFIX_TUNING``): docs/prefix.md."""

from .config import QPAPrefixTuningConfig
from .model import QPAPrefixEncoder, is_qpa_prefix

__all__ = ["QPAPrefixEncoder", "QPAPrefixTuningConfig", "is_qpa_prefix"]
