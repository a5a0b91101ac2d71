"""Stage `data`: read a GLUE task (local copy or Hub), a user's files or any Hub dataset;
check text cells and labels (class ids in the order of cofi.labels); shuffle and limit
the training split, tokenise with the base model's tokenizer, and write parquet splits
plus meta.json (label names, source digests, counts) for every later stage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import pandas as pd

from cofi.convert import load_tokenizer
from cofi.data import (TaskSpec, check_columns, check_text, data_error, hub_source, load_glue_split, load_hub_split,
                       read_table, tokenize)
from cofi.labels import LabelSet
from cofi.manifest import atomic_write
from pipeline import tracking
from pipeline.params import Params, resolve_source
from pipeline.paths import Paths
from pipeline.runtime import base_model_path, fingerprint, mlflow_run, task_spec_of, write_json

STAGE = "data"


def frame_digest(frame: pd.DataFrame) -> str:
    """Content digest of a table (row order included), independent of file encoding."""
    hashed = pd.util.hash_pandas_object(frame, index=False).values
    return hashlib.sha256(hashed.tobytes()).hexdigest()


def read_splits(params: Params, root: Path) -> dict[str, tuple[pd.DataFrame, str]]:
    """{"train"|"validation": (frame with the text columns and a "label" column, source description)}"""
    spec = task_spec_of(params)
    custom, source = params.data.custom, resolve_source(params, root)
    if custom is None:
        # the source as params.yaml names it, relative to the project: meta.json (a DVC output)
        # is then the same bytes in every clone, wherever it lives
        where = "hub" if source is None else params.data.source
        return {split: (load_glue_split(params.data.task, name, source), f"{where}:{params.data.task}/{name}")
                for split, name in (("train", "train"), ("validation", spec.eval_split))}
    splits = {}
    for split in ("train", "validation"):
        name = getattr(custom, split)
        if source is None:
            frame, where = load_hub_split(custom.dataset, name, custom.dataset_config), hub_source(
                custom.dataset, name, custom.dataset_config)
        else:
            where = str(Path(params.data.source) / name)
            frame = read_table(source / name, where)
        check_columns(frame, (*spec.text_columns, custom.label_column), where)
        splits[split] = (frame.rename(columns={custom.label_column: "label"}), where)
    return splits


def check_and_encode(splits: dict[str, tuple[pd.DataFrame, str]], spec: TaskSpec, label_column: str) -> list[str] | None:
    """Check text cells and labels of every split, replace labels by class ids (classification);
    returns the class names in id order, or None for regression."""
    for frame, where in splits.values():
        check_text(frame, spec.text_columns, where)
    if spec.regression:
        for frame, where in splits.values():
            numbers = pd.to_numeric(frame["label"], errors="coerce")
            if numbers.isna().any():
                row = int(numbers.isna().to_numpy().argmax())
                raise data_error(where, f"{frame['label'].iloc[row]!r} is not a number (a regression task)", row, label_column)
            frame["label"] = numbers.astype(float)
        return None
    train, train_where = splits["train"]
    label_set = LabelSet.from_train(train["label"], train_where, label_column, spec.labels)
    for frame, where in splits.values():
        frame["label"] = label_set.encode(frame["label"], where, label_column)
    return list(label_set.names)


def run(params: Params, root: Path = Path(".")) -> dict:
    paths = Paths(root)
    spec = task_spec_of(params)
    splits = read_splits(params, paths.root)  # fails on bad data before anything is written
    labels = check_and_encode(splits, spec, params.data.custom.label_column if params.data.custom else "label")
    train, train_source = splits["train"]
    train = train.sample(frac=1.0, random_state=params.seed).reset_index(drop=True)
    if params.data.train_limit:
        train = train.head(params.data.train_limit)
    splits["train"] = (train, train_source)

    tokenizer = load_tokenizer(base_model_path(params.teacher.base_model))
    meta = {"task": params.data.task, "text_columns": list(spec.text_columns), "labels": labels,
            "num_labels": len(labels) if labels else 1,
            "max_length": params.data.max_length, "tokenizer": params.teacher.base_model,
            "pad_token_id": tokenizer.pad_token_id, "splits": {}}
    with mlflow_run(STAGE, params, paths.root):
        for split, (frame, source) in splits.items():
            digest = frame_digest(frame)
            examples = tokenize(frame, tokenizer, spec.text_columns, params.data.max_length)
            out = pd.DataFrame(examples)
            atomic_write(paths.data_split(split), lambda f: out.to_parquet(f, index=False))
            lengths = out["input_ids"].map(len)
            meta["splits"][split] = {"source": source, "rows": len(frame), "digest": digest,
                                     "mean_tokens": float(lengths.mean()), "truncated": int((lengths >= params.data.max_length).sum())}
            tracking.log_dataset(frame, name=f"{params.data.task}-{split}", digest=digest, source=source, context=split)
        meta["digest"] = fingerprint(meta["splits"]["train"]["digest"], meta["splits"]["validation"]["digest"], labels)
        write_json(paths.data_meta, meta)
        metrics = {split: {"rows": m["rows"], "mean_tokens": m["mean_tokens"]} for split, m in meta["splits"].items()}
        write_json(paths.metrics(STAGE), metrics)
        mlflow.log_metrics({f"{split}.{k}": float(v) for split, m in metrics.items() for k, v in m.items()})
    return meta
