"""GLUE tasks: a table of task specs, loading from the Hub or a local copy, tokenising."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cofi.metrics import METRICS, MetricFn

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class TaskSpec:
    text_columns: tuple[str, ...]  # one sentence, or a pair
    num_labels: int  # 1: regression
    metric: str  # a key of cofi.metrics.METRICS
    primary_metric: str  # the number that picks the best checkpoint
    eval_split: str = "validation"

    @property
    def metric_fn(self) -> MetricFn:
        return METRICS[self.metric]


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(("sentence",), 2, "matthews", "matthews"),
    "sst2": TaskSpec(("sentence",), 2, "accuracy", "accuracy"),
    "mrpc": TaskSpec(("sentence1", "sentence2"), 2, "accuracy_f1", "accuracy"),
    "stsb": TaskSpec(("sentence1", "sentence2"), 1, "pearson_spearman", "spearman"),
    "qqp": TaskSpec(("question1", "question2"), 2, "accuracy_f1", "accuracy"),
    "mnli": TaskSpec(("premise", "hypothesis"), 3, "accuracy", "accuracy", eval_split="validation_matched"),
    "qnli": TaskSpec(("question", "sentence"), 2, "accuracy", "accuracy"),
    "rte": TaskSpec(("sentence1", "sentence2"), 2, "accuracy", "accuracy"),
}


def task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    return TASKS[task]


def load_glue_split(task: str, split: str, data_dir: str | Path | None = None) -> pd.DataFrame:
    """One split of a GLUE task, from ``data_dir`` (the Hub's parquet layout,
    ``<data_dir>/<task>/<split>-00000-of-00001.parquet``) or, if None, from the Hub."""
    spec = task_spec(task)
    if data_dir is None:
        import datasets

        frame = datasets.load_dataset(HUB_DATASET, task, split=split).to_pandas()
        source = f"{HUB_DATASET}/{task}:{split}"
    else:
        path = Path(data_dir) / task / f"{split}-00000-of-00001.parquet"
        if not path.exists():
            raise FileNotFoundError(f"no {task} {split} split at {path}")
        frame = pd.read_parquet(path)
        source = str(path)
    check_columns(frame, spec, source)
    return frame


def check_columns(frame: pd.DataFrame, spec: TaskSpec, source: str) -> None:
    """Refuse data that would train on nonsense: missing columns, empty split, bad labels."""
    missing = [c for c in (*spec.text_columns, "label") if c not in frame.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {list(frame.columns)}")
    if len(frame) == 0:
        raise ValueError(f"{source}: the split is empty")
    labels = frame["label"]
    if spec.num_labels == 1:
        if not pd.api.types.is_numeric_dtype(labels) or labels.isna().any():
            raise ValueError(f"{source}: column 'label' must hold numbers for a regression task")
    else:
        bad = sorted(set(labels.tolist()) - set(range(spec.num_labels)))
        if bad:
            raise ValueError(f"{source}: labels {bad[:10]} outside the task's label set 0..{spec.num_labels - 1}")


def tokenize(frame: pd.DataFrame, tokenizer, text_columns: tuple[str, ...], max_length: int) -> list[dict]:
    """Examples for ``cofi.batching``: input_ids, token_type_ids and label per row (unpadded)."""
    texts = [frame[c].astype(str).tolist() for c in text_columns]
    encoded = tokenizer(*texts, truncation=True, max_length=max_length)
    labels = frame["label"].tolist()
    examples = []
    for i, label in enumerate(labels):
        example = {"input_ids": encoded["input_ids"][i], "label": label}
        if "token_type_ids" in encoded:
            example["token_type_ids"] = encoded["token_type_ids"][i]
        examples.append(example)
    return examples


CUSTOM_READERS = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".jsonl": lambda p: pd.read_json(p, lines=True)}


def load_table(path: str | Path, spec: TaskSpec, label_column: str = "label") -> pd.DataFrame:
    """A user's own split: CSV, JSON lines or parquet with named text column(s) and a label column."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data file at {path}")
    reader = CUSTOM_READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; allowed: {sorted(CUSTOM_READERS)}")
    frame = reader(path)
    if label_column != "label":
        if label_column not in frame.columns:
            raise ValueError(f"{path}: missing label column {label_column!r}; found {list(frame.columns)}")
        frame = frame.rename(columns={label_column: "label"})
    check_columns(frame, spec, str(path))
    return frame
