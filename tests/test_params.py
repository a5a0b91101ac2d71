"""pipeline/params.py: the repo's params.yaml validates; each bad file is refused with a precise message."""

from __future__ import annotations

import functools
import operator
import re
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, load_params, resolve_source, validate_params
from pipeline.paths import Speedup

PROJECT = Path(__file__).resolve().parents[1]
REAL = PROJECT / "params.yaml"
DELETE = object()

CUSTOM = {
    "train": "data/train.csv",
    "validation": "data/dev.csv",
    "text_columns": ["premise", "claim"],
    "label_column": "label",
    "metric": "accuracy",
}


def real_params() -> dict:
    return yaml.safe_load(REAL.read_text())


def changed(changes: dict) -> str:
    """The real params.yaml with ``{"dotted.key": value}`` changes (DELETE removes the key)."""
    data = real_params()
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = functools.reduce(operator.getitem, parents, data)
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return yaml.safe_dump(data, sort_keys=False)


def test_repo_params_validate():
    params = load_params(REAL)
    assert isinstance(params, Params)
    assert params.model_dump() == real_params()  # nothing coerced, added or dropped


def test_custom_task_validates():
    params = validate_params(yaml.safe_load(changed({"data.task": "custom", "data.custom": CUSTOM})))
    assert params.data.custom.text_columns == ["premise", "claim"]
    assert (params.data.custom.labels, params.data.custom.dataset, params.data.custom.dataset_config) == (None,) * 3


def test_custom_hub_dataset_validates():
    hub = {**CUSTOM, "dataset": "ag_news", "train": "train", "validation": "test", "labels": ["World", "Sports"]}
    params = validate_params(yaml.safe_load(changed({"data.task": "custom", "data.source": "hub", "data.custom": hub})))
    assert params.data.custom.dataset == "ag_news" and params.data.custom.labels == ["World", "Sports"]


TASKS = "'cola', 'sst2', 'mrpc', 'stsb', 'qqp', 'mnli', 'qnli', 'rte' or 'custom'"

