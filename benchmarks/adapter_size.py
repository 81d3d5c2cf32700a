"""Adapter file sizes: plain LoRA, QPA-LoRA as saved by default, and QPA-LoRA with ``save_generated_tensors=False``.

The model is the README quickstart's (a random 25M-parameter Llama, all 56 linear layers adapted, r = 4, M = 278,528),
so the numbers are the ones a reader of the quickstart gets. Writes ``benchmarks/results/adapter_size.json``:

    python benchmarks/adapter_size.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_qpa

RESULTS = Path(__file__).parent / "results" / "adapter_size.json"


def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                                        num_attention_heads=8, vocab_size=4000))


def saved_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return (Path(directory) / "adapter_model.safetensors").stat().st_size


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    qpa = dict(r=4, lora_alpha=8, target_modules="all-linear", qnn_depth=8, chunk_size=64)
    rows = {
        "lora": saved_bytes(get_peft_model(base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))),
        "qpa_default": saved_bytes(get_peft_model(base(), peft_qpa.QPAConfig(**qpa))),
        "qpa_generator_only": saved_bytes(get_peft_model(base(), peft_qpa.QPAConfig(save_generated_tensors=False, **qpa))),
    }
    result = {"model": "README quickstart Llama (random, 25M parameters), all-linear, r=4", "bytes": rows,
              "ratio_to_lora": {k: v / rows["lora"] for k, v in rows.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, size in rows.items():
        print(f"{name:>20}: {size / 1e6:6.2f} MB ({size / rows['lora']:.2f}x LoRA)")
    return result


if __name__ == "__main__":
    main()
