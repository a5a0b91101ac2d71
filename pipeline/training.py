"""Running a `cofi.trainer.Trainer` inside a stage: MLflow logging, a resumable
checkpoint directory tied to the stage's inputs, curves and metrics files."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from cofi.trainer import TrainConfig, Trainer, TrainerCallback, TrainResult
from pipeline import tracking
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runtime import collator, fingerprint, is_main_process, load_examples, task_spec_of, write_curve


@dataclass
class StageData:
    train: list[dict]
    validation: list[dict]
    meta: dict[str, Any]


def load_stage_data(paths: Paths) -> StageData:
    meta = json.loads(paths.data_meta.read_text())
    return StageData(load_examples(paths.data_split("train")), load_examples(paths.data_split("validation")), meta)


def train(
    stage: str,
    params: Params,
    paths: Paths,
    data: StageData,
    model: nn.Module,
    config: TrainConfig,
    inputs_digest: str,
    curve: Path,
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
        collate=collator(data.meta["pad_token_id"]), callbacks=[*callbacks, *([mlflow_callback] if main else [])],
        checkpoint_dir=checkpoint_dir, **trainer_kwargs,
    )
    result = trainer.fit()
    if main:
        mlflow_callback.flush()
        write_curve(curve, result.history)
    return trainer, result


def finish(trainer: Trainer) -> None:
    """Drop the resumable state once the stage's outputs are complete."""
    shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
