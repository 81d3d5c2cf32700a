"""Perplexity, computed once and correctly, and the block builder used for training.

This module is the single perplexity implementation of the project: the demo, ``examples/run_clm_qpa.py``
and the benchmarks all call :func:`perplexity`.

Definition (token-weighted, causal):

* a token at position ``t`` of a window is predicted from positions ``< t`` of the *same* window, so the
  first token of every window is never scored (there is nothing to predict it from) unless it is context
  carried over by a sliding window;
* a position counts when its label is not ``-100``: padding and sliding-window context are ``-100``;
* ``NLL = sum(-log p(token)) / number of counted tokens`` over the whole set -- never a mean of per-batch
  means, which would over-weight short or padded batches -- and ``perplexity = exp(NLL)``.

The QPA paper's public reference code (GitHub ``CYLphysics/QPA``; paper: Liu et al., "A Quantum Circuit-Based
Compression Perspective for Parameter-Efficient Learning", ICLR 2025, arXiv:2410.09846) scored padding tokens
(pad = EOS, padded to 512) and averaged per-batch means, which is why it reports perplexities of ~1.5 for GPT-2;
see ``docs/demo.md``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "PerplexityResult",
    "group_texts",
    "perplexity",
    "tokenize_and_group",
    "window_spans",
]


@dataclass
class PerplexityResult:
    """What :func:`perplexity` measured.

    ``perplexity = exp(nll)``, ``nll = nll_sum / n_tokens`` (nats per scored token).
    """

    perplexity: float
    nll: float
    nll_sum: float
    n_tokens: int
    n_windows: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __float__(self) -> float:  # lets callers write float(perplexity(...))
        return self.perplexity


# --------------------------------------------------------------------------------------------------------
# building blocks from text
# --------------------------------------------------------------------------------------------------------
def group_texts(
    token_id_lists: Iterable[Sequence[int]],
    block_size: int,
    *,
    drop_last: bool = True,
    separator_id: Optional[int] = None,
) -> list[list[int]]:
    """Concatenate token sequences and cut the stream into blocks of ``block_size`` tokens.

    The same operation as ``group_texts`` in transformers' ``run_clm.py``. ``separator_id`` (e.g. the EOS id)
    is appended after every sequence so documents do not run into each other. ``drop_last=True`` drops the
    final partial block (training: every block full); ``False`` keeps it shorter (evaluation: every token
    scored; :func:`perplexity` pads and masks it).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (a block of 1 token has nothing to predict), got {block_size}.")
    stream: list[int] = []
    for ids in token_id_lists:
        stream.extend(int(i) for i in ids)
        if separator_id is not None:
            stream.append(int(separator_id))
    n_full = len(stream) // block_size
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n_full)]
    rest = stream[n_full * block_size :]
    if rest and not drop_last:
        blocks.append(rest)
    return blocks


def tokenize_and_group(
    tokenizer,
    texts: Union[str, Iterable[str]],
    block_size: int,
    *,
    drop_last: bool = True,
    add_eos: bool = True,
    max_tokens: Optional[int] = None,
) -> list[list[int]]:
    """Tokenize ``texts`` (one string or many documents), join them with EOS, and cut into blocks.

    No special tokens other than the EOS separator are added. ``max_tokens`` truncates the concatenated
    stream (applied before blocking) to bound the cost of a run.
    """
    if isinstance(texts, str):
        texts = [texts]
    sep = tokenizer.eos_token_id if add_eos else None
    if add_eos and sep is None:
        raise ValueError("tokenize_and_group(add_eos=True) needs a tokenizer with eos_token_id; pass add_eos=False.")
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        if max_tokens is not None and len(stream) >= max_tokens:
            del stream[max_tokens:]
            break
    return group_texts([stream], block_size, drop_last=drop_last)


