"""Local stand-ins for the tiny Hub models that PEFT's upstream decoder tests load by id (never the Hub).

PEFT's ``tests/test_decoder_models.py`` loads its models as ``self.transformers_class.from_pretrained(model_id)``
with Hub ids such as ``"peft-internal-testing/tiny-random-OPTForCausalLM"``. ``TINY_CONFIGS`` maps each such id to a
small config of the same architecture; :class:`TinyHub` builds the randomly initialised model (seeded) once with
``save_pretrained`` into a local directory, and :meth:`TinyHub.auto_class` returns a drop-in for
``AutoModelForCausalLM`` whose ``from_pretrained(model_id, **kwargs)`` loads that directory with the same kwargs
(``dtype=...`` etc.). The upstream test bodies stay unchanged; only the test class's ``transformers_class`` differs.

The loaded model's ``name_or_path`` is the local directory (as for any local checkpoint), so nothing PEFT does
with ``base_model_name_or_path`` (e.g. the embedding-resize check of ``save_pretrained``) reaches for the Hub.

No tokenizer is saved: the upstream tests that run for non-prompt-learning methods feed fixed token ids
(``prepare_inputs_for_testing``) and never load one; only the prompt-tuning / Trainer tests do, and those are not
collected for QPA.

Sizes follow the Hub models loosely (hidden 16-32, 4 heads) with 2 layers and a vocabulary of 128, so that each
model builds in well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

VOCAB = 128
COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}

# Hub id -> (transformers config class, kwargs, model class). Ids as in upstream PEFT_DECODER_MODELS_TO_TEST /
# SMALL_GRID_MODELS.
TINY_CONFIGS: dict[str, tuple[str, dict, str]] = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": (
        "OPTConfig",
        {"hidden_size": 16, "ffn_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "word_embed_proj_dim": 16, "max_position_embeddings": 64, **COMMON, "pad_token_id": 1},
        "OPTForCausalLM",
    ),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": (
        "GPT2Config",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, **COMMON},
        "GPT2LMHeadModel",
    ),
    "hf-internal-testing/tiny-random-gpt2": (
        "GPT2Config",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, **COMMON},
        "GPT2LMHeadModel",
    ),
    "peft-internal-testing/tiny-random-GPTJForCausalLM": (
        "GPTJConfig",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 64, **COMMON},
        "GPTJForCausalLM",
    ),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": (
        "LlamaConfig",
        {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, **COMMON},
        "LlamaForCausalLM",
    ),
    "peft-internal-testing/tiny-dummy-qwen2": (
        "Qwen2Config",
        {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, **COMMON},
        "Qwen2ForCausalLM",
    ),
    "hf-internal-testing/tiny-random-MistralForCausalLM": (
        "MistralConfig",
        {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, **COMMON},
        "MistralForCausalLM",
    ),
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64, "sliding_window": 16, **COMMON},
        "Gemma3ForCausalLM",
    ),
}


def _dirname(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "--", model_id)


def build_tiny_model(model_id: str, path: Path, seed: int = 0) -> Path:
    """Save the seeded random-init stand-in for ``model_id`` to ``path`` (``config.json`` + safetensors)."""
    import torch
    import transformers

    try:
        config_name, kwargs, model_name = TINY_CONFIGS[model_id]
    except KeyError:
        raise KeyError(f"{model_id!r} has no local stand-in in tests/tiny_hub.py TINY_CONFIGS") from None
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


class TinyHub:
    """Local directories for the ids of ``TINY_CONFIGS``, each built on first use under ``root``."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path(self, model_id: str) -> Path:
        path = self.root / _dirname(model_id)
        if not (path / "config.json").is_file():
            build_tiny_model(model_id, path)
        return path

    def auto_class(self, auto_cls):
        """A stand-in for ``auto_cls`` (e.g. ``AutoModelForCausalLM``) whose ``from_pretrained`` maps Hub ids of
        ``TINY_CONFIGS`` to their local directories; any other name or path is passed through unchanged."""
        hub = self

        class TinyHubAutoClass:
            __doc__ = f"``{auto_cls.__name__}`` loading the tiny local stand-ins of tests/tiny_hub.py."

            @staticmethod
            def from_pretrained(pretrained_model_name_or_path, *args, **kwargs):
                name = str(pretrained_model_name_or_path)
                if name in TINY_CONFIGS:
                    pretrained_model_name_or_path = hub.path(name)
                return auto_cls.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

            @staticmethod
            def from_config(*args, **kwargs):
                return auto_cls.from_config(*args, **kwargs)

        TinyHubAutoClass.__name__ = TinyHubAutoClass.__qualname__ = f"TinyHub{auto_cls.__name__}"
        return TinyHubAutoClass
