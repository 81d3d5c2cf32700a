"""The bottleneck adapters' configs: ``QPABottleneckConfig`` (PEFT type ``QPA_BOTTLENECK``: the adapter tensors
generated) and ``BottleneckConfig`` (PEFT type ``BOTTLENECK``: the same adapter trained directly, the classical
baseline). Both share the adapter's own fields (:class:`BottleneckFieldsMixin`) and the targeting fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft.config import PeftConfig

from ...generator.config import GeneratorConfig, is_int, is_real
from ...peft_types import BOTTLENECK, QPA_BOTTLENECK, ensure_peft_type
from ..config import QPATunerConfigMixin
from .adapter import ACTIVATIONS, PLACEMENTS


@dataclass
class BottleneckFieldsMixin:
    """The bottleneck adapter's fields, identical in the QPA member and in the classical baseline."""

    bottleneck_size: int = field(
        default=64,
        metadata={"help": "Width b of the bottleneck: each adapter maps d -> b -> d (d: the target's output width)."},
    )
    activation: str = field(
        default="relu", metadata={"help": f"Nonlinearity between the down- and up-projection: one of {ACTIVATIONS}."}
    )
    placement: str = field(
        default="sequential",
        metadata={
            "help": (
                "'sequential': h + up(act(down(h))) on the target's output h (Houlsby et al.); 'parallel': "
                "target(x) + up(act(down(x))) from the target's input x (He et al.), for targets whose input and "
                "output widths agree."
            )
        },
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout probability on the adapter branch's output while training, in [0, 1)."}
    )
    hidden_size: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Width d of the target's output (the adapter's input and output width). None infers it from the "
                "target: its own out_features for a Linear / Conv1D, else the output width of the last Linear / "
                "Conv1D inside it."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "True: the up-projection's weight and bias start at zero (the adapted model equals the base model at "
                "step 0) and the down-projection's weight as nn.Linear's (Kaiming-uniform, bound 1/sqrt(d)), its bias "
                "at zero. False: a nonzero adapter from the start (for tests and experiments)."
            )
        },
    )

    def _validate_fields(self) -> None:
        fail = self._fail
        if not is_int(self.bottleneck_size) or self.bottleneck_size < 1:
            fail("bottleneck_size", "an integer >= 1")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            fail("activation", f"one of {ACTIVATIONS}")
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            fail("placement", f"one of {PLACEMENTS}")
        if not is_real(self.dropout) or not 0 <= self.dropout < 1:
            fail("dropout", "a number in [0, 1)")
        if self.hidden_size is not None and (not is_int(self.hidden_size) or self.hidden_size < 1):
            fail("hidden_size", "None (inferred from the target) or an integer >= 1")
        super()._validate_fields()

    def bottleneck_fields(self) -> dict:
        """The adapter's own fields (what the QPA member and the classical baseline share)."""
        return {
            "bottleneck_size": self.bottleneck_size,
            "activation": self.activation,
            "placement": self.placement,
            "dropout": self.dropout,
            "hidden_size": self.hidden_size,
            "init_weights": self.init_weights,
        }


@dataclass
class QPABottleneckConfig(BottleneckFieldsMixin, QPATunerConfigMixin, GeneratorConfig, PeftConfig):
    """Configuration of a [`QPABottleneckModel`]: bottleneck (feed-forward) adapters whose tensors are generated.

    After each target (e.g. each decoder layer's `mlp`), a residual bottleneck `h + up(act(down(h)))` (Houlsby et
    al., arXiv:1902.00751) whose down/up weights and biases come from one generator per adapter (a circuit of N
    qubits plus a mapping MLP; QPA, arXiv:2410.09846). Only the circuit angles and the mapping MLP are trained.
    A nonlinear adapter cannot be merged into the base weights. See `docs/bottleneck.md`.
    """

    generated_size_field = "bottleneck_size"
    generated_size_what = "2 * d * bottleneck_size + bottleneck_size + d per target"
    generated_size_hint = (
        "Generate fewer numbers: lower bottleneck_size, target fewer modules (target_modules, exclude_modules, "
        "layers_to_transform), or raise chunk_size for fewer qubits"
    )

    _BOOL_FIELDS = QPATunerConfigMixin._BOOL_FIELDS + ("init_weights",)
    _INT_FIELDS = QPATunerConfigMixin._INT_FIELDS + ("bottleneck_size", "hidden_size")
    _REAL_FIELDS = QPATunerConfigMixin._REAL_FIELDS + ("dropout",)

    def __post_init__(self):
        self.peft_type = ensure_peft_type(QPA_BOTTLENECK)
        super().__post_init__()

    def classical_config(self) -> "BottleneckConfig":
        """The classical baseline with the same targets and adapter fields (``BottleneckConfig``)."""
        targets = self.target_modules
        return BottleneckConfig(
            target_modules=sorted(targets) if isinstance(targets, set) else targets,
            exclude_modules=sorted(self.exclude_modules) if isinstance(self.exclude_modules, set) else self.exclude_modules,
            layers_to_transform=self.layers_to_transform,
            layers_pattern=self.layers_pattern,
            modules_to_save=self.modules_to_save,
            **self.bottleneck_fields(),
        )


class _PlainValidation:
    """``_fail`` / ``_validate`` for a config without generator fields (the classical baseline)."""

    _BOOL_FIELDS: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        self._validate()

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"{type(self).__name__}.{name} must be {allowed}, got {getattr(self, name)!r}.")

    def _validate(self) -> None:
        for name in self._BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "True or False (a bool; strings such as 'no' and numbers are not accepted)")
        self._validate_fields()

    def _validate_fields(self) -> None:
        pass


@dataclass
class BottleneckConfig(BottleneckFieldsMixin, QPATunerConfigMixin, _PlainValidation, PeftConfig):
    """Configuration of a [`BottleneckModel`]: the classical bottleneck (feed-forward) adapter, the baseline of
    `QPABottleneckConfig`.

    The same adapter (placement, activation, initialisation, forward) with its down/up weights and biases ordinary
    trainable parameters, trained and saved by PEFT as usual. See `docs/bottleneck.md`.
    """

    _BOOL_FIELDS = ("inference_mode", "init_weights")

    def __post_init__(self):
        self.peft_type = ensure_peft_type(BOTTLENECK)
        super().__post_init__()