# --------------------------------------------------------------------------------------------------------
# windows
# --------------------------------------------------------------------------------------------------------
def window_spans(n_tokens: int, block_size: int, stride: Optional[int] = None) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` windows over a stream of ``n_tokens`` tokens.

    Without ``stride`` (or ``stride == block_size``) the stream is cut into consecutive non-overlapping
    blocks; every token is a label in exactly one block, and the first token of each block is unscored
    because it has no context. With ``stride < block_size`` (sliding window, as in the transformers
    perplexity guide) every window is ``block_size`` long and moves by ``stride``; tokens already scored
    by the previous window are context only, so each token after the first is scored exactly once with
    up to ``block_size - stride`` tokens of context.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}.")
    spans = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        spans.append((begin, end, max(prev_end, begin)))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def _as_examples(data, block_size: Optional[int], stride: Optional[int]) -> list[dict[str, torch.Tensor]]:
    """Normalize the accepted inputs to a list of {input_ids, labels, attention_mask} 1-D tensors."""

    def from_stream(ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        if block_size is None:
            raise ValueError("perplexity() on a token stream needs block_size (e.g. 256).")
        out = []
        for begin, end, first in window_spans(int(ids.numel()), block_size, stride):
            x = ids[begin:end].clone()
            labels = x.clone()
            labels[: first - begin] = IGNORE_INDEX
            out.append({"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)})
        return out

    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            return from_stream(data.long())
        if data.dim() == 2:
            return [{"input_ids": row.long(), "labels": row.long().clone(), "attention_mask": torch.ones_like(row)} for row in data]
        raise ValueError(f"perplexity() takes a 1-D token stream or a 2-D (blocks, length) tensor, got shape {tuple(data.shape)}.")
    if isinstance(data, Mapping) and "input_ids" in data:  # dict of columns
        keys = [k for k in ("input_ids", "attention_mask", "labels") if k in data]
        rows = [dict(zip(keys, vals)) for vals in zip(*(data[k] for k in keys))]
        return _as_examples(rows, block_size, stride)
    seq = list(data)
    if not seq:
        raise ValueError("perplexity() got no data.")
    first = seq[0]
    if isinstance(first, numbers.Integral) or (isinstance(first, torch.Tensor) and first.dim() == 0):
        return from_stream(torch.as_tensor([int(t) for t in seq], dtype=torch.long))
    examples = []
    for item in seq:
        if isinstance(item, Mapping):
            ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
            mask = torch.as_tensor(item["attention_mask"], dtype=torch.long) if item.get("attention_mask") is not None else torch.ones_like(ids)
            labels = torch.as_tensor(item["labels"], dtype=torch.long) if item.get("labels") is not None else ids.clone()
        else:
            ids = torch.as_tensor(item, dtype=torch.long)
            mask = torch.ones_like(ids)
            labels = ids.clone()
        if ids.dim() != 1:
            raise ValueError(f"Each example's input_ids must be 1-D, got shape {tuple(ids.shape)}.")
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    if block_size is not None and any(ex["input_ids"].numel() > block_size for ex in examples):
        raise ValueError(
            f"An example is longer than block_size={block_size}; build blocks with group_texts/tokenize_and_group "
            "or pass block_size=None to score examples as they are."
        )
    return examples


def _collate(batch: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    length = max(ex["input_ids"].numel() for ex in batch)
    ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = ex["input_ids"].numel()
        ids[i, :n] = ex["input_ids"]
        labels[i, :n] = ex["labels"]
        mask[i, :n] = ex["attention_mask"]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def nll_sum_and_count(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the scored positions of one padded batch, and how many there were.

    Logits at position ``t`` predict the label at ``t + 1`` (the causal shift); labels ``-100`` are skipped.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits if hasattr(out, "logits") else out[0]
    shift_logits = logits[:, :-1, :].float()
    shift_labels = batch["labels"][:, 1:].to(shift_logits.device)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll.double(), int((shift_labels != IGNORE_INDEX).sum())


def perplexity(
    model,
    data: Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]], Sequence[Mapping[str, Any]], Any],
    block_size: Optional[int] = None,
    batch_size: int = 8,
    *,
    stride: Optional[int] = None,
    pad_token_id: int = 0,
    max_windows: Optional[int] = None,
    progress: bool = True,
    desc: str = "perplexity",
    distributed: Optional[bool] = None,
) -> PerplexityResult:
    """Token-weighted perplexity of a causal LM on ``data``.

    ``data`` may be

    * a token stream (1-D tensor or list of ints): cut into ``block_size`` blocks, or sliding windows of
      ``block_size`` moving by ``stride`` (context tokens get label -100);
    * pre-built blocks (2-D tensor, list of lists, a list of dicts or a ``datasets.Dataset`` with
      ``input_ids`` and optionally ``attention_mask``/``labels``): scored as given; rows of different length
      are right-padded, padding is masked out of attention and labelled -100.

    Returns a :class:`PerplexityResult`; ``float(result)`` is the perplexity. The model is put in eval mode
    for the call and its previous mode restored. Under ``torch.distributed`` (e.g. ``accelerate launch``)
    each process scores every ``world_size``-th window and the sums are all-reduced, so every process gets
    the same full-set result; pass ``distributed=False`` to score everything locally.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    examples = _as_examples(data, block_size, stride)
    if max_windows is not None:
        examples = examples[:max_windows]
    if not examples:
        raise ValueError("perplexity(): no windows to score (is the text shorter than 2 tokens?).")

    dist = torch.distributed
    use_dist = dist.is_available() and dist.is_initialized() if distributed is None else bool(distributed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if use_dist else (0, 1)
    local = examples[rank::world]

    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64)
    n_tokens = 0
    try:
        from tqdm.auto import tqdm

        batches = range(0, len(local), batch_size)
        for start in tqdm(batches, desc=desc, disable=not progress or rank != 0, leave=False, unit="batch"):
            batch = _collate(local[start : start + batch_size], pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            s, n = nll_sum_and_count(model, batch)
            nll_sum += s.cpu()
            n_tokens += n
    finally:
        model.train(was_training)

    if use_dist:
        buf = torch.tensor([float(nll_sum), float(n_tokens)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            buf = buf.to(device)
        dist.all_reduce(buf)
        nll_sum, n_tokens = buf[0].cpu(), int(round(float(buf[1])))
    if n_tokens == 0:
        raise ValueError("perplexity(): every label is -100, nothing was scored.")
    nll = float(nll_sum) / n_tokens
    ppl = math.exp(nll) if nll < 700 else float("inf")
    logger.info("perplexity %.4f (nll %.4f over %d tokens, %d windows)", ppl, nll, n_tokens, len(examples))
    return PerplexityResult(perplexity=ppl, nll=nll, nll_sum=float(nll_sum), n_tokens=n_tokens, n_windows=len(examples))
