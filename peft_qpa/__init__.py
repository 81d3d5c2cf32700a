"""peft-qpa: Quantum Parameter Adaptation (QPA) methods for PEFT.

``import peft_qpa`` registers every member of the family with PEFT, after which ``get_peft_model(model,
config)``, ``PeftModel.from_pretrained`` and ``AutoPeftModel*`` work as for LoRA:

* ``QPAConfig`` (PEFT type ``QPA``): LoRA, or DoRA with ``use_dora=True``, whose tensors are generated;
* ``QTConfig`` (PEFT type ``QT``): Quantum-Train, the full weight update of every target generated;
* ``QPABottleneckConfig`` (``QPA_BOTTLENECK``): bottleneck (feed-forward) adapters whose tensors are generated,
  and ``BottleneckConfig`` (``BOTTLENECK``), the same adapters trained directly (the classical baseline);
* ``QPAPrefixTuningConfig`` (saved as ``QPA_PREFIX_TUNING``): prefix tuning whose prefixes are generated.

``export(model, dir)`` writes a member's classical twin for plain PEFT (LoRA, DoRA, prefix tuning).

``use_sampler(model, sampler)`` runs a ``backend="sampler"`` adapter's circuit on a Qiskit ``SamplerV2`` primitive
(IBM hardware, Aer, another provider); ``estimate_cost`` and ``CostGuardCallback`` estimate and bound its device time.

Every change the import makes to PEFT's own objects is listed in ``peft_qpa.patches`` (``PATCHES``).

Layout: ``generator/`` (the circuit, its backends, the mapping MLP: usable alone), ``tuners/`` (the shared
tuner machinery in ``base.py``, one package per method) and ``apps/`` (export, Hub upload, the demo, its
assets and the perplexity evaluation).
"""

from .apps.export import export, export_lora
from .apps.hardware import (
    CostEstimate,
    CostGuardCallback,
    DeviceBudgetError,
    SamplerJobError,
    SamplerNotAttachedError,
    SamplerResultError,
    estimate_cost,
    use_sampler,
)
from .apps.hub import push_to_hub
from .generator import GeneratorConfig, QPAGenerator, TensorSpec, build_ansatz, n_qubits_for
from .generator.backends.aer import available_fake_backends
from .patches import apply_patches
from .peft_types import BOTTLENECK, QPA, QPA_BOTTLENECK, QPA_PREFIX_TUNING, QT, register
from .tuners.base import GeneratedTensor, QPABaseLayer, QPABaseModel
from .tuners.bottleneck import (
    BottleneckConfig,
    BottleneckLayer,
    BottleneckModel,
    QPABottleneckConfig,
    QPABottleneckLayer,
    QPABottleneckModel,
)
from .tuners.lora import QPAConfig, QPALayer, QPAModel
from .tuners.prefix import QPAPrefixEncoder, QPAPrefixTuningConfig
from .tuners.qt import QTConfig, QTLayer, QTModel

__version__ = "0.2.0"


def register_qpa() -> None:
    """Register every method of the package with PEFT (idempotent; ``import peft_qpa`` already does it): first the
    patches to PEFT's own objects (``peft_qpa.patches``, the list of them all), then each method through PEFT's
    ``register_peft_method``."""
    apply_patches()
    register(QPA, QPAConfig, QPAModel)
    register(QT, QTConfig, QTModel)
    register(QPA_BOTTLENECK, QPABottleneckConfig, QPABottleneckModel)
    register(BOTTLENECK, BottleneckConfig, BottleneckModel)
    register(QPA_PREFIX_TUNING, QPAPrefixTuningConfig, QPAPrefixEncoder)


register_qpa()

__all__ = [
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckModel",
    "CostEstimate",
    "CostGuardCallback",
    "DeviceBudgetError",
    "GeneratedTensor",
    "GeneratorConfig",
    "QPABaseLayer",
    "QPABaseModel",
    "QPAConfig",
    "QPAGenerator",
    "QPALayer",
    "QPAModel",
    "QPAPrefixEncoder",
    "QPAPrefixTuningConfig",
    "QPABottleneckConfig",
    "QPABottleneckLayer",
    "QPABottleneckModel",
    "QTConfig",
    "QTLayer",
    "QTModel",
    "SamplerJobError",
    "SamplerNotAttachedError",
    "SamplerResultError",
    "TensorSpec",
    "available_fake_backends",
    "export",
    "build_ansatz",
    "estimate_cost",
    "export_lora",
    "n_qubits_for",
    "push_to_hub",
    "register_qpa",
    "use_sampler",
]
