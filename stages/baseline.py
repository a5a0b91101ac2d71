"""Stage `baseline@<method>`: a non-CoFi model from the same teacher, for comparison.

- layer_subset: distillation (prediction + layer, fixed layer matching) into the
  teacher's evenly spaced layers, narrowed uniformly, sized to the FLOPs of the
  CoFi model at baselines.target; trained for the prune + finetune epochs of baselines.target.
- magnitude: iterative magnitude pruning of the prunable matrices to
  baselines.target's sparsity in baselines.magnitude_rounds rounds (weights
  rewound to the teacher's each round), with CoFi's distillation; the same
  total epochs.

Writes outputs/compact/baseline-<method> (a model directory with its manifest,
parent: the teacher), metrics/baseline-<method>.json and plots/baseline-<method>.csv."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import AutoTokenizer

from cofi.baselines import iterative_magnitude_pruning, size_matching_flops, subset_student
from cofi.compact import load_model
from cofi.distill import DistillationLoss, LayerDistillLoss, PredictionDistillLoss
from cofi.flops import forward_flops
from cofi.manifest import read_manifest
from cofi.sparsity import count_prunable_parameters
from cofi.trainer import TrainerCallback, TrainResult
from pipeline.params import Params, Prune
from pipeline.paths import Paths
from pipeline.runtime import StageData, is_main_process, load_stage_data, setup, write_curve
from pipeline.distillation import distillation_loss
from pipeline.training import Manifest, Trained, result_metrics, run_training_stage, train, train_config

STAGE = "baseline"


def run(params: Params, method: str, root: Path = Path(".")) -> dict:
    setup(params)
    paths = Paths(root)
    data = load_stage_data(paths)
    teacher_digest = read_manifest(paths.teacher)["digest"]
    teacher = load_model(paths.teacher, verify=True)
    name = f"{STAGE}@{method}"
    epochs = params.prune.epochs_for(params.baselines.target) + params.finetune.epochs_for(params.baselines.target)
    section = params.prune.model_copy(update={"epochs": epochs})
    methods = {"layer_subset": layer_subset, "magnitude": magnitude}
    if method not in methods:
        raise ValueError(f"unknown baseline method {method!r}")
    tokenizer = AutoTokenizer.from_pretrained(paths.teacher)

    def fit() -> Trained:
        trained = methods[method](params, paths, data, teacher, teacher_digest, section)
        trained.extra = tokenizer.save_pretrained
        return trained

    return run_training_stage(
        name, params, paths, fit, out=paths.baseline(method), metrics_file=paths.metrics(f"{STAGE}-{method}"),
        manifest=Manifest(kind=f"baseline-{method}", parent_dir=paths.teacher, data_digest=data.meta["digest"]),
    )


def layer_subset(params: Params, paths: Paths, data: StageData, teacher: nn.Module, teacher_digest: str,
                 section: Prune) -> Trained:
    """Distillation into a subset of the teacher's layers, narrowed to the CoFi model's FLOPs."""
    sequence_length = max(params.benchmark.sequence_lengths)
    name = f"{STAGE}@layer_subset"
    cofi_model = load_model(paths.compact(params.baselines.target), verify=True)
    cofi_flops = forward_flops(cofi_model, sequence_length)
    size = size_matching_flops(teacher, cofi_flops, sequence_length)
    student = subset_student(teacher, size)
    distill = DistillationLoss(
        PredictionDistillLoss(params.prune.temperature),
        LayerDistillLoss(teacher.config.hidden_size, list(size.layers), matching="fixed",
                         student_layers=list(range(1, len(size.layers) + 1))),
        params.prune.prediction_weight,
    )
    config = train_config(params, section, params.prune.evals_per_epoch, len(data.train))
    trainer, result = train(name, params, paths, data, student, config, teacher_digest,
                            paths.curve(f"{STAGE}-layer_subset"), teacher=teacher, distill=distill)
    details = {"layers": list(size.layers), "head_fraction": size.head_fraction, "ffn_fraction": size.ffn_fraction,
               f"flops_s{sequence_length}": size.flops, f"cofi_flops_s{sequence_length}": cofi_flops}
    return Trained(trainer.model, baseline_metrics(trainer.model, result, details), [trainer])


def magnitude(params: Params, paths: Paths, data: StageData, teacher: nn.Module, teacher_digest: str,
              section: Prune) -> Trained:
    """Iterative magnitude pruning to baselines.target, rewound to the teacher each round."""
    name = f"{STAGE}@magnitude"
    rounds = params.baselines.magnitude_rounds
    config = train_config(params, section.model_copy(update={"epochs": section.epochs / rounds}),
                          params.prune.evals_per_epoch, len(data.train))
    trainers, curve = [], []

    def train_round(model: nn.Module, keep_pruned: TrainerCallback, r: int) -> TrainResult:
        distill = distillation_loss(params, teacher.config.hidden_size, teacher.config.num_hidden_layers)
        trainer, result = train(
            f"{name}-round{r}", params, paths, data, model, config, teacher_digest,
            None, teacher=teacher if distill else None, distill=distill, callbacks=[keep_pruned],
        )
        trainers.append(trainer)
        offset = curve[-1]["step"] if curve else 0  # one curve: the rounds one after another
        curve.extend({**row, "step": offset + row["step"], "round": r} for row in result.history)
        return result

    model, masks, result = iterative_magnitude_pruning(teacher, params.baselines.target, rounds, train_round)
    if is_main_process():
        write_curve(paths.curve(f"{STAGE}-magnitude"), curve)
    details = {"rounds": rounds, "nonzero_prunable": int(sum(m.sum() for m in masks.values()))}
    return Trained(model, baseline_metrics(model, result, details), trainers)


def baseline_metrics(model: nn.Module, result: TrainResult, details: dict) -> dict:
    return {**result_metrics(result), "prunable_parameters": count_prunable_parameters(model), **details}