# (id, file content: a dict of changes to the real params.yaml, raw text or a function giving it, None for no file,
#  the expected problems: one substring per reported problem, in order)
BAD = [
    ("unknown top-level key", {"extras": 1}, ["extras: unknown key"]),
    (
        "nested key typo",
        {"prune.temperature": DELETE, "prune.temprature": 2.0},
        ["prune.temperature: missing", "prune.temprature: unknown key; did you mean prune.temperature?"],
    ),
    ("missing section", {"mlflow": DELETE}, ["mlflow: missing"]),
    ("section not a mapping", {"finetune": "fast"}, ["finetune = 'fast': must be a mapping of keys, not a string"]),
    ("wrong type", {"prune.temperature": "two"}, ["prune.temperature = 'two': must be a number, not a string"]),
    (
        "string number",
        {"prune.targets": ["0.6", 0.9]},
        ["prune.targets[0] = '0.6': must be a number, not a string (remove the quotes)"],
    ),
    (
        "YAML 1.1 exponent read as a string",
        {"prune.learning_rate": "5e-5"},
        ["prune.learning_rate = '5e-5': must be a number, not a string (write 5.0e-5, without quotes)"],
    ),
    ("bool where int", {"prune.batch_size": True}, ["prune.batch_size = True: must be an integer, not a boolean"]),
    ("float where int", {"seed": 42.0}, ["seed = 42.0: must be an integer, not a number"]),
    ("int where bool", {"compute.bf16": 1}, ["compute.bf16 = 1: must be true or false, not an integer"]),
    ("target 1.0", {"prune.targets": [0.6, 1.0]}, ["prune.targets[1] = 1.0: must be in [0, 1)"]),
    ("target -0.1", {"prune.targets": [-0.1, 0.9]}, ["prune.targets[0] = -0.1: must be in [0, 1)"]),
    ("duplicate targets", {"prune.targets": [0.6, 0.9, 0.6]}, ["prune.targets = [0.6, 0.9, 0.6]: must not repeat 0.6"]),
    ("no targets", {"prune.targets": []}, ["prune.targets and prune.speedups are both empty: nothing to prune"]),
    ("speedup 1x", {"prune.speedups": [2, 1], "prune.deployment": "x"}, ["prune.speedups[1] = 1: must be > 1"]),
    ("speedup without deployment", {"prune.speedups": [2, 4]},
     ["prune.deployment = None: the speedup targets prune.speedups (2, 4) need the name of a deployment to measure "
      "them on, a key of deployments (none are defined)"]),
    ("speedup on an unknown deployment", {"prune.speedups": [2], "prune.deployment": "gpu",
                                          "deployments": {"cpu": {"device": "cpu", "runtime": "torch", "precision": "fp32",
                                                                  "batch_size": 1, "sequence_length": 128, "threads": 0}}},
     ["prune.deployment = 'gpu': the speedup targets prune.speedups (2) need the name of a deployment to measure "
      "them on, a key of deployments (cpu)"]),
    ("temperature 0", {"prune.temperature": 0}, ["prune.temperature = 0: must be > 0"]),
    ("NaN", {"prune.epochs": float("nan")}, ["prune.epochs = nan: must be a finite number"]),
    (
        "deployment of ONNX Runtime in bf16",
        {"deployments": {"ort": {"device": "cpu", "runtime": "onnxruntime", "precision": "bf16",
                                 "batch_size": 1, "sequence_length": 128, "threads": 0}}},
        ["deployments.ort: runtime onnxruntime serves fp32 and int8, not bf16"],
    ),
    *[(
        f"deployment name with {bad!r}",
        {"deployments": {name: {"device": "cpu", "runtime": "torch", "precision": "fp32",
                                "batch_size": 1, "sequence_length": 128, "threads": 0}}},
        [f"deployments: name {name!r} must be letters, digits, '_' or '-' (it names files, a stage and the DVC param "
         "deployments.<name>)"],
    ) for bad, name in (("/", "a/b"), (".", "cpu.b1"))],  # "deployments.cpu.b1" would be a nested param to DVC
    (
        "deployment without a batch size",
        {"deployments": {"cpu": {"device": "cpu", "runtime": "torch", "precision": "fp32",
                                 "sequence_length": 128, "threads": 0}}},
        ["deployments.cpu.batch_size: missing"],
    ),
    ("epochs map empty", {"prune.epochs": {}}, ["prune.epochs = {}: must be a number of epochs or a map with at least one target"]),
    ("epochs keyed by a name", {"prune.epochs": {"high": 2.0}}, ["prune.epochs = {'high': 2.0}: key 'high' must be a target sparsity in [0, 1)"]),
    ("epochs entry 0", {"prune.epochs": {0.6: 1.25, 0.9: 0}}, ["prune.epochs = {0.6: 1.25, 0.9: 0}: entry 0.9 must be > 0"]),
    ("finetune epochs entry < 0", {"finetune.epochs": {0.6: 0, 0.9: -1}}, ["finetune.epochs = {0.6: 0, 0.9: -1}: entry 0.9 must be >= 0"]),
    ("finetune epochs text", {"finetune.epochs": "1"}, ["finetune.epochs = '1': must be a number of epochs, not a string"]),
    ("prediction_weight 1.5", {"prune.prediction_weight": 1.5}, ["prune.prediction_weight = 1.5: must be in [0, 1]"]),
    ("learning_rate 0", {"teacher.learning_rate": 0}, ["teacher.learning_rate = 0: must be > 0"]),
    ("warmup_ratio 1", {"teacher.warmup_ratio": 1.0}, ["teacher.warmup_ratio = 1.0: must be in [0, 1)"]),
    ("dropout 1", {"teacher.dropout": 1.0}, ["teacher.dropout = 1.0: must be in [0, 1)"]),
    (
        "sparsity_tolerance 0",
        {"prune.sparsity_tolerance": 0.0},
        ["prune.sparsity_tolerance = 0.0: must be in (0, 1)"],
    ),
    ("non-string key", lambda: REAL.read_text() + "1: one\n", ["<root>: key 1 must be a string"]),
    ("max_length 1024", {"data.max_length": 1024}, ["data.max_length = 1024: must be in [8, 512]"]),
    ("train_limit 0", {"data.train_limit": 0}, ["data.train_limit = 0: must be >= 1"]),
    (
        "unknown family",
        {"prune.families": ["hidden", "neurons"]},
        ["prune.families[1] = 'neurons': must be one of 'hidden', 'head', 'mha', 'intermediate' or 'ffn'"],
    ),
    ("duplicate family", {"prune.families": ["head", "mha", "head"]}, ["must not repeat 'head'"]),
    (
        "teacher_layers not increasing",
        {"prune.teacher_layers": [4, 2]},
        ["prune.teacher_layers = [4, 2]: must be strictly increasing"],
    ),
    ("teacher_layers 0-based", {"prune.teacher_layers": [0, 3]}, ["prune.teacher_layers[0] = 0: must be >= 1"]),
    ("unknown task", {"data.task": "sst-2"}, [f"data.task = 'sst-2': must be one of {TASKS}"]),
    ("device tpu", {"compute.device": "tpu"}, ["compute.device = 'tpu': must be one of 'auto', 'cpu' or 'cuda'"]),
    ("ramp cosine", {"prune.sparsity_ramp": "cosine"}, ["prune.sparsity_ramp = 'cosine': must be one of 'linear' or 'cubic'"]),
    ("freeze as text", {"prune.freeze_word_embeddings": "yes"},
     ["prune.freeze_word_embeddings = 'yes': must be true or false"]),
    (
        "precision fp16",
        {"benchmark.precisions": ["fp16"]},
        ["benchmark.precisions[0] = 'fp16': must be one of 'fp32', 'bf16' or 'int8'"],
    ),
    (
        "warm-up longer than training",
        {"prune.sparsity_warmup_epochs": 3.5},
        [
            "sparsity warm-up longer than training: prune.distill_epochs (0.15) + "
            "prune.sparsity_warmup_epochs (3.5) must be < prune.epochs (2)"
        ],
    ),
    ("custom task without data.custom", {"data.task": "custom"}, ["data.task 'custom' requires data.custom"]),
    ("data.custom with a GLUE task", {"data.custom": CUSTOM}, ["data.custom is set but data.task is 'sst2'"]),
    (
        "custom metric unknown",
        {"data.task": "custom", "data.custom": {**CUSTOM, "metric": "f1"}},
        ["data.custom.metric = 'f1': must be one of 'accuracy', 'accuracy_f1', 'matthews' or 'pearson_spearman'"],
    ),
    (
        "custom with three text columns",
        {"data.task": "custom", "data.custom": {**CUSTOM, "text_columns": ["a", "b", "c"]}},
        ["data.custom.text_columns = ['a', 'b', 'c']: must have at most 2 items"],
    ),
    (
        "label names for a regression task",
        {"data.task": "custom", "data.custom": {**CUSTOM, "metric": "pearson_spearman", "labels": ["a", "b"]}},
        ["data.custom.labels is set but data.custom.metric is 'pearson_spearman'"],
    ),
    (
        "one label name",
        {"data.task": "custom", "data.custom": {**CUSTOM, "labels": ["a"]}},
        ["data.custom.labels = ['a']: must have at least 2 items"],
    ),
    (
        "repeated label names",
        {"data.task": "custom", "data.custom": {**CUSTOM, "labels": ["a", "b", "a"]}},
        ["data.custom.labels = ['a', 'b', 'a']: must not repeat 'a'"],
    ),
    (
        "custom files outside data.source",
        {"data.task": "custom", "data.custom": {**CUSTOM, "train": "../elsewhere/train.csv"}},
        ["data.custom.train = '../elsewhere/train.csv': must be a file inside data.source"],
    ),
    (
        "custom file by absolute path",
        {"data.task": "custom", "data.custom": {**CUSTOM, "validation": "/data/dev.csv"}},
        ["data.custom.validation = '/data/dev.csv': must be a file inside data.source"],
    ),
    (
        "hub source without a dataset",
        {"data.task": "custom", "data.source": "hub", "data.custom": CUSTOM},
        ["data.source 'hub' reads data.custom.dataset, but data.custom.dataset is null"],
    ),
    (
        "a dataset with a directory source",
        {"data.task": "custom", "data.custom": {**CUSTOM, "dataset": "imdb"}},
        ["data.custom.dataset is set but data.source is 'data/glue', a directory"],
    ),
    ("fine_tuned not a boolean", {"teacher.fine_tuned": "yes"}, ["teacher.fine_tuned = 'yes': must be true or false"]),
    ("missing file", None, ["params.yaml: cannot read the params file"]),
    ("invalid YAML", "prune:\n  targets: [0.6, 0.9\n", ["params.yaml: invalid YAML at line 3"]),
    ("duplicate YAML key", "seed: 1\nseed: 2\n", ["params.yaml: invalid YAML at line 2, column 1: duplicate key 'seed'"]),
    ("empty file", "", ["params.yaml: must be a mapping of sections, got null"]),
]


