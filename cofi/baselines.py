"""Baselines that CoFi is measured against, built from the same teacher.

- Layer-subset distillation (DistilBERT / TinyBERT style): a student made of
  some of the teacher's layers, optionally narrowed to the heads and FFN units
  with the largest weights, sized to the FLOPs of a CoFi model, then trained
  with the same distillation losses.
- Iterative magnitude pruning (the lottery-ticket procedure): unstructured,
  global, by |weight| over the prunable matrices, with the surviving weights
  rewound to the teacher's after each round. Sparse in its zeros, dense in its
  tensors: it saves no time without sparse kernels, which is the point.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from cofi.compact import compact
from cofi.distill import default_teacher_layers
from cofi.flops import forward_flops, layer_flops
from cofi.modeling_cofi import CofiForSequenceClassification
from cofi.sparsity import PRUNABLE_LINEARS
from cofi.trainer import TrainerCallback, TrainResult

WIDTH_FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # the widths the size search tries, per sublayer type


# --------------------------------------------------------------------------- #
# Layer-subset students
# --------------------------------------------------------------------------- #


def layer_subset(model: CofiForSequenceClassification, layers: Sequence[int]) -> CofiForSequenceClassification:
    """A new model of ``model``'s embeddings, the given 1-based layers (in order) and its head."""
    layers = [int(i) for i in layers]
    if not layers or any(not 1 <= i <= model.config.num_hidden_layers for i in layers) or layers != sorted(set(layers)):
        raise ValueError(f"layers {layers} must be increasing 1-based layers of 1..{model.config.num_hidden_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layers)
    config.layer_num_heads = [model.config.layer_num_heads[i - 1] for i in layers]
    config.layer_intermediate_size = [model.config.layer_intermediate_size[i - 1] for i in layers]
    student = CofiForSequenceClassification(config).to(next(model.parameters()).device)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            if int(index) + 1 not in layers:
                continue
            key = f"layers.{layers.index(int(index) + 1)}.{rest}"
        state[key] = value
    student.load_state_dict(state)
    return student


def largest_units(model: CofiForSequenceClassification, head_fraction: float, ffn_fraction: float) -> dict[str, Tensor]:
    """Binary head and FFN-unit masks keeping, per layer, the fraction with the largest
    output weights (L2 norm of their columns in attn_out / ffn_down)."""
    heads, units = [], []
    for layer in model.layers:
        D = layer.head_size
        head_norm = layer.attn_out.weight.detach().view(-1, layer.num_heads, D).pow(2).sum((0, 2))  # (H,)
        unit_norm = layer.ffn_down.weight.detach().pow(2).sum(0)  # (F,)
        heads.append(_top_fraction(head_norm, head_fraction))
        units.append(_top_fraction(unit_norm, ffn_fraction))
    return {"head": torch.stack(heads), "intermediate": torch.stack(units)}


def _top_fraction(scores: Tensor, fraction: float) -> Tensor:
    keep = max(1, round(fraction * scores.numel()))
    mask = torch.zeros_like(scores)
    mask[scores.topk(keep).indices] = 1.0
    return mask


@dataclass(frozen=True)
class SubsetSize:
    layers: tuple[int, ...]  # 1-based teacher layers
    head_fraction: float
    ffn_fraction: float
    flops: int


def subset_student(model: CofiForSequenceClassification, size: SubsetSize) -> CofiForSequenceClassification:
    student = layer_subset(model, size.layers)
    if size.head_fraction < 1 or size.ffn_fraction < 1:
        student = compact(student.eval(), largest_units(student, size.head_fraction, size.ffn_fraction)).train()
    return student


def size_matching_flops(model: CofiForSequenceClassification, target_flops: int, sequence_length: int) -> SubsetSize:
    """The layer subset (evenly spaced, top layer included) and uniform widths whose
    FLOPs per example are closest to ``target_flops`` (in ratio); ties prefer more layers."""
    config = model.config
    head = forward_flops(model, sequence_length) - sum(
        layer_flops(sequence_length, config.hidden_size, layer.num_heads, layer.head_size, layer.ffn_up.out_features)
        for layer in model.layers
    )  # pooler and classifier
    best: SubsetSize | None = None
    for count in range(config.num_hidden_layers, 0, -1):
        layers = tuple(default_teacher_layers(config.num_hidden_layers, count))
        for head_fraction in WIDTH_FRACTIONS:
            for ffn_fraction in WIDTH_FRACTIONS:
                flops = head + sum(
                    layer_flops(sequence_length, config.hidden_size,
                                max(1, round(head_fraction * config.layer_num_heads[i - 1])), config.attention_head_size,
                                max(1, round(ffn_fraction * config.layer_intermediate_size[i - 1])))
                    for i in layers
                )
                distance = abs(math.log(flops / target_flops))
                if best is None or distance < abs(math.log(best.flops / target_flops)) - 1e-9:
                    best = SubsetSize(layers, head_fraction, ffn_fraction, flops)
    return best


# --------------------------------------------------------------------------- #
# Iterative magnitude pruning
# --------------------------------------------------------------------------- #


def prunable_weights(model: CofiForSequenceClassification) -> dict[str, nn.Parameter]:
    return {f"layers.{i}.{name}.weight": getattr(layer, name).weight
            for i, layer in enumerate(model.layers) for name in PRUNABLE_LINEARS}


def magnitude_masks(model: CofiForSequenceClassification, sparsity: float,
                    previous: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Global magnitude masks over the prunable matrices: the ``sparsity`` fraction with the
    smallest |w| (among those ``previous`` kept) is zeroed. Exact count; ties by position."""
    weights = prunable_weights(model)
    scores = torch.cat([w.detach().abs().flatten() for w in weights.values()])
    if previous:  # already pruned weights must stay pruned
        kept_before = torch.cat([previous[n].flatten() for n in weights]).bool()
        scores = torch.where(kept_before, scores, torch.full_like(scores, -1.0))
    drop = round(sparsity * scores.numel())
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[scores.argsort(stable=True)[:drop]] = False
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start : start + w.numel()].view_as(w).to(w.dtype)
        start += w.numel()
    return masks


def apply_weight_masks(model: CofiForSequenceClassification, masks: dict[str, Tensor]) -> None:
    weights = prunable_weights(model)
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask.to(weights[name].device))


class KeepPruned(TrainerCallback):
    """Re-zeroes the pruned weights after every optimizer step."""

    def __init__(self, model: CofiForSequenceClassification, masks: dict[str, Tensor]):
        self.model, self.masks = model, masks

    def on_step(self, step: int, logs) -> None:
        apply_weight_masks(self.model, self.masks)


def iterative_magnitude_pruning(
    teacher: CofiForSequenceClassification,
    sparsity: float,
    rounds: int,
    train: Callable[[CofiForSequenceClassification, KeepPruned, int], TrainResult],
) -> tuple[CofiForSequenceClassification, dict[str, Tensor], TrainResult]:
    """``rounds`` rounds; round r prunes to 1 − (1 − sparsity)^(r / rounds) by magnitude of the
    weights trained so far, rewinds the survivors to the teacher's values and trains with the
    mask held (``train(model, callback, round)``). Returns the last round's model, masks, result."""
    if not 0 < sparsity < 1 or rounds < 1:
        raise ValueError(f"sparsity={sparsity} must be in (0, 1) and rounds={rounds} >= 1")
    trained, masks, result = teacher, None, None
    for r in range(1, rounds + 1):
        masks = magnitude_masks(trained, 1 - (1 - sparsity) ** (r / rounds), masks)
        model = copy.deepcopy(teacher)  # rewind
        apply_weight_masks(model, masks)
        result = train(model, KeepPruned(model, masks), r)
        trained = model
    return trained, masks, result
