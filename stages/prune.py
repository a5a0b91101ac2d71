"""Stage `prune@<target>`: CoFi pruning of a copy of the teacher to one target sparsity,
or (stage `prune-speedup@<k>`, target "<k>x") to a speedup over the teacher on
prune.deployment, predicted by that deployment's latency model (outputs/latency/).

Reads outputs/teacher and outputs/data; writes outputs/pruned/<target> (the
full-size student, its deterministic masks, gate log α and the layer-distillation
map, manifest.json), metrics/prune-<target>.json and plots/prune-<target>.csv."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from safetensors.torch import save_file

from cofi.compact import compact, load_model
from cofi.configuration_cofi import CofiConfig
from cofi.gates import GateConfig
from cofi.latency import LatencyModel
from cofi.sparsity import ModelShape
from cofi.manifest import read_manifest
from cofi.pruning import PruneConfig
from cofi.structure import structure_summary, structure_table
from pipeline import tracking
from pipeline.params import Params
from pipeline.plotting import structure_figure
from pipeline.paths import GATES_FILE, LAYER_MAP_FILE, MASKS_FILE, Paths, Speedup, Target
from pipeline.runtime import is_main_process, load_stage_data, setup
from pipeline.distillation import distillation_loss
from pipeline.training import Manifest, Trained, result_metrics, run_training_stage, train, train_config

STAGE = "prune"


def prune_config(params: Params, target: Target, latency: LatencyModel | None = None) -> PruneConfig:
    """Pruning to ``target``: a sparsity, or a speedup that ``latency`` (prune.deployment's model) predicts."""
    p = params.prune
    aim = ({"target_speedup": target.factor, "latency": latency, "speedup_tolerance": p.speedup_tolerance}
           if isinstance(target, Speedup) else {"target_sparsity": target})
    return PruneConfig(
        **aim,
        distill_epochs=p.distill_epochs,
        sparsity_warmup_epochs=p.sparsity_warmup_epochs,
        ramp=p.sparsity_ramp,
        reg_learning_rate=p.reg_learning_rate,
        lambda_2_init=p.lambda_2_init,
        sparsity_tolerance=p.sparsity_tolerance,
        gates=GateConfig(families=tuple(p.families), keep_multiple=p.keep_multiple),
    )


def load_latency_model(paths: Paths, deployment: str) -> LatencyModel:
    path = paths.latency_model(deployment)
    if not path.exists():
        raise FileNotFoundError(f"prune.deployment {deployment!r}: no latency model at {path}; "
                                f"stage profile@{deployment} measures it (dvc repro profile@{deployment})")
    return LatencyModel.from_dict(json.loads(path.read_text()))


def run(params: Params, target: Target, root: Path = Path("."), variant: str | None = None) -> dict:
    setup(params)
    paths = Paths(root, variant)
    latency = None  # first: a missing or too slow latency model stops the stage before any loading
    if isinstance(target, Speedup):
        latency = load_latency_model(paths, params.prune.deployment)
        shape = ModelShape.from_config(CofiConfig.from_pretrained(paths.teacher))  # the shape; no weights needed
        latency.check_reachable(target.factor, shape, params.prune.families, params.prune.keep_multiple)
        aim = {"target_speedup": target.factor, "deployment": params.prune.deployment}
    else:
        aim = {"target_sparsity": target}
    data = load_stage_data(paths)
    teacher_digest = read_manifest(paths.teacher)["digest"]
    student = load_model(paths.teacher, verify=True)  # CoFi starts from the fine-tuned teacher
    distill = distillation_loss(params, student.config.hidden_size, student.config.num_hidden_layers)
    teacher = copy.deepcopy(student) if distill is not None else None  # frozen by the Trainer
    section = params.prune.model_copy(update={"epochs": params.prune.epochs_for(target)})
    config = train_config(params, section, params.prune.evals_per_epoch, len(data.train))
    name = paths.run_name(STAGE, target)

    def fit() -> Trained:
        trainer, result = train(
            name, params, paths, data, student, config,
            teacher_digest, paths.curve(STAGE, target),
            teacher=teacher, distill=distill, prune=prune_config(params, target, latency),
        )
        if not is_main_process():
            return Trained(trainer.model, {}, [trainer])
        masks = {k: v.contiguous().cpu() for k, v in result.masks.items()}
        structure = compact(trainer.model, masks).config
        shape = (structure.num_attention_heads, structure.intermediate_size)
        table = structure_table(structure.layer_num_heads, structure.layer_intermediate_size, *shape)
        tracking.log_structure(table, structure_figure(table, *shape), name=f"structure-{paths.model_name(target)}",
                               summary=structure_summary(table, *shape))
        metrics = {
            **result_metrics(result),
            **aim,
            "target_reached": result.target_reached,
            "hidden_size": structure.hidden_size,
            "heads": sum(structure.layer_num_heads),
            "ffn_units": sum(structure.layer_intermediate_size),
        }

        def extra(directory: Path) -> None:
            save_file(masks, directory / MASKS_FILE)
            save_file({k: v.detach().cpu().contiguous() for k, v in trainer.pruning.gates.log_alpha.items()}, directory / GATES_FILE)
            if trainer.distillation is not None:
                save_file({k: v.detach().cpu().contiguous() for k, v in trainer.distillation.loss.state_dict().items()},
                          directory / LAYER_MAP_FILE)

        return Trained(trainer.model, metrics, [trainer], extra)

    return run_training_stage(
        name, params, paths, fit, out=paths.pruned(target), metrics_file=paths.metrics(STAGE, target),
        manifest=Manifest(kind="pruned", parent_dir=paths.teacher, data_digest=data.meta["digest"]),
    )
