"""What every QPA member's PEFT config shares beyond the generator: which modules to adapt (LoRA's targeting
fields, with LoRA's meaning), the model card written on save, and validation that names the member's class."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

from ..generator.config import GeneratorConfig, is_int


def _is_names(value) -> bool:  # a list/set of strings
    return isinstance(value, (list, set, tuple)) and all(isinstance(v, str) for v in value)


LOADING_NOTE = (
    "This adapter needs the peft-qpa package: run `import peft_qpa` before loading it (PeftModel.from_pretrained, "
    "AutoPeftModel*, PeftConfig.from_pretrained). Without it, PEFT does not know this peft_type and fails with "
    "KeyError: '<peft_type>'."
)


@dataclass
class SavedAdapterMixin:
    """What every saved peft-qpa adapter carries besides PEFT's fields: a ``loading`` field whose value is always
    :data:`LOADING_NOTE` (the saved ``adapter_config.json`` tells a reader whose PEFT fails with a bare ``KeyError``
    on the type what to do: PEFT reads the type before any code of ours can run), and the QPA section of the model
    card."""

    loading: str = field(
        default=LOADING_NOTE,
        metadata={"help": "How to load this adapter (written for readers of adapter_config.json; not a setting)."},
    )
    save_generated_tensors: bool = field(
        default=True,
        metadata={
            "help": (
                "True: the saved adapter holds the generated tensors (their snapshot) and the generator's offset "
                "besides the generator, and reloads bit for bit. False: it holds the generator alone (as VeRA's "
                "save_projection=False omits what the seed regenerates), a file far smaller than the tensors; loading "
                "regenerates them (outputs equal to float rounding, no load cross-check)."
            )
        },
    )

    def __post_init__(self):
        self.loading = LOADING_NOTE
        if not isinstance(self.save_generated_tensors, bool):
            raise ValueError(
                f"{type(self).__name__}.save_generated_tensors must be True or False, got {self.save_generated_tensors!r}."
            )
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save ``adapter_config.json`` and, once the adapter was built, the QPA section of the model card."""
        super().save_pretrained(save_directory, **kwargs)
        facts = getattr(self, "_model_card_facts", None)
        if facts is not None:
            from .model_card import update_model_card

            update_model_card(save_directory, facts, self.base_model_name_or_path)


@dataclass
class QPATunerConfigMixin(SavedAdapterMixin):
    """Targeting fields (as in ``peft.LoraConfig``) for a config that also inherits ``GeneratorConfig`` and
    ``PeftConfig``: ``class MyConfig(QPATunerConfigMixin, GeneratorConfig, PeftConfig)``."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Names of the modules to adapt, as in LoraConfig: a list (exact name or suffix match), a regex string, "
                "or 'all-linear'. If None, LoRA's defaults for the model architecture are used."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names (list) or a regex of modules not to adapt, as in LoraConfig."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the QPA layers that are trained in full and saved."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt (as in LoraConfig); None adapts all matching layers."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer container used with layers_to_transform (as in LoraConfig)."}
    )

    _INT_FIELDS = GeneratorConfig._INT_FIELDS
    _REAL_FIELDS = GeneratorConfig._REAL_FIELDS
    _BOOL_FIELDS = GeneratorConfig._BOOL_FIELDS + ("inference_mode",)
    _LIST_FIELDS = GeneratorConfig._LIST_FIELDS + ("modules_to_save", "layers_to_transform")

    def __post_init__(self):
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        super().__post_init__()

    def _validate_fields(self) -> None:
        fail, cls = self._fail, type(self).__name__
        is_names = _is_names

        def check_regex(name: str, pattern: str) -> None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(
                    f"{cls}.{name}={pattern!r} is a string, so it is used as a regular expression (matched "
                    f"against full module names), but it does not compile: {error}. Pass a list of names instead."
                ) from None

        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                check_regex("target_modules", self.target_modules)
            elif not is_names(self.target_modules) or not self.target_modules:
                fail(
                    "target_modules",
                    "None (LoRA's defaults for the architecture), a non-empty list of module names, a regex string "
                    "or 'all-linear'",
                )
        if self.exclude_modules is not None:
            if isinstance(self.exclude_modules, str):
                check_regex("exclude_modules", self.exclude_modules)
            elif not is_names(self.exclude_modules):
                fail("exclude_modules", "None, a list of module names or a regex string")
        if self.modules_to_save is not None and not (
            isinstance(self.modules_to_save, list) and is_names(self.modules_to_save)
        ):
            fail("modules_to_save", "None or a list of module names, e.g. ['lm_head'] (a bare string is not accepted)")
        if self.layers_to_transform is not None and not (
            (is_int(self.layers_to_transform) and self.layers_to_transform >= 0)
            or (
                isinstance(self.layers_to_transform, list)
                and all(is_int(i) and i >= 0 for i in self.layers_to_transform)
            )
        ):
            fail(
                "layers_to_transform",
                "None, a layer index >= 0, or a list of layer indices >= 0 ([] adapts all layers, like None)",
            )
        if self.layers_pattern is not None and not (
            isinstance(self.layers_pattern, str)
            or (isinstance(self.layers_pattern, list) and is_names(self.layers_pattern))
        ):
            fail("layers_pattern", "None, a string or a list of strings")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{cls}.layers_pattern needs layers_to_transform to be set too.")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(
                f"{cls}.layers_to_transform/layers_pattern cannot be used when target_modules is a regex string "
                "(as in LoraConfig; the regex would silently ignore them): pass target_modules as a list of names."
            )

        super()._validate_fields()

