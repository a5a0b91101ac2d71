"""The frozen teacher's outputs, computed once per training example.

Distillation runs the teacher on every batch, and the teacher never changes: from
the second epoch on, a forward pass repeats one already done. On the CPU it is a
fifth of a pruning step (all-MiniLM-L6-v2 on SST-2, README). ``TeacherCache``
keeps what the distillation losses read (the logits, and the hidden states of the
distilled layers at each example's real tokens) in one buffer on the training
device, and hands a batch back as a forward pass of that batch would, except at
padding, which holds zeros (the layer loss weights padding 0).

Which examples are kept: the longest prefix of the training set (by index) whose
outputs fit ``budget_bytes``; the others are computed every time they come. An
example is stored when the training loop first meets it, which is in epoch 0,
where every batch is new and so computed whole, exactly as without a cache. The
buffer's content at step s is therefore a function of the seed and s: a resumed
run refills it by running the teacher over epoch 0's batches up to s
(``Trainer.fit``), and continues exactly as the uninterrupted run.

A kept output differs from a fresh forward pass of a later batch only in float
rounding (the same example padded to another length gives the same values, up to
~1e-7 relative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["TeacherBatch", "TeacherCache", "kept_prefix"]

BYTES_PER_VALUE = 4  # fp32: the budget's unit; outputs in bf16 would take half


@dataclass
class TeacherBatch:
    """The teacher outputs of one batch, as the distillation losses read them."""

    logits: Tensor  # (B, K)
    hidden_states: Sequence[Tensor | None] | None  # L + 1 entries; only the distilled layers are needed


def kept_prefix(lengths: Sequence[int], bytes_per_token: int, bytes_per_example: int, budget_bytes: int) -> int:
    """How many leading examples' outputs fit the budget."""
    sizes = np.asarray(lengths, dtype=np.int64) * bytes_per_token + bytes_per_example
    return int(np.searchsorted(np.cumsum(sizes), budget_bytes, side="right"))


class TeacherCache:
    """Args:
        teacher: the frozen teacher, in eval mode, on ``device``.
        lengths: the real token count of every training example, by index.
        layers: the hidden states to keep (indices into ``hidden_states``, 0 being the
            embeddings); empty for prediction distillation only.
        budget_bytes: at most this much is kept (fp32 sizes).

    Call: ``cache(examples, input_ids, attention_mask, token_type_ids)`` with the
    examples' indices and their right-padded batch (B, T), under the caller's
    ``no_grad`` and autocast, returns a ``TeacherBatch``. Nothing here waits for the
    device: which examples are kept is known on the host.
    """

    def __init__(self, teacher: nn.Module, lengths: Sequence[int], layers: Sequence[int], budget_bytes: int,
                 device: torch.device):
        self.teacher, self.layers, self.device = teacher, list(layers), device
        self.num_hidden_states = teacher.config.num_hidden_layers + 1
        self.lengths = np.asarray(lengths, dtype=np.int64)
        token_bytes = len(self.layers) * teacher.config.hidden_size * BYTES_PER_VALUE
        example_bytes = teacher.config.num_labels * BYTES_PER_VALUE
        self.kept = kept_prefix(self.lengths, token_bytes, example_bytes, budget_bytes)
        self.nbytes = int(self.lengths[: self.kept].sum()) * token_bytes + self.kept * example_bytes
        # example i's tokens are rows offsets[i] ... offsets[i] + lengths[i] − 1 of the hidden buffer,
        # and row zero_row stays 0: where padding reads from
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths[: self.kept])])
        self.zero_row = int(self.offsets[-1])
        self.stored = np.zeros(len(self.lengths), dtype=bool)  # in the buffer (only ever for i < kept)
        self.hidden: Tensor | None = None  # (N_layers, kept tokens + 1, C), allocated at the first store
        self.logits: Tensor | None = None  # (kept examples, K)
        self.computed = self.reused = 0  # examples run through the teacher, and read from the buffer

    def __call__(self, examples: Sequence[int], input_ids: Tensor, attention_mask: Tensor,
                 token_type_ids: Tensor) -> TeacherBatch:
        examples = np.asarray(examples, dtype=np.int64)
        stored = self.stored[examples]
        live = np.flatnonzero(~stored)  # rows the teacher computes
        self.computed += len(live)
        self.reused += len(examples) - len(live)
        if len(live) == len(examples):  # every row new (all of epoch 0): the forward pass itself
            out = self._forward(input_ids, attention_mask, token_type_ids)
            self._store(examples, out, input_ids.shape[1])
            return out
        B, T = input_ids.shape
        # every row from the buffer (padding from the zero row), then the live rows over them
        index = np.full((B, T), self.zero_row, dtype=np.int64)
        for row in np.flatnonzero(stored):
            i = examples[row]
            index[row, : self.lengths[i]] = np.arange(self.offsets[i], self.offsets[i + 1])
        hidden = self.hidden.index_select(1, self._on_device(index.reshape(-1))).view(len(self.layers), B, T, -1) \
            if self.layers else None
        logits = self.logits.index_select(0, self._on_device(np.where(stored, examples, examples[stored][0])))
        if len(live):  # some rows new: the teacher runs on those alone
            rows = self._on_device(live)
            out = self._forward(input_ids.index_select(0, rows), attention_mask.index_select(0, rows),
                                token_type_ids.index_select(0, rows))
            self._store(examples[live], out, T)
            logits.index_copy_(0, rows, out.logits.to(logits.dtype))
            if self.layers:
                hidden.index_copy_(1, rows, self._kept_layers(out).to(hidden.dtype))
        states = [None] * self.num_hidden_states
        for k, layer in enumerate(self.layers):
            states[layer] = hidden[k]
        return TeacherBatch(logits, states if self.layers else None)

    def _forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> TeacherBatch:
        out = self.teacher(input_ids, attention_mask, token_type_ids, output_hidden_states=bool(self.layers))
        return TeacherBatch(out.logits, out.hidden_states if self.layers else None)

    def _kept_layers(self, out: TeacherBatch) -> Tensor:
        return torch.stack([out.hidden_states[layer] for layer in self.layers])  # (N_layers, B, T, C)

    def _store(self, examples: np.ndarray, out: TeacherBatch, T: int) -> None:
        """Keep the rows of ``out`` whose examples fit the budget and are not kept yet."""
        rows = np.flatnonzero((examples < self.kept) & ~self.stored[examples])
        if not len(rows):
            return
        if self.logits is None:
            self.logits = torch.zeros(self.kept, out.logits.shape[1], dtype=out.logits.dtype, device=self.device)
            if self.layers:
                C = out.hidden_states[self.layers[0]].shape[-1]
                dtype = out.hidden_states[self.layers[0]].dtype
                self.hidden = torch.zeros(len(self.layers), self.zero_row + 1, C, dtype=dtype, device=self.device)
        new = examples[rows]
        self.logits.index_copy_(0, self._on_device(new), out.logits.index_select(0, self._on_device(rows)).to(self.logits.dtype))
        if self.layers:
            # the real tokens of each stored row: (row, t) of the batch → the example's buffer rows
            source = np.concatenate([row * T + np.arange(self.lengths[i]) for row, i in zip(rows, new)])
            target = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in new])
            states = self._kept_layers(out)
            flat = states.reshape(len(self.layers), -1, states.shape[-1])  # (N_layers, B·T, C)
            self.hidden.index_copy_(1, self._on_device(target), flat.index_select(1, self._on_device(source)).to(self.hidden.dtype))
        self.stored[new] = True

    def _on_device(self, index: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        if self.device.type == "cuda":  # through pinned memory: the copy does not block the host
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)
