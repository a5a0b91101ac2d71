"""Bad input is caught before any work, with a message naming the problem, and
nothing is written: data, columns, labels, empty splits, teacher paths, corrupt
weight files. (Params: tests/test_params.py; checkpoints: tests/test_trainer.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_model
from cofi.compact import load_model, save_model
from cofi.manifest import ManifestError
from pipeline import lineage
from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data" / "glue"  # the demo data shipped with the repository


def project(tmp_path: Path, data: dict, teacher: dict | None = None) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(data)
    params["teacher"].update(teacher or {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def custom(tmp_path: Path, train_csv: str, dev_csv: str = "text,label\ngood,1\nbad,0\n", **spec) -> Path:
    """A project reading train.csv and dev.csv from its own directory (data.source ".")."""
    (tmp_path / "train.csv").write_text(train_csv)
    (tmp_path / "dev.csv").write_text(dev_csv)
    settings = {"train": "train.csv", "validation": "dev.csv", "text_columns": ["text"], "label_column": "label",
                "metric": "accuracy"}
    settings.update(spec)
    return project(tmp_path, {"task": "custom", "source": ".", "custom": settings})


def hub(tmp_path: Path, dataset: str, **spec) -> Path:
    """A project reading a dataset through `datasets` (data.source "hub")."""
    settings = {"dataset": dataset, "train": "train", "validation": "validation", "text_columns": ["text"],
                "label_column": "label", "metric": "accuracy", **spec}
    return project(tmp_path, {"task": "custom", "source": "hub", "custom": settings})


def local_dataset(tmp_path: Path) -> str:
    """A dataset directory `datasets.load_dataset` reads like a Hub dataset: splits train, validation."""
    directory = tmp_path / "dataset"
    directory.mkdir()
    (directory / "train.csv").write_text("text,label\nhi,a\nho,b\n")
    (directory / "validation.csv").write_text("text,label\nhu,a\n")
    return str(directory)


def scripted_dataset(tmp_path: Path) -> str:
    """A dataset directory holding only a loading script, which datasets 2.x would run."""
    directory = tmp_path / "scripted"
    directory.mkdir()
    (directory / "scripted.py").write_text('raise RuntimeError("the dataset\'s loading script ran")\n')
    return str(directory)


CASES = {
    "missing data directory": (lambda t: project(t, {"source": str(t / "no-such-dir")}),
                               r"no sst2 train split at .*no-such-dir/sst2/train-00000-of-00001.parquet"),
    "missing text column": (lambda t: custom(t, "sentence,label\nhi,1\n"),
                            r"train.csv: missing column\(s\) \['text'\]; found \['sentence', 'label'\]"),
    "missing label column": (lambda t: custom(t, "text,y\nhi,1\n"),
                             r"train.csv: missing column\(s\) \['label'\]; found \['text', 'y'\]"),
    "validation label not in train": (lambda t: custom(t, "text,label\nhi,World\nho,Sports\n",
                                                       "text,label\nok,Sports\nhm,Sprots\n"),
                                      r"^dev.csv, row 2, column 'label': label 'Sprots' does not occur in the "
                                      r"training split$"),
    "label not in the explicit list": (lambda t: custom(t, "text,label\nhi,pos\nho,neutral\n", labels=["neg", "pos"]),
                                       r"^train.csv, row 2, column 'label': label 'neutral' does not occur in the "
                                       r"labels \['neg', 'pos'\]$"),
    "integer label beyond the explicit list": (lambda t: custom(t, "text,label\nhi,1\nho,2\n", labels=["neg", "pos"]),
                                               r"^train.csv, row 2, column 'label': label 2 is not an id of the 2 "
                                               r"labels \['neg', 'pos'\]$"),
    "mixed label types in a file": (lambda t: custom(t, "text,label\nhi,1\nho,0\nhu,pos\n"),
                                    r"^train.csv, row 3, column 'label': mixed label types: 'pos' is a string, but "
                                    r"the labels before it are integers$"),
    "mixed label types across splits": (lambda t: custom(t, "text,label\nhi,pos\nho,neg\n"),
                                        r"^dev.csv, row 1, column 'label': mixed label types: 1 is an integer, but "
                                        r"the training labels are strings$"),
    "float labels": (lambda t: custom(t, "text,label\nhi,0.5\nho,1.0\n"),
                     r"^train.csv, row 1, column 'label': label 0.5 is neither an integer nor a string$"),
    "empty label": (lambda t: custom(t, "text,label\nhi,1\nho,\n"), r"^train.csv, row 2, column 'label': empty label$"),
    "empty text cell": (lambda t: custom(t, "text,label\nhi,1\n,0\n"), r"^train.csv, row 2, column 'text': empty text$"),
    "blank text cell": (lambda t: custom(t, "text,label\nhi,1\n\"  \",0\n"),
                        r"^train.csv, row 2, column 'text': empty text$"),
    "non-numeric regression target": (lambda t: custom(t, "text,label\nhi,0.5\nho,high\n", metric="pearson_spearman"),
                                      r"^train.csv, row 2, column 'label': 'high' is not a number \(a regression task\)$"),
    "not UTF-8": (lambda t: _latin1(custom(t, "text,label\nhi,1\n")),
                  r"^train.csv: not UTF-8 text \(byte 14: invalid continuation byte\)$"),
    "empty split": (lambda t: custom(t, "text,label\n"), r"train.csv: the split is empty"),
    "missing custom file": (lambda t: custom(t, "text,label\nhi,1\n", train="nope.csv"), r"no data file at .*nope.csv"),
    "hub dataset that does not exist": (lambda t: hub(t, "no-such-user/no-such-dataset"),
                                        r"^hub:no-such-user/no-such-dataset/train: cannot load it with datasets "
                                        r"\(Couldn't reach 'no-such-user/no-such-dataset' on the Hub \(\w+\)\)$"),
    # datasets>=3 (pyproject.toml): a dataset's own Python code is never run
    "hub dataset with a loading script": (lambda t: hub(t, scripted_dataset(t)),
                                          r"^hub:.*scripted/train: cannot load it with datasets \(Dataset scripts "
                                          r"are no longer supported, but found scripted.py\)$"),
    "hub split that does not exist": (lambda t: hub(t, local_dataset(t), validation="dev"),
                                      r"^hub:.*dataset/dev: cannot load it with datasets \(Unknown split \"dev\". "
                                      r"Should be one of \['train', 'validation'\].\)$"),
}


def _latin1(tmp_path: Path) -> Path:
    (tmp_path / "train.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    return tmp_path


@pytest.mark.parametrize("case", CASES)
def test_bad_data_stops_the_data_stage_and_writes_nothing(tmp_path, case, monkeypatch):
    from stages import data

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)  # offline: no network is tried
    make, message = CASES[case]
    root = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.run(load_params(root / "params.yaml"), root)
    assert not (root / "outputs").exists() and not (root / "metrics").exists()
    assert not (root / "mlflow.db").exists()  # failed before a run was opened


def test_a_teacher_path_that_does_not_exist_is_named_by_the_cli(tmp_path):
    root = project(tmp_path, {"source": str(DATA_DIR), "train_limit": 16}, {"base_model": str(tmp_path / "no-model")})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "COFI_"))}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "data"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "no-model" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "outputs").exists()


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_weight_file_is_caught_by_its_hash(tmp_path, damage):
    model_dir = tmp_path / "model"
    save_model(tiny_model(), model_dir, extra=lambda d: lineage.write_manifest(
        d, kind="teacher", parent_dir=None, data_digest=None, mlflow_run_id=None))
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    weights.chmod(0o644)
    weights.write_bytes(bytes(data[: len(data) // 2]) if damage == "truncated" else bytes(data[:-8]) + bytes([data[-8] ^ 1]) + bytes(data[-7:]))
    with pytest.raises(ManifestError, match=r"model.safetensors: SHA-256 mismatch"):
        load_model(model_dir, verify=True)
