"""Stage `finetune@<target>`: fine-tune the pruned structure with the same distillation loss.

The pruned model is compacted first (exact: see cofi.compact), so fine-tuning
runs on the small dense model; the masks are thereby fixed. Reads
outputs/pruned/<target>, outputs/teacher and outputs/data; writes
outputs/finetuned/<target>, metrics/finetune-<target>.json and
plots/finetune-<target>.csv."""

from __future__ import annotations

from pathlib import Path

import mlflow
from safetensors.torch import load_file

from cofi.compact import compact, save_model
from pipeline import lineage
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runtime import distillation, is_main_process, mlflow_run, setup, train_config, write_json
from pipeline.training import finish, load_stage_data, train
from stages.prune import LAYER_MAP_FILE, MASKS_FILE

STAGE = "finetune"


def run(params: Params, target: float, root: Path = Path("."), variant: str | None = None) -> dict:
    setup(params)
    paths = Paths(root, variant)
    data = load_stage_data(paths)
    pruned_dir = paths.pruned(target)
    pruned_manifest = lineage.read_manifest(pruned_dir)
    masks = load_file(pruned_dir / MASKS_FILE)
    pruned = lineage.load_verified(pruned_dir)  # full size: the teacher's shape
    distill = distillation(params, pruned.config.hidden_size, pruned.config.num_hidden_layers)
    student = compact(pruned, masks)
    teacher = lineage.load_verified(paths.teacher) if distill is not None else None  # None: gold labels only
    if distill is not None:
        distill.load_state_dict(load_file(pruned_dir / LAYER_MAP_FILE))
        if distill.layer is not None and "hidden" in masks:  # the map now reads only the kept hidden dims
            distill.layer = distill.layer.restrict_input(masks["hidden"] != 0)
    config = train_config(params, params.finetune, params.finetune.evals_per_epoch, len(data.train))
    name = paths.run_name(STAGE, target)

    with mlflow_run(name, params, paths.root, tags=lineage.lineage_tags(pruned_manifest)) as run:
        trainer, result = train(
            name, params, paths, data, student, config,
            pruned_manifest["weights_sha256"], paths.curve(STAGE, target),
            teacher=teacher, distill=distill,
        )
        if not is_main_process():  # the main process writes the outputs
            return {}

        def extra(directory: Path) -> None:
            lineage.write_manifest(
                directory, kind="finetuned", parent_dir=pruned_dir, base_model=None,
                data={"digest": data.meta["digest"]}, params={"target": target, **params.finetune.model_dump()},
                mlflow_run_id=run.info.run_id,
            )

        save_model(trainer.model, paths.finetuned(target), extra=extra)
        mlflow.set_tags(lineage.lineage_tags(lineage.read_manifest(paths.finetuned(target))))
        metrics = {**{k: v for k, v in result.best_metrics.items() if k != "step"}, "best_step": result.best_step}
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()})
        write_json(paths.metrics(STAGE, target), metrics)
    finish(trainer)
    return metrics
