"""The QPA section of an adapter's model card (README.md), written next to ``adapter_config.json``."""

from __future__ import annotations

import os
import re

from huggingface_hub import ModelCard, ModelCardData

TAGS = ("qpa", "quantum", "peft-qpa")  # every adapter of this package; each method adds its own (card_tags)
SECTION_START = "<!-- peft-qpa:start -->"
SECTION_END = "<!-- peft-qpa:end -->"


def card_facts(config, generator, classical_parameters: int, tuner=None) -> dict:
    """What a reader of the card needs to know about an adapter, from its config, generator and tuner (which
    describes the method: ``card_description`` and ``classical_name``)."""
    trainable = generator.num_trainable()
    targets = getattr(config, "target_modules", None)
    targets = sorted(targets) if isinstance(targets, set) else targets
    return {
        "description": tuner.card_description(config, targets) if tuner is not None else f"an adapter (targets: {targets})",
        "classical_name": getattr(tuner, "classical_name", "the classical twin"),
        "classical_use": getattr(tuner, "card_classical_use", ""),
        "tags": list(getattr(tuner, "card_tags", ())),
        "qubits": generator.n_qubits,
        "depth": config.qnn_depth,
        "ansatz": config.ansatz,
        "chunk_size": config.chunk_size,
        "backend": config.backend,
        "shots": config.shots,
        "shots_per_state": config.shots_per_state,
        "sampler_backend_name": getattr(config, "sampler_backend_name", None),
        "noise_model": config.noise_model if isinstance(config.noise_model, (str, type(None))) else "custom NoiseModel",
        "generative_interpolation": config.generative_interpolation,
        "readout_mitigation": getattr(config, "readout_mitigation", False),
        "trainable_parameters": trainable,
        "classical_parameters": classical_parameters,
        "ratio": trainable / classical_parameters,
    }


def _section(facts: dict, base_model: str | None) -> str:
    shots = "exact probabilities"
    if facts["backend"] in ("aer_shots", "sampler"):
        shots = f"{facts['shots']} shots" if facts["shots"] else f"{facts['shots_per_state']} shots per basis state"
    if facts["backend"] == "sampler":
        shots += f"; device: {facts.get('sampler_backend_name') or 'none attached'}"
    noise = facts["noise_model"] or "none"
    if facts.get("readout_mitigation"):
        noise += " (readout error mitigated)"
    base = base_model or "BASE_MODEL"
    return f"""{SECTION_START}
## Quantum Parameter Adaptation (QPA)

This adapter is {facts['description']}. Its tensors were generated during training by a parameterized
quantum circuit and a mapping MLP, with the `peft-qpa` package
(an implementation of Quantum Parameter Adaptation: Liu et al., "A Quantum Circuit-Based Compression
Perspective for Parameter-Efficient Learning", ICLR 2025, [arXiv:2410.09846](https://arxiv.org/abs/2410.09846)).
`peft-qpa` is not published on PyPI: install it from its source tree with `pip install .`.

| | |
| --- | --- |
| qubits | {facts['qubits']} |
| circuit depth | {facts['depth']} ({facts['ansatz']}) |
| chunk size | {facts['chunk_size']} |
| backend | {facts['backend']} ({shots}) |
| noise model | {noise} |
| generative interpolation | {facts['generative_interpolation']} |
| trainable parameters | {facts['trainable_parameters']:,} |
| {facts['classical_name']} | {facts['classical_parameters']:,} |
| ratio | {facts['ratio']:.2%} |

### How to load

With peft-qpa (the generator can be trained further):

```python
import peft_qpa  # registers the peft-qpa methods with PEFT
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "THIS_REPO")
```

{facts['classical_use']}
{SECTION_END}"""


def update_model_card(save_directory: str, facts: dict, base_model: str | None = None) -> None:
    """Add (or replace) the QPA section and tags in ``save_directory/README.md``."""
    path = os.path.join(save_directory, "README.md")
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(TAGS) | set(facts.get("tags", ())))
    if base_model and not card.data.get("base_model"):
        card.data["base_model"] = base_model
    section = _section(facts, base_model)
    pattern = re.compile(re.escape(SECTION_START) + ".*?" + re.escape(SECTION_END), re.S)
    text = card.text
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else section + "\n\n" + text
    card.text = text
    card.save(path)
