"""Stage `teacher`: fine-tune the base model on the task with gold labels.

Reads outputs/data; writes outputs/teacher (model, tokenizer, manifest.json),
metrics/teacher.json and plots/teacher.csv."""

from __future__ import annotations

from pathlib import Path

import mlflow

from cofi.compact import save_model
from cofi.convert import load_pretrained, load_tokenizer
from pipeline import lineage
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runtime import base_model_path, is_main_process, mlflow_run, setup, task_spec_of, train_config, write_json
from pipeline.training import finish, load_stage_data, train

STAGE = "teacher"


def run(params: Params, root: Path = Path(".")) -> dict:
    setup(params)
    paths = Paths(root)
    data = load_stage_data(paths)
    spec = task_spec_of(params)
    base = base_model_path(params.teacher.base_model)
    model = load_pretrained(base, num_labels=spec.num_labels, seed=params.seed)
    tokenizer = load_tokenizer(base)
    config = train_config(params, params.teacher, evals_per_epoch=1, num_examples=len(data.train))

    with mlflow_run(STAGE, params, paths.root) as run:
        trainer, result = train(STAGE, params, paths, data, model, config, data.meta["digest"], paths.curve(STAGE))
        if not is_main_process():  # the main process writes the outputs
            return {}

        def extra(directory: Path) -> None:
            tokenizer.save_pretrained(directory)
            lineage.write_manifest(
                directory, kind=STAGE, parent_dir=None,
                base_model=lineage.describe_base_model(params.teacher.base_model, base),
                data={"digest": data.meta["digest"], "splits": data.meta["splits"]},
                params=params.teacher.model_dump(), mlflow_run_id=run.info.run_id,
            )

        save_model(trainer.model, paths.teacher, extra=extra)
        mlflow.set_tags(lineage.lineage_tags(lineage.read_manifest(paths.teacher)))
        metrics = {**{k: v for k, v in result.best_metrics.items() if k != "step"}, "best_step": result.best_step}
        mlflow.log_metrics({f"final_{k}": v for k, v in metrics.items()})
        write_json(paths.metrics(STAGE), metrics)
    finish(trainer)
    return metrics
