"""Model size and sparsity (section 4 of the method page).

Sizes count the weight matrices of the prunable sublayers only: per layer the
query, key, value and output projections of attention (4·C·H·D) and the up and
down projections of the FFN (2·C·F). Biases, embeddings, LayerNorms, pooler and
classifier are not counted. Biases are left out everywhere (expected size,
deterministic masks, compact model) so that the three numbers agree exactly;
they are under 0.3% of the prunable parameters of BERT-base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

FAMILIES = ("hidden", "head", "mha", "intermediate", "ffn")


@dataclass(frozen=True)
class ModelShape:
    """The full (unpruned) dimensions a set of masks refers to."""

    num_layers: int  # L
    num_heads: int  # H
    head_size: int  # D
    hidden_size: int  # C
    intermediate_size: int  # F

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """The full shape; for a compact CofiConfig, the shape it was pruned from."""
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            head_size=getattr(config, "attention_head_size", None)
            or config.hidden_size // config.num_attention_heads,
            hidden_size=getattr(config, "full_hidden_size", None) or config.hidden_size,
            intermediate_size=config.intermediate_size,
        )

    def mask_shape(self, family: str) -> tuple[int, ...]:
        L = self.num_layers
        return {
            "hidden": (self.hidden_size,),
            "head": (L, self.num_heads),
            "mha": (L,),
            "intermediate": (L, self.intermediate_size),
            "ffn": (L,),
        }[family]

    @property
    def prunable_size(self) -> int:
        """M: prunable weights of the full model."""
        C, H, D, F = self.hidden_size, self.num_heads, self.head_size, self.intermediate_size
        return self.num_layers * (4 * C * H * D + 2 * C * F)


def group_counts(keep: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """Per-unit keep values summed over each family's groups: the (expected) units kept
    per group, the shapes ``size_of_counts`` takes. hidden (C,) → (); head (L, H),
    intermediate (L, F) → (L,); the layer gates mha, ffn (L,) are groups of one."""
    per_layer = {"head", "intermediate"}
    return {
        f: v.sum(-1) if f in per_layer else v.sum() if f == "hidden" else v
        for f, v in keep.items()
        if v is not None
    }


def complete_counts(shape: ModelShape, counts: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``counts`` (units kept per group, the shapes of ``group_counts``, optionally with
    leading batch dimensions S: hidden S, the others (*S, L)) with every family present:
    a missing family (not pruned) keeps everything."""
    given = {f: v for f, v in counts.items() if v is not None}
    first = next(iter(given.items()), None)
    like = {"dtype": torch.float64} if first is None else {"dtype": first[1].dtype, "device": first[1].device}
    batch = () if first is None else first[1].shape if first[0] == "hidden" else first[1].shape[:-1]
    L = shape.num_layers
    full = {"hidden": ((), shape.hidden_size), "head": ((L,), shape.num_heads), "mha": ((L,), 1),
            "intermediate": ((L,), shape.intermediate_size), "ffn": ((L,), 1)}
    return {f: given[f] if f in given else torch.full(batch + size, n, **like) for f, (size, n) in full.items()}


def size_of_counts(shape: ModelShape, counts: Mapping[str, Tensor]) -> Tensor:
    """E = hidden · [4·D·Σ_l mha(l)·heads(l) + 2·Σ_l ffn(l)·units(l)].

    ``counts`` maps a family to the units kept per group: hidden (), heads and
    FFN units per layer (L,), the layer gates mha and ffn (L,) in [0, 1]. They may be
    expected counts (sums of keep probabilities) or exact ones (deterministic
    masks). A missing family keeps everything.
    """
    c = complete_counts(shape, counts)
    heads = (c["mha"] * c["head"]).sum(-1)
    units = (c["ffn"] * c["intermediate"]).sum(-1)
    return c["hidden"] * (4 * shape.head_size * heads + 2 * units)


def sparsity_of_counts(shape: ModelShape, counts: Mapping[str, Tensor]) -> Tensor:
    """1 − E / M for units kept per group (``size_of_counts``'s counts)."""
    return 1.0 - size_of_counts(shape, counts) / shape.prunable_size


def remaining_size(shape: ModelShape, keep: Mapping[str, Tensor | None]) -> Tensor:
    """E = Σ_k p_hid(k) · [4·D·Σ_{l,h} p_MHA(l)·p_head(l,h) + 2·Σ_{l,j} p_FFN(l)·p_int(l,j)].

    ``keep`` maps a family to its keep probabilities P(z > 0) (expected size) or
    to 0/1 indicators (size under deterministic masks). A missing family keeps
    everything.
    """
    return size_of_counts(shape, group_counts(keep))


def expected_sparsity(shape: ModelShape, keep: Mapping[str, Tensor]) -> Tensor:
    """ŝ = 1 − E / M (differentiable in the keep probabilities)."""
    return sparsity_of_counts(shape, group_counts(keep))


def mask_sparsity(shape: ModelShape, masks: Mapping[str, Tensor]) -> float:
    """Sparsity implied by deterministic masks: a unit counts iff its mask is non-zero."""
    keep = {k: (v != 0).double() for k, v in masks.items() if v is not None}  # float64: exact counts
    return float(expected_sparsity(shape, keep))


def max_sparsity(shape: ModelShape, families: tuple[str, ...] | list[str]) -> float:
    """The highest sparsity masks of ``families`` can reach (all their units removed).

    With "hidden", "head" + "intermediate" or "mha" + "ffn" (or mixes covering both
    sublayers) everything can go: 1.0. With only attention (or only FFN) families,
    the other sublayer's weights stay: 2F / (4HD + 2F) of the size remains, etc.
    """
    zero = {f: torch.zeros(shape.mask_shape(f), dtype=torch.float64) for f in families}
    return float(expected_sparsity(shape, zero))


PRUNABLE_LINEARS = ("query", "key", "value", "attn_out", "ffn_up", "ffn_down")


def count_prunable_parameters(model: nn.Module) -> int:
    """Prunable weights counted from a (possibly compact) model's real tensors."""
    return sum(
        getattr(layer, name).weight.numel() for layer in model.layers for name in PRUNABLE_LINEARS
    )


def model_sparsity(model: nn.Module) -> float:
    """Sparsity of a compact model, from its real tensors and the full shape in its config."""
    return 1.0 - count_prunable_parameters(model) / ModelShape.from_config(model.config).prunable_size
