"""The demo data shipped in data/glue (data/README.md, its card): the tables the card
describes, read by the same loader and digest as the data stage, and the default
params.yaml pointing at them, so a fresh clone needs no directory beside it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cofi.data import load_glue_split
from stages.data import frame_digest

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT / "data" / "glue"

# (task, split): rows, columns, rows per class, the start of the content digest (data/README.md)
CARD = {
    ("sst2", "train"): (67349, ["sentence", "label", "idx"], [29780, 37569], "c63f61172050de3f"),
    ("sst2", "validation"): (872, ["sentence", "label", "idx"], [428, 444], "565b3dac23181e73"),
    ("rte", "train"): (2490, ["sentence1", "sentence2", "label", "idx"], [1249, 1241], "d2c8649cc256c4a3"),
    ("rte", "validation"): (277, ["sentence1", "sentence2", "label", "idx"], [146, 131], "fac03e957020cc8f"),
}


@pytest.mark.parametrize("task, split", sorted(CARD))
def test_each_shipped_split_is_the_table_its_card_describes(task, split):
    rows, columns, per_class, digest = CARD[(task, split)]
    frame = load_glue_split(task, split, GLUE)
    assert len(frame) == rows and list(frame.columns) == columns
    assert frame["label"].value_counts().sort_index().tolist() == per_class
    assert frame_digest(frame).startswith(digest)
    card = (ROOT / "data" / "README.md").read_text()
    assert f"{rows:,}" in card and digest in card


def test_the_default_params_read_the_shipped_copy_and_nothing_reads_outside_the_repository():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["data"]["source"] == "data/glue"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    beside = "../" + "shared"  # split, so that this file does not name it
    outside = [name for name in tracked if not name.endswith((".parquet", ".png")) and beside in (ROOT / name).read_text()]
    assert outside == [], f"files that read a directory beside the repository: {outside}"


def test_the_data_stage_names_its_source_as_the_params_do_not_by_where_the_clone_lives():
    """meta.json, a DVC output every stage depends on, holds the source description: an
    absolute path there made each clone's outputs/data other bytes (another digest)."""
    from pipeline.params import load_params
    from stages.data import read_splits

    splits = read_splits(load_params(ROOT / "params.yaml"), ROOT)
    assert {split: source for split, (_, source) in splits.items()} == {
        "train": "data/glue:sst2/train", "validation": "data/glue:sst2/validation"}
