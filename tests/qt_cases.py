"""Quantum-Train cases for PEFT's custom-model matrix (``tests/test_peft_common.py``), in the format of its
``QPA_TEST_CASES``: ``(test_name, model_id, config_cls, config_kwargs)`` on upstream's tiny models ("MLP": lin0,
lin1; "EmbConv1D": emb, conv1d (transformers' Conv1D); "Conv2d": conv2d, lin0; "Conv2dGroups": a grouped conv2d).
Small generators, so that each case runs in well under a second."""

from peft_qpa import QTConfig

SMALL = {"chunk_size": 8, "qnn_depth": 2, "mapping_hidden_sizes": [8], "seed": 0}

QT_TEST_CASES = [
    ("Vanilla MLP 1 QT", "MLP", QTConfig, {"target_modules": "lin0", **SMALL}),
    ("Vanilla MLP 2 QT", "MLP", QTConfig, {"target_modules": ["lin0", "lin1"], **SMALL}),
    ("Vanilla MLP 3 QT", "MLP", QTConfig, {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **SMALL}),
    ("Vanilla MLP 4 QT bias", "MLP", QTConfig, {"target_modules": ["lin0", "lin1"], "bias_update": True, **SMALL}),
    # the conv1d alone is small: chunks of 4 give the circuit enough qubits for every angle to matter
    ("Embedding + transformers Conv1D 1 QT", "EmbConv1D", QTConfig, {"target_modules": ["conv1d"], **SMALL, "chunk_size": 4}),
    ("Embedding + transformers Conv1D 2 QT", "EmbConv1D", QTConfig, {"target_modules": ["emb", "conv1d"], **SMALL}),
    ("Conv2d 1 QT", "Conv2d", QTConfig, {"target_modules": ["conv2d"], **SMALL}),
    ("Conv2d 2 QT bias", "Conv2d", QTConfig, {"target_modules": ["conv2d", "lin0"], "bias_update": True, **SMALL}),
    ("Conv2d Groups QT", "Conv2dGroups", QTConfig, {"target_modules": ["conv2d"], **SMALL}),
]