@pytest.mark.parametrize("content, expected", [pytest.param(c, e, id=i) for i, c, e in BAD])
def test_bad_params_are_refused(tmp_path, content, expected):
    path = tmp_path / "params.yaml"
    if content is not None:
        text = changed(content) if isinstance(content, dict) else content() if callable(content) else content
        path.write_text(text)
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    problems = raised.value.problems
    assert len(problems) == len(expected), problems
    for problem, text in zip(problems, expected):
        assert text in problem
        assert text in str(raised.value)


def test_every_problem_is_reported(tmp_path):
    path = tmp_path / "params.yaml"
    changes = {
        "seed": "42",
        "data.task": "custom",
        "compute.device": "tpu",
        "prune.targets": [0.6, 1.0],
        "prune.sparsity_warmup_epochs": 9.0,
        "prune.families": ["hidden", "hidden"],
        "benchmark.repeats": 0,
        "mlflow.experimen": "cofi",
    }
    path.write_text(changed(changes))
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    message = str(raised.value)
    lines = message.splitlines()
    assert lines[0] == f"{path}: 7 invalid parameters:"
    for text in [
        "seed = '42': must be an integer, not a string (remove the quotes)",
        "data.task 'custom' requires data.custom",
        "compute.device = 'tpu'",
        "prune.targets[1] = 1.0: must be in [0, 1)",
        "prune.families = ['hidden', 'hidden']: must not repeat 'hidden'",
        "benchmark.repeats = 0: must be >= 1",
        "mlflow.experimen: unknown key; did you mean mlflow.experiment?",
    ]:
        assert sum(text in line for line in lines[1:]) == 1, text
    # the warm-up rule needs prune's own fields valid; targets and families are not here
    assert "warm-up" not in message


