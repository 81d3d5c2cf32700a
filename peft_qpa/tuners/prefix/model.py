"""QPA prefix tuning: a prompt encoder that holds the quantum generator, and what PEFT's prompt-learning code
needs of it.

PEFT builds, saves and runs prefix tuning in ``PeftModel`` itself (prompt learning is not a ``BaseTuner``), and
dispatches on ``config.peft_type`` with explicit lists; a config of ours reports ``PREFIX_TUNING`` at run time
(``QPAPrefixTuningConfig``), so PEFT's prompt-learning paths (``get_prompt``, the forward of every task class, the
prompt-learning config preparation) run unchanged. Four points need our code; ``peft_qpa.patches`` wraps them (the
list of every change to PEFT), sending only adapters whose config has ``qpa_peft_type == "QPA_PREFIX_TUNING"`` here
and plain PEFT adapters straight to PEFT's code:

* ``PeftModel._setup_prompt_encoder`` (:func:`setup_qpa_prefix_encoder`): after PEFT's setup (freezing, word
  embeddings, prompt tokens), the ``PrefixEncoder`` it built is replaced by :class:`QPAPrefixEncoder` (both are
  built under a forked RNG: the caller's RNG is not advanced, and the adapter depends on its ``seed`` alone).
  Gradient checkpointing is refused with a clear message, here and again at each training forward (e.g. when a
  Trainer turns it on later).
* ``PrefixEncoder._get_adapter_state_dict`` (what ``get_peft_model_state_dict`` saves for a ``PREFIX_TUNING`` config):
  ours saves the generated prefixes (``prompt_embeddings``, PEFT's key: the snapshot) and the generator
  (``qpa_prefix_generator.*``), :meth:`QPAPrefixEncoder.adapter_state_dict`. Loading needs no hook: PEFT calls the
  encoder's own ``_load_adapter_state_dict``.
* ``PeftModelForCausalLM.prepare_inputs_for_generation`` (:func:`prepare_prefixed_inputs`): PEFT 0.21's version
  looks for transformers 4's ``past_key_values``/``cache_position`` arguments; with transformers 5 (``cache``) it
  loses the prefix. Ours puts the prefix into the (empty) cache of the first step, or into a fresh cache at every
  step without cache, and shifts the attention mask and position ids by the P virtual tokens, so that
  ``generate()`` equals greedy decoding with the forward.
* ``PeftModel.__getattr__`` (:func:`merge_refusal`): the merge methods, which prefix tuning cannot have, say what
  to do instead of failing on the base model's missing attribute.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BasePromptEncoder
from peft.utils import _prepare_prompt_learning_config
from torch import nn
from transformers import DynamicCache

from ...generator import QPAGenerator, TensorSpec
from .. import distributed
from ..cache import GeneratedCache
from ...peft_types import QPA_PREFIX_TUNING
from ..model_card import card_facts

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"  # PEFT's key for prefix tuning's table: the generated snapshot
GENERATOR_KEY = "qpa_prefix_generator."  # the generator's state, saved beside it
TENSOR_NAME = "prefix"
CLASSICAL_NAME = "classical prefix tuning with the same shapes (PEFT PrefixTuningConfig, prefix_projection=False)"

GRADIENT_CHECKPOINTING_MESSAGE = (
    "QPA prefix tuning does not work with gradient checkpointing, as PEFT's prefix tuning does not: the prefixes "
    "enter every layer through the key/value cache, which checkpointed layers would extend again when they are "
    "recomputed. Turn it off (model.gradient_checkpointing_disable(), or TrainingArguments(gradient_checkpointing="
    "False)); prefix tuning keeps no activations of its own beyond the model's."
)


def is_qpa_prefix(config: Any) -> bool:
    """Whether ``config`` is a QPA prefix-tuning config (PEFT type ``PREFIX_TUNING`` at run time)."""
    return getattr(config, "qpa_peft_type", None) == QPA_PREFIX_TUNING


def _checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


class PrefixSnapshot(nn.Module):
    """The generated prefixes' last value (a buffer, saved as ``prompt_embeddings``), read by PEFT as
    ``prompt_encoder.embedding.weight`` (e.g. in inference mode): reading ``weight`` regenerates it first if the
    generator changed."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.register_buffer("snapshot", torch.zeros(shape, dtype=dtype))
        self._cache: Optional[GeneratedCache] = None  # set by the encoder, which owns the generator and the cache

    @property
    def weight(self) -> torch.Tensor:
        if self._cache is not None:
            self._cache.refresh()
        return self.snapshot


