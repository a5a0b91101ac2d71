"""What every training stage (teacher, prune, finetune, baseline) does around its own
training: :func:`run_training_stage` opens the stage's MLflow run, calls the stage's
``fit``, and on the main process saves the model with its manifest, tags the run with
its lineage, logs and writes the metrics, then drops the resumable checkpoints;
:func:`train` runs a `cofi.trainer.Trainer` with MLflow logging, a checkpoint
directory tied to the stage's inputs, and the curve file; :func:`train_config` builds
its config from the params (a student's distillation loss: pipeline.distillation)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import mlflow
from torch import nn

from cofi.batching import COMPILED_LENGTH_MULTIPLE
from cofi.compact import save_model
from cofi.manifest import read_manifest
from cofi.trainer import TrainConfig, Trainer, TrainerCallback, TrainResult
from pipeline import lineage, tracking
from pipeline.params import Finetune, Params, Teacher
from pipeline.paths import Paths
from pipeline.runtime import (StageData, collator, fingerprint, is_main_process, mlflow_run, task_spec_of,
                              write_curve, write_json)


def train_config(params: Params, section, evals_per_epoch: int, num_examples: int, progress: bool = True) -> TrainConfig:
    steps_per_epoch = -(-num_examples // section.batch_size)
    return TrainConfig(
        epochs=section.epochs,
        batch_size=section.batch_size,
        learning_rate=section.learning_rate,
        warmup_ratio=getattr(section, "warmup_ratio", 0.0),
        bf16=params.compute.bf16,
        group_by_length=params.compute.group_by_length,
        freeze_word_embeddings=params.prune.freeze_word_embeddings and not isinstance(section, Teacher),  # students only
        accumulation_steps=params.compute.accumulation_steps,
        compile=params.compute.compile,
        teacher_cache_gb=params.compute.teacher_cache_gb,
        seed=params.seed,
        eval_steps=max(1, steps_per_epoch // evals_per_epoch),
        evaluate_at_start=isinstance(section, Finetune),  # the pruned model is a candidate too
        device=params.compute.device,
        progress=progress,
    )


def train(
    stage: str,
    params: Params,
    paths: Paths,
    data: StageData,
    model: nn.Module,
    config: TrainConfig,
    inputs_digest: str,
    curve: Path | None,
    callbacks: Sequence[TrainerCallback] = (),
    **trainer_kwargs: Any,
) -> tuple[Trainer, TrainResult]:
    """Fit ``model``; resume from this stage's checkpoint if one with the same inputs exists.

    The checkpoint directory is named by a digest of the stage's config and its
    inputs, so a rerun with other params or data never resumes a stale run. It
    is removed once the stage's outputs are written (by the caller, via
    ``finish``).
    """
    spec = task_spec_of(params)
    checkpoint_dir = paths.checkpoints(stage, fingerprint(stage, repr(config), repr(trainer_kwargs.get("prune")), inputs_digest))
    main = is_main_process()
    mlflow_callback = tracking.MlflowCallback() if main else None
    trainer = Trainer(
        model, data.train, data.validation, config,
        metric_fn=spec.metric_fn, primary_metric=spec.primary_metric,
        # a compiled step pads to a few lengths, so that a few graphs (CUDA graphs) cover every batch
        collate=collator(data.meta["pad_token_id"], COMPILED_LENGTH_MULTIPLE if config.compile else 1),
        callbacks=[*callbacks, *([mlflow_callback] if main else [])],
        checkpoint_dir=checkpoint_dir, **trainer_kwargs,
    )
    cache = trainer.teacher_cache
    if main:
        mlflow.set_tag(tracking.TAG_TRAINING_PRECISION, "bf16" if trainer.bf16 else "fp32")
        if cache is not None:
            rest = len(data.train) - cache.kept
            print(f"teacher outputs kept for {cache.kept:,} of {len(data.train):,} training examples "
                  f"({cache.nbytes / 2**20:,.1f} MiB of compute.teacher_cache_gb {config.teacher_cache_gb:g} GiB), "
                  + (f"the other {rest:,} computed each time they come" if rest else "each computed once"), flush=True)
    result = trainer.fit()
    if main:
        mlflow_callback.flush()
        if cache is not None:  # on this process: what the cache saved
            mlflow.log_metrics({"teacher_cache_examples": cache.kept, "teacher_forward_examples": cache.computed,
                                "teacher_cache_reused_examples": cache.reused})
        if curve is not None:
            write_curve(curve, result.history)
    return trainer, result


def finish(trainer: Trainer) -> None:
    """Drop the resumable state once the stage's outputs are complete."""
    shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)


def result_metrics(result: TrainResult) -> dict[str, Any]:
    """The best evaluation's metrics and its step: what every training stage reports."""
    return {**{k: v for k, v in result.best_metrics.items() if k != "step"}, "best_step": result.best_step}


@dataclass
class Trained:
    """What a training stage's ``fit`` returns: the model to save, its metrics, the trainers
    whose checkpoints to drop once the outputs are written, and ``extra(directory)``
    writing the stage's own files (tokenizer, masks) into the model directory."""

    model: nn.Module
    metrics: dict[str, Any]
    trainers: Sequence[Trainer] = ()
    extra: Callable[[Path], None] | None = None


@dataclass
class Manifest:
    """What the output model's manifest records besides its files (see pipeline.lineage)."""

    kind: str
    parent_dir: Path | None  # None: the teacher, made from base_model
    data_digest: str
    base_model: tuple[str, str] | None = None  # (name, where it was loaded from); hashed on the main process only


def run_training_stage(
    name: str,
    params: Params,
    paths: Paths,
    fit: Callable[[], Trained],
    out: Path,
    metrics_file: Path,
    manifest: Manifest,
) -> dict[str, Any]:
    """Run ``fit`` in the MLflow run ``name``; on the main process save its model to ``out``
    with its manifest, tag the run with the model's lineage, log the metrics (as
    ``final_<name>``) and write them to ``metrics_file``. Returns the metrics ({} on other
    processes, which only train)."""
    tags = lineage.run_tags(manifest.kind, manifest.parent_dir, manifest.data_digest)
    with mlflow_run(name, params, paths.root, tags=tags) as run:
        trained = fit()
        if not is_main_process():  # the main process writes the outputs
            return {}

        def extra(directory: Path) -> None:
            if trained.extra is not None:
                trained.extra(directory)
            lineage.write_manifest(
                directory, kind=manifest.kind, parent_dir=manifest.parent_dir, data_digest=manifest.data_digest,
                mlflow_run_id=run.info.run_id, base_model=manifest.base_model,
            )

        save_model(trained.model, out, extra=extra)
        mlflow.set_tags(lineage.lineage_tags(read_manifest(out)))  # read back: no hashing
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in trained.metrics.items() if isinstance(v, (int, float))})
        write_json(metrics_file, trained.metrics)
    for trainer in trained.trainers:
        finish(trainer)
    return trained.metrics
