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
from cofi.compact import save_model
from pipeline import lineage
from pipeline.lineage import LineageError
from pipeline.params import load_params

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data" / "glue"


def project(tmp_path: Path, data: dict, teacher: dict | None = None) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(data)
    params["teacher"].update(teacher or {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def custom(tmp_path: Path, train_csv: str, **spec) -> Path:
    (tmp_path / "train.csv").write_text(train_csv)
    (tmp_path / "dev.csv").write_text("text,label\ngood,1\nbad,0\n")
    settings = {"train": "train.csv", "validation": "dev.csv", "text_columns": ["text"], "label_column": "label",
                "num_labels": 2, "metric": "accuracy"}
    settings.update(spec)
    return project(tmp_path, {"task": "custom", "source": "hub", "custom": settings})


CASES = {
    "missing data directory": (lambda t: project(t, {"source": str(t / "no-such-dir")}),
                               r"no sst2 train split at .*no-such-dir/sst2/train-00000-of-00001.parquet"),
    "missing text column": (lambda t: custom(t, "sentence,label\nhi,1\n"),
                            r"train.csv: missing column\(s\) \['text'\]; found \['sentence', 'label'\]"),
    "missing label column": (lambda t: custom(t, "text,y\nhi,1\n"),
                             r"train.csv: missing column\(s\) \['label'\]; found \['text', 'y'\]"),
    "labels outside the label set": (lambda t: custom(t, "text,label\nhi,1\nho,5\nhu,-1\n"),
                                     r"train.csv: labels \[-1, 5\] outside the task's label set 0..1"),
    "non-numeric regression target": (lambda t: custom(t, "text,label\nhi,0.5\nho,high\n", num_labels=1,
                                                       metric="pearson_spearman"),
                                      r"train.csv: column 'label' must hold numbers for a regression task"),
    "empty split": (lambda t: custom(t, "text,label\n"), r"train.csv: the split is empty"),
    "missing custom file": (lambda t: custom(t, "text,label\nhi,1\n", train="nope.csv"), r"no data file at .*nope.csv"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_data_stops_the_data_stage_and_writes_nothing(tmp_path, case, monkeypatch):
    from stages import data

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    make, message = CASES[case]
    root = make(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        data.run(load_params(root / "params.yaml"), root)
    assert not (root / "outputs").exists() and not (root / "metrics").exists()
    assert not (root / "mlflow.db").exists()  # failed before a run was opened


@pytest.mark.skipif(not DATA_DIR.exists(), reason=f"no GLUE data at {DATA_DIR}")
def test_a_teacher_path_that_does_not_exist_is_named_by_the_cli(tmp_path):
    root = project(tmp_path, {"source": str(DATA_DIR), "train_limit": 16}, {"base_model": str(tmp_path / "no-model")})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "COFI_"))}
    result = subprocess.run([sys.executable, "-m", "cofi.cli", "data"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "no-model" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "outputs").exists()


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_weight_file_is_caught_by_its_hash(tmp_path, damage):
    model_dir = tmp_path / "model"
    save_model(tiny_model(), model_dir, extra=lambda d: lineage.write_manifest(
        d, kind="teacher", parent_dir=None, base_model=None, data=None, params={}, mlflow_run_id=None))
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    weights.chmod(0o644)
    weights.write_bytes(bytes(data[: len(data) // 2]) if damage == "truncated" else bytes(data[:-8]) + bytes([data[-8] ^ 1]) + bytes(data[-7:]))
    with pytest.raises(LineageError, match=r"model.safetensors: SHA-256 mismatch"):
        lineage.load_verified(model_dir)