class QPAPrefixEncoder(BasePromptEncoder):
    """PEFT's prefix-tuning encoder (``prefix_projection=False``), with its table generated.

    ``forward(prefix_tokens)`` returns ``(batch, num_virtual_tokens, num_layers * 2 * token_dim)`` as
    ``PrefixEncoder`` does: the generator's live, differentiable output while gradients are needed (one generation per
    forward; a training forward advances the generator's step), the snapshot otherwise."""

    prefix = "qpa_prefix_"
    classical_name = CLASSICAL_NAME
    card_tags = ("prefix-tuning",)
    card_classical_use = (
        "Without any quantum software: export the generated prefixes once with\n"
        '`peft_qpa.export(model, "prefix-twin")`; the result is a standard prefix-tuning adapter that plain `peft`\n'
        "loads with `PeftModel.from_pretrained`."
    )

    def card_description(self, config, targets) -> str:
        return (f"a prefix-tuning adapter ({config.num_virtual_tokens} virtual tokens: a key and a value prefix in "
                f"each of {config.num_layers} layers)")

    def __init__(self, config):
        super().__init__()
        if not is_qpa_prefix(config):
            raise ValueError(f"QPAPrefixEncoder needs a QPAPrefixTuningConfig, got {type(config).__name__}.")
        missing = [n for n in ("token_dim", "num_layers") if getattr(config, n) is None]
        if missing:
            raise ValueError(f"QPAPrefixTuningConfig.{missing[0]} is not set (get_peft_model reads it from the model).")
        self.prefix_projection = False
        self.shape_fields = {n: getattr(config, n) for n in ("num_virtual_tokens", "num_layers", "token_dim")}
        shape = (config.num_virtual_tokens, config.num_layers * 2 * config.token_dim)
        init = "zeros" if config.init_weights == "zero" else "normal"
        self.generator = QPAGenerator.from_config(config, [TensorSpec(TENSOR_NAME, shape, init)])
        distributed.keep_whole(self.generator)  # FSDP leaves it whole on every rank (docs/scaling.md)
        self.embedding = PrefixSnapshot(shape, self.generator.offset.dtype)
        # The encoder owns the generated prefixes: live while training, else the snapshot buffer PEFT saves.
        self.cache = GeneratedCache(self.generator, {TENSOR_NAME: (self.embedding._buffers, "snapshot")},
                                    member="QPA prefix-tuning")
        self.embedding._cache = self.cache
        self.generator.requires_grad_(not config.inference_mode)
        self.config = config  # read when saving: save_generated_tensors may be changed on the model's config
        self.cache.refresh()
        self._base_model: Optional[nn.Module] = None

    def attach(self, base_model: nn.Module) -> None:
        """The model the prefixes go into (checked for gradient checkpointing at each training forward)."""
        object.__setattr__(self, "_base_model", base_model)

    def get_generator(self) -> QPAGenerator:
        return self.generator

    def forward(self, prefix_tokens: torch.Tensor) -> torch.Tensor:
        if self.training and self._base_model is not None and torch.is_grad_enabled() and _checkpointing_on(self._base_model):
            raise ValueError(GRADIENT_CHECKPOINTING_MESSAGE)
        if not self.cache.syncs_gradients and distributed.multi_process() and distributed.is_fsdp_managed(
                self, distributed.fsdp_module_types()):
            # under FSDP: a replica whose gradients each backward averages across ranks (tuners/distributed.py)
            distributed.refuse_sharded(self.generator, self.cache.member, self.cache.adapter_name)
            distributed.attach(self.generator, prefix_tokens.device)
            self.cache.sync_gradients()
        live = self.cache.live(training=self.training)
        table = live[TENSOR_NAME] if live is not None else self.embedding.snapshot
        return table[prefix_tokens]

    # --- reporting ----------------------------------------------------------------------------------------
    def classical_parameter_count(self) -> int:
        """Parameters of classical prefix tuning with the same shapes (PEFT's table): M."""
        return self.generator.num_generated

    def generator_summary(self) -> str:
        """Qubits, depth, M, the trainable parameters by part and their ratio to classical prefix tuning's."""
        return self.generator.summary(self.classical_parameter_count(), CLASSICAL_NAME)

    # --- saving and loading (PEFT's prompt-learning hooks) ------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What is saved: the generated prefixes under PEFT's key (a fresh snapshot) and the generator."""
        self.cache.refresh(force=True)
        state = {PROMPT_EMBEDDINGS_KEY: self.embedding.snapshot.detach().cpu().clone()}
        for key, value in self.generator.state_dict().items():
            state[GENERATOR_KEY + key] = value.detach().cpu().clone()
        if not self.save_generated_tensors:  # the generator alone: loading regenerates the rest
            del state[PROMPT_EMBEDDINGS_KEY], state[GENERATOR_KEY + "offset"]
        return state

    def _load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if PROMPT_EMBEDDINGS_KEY not in state_dict and not self.save_generated_tensors:
            return self._load_generator_alone(state_dict)
        if PROMPT_EMBEDDINGS_KEY not in state_dict:
            raise ValueError(f"A QPA prefix-tuning adapter's weights must contain {PROMPT_EMBEDDINGS_KEY!r}.")
        snapshot = state_dict[PROMPT_EMBEDDINGS_KEY]
        if tuple(snapshot.shape) != tuple(self.embedding.snapshot.shape):
            raise ValueError(
                f"The saved prefixes have shape {tuple(snapshot.shape)}, the model needs "
                f"{tuple(self.embedding.snapshot.shape)} (num_virtual_tokens x num_layers * 2 * token_dim, with this "
                f"model's num_layers={self.shape_fields['num_layers']}, token_dim={self.shape_fields['token_dim']}): "
                "the adapter was trained for another model or another num_virtual_tokens."
            )
        generator_state = {k[len(GENERATOR_KEY):]: v for k, v in state_dict.items() if k.startswith(GENERATOR_KEY)}
        if generator_state:
            self.generator.load_state_dict(generator_state, strict=True)
        with torch.no_grad():
            self.embedding.snapshot.copy_(snapshot.to(self.embedding.snapshot.device))
        if not generator_state:
            warnings.warn(
                "The loaded QPA prefix-tuning weights hold the prefixes but no generator: inference uses the loaded "
                "prefixes; training would start again from the generator's own output.",
                UserWarning,
                stacklevel=2,
            )
        else:
            self.cache.warn_if_loaded_disagrees("prefixes", (
                "a corrupted weights file, or an edited adapter_config.json field that keeps the shapes"
            ))
        self.cache.mark_fresh()

    @property
    def save_generated_tensors(self) -> bool:
        return getattr(self.config, "save_generated_tensors", True)

    def _load_generator_alone(self, state_dict: dict[str, torch.Tensor]) -> None:
        """An adapter saved with ``save_generated_tensors=False``: the generator's parameters (and step) are loaded,
        its offset is the one the config and seed give, and the prefixes are generated from them."""
        generator_state = {k[len(GENERATOR_KEY):]: v for k, v in state_dict.items() if k.startswith(GENERATOR_KEY)}
        if not generator_state:
            raise ValueError(f"A QPA prefix-tuning adapter's weights must contain {PROMPT_EMBEDDINGS_KEY!r} or its "
                             "generator (qpa_prefix_generator.*).")
        offset = self.generator.offset.detach().clone()
        generator_state.setdefault("offset", offset)
        self.generator.load_state_dict(generator_state, strict=True)
        self.cache.refresh(force=True)


