"""Stage `baseline@<method>`: a non-CoFi model from the same teacher, for comparison.

- layer_subset: distillation (prediction + layer, fixed layer matching) into the
  teacher's evenly spaced layers, narrowed uniformly, sized to the FLOPs of the
  CoFi model at baselines.target; trained for prune.epochs + finetune.epochs.
- magnitude: iterative magnitude pruning of the prunable matrices to
  baselines.target's sparsity in baselines.magnitude_rounds rounds (weights
  rewound to the teacher's each round), with CoFi's distillation; the same
  total epochs.

Writes outputs/compact/baseline-<method> (a model directory with its manifest,
parent: the teacher), metrics/baseline-<method>.json and plots/baseline-<method>.csv."""

from __future__ import annotations

from pathlib import Path

import mlflow
from transformers import AutoTokenizer

from cofi.baselines import iterative_magnitude_pruning, size_matching_flops, subset_student
from cofi.compact import save_model
from cofi.distill import DistillationLoss, LayerDistillLoss, PredictionDistillLoss
from cofi.flops import forward_flops
from cofi.sparsity import count_prunable_parameters
from pipeline import lineage
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runtime import distillation, is_main_process, mlflow_run, setup, train_config, write_json
from pipeline.training import finish, load_stage_data, train

STAGE = "baseline"


def run(params: Params, method: str, root: Path = Path(".")) -> dict:
    setup(params)
    paths = Paths(root)
    data = load_stage_data(paths)
    teacher_manifest = lineage.read_manifest(paths.teacher)
    teacher = lineage.load_verified(paths.teacher)
    name = f"{STAGE}@{method}"
    section = params.prune.model_copy(update={"epochs": params.prune.epochs + params.finetune.epochs})
    sequence_length = max(params.benchmark.sequence_lengths)

    trainers = []  # their checkpoints are dropped once the outputs are written
    with mlflow_run(name, params, paths.root, tags=lineage.lineage_tags(teacher_manifest)) as run:
        if method == "layer_subset":
            cofi_model = lineage.load_verified(paths.compact(params.baselines.target))
            size = size_matching_flops(teacher, forward_flops(cofi_model, sequence_length), sequence_length)
            student = subset_student(teacher, size)
            distill = DistillationLoss(
                PredictionDistillLoss(params.prune.temperature),
                LayerDistillLoss(teacher.config.hidden_size, list(size.layers), matching="fixed",
                                 student_layers=list(range(1, len(size.layers) + 1))),
                params.prune.prediction_weight,
            )
            config = train_config(params, section, params.prune.evals_per_epoch, len(data.train))
            trainer, result = train(name, params, paths, data, student, config, teacher_manifest["weights_sha256"],
                                    paths.curve(STAGE + "-" + method), teacher=teacher, distill=distill)
            trainers.append(trainer)
            model = trainer.model
            details = {"layers": list(size.layers), "head_fraction": size.head_fraction,
                       "ffn_fraction": size.ffn_fraction, f"flops_s{sequence_length}": size.flops,
                       f"cofi_flops_s{sequence_length}": forward_flops(cofi_model, sequence_length)}
        elif method == "magnitude":
            rounds = params.baselines.magnitude_rounds
            round_section = section.model_copy(update={"epochs": section.epochs / rounds})
            config = train_config(params, round_section, params.prune.evals_per_epoch, len(data.train))

            def train_round(model, keep_pruned, r):
                distill = distillation(params, teacher.config.hidden_size, teacher.config.num_hidden_layers)
                trainer, result = train(
                    f"{name}-round{r}", params, paths, data, model, config, teacher_manifest["weights_sha256"],
                    paths.curve(f"{STAGE}-{method}-round{r}"), teacher=teacher if distill else None, distill=distill,
                    callbacks=[keep_pruned],
                )
                trainers.append(trainer)
                return result

            model, masks, result = iterative_magnitude_pruning(teacher, params.baselines.target, rounds, train_round)
            kept = int(sum(m.sum() for m in masks.values()))
            details = {"rounds": rounds, "nonzero_prunable": kept}
        else:
            raise ValueError(f"unknown baseline method {method!r}")

        if not is_main_process():  # the main process writes the outputs
            return {}
        tokenizer = AutoTokenizer.from_pretrained(paths.teacher)

        def extra(directory: Path) -> None:
            tokenizer.save_pretrained(directory)
            lineage.write_manifest(
                directory, kind=f"baseline-{method}", parent_dir=paths.teacher, base_model=None,
                data={"digest": data.meta["digest"]}, params={"method": method, **params.baselines.model_dump()},
                mlflow_run_id=run.info.run_id,
            )

        out = save_model(model, paths.baseline(method), extra=extra)
        mlflow.set_tags(lineage.lineage_tags(lineage.read_manifest(out)))
        metrics = {**{k: v for k, v in result.best_metrics.items() if k != "step"}, "best_step": result.best_step,
                   "prunable_parameters": count_prunable_parameters(model), **details}
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        write_json(paths.metrics(f"{STAGE}-{method}"), metrics)
    for trainer in trainers:
        finish(trainer)
    return metrics
