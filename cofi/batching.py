"""Batching tokenised examples: dynamic padding and a seeded, resumable order."""

from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor

Example = Mapping[str, Sequence[int] | int | float]


# A compiled training step has one graph per batch shape; padding every batch to a
# multiple of this many tokens keeps the shapes to max_length / 16 buckets (4 at the
# default 64), where padding to the longest example gives one per length.
COMPILED_LENGTH_MULTIPLE = 16


class Collator:
    """Pads a list of tokenised examples to the longest one in the batch, rounded up to
    a multiple of ``pad_to_multiple`` (1: the longest; a compiled step: its buckets).

    Each example has "input_ids", optionally "token_type_ids" and "label";
    the batch gets an "attention_mask" (1 for real tokens).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple: int = 1):
        if pad_to_multiple < 1:
            raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple = pad_to_multiple

    def __call__(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        T = -(-longest // self.pad_to_multiple) * self.pad_to_multiple  # (B, T): T the bucket of the longest
        B = len(examples)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        token_type_ids = torch.zeros((B, T), dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.as_tensor(e["input_ids"])
            if "token_type_ids" in e:
                token_type_ids[i, :n] = torch.as_tensor(e["token_type_ids"])
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
        if "label" in examples[0]:
            labels = [e["label"] for e in examples]
            dtype = torch.float if isinstance(labels[0], float) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


# Length grouping sorts windows of this many batches: wide enough that most
# batches pad to within a token or two of their own examples (SST-2 at batch 32:
# 14 tokens per row instead of 40), narrow enough that the windows stay random.
GROUP_WINDOW_BATCHES = 50


def epoch_order(
    num_examples: int, epoch: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int = 1
) -> Tensor:
    """The example order of one epoch: a function of (seed, epoch) alone, so a
    resumed run sees exactly the batches an uninterrupted one would.

    With ``lengths``, examples are grouped by length: a random permutation is cut
    into windows of ``GROUP_WINDOW_BATCHES`` batches, each window is sorted by
    length and cut into batches, and the full batches are shuffled (the one short
    batch, if any, stays last so that every batch starts at a multiple of
    ``batch_size``). Less padding, the same examples per epoch.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=generator)
    if lengths is None:
        return order
    if len(lengths) != num_examples:
        raise ValueError(f"{len(lengths)} lengths for {num_examples} examples")
    length = torch.as_tensor(lengths)
    window = GROUP_WINDOW_BATCHES * batch_size
    grouped = torch.cat([
        chunk[torch.argsort(length[chunk], descending=True, stable=True)] for chunk in order.split(window)
    ])
    full = num_examples // batch_size
    head, tail = grouped[: full * batch_size].view(full, batch_size), grouped[full * batch_size :]
    head = head[torch.randperm(full, generator=generator)]
    return torch.cat([head.reshape(-1), tail])


def batches(
    dataset: Sequence[Example], batch_size: int, collate: Collator, order: Tensor | None = None, skip: int = 0
) -> Iterator[dict[str, Tensor]]:
    """Batches of ``dataset`` in ``order`` (default: as stored), skipping the first ``skip``."""
    indices = order.tolist() if order is not None else list(range(len(dataset)))
    for start in range(skip * batch_size, len(indices), batch_size):
        yield collate([dataset[i] for i in indices[start : start + batch_size]])