def test_prune_epochs_per_target():
    """A map gives its entries' targets their epochs, targets between two entries the
    linear interpolation, targets beyond them the nearest entry's."""
    data = yaml.safe_load(REAL.read_text())
    data["prune"].update(epochs={0.6: 1.25, 0.9: 2.25}, targets=[0.5, 0.6, 0.8, 0.9, 0.95])
    prune = validate_params(data).prune
    assert [prune.epochs_for(t) for t in (0.5, 0.6, 0.9, 0.95)] == [1.25, 1.25, 2.25, 2.25]
    assert prune.epochs_for(0.8) == pytest.approx(1.25 + (2.25 - 1.25) * 0.2 / 0.3, abs=1e-12)
    data["prune"]["epochs"] = 2
    assert validate_params(data).prune.epochs_for(0.9) == 2.0
    # the warm-up rule holds for every swept target's own length
    data["prune"].update(epochs={0.6: 0.7, 0.9: 2.25}, targets=[0.9])
    assert validate_params(data).prune.epochs_for(0.9) == 2.25
    data["prune"]["targets"] = [0.6, 0.9]
    with pytest.raises(ParamsError, match=r"must be < prune.epochs \(0.7\)"):
        validate_params(data)


def test_finetune_epochs_per_target_may_be_zero():
    """finetune.epochs reads as prune.epochs, and 0 (no fine-tuning) is a valid entry."""
    data = yaml.safe_load(REAL.read_text())
    data["finetune"]["epochs"] = {0.6: 0, 0.9: 1.0}
    finetune = validate_params(data).finetune
    assert [finetune.epochs_for(t) for t in (0.5, 0.6, 0.9, 0.95, Speedup(10))] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert finetune.epochs_for(0.75) == pytest.approx(0.5, abs=1e-12)
    data["finetune"]["epochs"] = 0
    assert validate_params(data).finetune.epochs_for(0.9) == 0.0


SPEEDUP_ONLY = {"prune.deployment", "prune.speedup_tolerance"}  # read by speedup targets alone