# --- what PEFT's prompt-learning code runs for a QPA prefix adapter (wired by peft_qpa.patches) --------------
def setup_qpa_prefix_encoder(peft_model, adapter_name: str, peft_setup) -> None:
    """``PeftModel._setup_prompt_encoder`` for a QPA prefix adapter: PEFT's own setup (``peft_setup``) for the
    freezing, word embeddings and prompt tokens, then its ``PrefixEncoder`` replaced by :class:`QPAPrefixEncoder`."""
    config = peft_model.peft_config[adapter_name]
    if _checkpointing_on(peft_model.get_base_model()):
        raise ValueError(GRADIENT_CHECKPOINTING_MESSAGE)
    _check_prefix_shape(config, peft_model.get_base_model(), adapter_name)
    # Neither PEFT's PrefixEncoder (replaced below) nor building the generator (its layers are created before
    # they are re-initialised from `seed`) advances the caller's RNG: the adapter depends on `seed` alone.
    with torch.random.fork_rng(devices=[]):
        peft_setup(peft_model, adapter_name)
        encoder = QPAPrefixEncoder(config)
    encoder.attach(peft_model.get_base_model())
    encoder.cache.adapter_name = adapter_name
    peft_model.prompt_encoder[adapter_name] = encoder.to(peft_model.device)
    config._model_card_facts = card_facts(config, encoder.generator, encoder.classical_parameter_count(), encoder)


SHAPE_FIELDS = ("num_layers", "token_dim", "num_attention_heads")


