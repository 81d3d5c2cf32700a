"""Bottleneck cases for PEFT's custom-model matrix (``tests/test_peft_common.py``), in the format of its
``QPA_TEST_CASES``: ``(test_name, model_id, config_cls, config_kwargs)`` on upstream's tiny models ("MLP": lin0
(10 -> 20), lin1 (20 -> 2); "MLP2": lin0 (10 -> 32), lin1; "MLP_LayerNorm": layernorm0, lin0, layernorm1, lin1;
"EmbConv1D": emb, conv1d (transformers' Conv1D, 5 -> 1)). Each QPA case has a classical twin (``BottleneckConfig``
with the same adapter fields). Small generators, so that each case runs in well under a second.

Which upstream generic tests cannot pass, and why: a bottleneck adapter is nonlinear (``h + up(act(down(h)))``), so
no change of the base weights reproduces it and ``merge_adapter()`` / ``merge_and_unload()`` raise
``NotImplementedError`` (see ``docs/bottleneck.md``). The upstream tests that call
``testing_common._skip_if_merging_not_supported`` all merge at some point and must be skipped for these configs
(``test_merge_layers``, ``test_merge_layers_fp16``, ``test_merge_layers_is_idempotent``,
``test_merge_layers_is_deterministic_in_train_mode``, ``test_safe_merge``, ``test_disable_adapters_with_merging``,
``test_delete_merged_adapter_raises_without_mutation``, ``test_delete_merged_adapter_only_rejects_the_merged_one``,
and ``test_forward_float16`` / ``test_forward_bfloat16`` (``_no_autocast`` too), which merge after their forward
checks), as upstream skips prompt learning, Lily and ShadowPEFT there: :data:`MERGE_SKIP_REASON` is the reason
to use, and :func:`skips_merging` tells which configs it applies to. Run so (a copy of ``test_peft_common.py`` with
these cases and that skip), every other collected upstream test passes for all twelve cases. A parallel adapter
(``placement="parallel"``) has no case here: none of upstream's tiny models has a Linear whose input and output
widths agree (it is covered by ``tests/test_bottleneck.py`` on Llama's MLP block).
"""

from peft_qpa import BottleneckConfig, QPABottleneckConfig

SMALL = {"chunk_size": 8, "qnn_depth": 2, "mapping_hidden_sizes": [8], "seed": 0}

MERGE_SKIP_REASON = (
    "A bottleneck adapter is nonlinear and cannot be merged into the base weights (merge raises NotImplementedError)."
)


def skips_merging(config_cls) -> bool:
    """Whether upstream's merge checks must be skipped for ``config_cls`` (both bottleneck members)."""
    return isinstance(config_cls, type) and issubclass(config_cls, (QPABottleneckConfig, BottleneckConfig))


_QPA_CASES = [
    ("Vanilla MLP 1 QPA-Bottleneck", "MLP", QPABottleneckConfig, {"target_modules": "lin0", "bottleneck_size": 4, **SMALL}),
    (
        "Vanilla MLP 2 QPA-Bottleneck",
        "MLP",
        QPABottleneckConfig,
        {"target_modules": ["lin0", "lin1"], "bottleneck_size": 4, **SMALL},
    ),
    (
        "Vanilla MLP 3 QPA-Bottleneck",
        "MLP",
        QPABottleneckConfig,
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "bottleneck_size": 4, **SMALL},
    ),
    (
        "Vanilla MLP 4 QPA-Bottleneck gelu dropout",
        "MLP2",
        QPABottleneckConfig,
        {"target_modules": ["lin0"], "activation": "gelu", "dropout": 0.1, "bottleneck_size": 8, **SMALL},
    ),
    # a LayerNorm has no Linear inside: its width comes from hidden_size
    (
        "MLP LayerNorm QPA-Bottleneck hidden_size",
        "MLP_LayerNorm",
        QPABottleneckConfig,
        {"target_modules": ["layernorm1"], "hidden_size": 20, "activation": "tanh", "bottleneck_size": 4, **SMALL},
    ),
    (
        "Embedding + transformers Conv1D 1 QPA-Bottleneck",
        "EmbConv1D",
        QPABottleneckConfig,
        {"target_modules": ["conv1d"], "bottleneck_size": 8, **SMALL, "chunk_size": 2},
    ),
]


def _classical(case):
    name, model_id, _, kwargs = case
    kwargs = {k: v for k, v in kwargs.items() if k not in SMALL}
    return (name.replace("QPA-Bottleneck", "Bottleneck"), model_id, BottleneckConfig, kwargs)


BOTTLENECK_TEST_CASES = _QPA_CASES + [_classical(case) for case in _QPA_CASES]
