"""The distillation loss a student (prune, finetune, baseline) trains with, from the params.
Apart from pipeline.training, so that the teacher stage imports no distillation code (and
the pruning config is the prune stage's own: stages/prune.py)."""

from __future__ import annotations

from cofi.distill import DistillationLoss, LayerDistillLoss, PredictionDistillLoss, default_teacher_layers
from pipeline.params import Params


def distillation_loss(params: Params, hidden_size: int, num_teacher_layers: int) -> DistillationLoss | None:
    """The distillation loss prune.distillation asks for; None: gold labels only."""
    p = params.prune
    if p.distillation == "none":
        return None
    layer = None
    if p.distillation == "layer_and_prediction":
        teacher_layers = p.teacher_layers or default_teacher_layers(num_teacher_layers)
        bad = [i for i in teacher_layers if i > num_teacher_layers]
        if bad:
            raise ValueError(f"prune.teacher_layers {bad} exceed the teacher's {num_teacher_layers} layers")
        layer = LayerDistillLoss(hidden_size, teacher_layers, matching=p.layer_matching)
    return DistillationLoss(PredictionDistillLoss(p.temperature), layer, p.prediction_weight)