def test_the_prune_stages_rerun_on_every_prune_param_they_read():
    """dvc.yaml lists the prune stages' params one by one (the target lists are left out: a
    new target adds a stage, it does not change the others); a Prune field missing there
    would leave a changed param without a rerun. The sparsity stage does not list what only
    speedup targets read, so that changing those reruns no sparsity run."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    fields = {f"prune.{name}" for name in Params.model_fields["prune"].annotation.model_fields}
    fields -= {"prune.targets", "prune.speedups"}

    def keys(name: str) -> set[str]:  # `- params.yaml: *prune_params` entries: the keys of that list
        listed = stages[name]["do"]["params"]
        return {k for entry in listed for k in (entry.get("params.yaml", []) if isinstance(entry, dict) else [entry])}

    sparsity, speedup = keys("prune"), keys("prune-speedup")
    assert fields - SPEEDUP_ONLY <= sparsity, sorted(fields - SPEEDUP_ONLY - sparsity)
    assert not sparsity & (SPEEDUP_ONLY | {"prune", "prune.speedups"})
    assert fields <= speedup, sorted(fields - speedup)
    assert not speedup & {"prune", "prune.targets", "prune.speedups"}


def test_resolve_source(tmp_path):
    params = load_params(REAL)
    assert resolve_source(params, PROJECT) == (PROJECT / params.data.source).resolve()
    assert resolve_source({"data": {"source": "hub"}}, PROJECT) is None
    assert resolve_source({"data": {"source": str(tmp_path)}}, PROJECT) == tmp_path.resolve()
    assert resolve_source({"data": {"source": "glue"}}, tmp_path) == tmp_path.resolve() / "glue"


def test_the_readme_deployments_validate():
    """The README's `deployments` example is valid params, as printed."""
    readme = (PROJECT / "README.md").read_text()
    block = re.search(r"```yaml\n(deployments:\n.*?)```", readme, re.S).group(1)
    data = yaml.safe_load(REAL.read_text())
    data.update(yaml.safe_load(block))
    deployments = validate_params(data).deployments
    assert set(deployments) == {"cpu-b32", "ort-b1"} and deployments["ort-b1"].runtime == "onnxruntime"


def test_a_deployment_without_threads_uses_the_runtimes_default():
    deployment = {"device": "cpu", "runtime": "onnxruntime", "precision": "int8", "batch_size": 1, "sequence_length": 128}
    params = validate_params(yaml.safe_load(changed({"deployments": {"ort-b1": deployment}})))
    assert params.deployments["ort-b1"].threads == 0


def test_the_readme_speed_targets_validate_and_make_their_stages(tmp_path):
    """The README's speed-target params, as printed, are valid, and DVC makes the stages it
    names from them (the e2e test runs the same keys through `dvc repro` at a tiny size)."""
    import subprocess

    readme = (PROJECT / "README.md").read_text()
    block = yaml.safe_load(re.search(r"```yaml\n(prune:\n  targets: \[\].*?)```", readme, re.S).group(1))
    data = yaml.safe_load(REAL.read_text())
    data["prune"].update(block["prune"])
    data["deployments"] = block["deployments"]
    params = validate_params(data)
    assert params.prune.speedups == [2, 4] and params.prune.targets == []
    assert params.prune.epochs_for(Speedup(4)) == params.prune.epochs_for(0.75)
    (tmp_path / "dvc.yaml").write_text((PROJECT / "dvc.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    listed = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=tmp_path, capture_output=True, text=True)
    stages = set(listed.stdout.split())
    assert {"profile@ort-b1", "prune-speedup@2", "prune-speedup@4", "compact-speedup@4"} <= stages, listed
    assert not any(s.startswith("prune@") for s in stages)


def test_frozen_word_embeddings_are_for_students_not_the_teacher():
    from pipeline.training import train_config

    params = load_params(REAL)
    params = params.model_copy(update={"prune": params.prune.model_copy(update={"freeze_word_embeddings": True})})
    assert not train_config(params, params.teacher, 1, 100).freeze_word_embeddings
    for section in (params.prune, params.finetune):  # as the stages pass them: with this run's epochs
        assert train_config(params, section.model_copy(update={"epochs": 1.0}), 1, 100).freeze_word_embeddings
    off = params.model_copy(update={"prune": params.prune.model_copy(update={"freeze_word_embeddings": False})})
    assert not train_config(off, off.prune.model_copy(update={"epochs": 1.0}), 1, 100).freeze_word_embeddings


def test_only_fine_tuning_counts_the_model_it_starts_from_as_a_candidate():
    from pipeline.training import train_config

    params = load_params(REAL)
    configs = {name: train_config(params, section.model_copy(update={"epochs": 1.0}), 1, 100)
               for name, section in (("teacher", params.teacher), ("prune", params.prune), ("finetune", params.finetune))}
    assert {name: c.evaluate_at_start for name, c in configs.items()} == {"teacher": False, "prune": False, "finetune": True}


def test_the_schemas_names_are_the_librarys():
    # written out in the schema so that every stage's code is free of the pruning modules
    from typing import get_args

    from cofi.lagrangian import RAMPS
    from cofi.sparsity import FAMILIES
    from pipeline.params import Family, Ramp

    assert get_args(Family) == FAMILIES
    assert get_args(Ramp) == tuple(RAMPS)
