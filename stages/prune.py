"""Stage `prune@<target>`: CoFi pruning of a copy of the teacher to one target sparsity.

Reads outputs/teacher and outputs/data; writes outputs/pruned/<target> (the
full-size student, its deterministic masks, gate log α and the layer-distillation
map, manifest.json), metrics/prune-<target>.json and plots/prune-<target>.csv."""

from __future__ import annotations

import copy
from pathlib import Path

import mlflow
from safetensors.torch import save_file

from cofi.compact import compact, save_model
from cofi.structure import structure_summary, structure_table
from pipeline import lineage, tracking
from pipeline.plotting import structure_figure
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runtime import distillation, is_main_process, mlflow_run, prune_config, setup, train_config, write_json
from pipeline.training import finish, load_stage_data, train

STAGE = "prune"
MASKS_FILE, GATES_FILE, LAYER_MAP_FILE = "masks.safetensors", "gates.safetensors", "layer_map.safetensors"


def run(params: Params, target: float, root: Path = Path("."), variant: str | None = None) -> dict:
    setup(params)
    paths = Paths(root, variant)
    data = load_stage_data(paths)
    teacher_manifest = lineage.read_manifest(paths.teacher)
    student = lineage.load_verified(paths.teacher)  # CoFi starts from the fine-tuned teacher
    distill = distillation(params, student.config.hidden_size, student.config.num_hidden_layers)
    teacher = copy.deepcopy(student) if distill is not None else None  # frozen by the Trainer
    config = train_config(params, params.prune, params.prune.evals_per_epoch, len(data.train))
    name = paths.run_name(STAGE, target)

    with mlflow_run(name, params, paths.root, tags=lineage.lineage_tags(teacher_manifest)) as run:
        trainer, result = train(
            name, params, paths, data, student, config,
            teacher_manifest["weights_sha256"], paths.curve(STAGE, target),
            teacher=teacher, distill=distill, prune=prune_config(params, target),
        )
        if not is_main_process():  # the main process writes the outputs
            return {}
        masks = {k: v.contiguous().cpu() for k, v in result.masks.items()}

        def extra(directory: Path) -> None:
            save_file(masks, directory / MASKS_FILE)
            save_file({k: v.detach().cpu().contiguous() for k, v in trainer.gates.log_alpha.items()}, directory / GATES_FILE)
            if trainer.distill is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in trainer.distill.state_dict().items()},
                          directory / LAYER_MAP_FILE)
            lineage.write_manifest(
                directory, kind="pruned", parent_dir=paths.teacher, base_model=None,
                data={"digest": data.meta["digest"]}, params={"target": target, **params.prune.model_dump()},
                mlflow_run_id=run.info.run_id,
            )

        save_model(trainer.model, paths.pruned(target), extra=extra)
        mlflow.set_tags(lineage.lineage_tags(lineage.read_manifest(paths.pruned(target))))
        structure = compact(trainer.model, masks).config
        shape = (structure.num_attention_heads, structure.intermediate_size)
        table = structure_table(structure.layer_num_heads, structure.layer_intermediate_size, *shape)
        tracking.log_structure(table, structure_figure(table, *shape), name=f"structure-{paths.model_name(target)}",
                               summary=structure_summary(table, *shape))
        metrics = {
            **{k: v for k, v in result.best_metrics.items() if k != "step"},
            "best_step": result.best_step,
            "target_sparsity": target,
            "target_reached": result.target_reached,
            "hidden_size": structure.hidden_size,
            "heads": sum(structure.layer_num_heads),
            "ffn_units": sum(structure.layer_intermediate_size),
        }
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()})
        write_json(paths.metrics(STAGE, target), metrics)
    finish(trainer)
    return metrics
