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


# The README's three ways to load a compact model, each told by a word its snippet holds, and
# the modules its interpreter is denied: the remote-code route needs no cofi package, the
# ONNX route no Python model code at all (no cofi, transformers or torch).
LOADING_ROUTES = {
    "package": ("import cofi", ()),
    "remote code": ("trust_remote_code=True", ("cofi",)),
    "onnx": ("onnxruntime", ("cofi", "transformers", "torch")),
}


def readme_snippet(word: str, project) -> str:
    """The README's python block holding ``word``, as a user copies it, the paths pointing at
    ``project``'s 0.5 model, the last line printed as a REPL would show it."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if word in block)
    snippet = (snippet.replace("outputs/compact/0.6", str(project / "outputs" / "compact" / "0.5"))
                      .replace("outputs/onnx/cofi-0.6", str(project / "outputs" / "onnx" / "cofi-0.5")))
    code = snippet.rstrip().splitlines()
    last = code[-1].split("#")[0].strip()
    code[-1] = last if last.startswith("print(") else f"print({last})"
    return "\n".join(code)


@pytest.mark.parametrize("route", LOADING_ROUTES)
def test_the_readme_loading_snippets_run_as_printed(project, route):
    """Each README snippet, copied as a user would (only the model path changed), in a fresh
    interpreter with no terminal to answer a prompt and without the modules its route says
    it does without: it loads without asking to run custom code and prints a label name.
    The package route passes no trust_remote_code at all."""
    import subprocess
    import sys

    word, denied = LOADING_ROUTES[route]
    code = readme_snippet(word, project)
    if route == "package":
        assert "trust_remote_code" not in code
    deny = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in denied)  # import raises ImportError
    out = subprocess.run([sys.executable, "-c", deny + code], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300, cwd=project)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Do you wish to run the custom code" not in out.stdout + out.stderr
    if route == "onnx":
        assert out.stdout.split() == [out.stdout.split()[0]] and out.stdout.split()[0] in LABELS, out.stdout
    else:
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
