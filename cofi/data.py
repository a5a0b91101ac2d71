"""Task data: a table of GLUE task specs, reading splits (local files or the Hugging
Face Hub), checking text cells, and tokenising.

Every problem with the data is a ``DataError``: one line naming the file (or Hub
split), the row (counted from 1, the header not counted) and the column.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cofi.metrics import METRICS, MetricFn

GLUE_DATASET = "nyu-mll/glue"
REGRESSION_METRIC = "pearson_spearman"


class DataError(ValueError):
    """Bad input data; the message names the file, and where known the row and column."""


def data_error(source: str, problem: str, row: int | None = None, column: str | None = None) -> DataError:
    """``source, row 3, column 'label': problem``; ``row`` is the 0-based position in the table."""
    where = source
    if row is not None:
        where += f", row {row + 1}"
    if column is not None:
        where += f", column {column!r}"
    return DataError(f"{where}: {problem}")


@dataclass(frozen=True)
class TaskSpec:
    text_columns: tuple[str, ...]  # one sentence, or a pair
    metric: str  # a key of cofi.metrics.METRICS; "pearson_spearman": regression (one output)
    primary_metric: str  # the number that picks the best checkpoint
    labels: tuple[str, ...] | None = None  # class names in id order; None: from the training data (or regression)
    eval_split: str = "validation"

    @property
    def metric_fn(self) -> MetricFn:
        return METRICS[self.metric]

    @property
    def regression(self) -> bool:
        return self.metric == REGRESSION_METRIC


# Label names as in the Hub's nyu-mll/glue features.
TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec(("sentence",), "matthews", "matthews", ("unacceptable", "acceptable")),
    "sst2": TaskSpec(("sentence",), "accuracy", "accuracy", ("negative", "positive")),
    "mrpc": TaskSpec(("sentence1", "sentence2"), "accuracy_f1", "accuracy", ("not_equivalent", "equivalent")),
    "stsb": TaskSpec(("sentence1", "sentence2"), REGRESSION_METRIC, "spearman"),
    "qqp": TaskSpec(("question1", "question2"), "accuracy_f1", "accuracy", ("not_duplicate", "duplicate")),
    "mnli": TaskSpec(("premise", "hypothesis"), "accuracy", "accuracy", ("entailment", "neutral", "contradiction"),
                     eval_split="validation_matched"),
    "qnli": TaskSpec(("question", "sentence"), "accuracy", "accuracy", ("entailment", "not_entailment")),
    "rte": TaskSpec(("sentence1", "sentence2"), "accuracy", "accuracy", ("entailment", "not_entailment")),
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
        frame = load_hub_split(GLUE_DATASET, split, config=task)
        source = hub_source(GLUE_DATASET, split, config=task)
    else:
        path = Path(data_dir) / task / f"{split}-00000-of-00001.parquet"
        if not path.exists():
            raise FileNotFoundError(f"no {task} {split} split at {path}")
        frame = pd.read_parquet(path)
        source = str(path)
    check_columns(frame, (*spec.text_columns, "label"), source)
    return frame


def hub_source(dataset: str, split: str, config: str | None = None) -> str:
    """How a Hub split is named in messages and metadata: ``hub:ag_news[default]/test``."""
    return f"hub:{dataset}{f'[{config}]' if config else ''}/{split}"


def load_hub_split(dataset: str, split: str, config: str | None = None) -> pd.DataFrame:
    """One split of any dataset ``datasets.load_dataset`` reads: a Hub id (optionally a
    config) or a local directory of data files. Its failures (no such dataset, config
    or split; no network) become one DataError line."""
    import datasets

    try:
        return datasets.load_dataset(dataset, config, split=split).to_pandas()
    except Exception as e:  # datasets raises many types (DatasetNotFoundError, ValueError, ConnectionError...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise data_error(hub_source(dataset, split, config), f"cannot load it with datasets ({reason})") from e


def check_columns(frame: pd.DataFrame, columns: tuple[str, ...], source: str) -> None:
    """Refuse a table without the named columns, or without rows."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise data_error(source, f"missing column(s) {missing}; found {list(frame.columns)}")
    if len(frame) == 0:
        raise data_error(source, "the split is empty")


def check_text(frame: pd.DataFrame, text_columns: tuple[str, ...], source: str) -> None:
    """Refuse empty (missing or blank) text cells, naming the first."""
    for column in text_columns:
        cells = frame[column]
        empty = cells.isna() | cells.astype(str).str.strip().eq("")
        if empty.any():
            raise data_error(source, "empty text", row=int(empty.to_numpy().argmax()), column=column)


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


# ---- a user's own files ----------------------------------------------------------------

DELIMITERS = (",", ";", "\t", "|")


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV (or TSV) file, UTF-8 with or without a byte-order mark; the delimiter is the one
    of ``DELIMITERS`` that splits the header line into the most columns (ties: comma)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = f.readline()
    delimiter = max(DELIMITERS, key=lambda d: len(next(csv.reader([header], delimiter=d), [])))
    return pd.read_csv(path, encoding="utf-8-sig", sep=delimiter, keep_default_na=False, na_values=[""])


READERS = {
    ".csv": read_csv,
    ".tsv": read_csv,
    ".parquet": pd.read_parquet,
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
}


def read_table(path: str | Path, source: str | None = None) -> pd.DataFrame:
    """A user's split: CSV / TSV, JSON lines or parquet, by the file's suffix.
    ``source``: the file's name in messages (default: ``path``)."""
    path = Path(path)
    source = source or str(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise data_error(source, f"unsupported file type {path.suffix!r}; allowed: {sorted(READERS)}")
    try:
        return reader(path)
    except UnicodeDecodeError as e:
        raise data_error(source, f"not UTF-8 text (byte {e.start}: {e.reason})") from None
    except ValueError as e:  # pandas' parse errors (JSON, CSV) are ValueErrors
        raise data_error(source, f"cannot parse it ({str(e).strip().splitlines()[0]})") from None
