"""`dvc repro` end to end on the user's own data, as the README tells it: a pair task
(premise, hypothesis) in CSV files with string labels, read from the project's data/
directory. Checks the label names every saved model, the ONNX export and
`transformers.pipeline` give back, that a second repro does nothing, and that editing
the CSV invalidates the data stage and, through its output, everything after it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from test_pipeline_e2e import DATA_DIR, TINY, copy_project, pytestmark, run  # noqa: F401  (pytestmark: same skips)

LABELS = ["entailment", "not_entailment"]  # sorted: the ids 0 and 1
CUSTOM = {
    "data": {**TINY["data"], "task": "custom", "source": "data",
             "custom": {"train": "train.csv", "validation": "dev.csv", "text_columns": ["premise", "hypothesis"],
                        "label_column": "label", "metric": "accuracy"}},
    **{k: v for k, v in TINY.items() if k != "data"},
    "prune": {**TINY["prune"], "targets": [0.5], "speedups": [], "deployment": None},  # speed targets: the main e2e
    "deployments": {},
    "mlflow": {"register_models": False},
}
STAGES = {"data", "teacher", "prune@0.5", "finetune@0.5", "compact@0.5", "benchmark", "report"}


def write_rte_csv(path, split: str, rows: int) -> None:
    """RTE as a user has it: named columns, label names instead of ids."""
    frame = pd.read_parquet(DATA_DIR / "rte" / f"{split}-00000-of-00001.parquet").head(rows)
    frame = pd.DataFrame({"premise": frame["sentence1"], "hypothesis": frame["sentence2"],
                          "label": [LABELS[i] for i in frame["label"]]})
    frame.to_csv(path, index=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = tmp_path_factory.mktemp("custom")
    (project / "data").mkdir()
    write_rte_csv(project / "data" / "train.csv", "train", 64)
    write_rte_csv(project / "data" / "dev.csv", "validation", 32)
    copy_project(project, CUSTOM)
    run(["dvc", "repro"], project)
    return project


def test_every_saved_model_and_the_onnx_export_carry_the_label_names(project):
    expected = {"id2label": {str(i): n for i, n in enumerate(LABELS)}, "label2id": {n: i for i, n in enumerate(LABELS)}}
    meta = json.loads((project / "outputs" / "data" / "meta.json").read_text())
    assert meta["labels"] == LABELS and meta["splits"]["train"]["source"] == "data/train.csv"
    for model_dir in ("teacher", "pruned/0.5", "finetuned/0.5", "compact/0.5"):
        config = json.loads((project / "outputs" / model_dir / "config.json").read_text())
        assert {k: config[k] for k in expected} == expected, model_dir
    for name in ("teacher", "cofi-0.5"):
        assert json.loads((project / "outputs" / "onnx" / f"{name}.labels.json").read_text()) == expected


def test_transformers_pipeline_returns_the_label_names(project):
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(project / "outputs" / "compact" / "0.5"),
                        trust_remote_code=True)
    results = classify([{"text": "A man is playing a guitar.", "text_pair": "A man plays music."},
                        {"text": "The cat sleeps.", "text_pair": "A dog runs."}])
    assert len(results) == 2 and all(r["label"] in LABELS for r in results)


def test_the_readme_loading_snippet_runs_as_printed(project):
    """The README's snippet, copied as a user would (only the model path changed), in a
    fresh interpreter without this package imported and with no terminal to answer a
    prompt: it loads without asking to run custom code and returns a label name."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
                   if "AutoTokenizer.from_pretrained" in block)
    snippet = snippet.replace('"outputs/compact/0.6"', repr(str(project / "outputs" / "compact" / "0.5")))
    code = snippet.rstrip().splitlines()
    code[-1] = f"print({code[-1].split('#')[0].strip()})"  # the last line's result, as a REPL would show it
    out = subprocess.run([sys.executable, "-c", "\n".join(code)], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300, cwd=project)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Do you wish to run the custom code" not in out.stdout + out.stderr
    assert any(f"'label': '{name}'" in out.stdout for name in LABELS), out.stdout


def test_second_repro_does_nothing(project):
    out = run(["dvc", "repro"], project)
    assert "Running stage" not in out.stdout + out.stderr


def test_editing_the_csv_reruns_data_and_everything_after_it(project):
    train = project / "data" / "train.csv"
    train.write_text(train.read_text() + '"One more premise.","One more hypothesis.",entailment\n')
    assert set(json.loads(run(["dvc", "status", "--json"], project).stdout)) == {"data"}
    out = run(["dvc", "repro", "data"], project)
    assert "Running stage 'data'" in out.stdout + out.stderr
    assert set(json.loads(run(["dvc", "status", "--json"], project).stdout)) == STAGES - {"data"}
