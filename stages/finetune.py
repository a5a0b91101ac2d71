"""Stage `finetune@<target>`: fine-tune the pruned structure with the same distillation loss.

The pruned model is compacted first (exact: see cofi.compact), so fine-tuning
runs on the small dense model; the masks are thereby fixed. The target's
``finetune.epochs`` (a number or a map, as prune.epochs) may be 0: the default
for 0.6, where it measured no gain (docs/experiments/fine-tuning.md); the compacted
model is then evaluated and passed on as it is. Otherwise the compacted model is
evaluated before the first step too, and the best evaluation ships: fine-tuning
never returns a model worse on the dev set than the pruned one. Reads
outputs/pruned/<target>, outputs/teacher and outputs/data; writes
outputs/finetuned/<target>, metrics/finetune-<target>.json and
plots/finetune-<target>.csv."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from cofi.compact import compact, load_model
from cofi.trainer import predict
from cofi.manifest import read_manifest
from pipeline.params import Params
from pipeline.paths import LAYER_MAP_FILE, MASKS_FILE, Paths, Target
from pipeline.runtime import collator, load_stage_data, setup, task_spec_of, write_curve
from pipeline.distillation import distillation_loss
from pipeline.training import Manifest, Trained, result_metrics, run_training_stage, train, train_config

STAGE = "finetune"


def run(params: Params, target: Target, root: Path = Path("."), variant: str | None = None) -> dict:
    setup(params)
    paths = Paths(root, variant)
    data = load_stage_data(paths)
    pruned_dir = paths.pruned(target)
    pruned_digest = read_manifest(pruned_dir)["digest"]
    pruned = load_model(pruned_dir, verify=True)  # full size: the teacher's shape; verifies the masks' file too
    masks = load_file(pruned_dir / MASKS_FILE)
    distill = distillation_loss(params, pruned.config.hidden_size, pruned.config.num_hidden_layers)
    student = compact(pruned, masks)
    epochs = params.finetune.epochs_for(target)
    fine_tune = epochs > 0
    teacher = load_model(paths.teacher, verify=True) if distill is not None and fine_tune else None  # None: gold labels only
    if distill is not None:
        distill.load_state_dict(load_file(pruned_dir / LAYER_MAP_FILE))
        if distill.layer is not None and "hidden" in masks:  # the map now reads only the kept hidden dims
            distill.layer = distill.layer.restrict_input(masks["hidden"] != 0)
    name = paths.run_name(STAGE, target)

    def fit() -> Trained:
        if not fine_tune:  # no fine-tuning: the pruned model as it is, evaluated
            preds, gold = predict(student, data.validation, collator(data.meta["pad_token_id"]), bf16=False)
            write_curve(paths.curve(STAGE, target), [{"step": 0, "loss": float("nan")}])
            return Trained(student, task_spec_of(params).metric_fn(preds, gold))
        section = params.finetune.model_copy(update={"epochs": epochs})
        config = train_config(params, section, params.finetune.evals_per_epoch, len(data.train))
        trainer, result = train(
            name, params, paths, data, student, config,
            pruned_digest, paths.curve(STAGE, target),
            teacher=teacher, distill=distill,
        )
        return Trained(trainer.model, result_metrics(result), [trainer])

    return run_training_stage(
        name, params, paths, fit, out=paths.finetuned(target), metrics_file=paths.metrics(STAGE, target),
        manifest=Manifest(kind="finetuned", parent_dir=pruned_dir, data_digest=data.meta["digest"]),
    )
