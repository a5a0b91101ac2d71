"""Reading a user's data (cofi.data) and mapping its labels to class ids (cofi.labels)."""

from __future__ import annotations

import pandas as pd
import pytest

from cofi.data import load_hub_split, read_table
from cofi.labels import LabelSet

ROWS = pd.DataFrame({"premise": ["a b", "c, d"], "hypothesis": ["e", "f"], "label": ["yes", "no"]})


@pytest.mark.parametrize(
    "name, write",
    [
        ("plain.csv", lambda p: ROWS.to_csv(p, index=False)),
        ("bom.csv", lambda p: p.write_bytes(b"\xef\xbb\xbf" + ROWS.to_csv(index=False).encode())),
        ("semicolon.csv", lambda p: ROWS.to_csv(p, index=False, sep=";")),
        ("tabs.tsv", lambda p: ROWS.to_csv(p, index=False, sep="\t")),
        ("lines.jsonl", lambda p: ROWS.to_json(p, orient="records", lines=True)),
        ("table.parquet", lambda p: ROWS.to_parquet(p, index=False)),
    ],
)
def test_every_format_reads_the_same_table(tmp_path, name, write):
    write(tmp_path / name)
    pd.testing.assert_frame_equal(read_table(tmp_path / name), ROWS)


def test_the_hub_code_path_reads_a_local_dataset_directory(tmp_path):
    ROWS.to_csv(tmp_path / "train.csv", index=False)
    ROWS.head(1).to_csv(tmp_path / "validation.csv", index=False)
    pd.testing.assert_frame_equal(load_hub_split(str(tmp_path), "validation"), ROWS.head(1))


@pytest.mark.parametrize(
    "labels, names, ids",
    [
        (["World", "Sports", "Business", "Sports"], ("Business", "Sports", "World"), [2, 1, 0, 1]),  # sorted
        ([1, 0, 1], ("0", "1"), [1, 0, 1]),  # integers keep their values
        ([3, 1, 2], ("1", "2", "3"), [2, 0, 1]),  # integers sorted numerically
        (["10", "9", "10"], ("9", "10"), [1, 0, 1]),  # integers read as strings (a CSV column) too
    ],
)
def test_labels_get_ids_in_sorted_order(labels, names, ids):
    label_set = LabelSet.from_train(pd.Series(labels), "train.csv", "label")
    assert label_set.names == names
    assert label_set.encode(pd.Series(labels), "train.csv", "label") == ids


def test_an_explicit_list_gives_the_order():
    label_set = LabelSet.from_train(pd.Series(["pos", "neg"]), "train.csv", "label", names=["pos", "neg"])
    assert label_set.names == ("pos", "neg")
    assert label_set.encode(pd.Series(["neg", "pos", "neg"]), "dev.csv", "label") == [1, 0, 1]
    by_id = LabelSet.from_train(pd.Series([1, 0]), "train.csv", "label", names=["negative", "positive"])
    assert by_id.encode(pd.Series([0, 1]), "dev.csv", "label") == [0, 1]  # integers are ids into the list
