"""peft-qpa: Quantum Parameter Adaptation (QPA) as a PEFT method.

``import peft_qpa`` registers the ``QPA`` PEFT type, after which ``get_peft_model(model, QPAConfig(...))``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*`` work as for LoRA.
"""

from .circuit import build_ansatz, n_qubits_for
from .config import QPAConfig
from .export import export_lora
from .generator import QPAGenerator, TensorSpec
from .hub import push_to_hub
from .layer import QPALayer
from .model import QPAModel
from .registration import register_qpa

register_qpa()

__version__ = "0.1.0"

__all__ = [
    "QPAConfig",
    "QPAGenerator",
    "QPALayer",
    "QPAModel",
    "TensorSpec",
    "build_ansatz",
    "export_lora",
    "n_qubits_for",
    "push_to_hub",
    "register_qpa",
]
