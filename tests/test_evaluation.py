"""peft_qpa.apps.evaluation: token-weighted perplexity checked against hand-computed values."""

import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft_qpa.apps.evaluation import (  # noqa: E402
    IGNORE_INDEX,
    group_texts,
    perplexity,
    tokenize_and_group,
    window_spans,
)

# A bigram "language model" over 3 tokens: p(next | current) is row `current` of PROBS.
PROBS = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)


class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(PROBS.log().float())
        self.seen_masks = []

    def forward(self, input_ids, attention_mask=None):
        self.seen_masks.append(attention_mask)
        return SimpleNamespace(logits=self.logits[input_ids])


def test_hand_computed_with_padding():
    # Two examples of different length -> the second is right-padded in a batch of 2.
    # Scored transitions: 0->1 (0.25), 1->2 (0.2), 2->2 (0.8) | 1->0 (0.2); first tokens have no context.
    data = [[0, 1, 2, 2], [1, 0]]
    expected = (0.25 * 0.2 * 0.8 * 0.2) ** (-1 / 4)  # = 0.008 ** -0.25 = 3.3437...
    for batch_size in (1, 2):
        res = perplexity(Bigram(), data, batch_size=batch_size, progress=False)
        assert res.n_tokens == 4
        assert res.perplexity == pytest.approx(expected, rel=1e-6)
        assert res.nll == pytest.approx(-math.log(0.008) / 4, rel=1e-6)
    # the reference code's mean of per-example means would give a different number
    wrong = math.exp((-(math.log(0.25) + math.log(0.2) + math.log(0.8)) / 3 - math.log(0.2)) / 2)
    assert abs(wrong - expected) > 0.1


def test_padding_and_masked_labels_are_not_scored():
    model = Bigram()
    base = perplexity(model, [[0, 1, 2, 2]], progress=False)
    # explicit padding marked in attention_mask: same value, same count
    padded = perplexity(
        model, [{"input_ids": [0, 1, 2, 2, 0, 0, 0], "attention_mask": [1, 1, 1, 1, 0, 0, 0]}], progress=False
    )
    assert padded.n_tokens == base.n_tokens == 3
    assert padded.perplexity == pytest.approx(base.perplexity, rel=1e-9)
    # labels -100 on a prefix: only the last transition (2->2, p=0.8) is scored
    ctx = perplexity(model, [{"input_ids": [0, 1, 2, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 2]}], progress=False)
    assert ctx.n_tokens == 1 and ctx.perplexity == pytest.approx(1 / 0.8, rel=1e-6)
    # the attention mask is passed to the model, with zeros on the padding
    model.seen_masks.clear()
    perplexity(model, [[0, 1, 2, 2], [1, 0]], batch_size=2, progress=False)
    assert model.seen_masks[0].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_stream_blocks_and_sliding_window():
    stream = [0, 1, 2, 2, 1, 0]
    # blocks of 4: [0 1 2 2] [1 0]; the transition 2->1 across the boundary is not scored
    blocks = perplexity(Bigram(), torch.tensor(stream), block_size=4, batch_size=8, progress=False)
    assert blocks.n_windows == 2 and blocks.n_tokens == 4
    assert blocks.perplexity == pytest.approx((0.25 * 0.2 * 0.8 * 0.2) ** (-1 / 4), rel=1e-6)
    # sliding window of 4 moving by 2: every token after the first is scored exactly once
    slide = perplexity(Bigram(), stream, block_size=4, stride=2, progress=False)
    assert slide.n_tokens == len(stream) - 1
    assert slide.perplexity == pytest.approx((0.25 * 0.2 * 0.8 * 0.1 * 0.2) ** (-1 / 5), rel=1e-6)
    assert window_spans(6, 4, 2) == [(0, 4, 0), (2, 6, 4)]
    assert window_spans(9, 4) == [(0, 4, 0), (4, 8, 4), (8, 9, 8)]


def test_group_texts_and_tokenize():
    assert group_texts([[1, 2, 3], [4, 5]], 2) == [[1, 2], [3, 4]]
    assert group_texts([[1, 2, 3], [4, 5]], 2, drop_last=False, separator_id=9) == [[1, 2], [3, 9], [4, 5], [9]]
    with pytest.raises(ValueError, match="block_size"):
        group_texts([[1]], 1)

    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    assert tokenize_and_group(Tok(), ["a bb ccc", "dddd"], 3) == [[1, 2, 3], [0, 4, 0]]
    assert tokenize_and_group(Tok(), ["a bb ccc", "dddd"], 2, max_tokens=3) == [[1, 2]]


def test_tiny_llama_matches_model_loss_and_padding_invariance():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    block = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=block, labels=block).loss  # mean over 11 shifted tokens of one full block
    res = perplexity(model, block, progress=False)
    assert res.n_tokens == 11
    assert res.nll == pytest.approx(float(ref), rel=1e-5)
    # different lengths, batched with right padding == each scored alone, token-weighted
    rows = [torch.randint(0, 50, (n,)).tolist() for n in (12, 5, 9)]
    together = perplexity(model, rows, batch_size=3, progress=False)
    alone = [perplexity(model, [r], progress=False) for r in rows]
    assert together.n_tokens == sum(a.n_tokens for a in alone) == 11 + 4 + 8
    assert together.nll_sum == pytest.approx(sum(a.nll_sum for a in alone), rel=1e-5)
    assert model.training is False


def test_restores_training_mode_and_rejects_bad_input():
    model = Bigram().train()
    perplexity(model, [[0, 1]], progress=False)
    assert model.training
    with pytest.raises(ValueError, match="block_size"):
        perplexity(model, [0, 1, 2], progress=False)
    with pytest.raises(ValueError, match="longer than block_size"):
        perplexity(model, [[0, 1, 2]], block_size=2, progress=False)
    with pytest.raises(ValueError, match="nothing was scored"):
        perplexity(model, [[0]], progress=False)
