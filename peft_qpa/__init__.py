"""peft-qpa: Quantum Parameter Adaptation (QPA) methods for PEFT.

``import peft_qpa`` registers every member of the family with PEFT, after which ``get_peft_model(model,
config)``, ``PeftModel.from_pretrained`` and ``AutoPeftModel*`` work as for LoRA:

* ``QPAConfig`` (PEFT type ``QPA``): LoRA, or DoRA with ``use_dora=True``, whose tensors are generated;
* ``QTConfig`` (PEFT type ``QT``): Quantum-Train, the full weight update of every target generated.

Layout: ``generator/`` (the circuit, its backends, the mapping MLP: usable alone), ``tuners/`` (the shared
tuner machinery in ``base.py``, one package per method) and ``apps/`` (export, Hub upload, the demo, its
assets and the perplexity evaluation).
"""

from .apps.export import export_lora
from .apps.hub import push_to_hub
from .generator import GeneratorConfig, QPAGenerator, TensorSpec, build_ansatz, n_qubits_for
from .generator.backends.aer import available_fake_backends
from .peft_types import QPA, QT, register
from .tuners.base import GeneratedTensor, QPABaseLayer, QPABaseModel
from .tuners.lora import QPAConfig, QPALayer, QPAModel
from .tuners.qt import QTConfig, QTLayer, QTModel
from .tuners.saving import install_staged_save
# BOTTLENECK_IMPORT
# PREFIX_IMPORT

__version__ = "0.2.0"


def register_qpa() -> None:
    """Register every method of the package with PEFT (idempotent; ``import peft_qpa`` already does it)."""
    install_staged_save()
    register(QPA, QPAConfig, QPAModel)
    register(QT, QTConfig, QTModel)
    # BOTTLENECK_REGISTER
    # PREFIX_REGISTER


register_qpa()

__all__ = [
    "GeneratedTensor",
    "GeneratorConfig",
    "QPABaseLayer",
    "QPABaseModel",
    "QPAConfig",
    "QPAGenerator",
    "QPALayer",
    "QPAModel",
    "QTConfig",
    "QTLayer",
    "QTModel",
    "TensorSpec",
    "available_fake_backends",
    "build_ansatz",
    "export_lora",
    "n_qubits_for",
    "push_to_hub",
    "register_qpa",
]
