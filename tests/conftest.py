"""Tiny models built from configs (never the Hub)."""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

import peft_qpa  # noqa: F401  (registers QPA)

warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")


@pytest.fixture(params=["gpt2", "llama"])
def arch(request):
    return request.param


@pytest.fixture
def input_ids():
    return torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def tiny_lm_files(tmp_path_factory):
    """(model_dir, train_file, held_out_file): a tiny local causal LM and text (see tiny_lm.py)."""
    from tiny_lm import make_text_files, make_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny_lm")
    model_dir = make_tiny_model_dir(root / "model")
    train, held = make_text_files(root / "text")
    return model_dir, train, held
