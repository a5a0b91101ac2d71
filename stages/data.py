"""Stage `data`: read a GLUE task (local copy or Hub) or a user's files, shuffle and
limit the training split, tokenise with the base model's tokenizer, and write
parquet splits plus meta.json (source digests, counts) for every later stage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import pandas as pd

from cofi.convert import load_tokenizer
from cofi.data import load_glue_split, load_table, tokenize
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
    """{"train"|"validation": (frame, source description)}"""
    spec = task_spec_of(params)
    if params.data.task == "custom":
        custom = params.data.custom
        return {
            split: (load_table(root / path, spec, custom.label_column), str(path))
            for split, path in (("train", custom.train), ("validation", custom.validation))
        }
    source = resolve_source(params, root)
    where = "hub" if source is None else str(source)
    return {
        "train": (load_glue_split(params.data.task, "train", source), f"{where}:{params.data.task}/train"),
        "validation": (
            load_glue_split(params.data.task, spec.eval_split, source),
            f"{where}:{params.data.task}/{spec.eval_split}",
        ),
    }


def run(params: Params, root: Path = Path(".")) -> dict:
    paths = Paths(root)
    spec = task_spec_of(params)
    splits = read_splits(params, paths.root)  # fails on bad data before anything is written
    train, train_source = splits["train"]
    train = train.sample(frac=1.0, random_state=params.seed).reset_index(drop=True)
    if params.data.train_limit:
        train = train.head(params.data.train_limit)
    splits["train"] = (train, train_source)

    tokenizer = load_tokenizer(base_model_path(params.teacher.base_model))
    meta = {"task": params.data.task, "text_columns": list(spec.text_columns), "num_labels": spec.num_labels,
            "max_length": params.data.max_length, "tokenizer": params.teacher.base_model,
            "pad_token_id": tokenizer.pad_token_id, "splits": {}}
    with mlflow_run(STAGE, params, paths.root):
        for split, (frame, source) in splits.items():
            digest = frame_digest(frame)
            examples = tokenize(frame, tokenizer, spec.text_columns, params.data.max_length)
            out = pd.DataFrame(examples)
            paths.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = paths.data_split(split).with_suffix(".parquet.tmp")
            out.to_parquet(tmp, index=False)
            tmp.replace(paths.data_split(split))
            lengths = out["input_ids"].map(len)
            meta["splits"][split] = {"source": source, "rows": len(frame), "digest": digest,
                                     "mean_tokens": float(lengths.mean()), "truncated": int((lengths >= params.data.max_length).sum())}
            tracking.log_dataset(frame, name=f"{params.data.task}-{split}", digest=digest, source=source, context=split)
        meta["digest"] = fingerprint(meta["splits"]["train"]["digest"], meta["splits"]["validation"]["digest"])
        write_json(paths.data_meta, meta)
        metrics = {split: {"rows": m["rows"], "mean_tokens": m["mean_tokens"]} for split, m in meta["splits"].items()}
        write_json(paths.metrics(STAGE), metrics)
        mlflow.log_metrics({f"{split}.{k}": float(v) for split, m in metrics.items() for k, v in m.items()})
    return meta
