"""Tiny random models and synthetic data shared by the unit tests."""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from cofi import CofiConfig, CofiForSequenceClassification

VOCAB = 50


def tiny_config(**overrides) -> CofiConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
    )
    settings.update(overrides)
    return CofiConfig(**settings)


# 3 layers of 8 heads of 4 and 128 FFN units: sparsity levels fine enough for ε = 0.01
# (the default tiny model moves in steps of 1/16, so a controller chatters around its target)
FINE_GRID = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=8, intermediate_size=128)


def tiny_model(seed: int = 0, **overrides) -> CofiForSequenceClassification:
    torch.manual_seed(seed)
    return CofiForSequenceClassification(tiny_config(**overrides))


def synthetic_task(n: int, seed: int) -> list[dict]:
    """A learnable binary task: the label says whether the first token is below VOCAB/2."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=generator))
        ids = torch.randint(2, VOCAB, (length,), generator=generator).tolist()
        data.append({"input_ids": ids, "label": int(ids[0] < VOCAB // 2)})
    return data


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def task() -> tuple[list[dict], list[dict]]:
    return synthetic_task(96, seed=1), synthetic_task(48, seed=2)


def tiny_project(root, update) -> None:
    """A project at ``root`` as the training stages find it after `data` and `teacher`: the
    repository's params.yaml changed by ``update(params)``, tiny tokenised data (48 train,
    24 dev examples) and a tiny random 4-layer teacher with its tokenizer and manifest."""
    import json
    from pathlib import Path

    import pandas as pd
    import yaml

    from cofi.compact import save_model
    from cofi.convert import load_tokenizer
    from pipeline import lineage
    from pipeline.paths import Paths
    from pipeline.runtime import base_model_path

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    update(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    paths = Paths(root)
    paths.data_dir.mkdir(parents=True)
    for split, (n, seed) in {"train": (48, 1), "validation": (24, 2)}.items():
        rows = synthetic_task(n, seed)
        pd.DataFrame({"input_ids": [r["input_ids"] for r in rows], "label": [r["label"] for r in rows]}
                     ).to_parquet(paths.data_split(split))
    paths.data_meta.write_text(json.dumps({"pad_token_id": 0, "digest": "tiny", "splits": {}}))
    tokenizer = load_tokenizer(base_model_path("all-MiniLM-L6-v2"))

    def teacher_extra(directory: Path) -> None:
        tokenizer.save_pretrained(directory)
        lineage.write_manifest(directory, kind="teacher", parent_dir=None, data_digest="tiny", mlflow_run_id=None)

    save_model(tiny_model(seed=4, num_hidden_layers=4), paths.teacher, extra=teacher_extra)


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    try:  # workers left behind by a server that exited first
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def isolated_mlflow(tracking_uri: str | None = None) -> Iterator[None]:
    """Runs the body with ``tracking_uri`` (or none from outside) and undoes what MLflow sets
    process-wide meanwhile: active runs, the tracking URI (set_tracking_uri exports
    MLFLOW_TRACKING_URI) and any other environment variable (MLFLOW_HTTP_* and the like)."""
    import mlflow

    saved = dict(os.environ)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    try:
        yield
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
        os.environ.clear()
        os.environ.update(saved)
