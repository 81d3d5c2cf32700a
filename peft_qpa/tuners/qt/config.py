"""``QTConfig``: which modules Quantum-Train generates, whether their biases too, and the generator's fields (from
:class:`~peft_qpa.generator.GeneratorConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ...generator.config import GeneratorConfig
from ...peft_types import QT, ensure_peft_type
from ..config import QPATunerConfigMixin


@dataclass
class QTConfig(QPATunerConfigMixin, GeneratorConfig, PeftConfig):
    """Configuration of a [`QTModel`]: Quantum-Train (arXiv:2405.11304), every weight of the targets generated.

    One generator per adapter (a circuit of N qubits plus a mapping MLP) produces the full update ΔW of every
    targeted layer (and Δb with `bias_update=True`): M numbers in all, N = ceil(log2(ceil(M / chunk_size))).
    Only the circuit angles and the mapping MLP are trained; the base weights stay frozen, and
    `merge_and_unload()` returns the plain network with W + ΔW. Targets: `torch.nn.Linear`, transformers'
    `Conv1D`, `torch.nn.Conv2d` and `torch.nn.Embedding`. See `docs/qt.md`.
    """

    bias_update: bool = field(
        default=False,
        metadata={
            "help": (
                "Also generate the update of each target's bias (targets without a bias get none). False: biases "
                "stay as in the base model."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: every generated update starts at exactly zero (the adapted model equals the base model at "
                "step 0, while gradients reach the whole generator). False: the raw generator output is added "
                "from the start (a nonzero update; for tests and experiments)."
            )
        },
    )

    generated_size_field = "target_modules"
    generated_size_what = "every weight of the targets, and their biases with bias_update"
    generated_size_hint = (
        "Generate fewer numbers: target fewer or smaller modules (target_modules, exclude_modules, "
        "layers_to_transform), or raise chunk_size for fewer qubits"
    )

    _BOOL_FIELDS = QPATunerConfigMixin._BOOL_FIELDS + ("bias_update", "init_weights")

    def __post_init__(self):
        self.peft_type = ensure_peft_type(QT)
        super().__post_init__()

    def _validate_fields(self) -> None:
        # The bool fields are checked by GeneratorConfig._validate (naming the field); QT adds nothing else.
        super()._validate_fields()