def _check_prefix_shape(config, base_model: nn.Module, adapter_name: str) -> None:
    """Refuse a prefix adapter whose shape fields (saved in its config) are not the ones PEFT derives from this
    model: a prefix for more layers would run silently with the extra layers ignored, one for fewer fails deep in
    transformers' cache code, and one of another width fails in attention."""
    model_config = getattr(base_model, "config", None)
    if model_config is None or not all(isinstance(getattr(config, n, None), int) for n in SHAPE_FIELDS):
        return
    probe = copy.copy(config)
    for name in SHAPE_FIELDS:
        setattr(probe, name, None)
    try:
        probe = _prepare_prompt_learning_config(probe, model_config)
    except ValueError:
        return  # a model whose shape PEFT cannot read: the user set the fields, PEFT's own checks apply
    saved = {n: getattr(config, n) for n in SHAPE_FIELDS}
    derived = {n: getattr(probe, n) for n in SHAPE_FIELDS}
    if saved == derived:
        return
    show = lambda values: ", ".join(f"{n}={v}" for n, v in values.items())  # noqa: E731
    raise ValueError(
        f"The QPA prefix-tuning adapter {adapter_name!r} does not fit this model (adapter: {show(saved)}; this "
        f"model: {show(derived)}; token_dim and num_attention_heads are the key/value width and heads, "
        "head_dim x num_key_value_heads under grouped-query attention). Its prefixes hold one key and one value per "
        "layer of the model it was trained for (base_model_name_or_path in its adapter_config.json: "
        f"{getattr(config, 'base_model_name_or_path', None)!r}): load it onto that model."
    )


def prepare_prefixed_inputs(peft_model, *args, **kwargs) -> dict:
    """One generation step's model inputs with the prefix: the base model's own preparation, then

    * the cache: at the first step (an empty cache) the P prefix positions of every layer are put in front of it;
      without cache (``use_cache=False``) every step gets a fresh cache holding the prefix alone;
    * the 2-d attention mask: P ones in front (the prefix is attended to by every row, padded or not);
    * the position ids: + P, as the prefixed forward numbers positions (PEFT adds P to given position ids, and the
      model counts the P cached positions when none are given)."""
    config = peft_model.active_peft_config
    virtual = config.num_virtual_tokens
    use_cache = kwargs.get("use_cache", True)
    inputs = peft_model.base_model_prepare_inputs_for_generation(*args, **kwargs)
    key = "cache" if "cache" in inputs or "past_key_values" not in inputs else "past_key_values"
    reference = inputs.get("input_ids")
    if reference is None:
        reference = inputs["inputs_embeds"]
    batch_size = reference.shape[0]
    cache = inputs.get(key)
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(
            f"QPA prefix tuning generates with transformers' DynamicCache, got {type(cache).__name__}: leave "
            "cache_implementation unset."
        )
    if not use_cache or cache is None or cache.get_seq_length() == 0:
        inputs[key] = peft_model.get_prompt(batch_size=batch_size)
    mask = inputs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("QPA prefix tuning's generate() needs a 2-d attention mask (batch x sequence).")
        inputs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], virtual), mask], dim=1)
    if inputs.get("position_ids") is not None:
        inputs["position_ids"] = inputs["position_ids"] + virtual
    if inputs.get("cache_position") is not None:  # transformers 4
        inputs["cache_position"] = inputs["cache_position"] + virtual
    return inputs


MERGE_METHODS = ("merge_and_unload", "merge_adapter", "unmerge_adapter", "unload")


def _merge_message(name: str) -> str:
    return (
        f"'{name}' is not available: prefix tuning cannot be merged into the model's weights (its prefixes are extra "
        "key/value positions in every layer, not a change of any weight), neither in PEFT nor in peft_qpa. To use the "
        "trained adapter without peft_qpa, write its classical twin with peft_qpa.export(model, \"prefix-twin\") (a "
        "plain PEFT prefix-tuning adapter); to drop the adapter, use model.get_base_model()."
    )


def _active_config(peft_model) -> Any:
    try:
        return peft_model.peft_config[peft_model.active_adapter]
    except (AttributeError, KeyError, TypeError):
        return None


def merge_refusal(peft_model, name: str) -> Optional[str]:
    """The message for ``name`` missing on ``peft_model`` when it is a merge method asked of a QPA prefix model;
    None otherwise. PeftModel forwards unknown attributes to the base model, which for prefix tuning is the
    transformers model: merge_and_unload() would fail with "'LlamaForCausalLM' object has no attribute ..."."""
    if name in MERGE_METHODS and is_qpa_prefix(_active_config(peft_model)):
        return _merge_message(name)
    return None
