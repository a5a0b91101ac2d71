"""dvc.yaml's code deps: each stage lists exactly the project files it imports
(pipeline.stage_deps), so an edit reruns only the stages that run the edited file.
The real `dvc status` after an edit is in tests/test_pipeline_e2e.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from pipeline import stage_deps

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_lists_each_stages_import_closure():
    assert stage_deps.check() == []


def test_every_stage_runs_the_launcher_its_stage_module_and_their_imports():
    deps = {name: stage["deps"] for name, stage in stage_deps.stages(ROOT / "dvc.yaml").items()}
    report = set(deps.pop("report"))
    assert {"pipeline/launch.py", "pipeline/stage_cli.py", "stages/__init__.py", "stages/report.py",
            "pipeline/plotting.py", "cofi/structure.py", "cofi/__init__.py"} <= report
    assert all("stages/report.py" not in d for d in deps.values())  # an edit of it reruns only report
    assert {name for name, d in deps.items() if "pipeline/plotting.py" in d} == {
        "prune", "prune-speedup", "prune-ablation"}
    assert all("pipeline/training.py" not in deps[name] for name in ("data", "profile"))
    # the console script's tools (lineage, structure, ui) are no stage's code: editing them reruns nothing
    tools = {"pipeline/cli.py", "pipeline/cli_lineage.py", "pipeline/mlflow_app.py"}
    assert all(not tools & {*d, *report} for d in deps.values())


def test_serving_and_training_code_reruns_only_the_stages_that_run_it():
    """The params schema checks deployments with cofi.deployment alone, and the shared
    runtime helpers import no trainer: an edit of the serving code (ONNX Runtime, int8,
    the profiling of a latency model) never retrains a model, and an edit of the trainer never
    re-reads the data."""
    deps = {name: set(stage["deps"]) for name, stage in stage_deps.stages(ROOT / "dvc.yaml").items()}
    serving = {"cofi/serving.py", "cofi/quantize.py", "cofi/onnx_export.py", "cofi/benchmark.py", "cofi/profiling.py"}
    training = {"teacher", "prune", "finetune", "prune-speedup", "finetune-speedup", "prune-ablation",
                "finetune-ablation", "baseline"}
    for name in training | {"data"}:
        assert not serving & deps[name], (name, sorted(serving & deps[name]))
    assert serving - {"cofi/profiling.py"} <= deps["benchmark"] and "cofi/profiling.py" in deps["profile"]
    assert "cofi/latency.py" in deps["prune-speedup"]  # the latency model's prediction steers the pruning
    assert not {"cofi/trainer.py", "cofi/gates.py", "cofi/distill.py"} & deps["data"]
    assert all("cofi/trainer.py" in deps[name] for name in training)


def test_an_edit_of_pruning_or_distillation_code_retrains_no_teacher():
    """The trainer reaches pruning and distillation through the objects a student stage
    passes in, and the params schema names the mask families and ramps itself: the teacher
    and data stages import none of that code, the prune stages all of it, and the stages
    that train a fixed structure (finetune, baseline) the distillation code alone."""
    deps = {name: set(stage["deps"]) for name, stage in stage_deps.stages(ROOT / "dvc.yaml").items()}
    pruning = {"cofi/pruning.py", "cofi/gates.py", "cofi/lagrangian.py"}
    distillation = {"cofi/distill.py", "cofi/teacher_cache.py", "pipeline/distillation.py"}
    for name in ("data", "teacher"):
        assert not (pruning | distillation | {"cofi/sparsity.py"}) & deps[name], (name, sorted(deps[name]))
    for name in ("prune", "prune-speedup", "prune-ablation"):
        assert pruning | distillation <= deps[name], (name, sorted((pruning | distillation) - deps[name]))
    for name in ("finetune", "finetune-speedup", "finetune-ablation", "baseline"):
        assert distillation <= deps[name] and not pruning & deps[name], (name, sorted(pruning & deps[name]))


def _project(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_closure_follows_every_kind_of_import(tmp_path):
    root = _project(tmp_path, {
        "pipeline/__init__.py": "",
        "pipeline/launch.py": "from pipeline import cli\n",
        "pipeline/cli.py": "import os\ndef main():\n    import pipeline.lazy\n",  # inside a function
        "pipeline/lazy.py": "from .rel import x\n",  # relative
        "pipeline/rel.py": "x = 1\n",
        "stages/__init__.py": "",
        "stages/s.py": ("from typing import TYPE_CHECKING\nfrom cofi import sub\nimport cofi.deep.leaf\n"
                        "if TYPE_CHECKING:\n    from cofi import typing_only\n"),
        "cofi/__init__.py": "from cofi.registered import C\n",  # a package's __init__ runs first
        "cofi/registered.py": "",
        "cofi/sub.py": "",
        "cofi/typing_only.py": "",
        "cofi/unused.py": "",
        "cofi/deep/__init__.py": "",
        "cofi/deep/leaf.py": "",
    })
    assert stage_deps.import_closure(["pipeline/launch.py", "stages/s.py"], root) == [
        "cofi/__init__.py", "cofi/deep/__init__.py", "cofi/deep/leaf.py", "cofi/registered.py", "cofi/sub.py",
        "pipeline/__init__.py", "pipeline/cli.py", "pipeline/launch.py", "pipeline/lazy.py", "pipeline/rel.py",
        "stages/__init__.py", "stages/s.py"]


def _copy(tmp_path: Path) -> Path:
    for package in stage_deps.PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def test_check_names_a_missing_import_and_an_unneeded_listing(tmp_path):
    project = _copy(tmp_path)
    report = project / "stages" / "report.py"
    report.write_text(report.read_text() + "\nimport cofi.baselines  # noqa\n")
    dvc_yaml = project / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace(
        "      - outputs/data\n      - cofi/__init__.py", "      - outputs/data\n      - cofi/__init__.py\n      - cofi/structure.py", 1))
    assert stage_deps.check(dvc_yaml) == [
        "stage teacher: deps lack [], list unimported ['cofi/structure.py']",
        "stage report: deps lack ['cofi/baselines.py', 'cofi/checkpoint.py', 'cofi/compact.py', 'cofi/distill.py', 'cofi/distributed.py', "
        "'cofi/flops.py', 'cofi/teacher_cache.py', 'cofi/trainer.py'], list unimported []"]


def test_write_replaces_only_the_code_lines(tmp_path):
    """From whole-directory deps (the old dvc.yaml) to today's file, comments and the rest kept."""
    project = _copy(tmp_path)
    dvc_yaml = project / "dvc.yaml"
    today = dvc_yaml.read_text()
    code_line = re.compile(r"^\s+- (cofi|pipeline|stages)/\S+\n", re.M)
    old = re.sub(r"(\n(\s+)- [^\n]*)\n(?=\s+params:)",
                 lambda m: f"{m.group(1)}\n{m.group(2)}- cofi\n{m.group(2)}- pipeline\n{m.group(2)}- stages\n",
                 code_line.sub("", today))
    assert "      - stages\n" in old and "- cofi/" not in old
    dvc_yaml.write_text(old)
    stage_deps.write(dvc_yaml)
    assert dvc_yaml.read_text() == today
    stage_deps.write(dvc_yaml)
    assert dvc_yaml.read_text() == today


def test_the_prune_params_are_written_once():
    text = (ROOT / "dvc.yaml").read_text()
    assert text.count("prune.sparsity_tolerance") == 1
    stages = yaml.safe_load(text)["stages"]
    sparsity = stages["prune"]["do"]["params"]
    speedup = stages["prune-speedup"]["do"]["params"]
    assert speedup == [{"params.yaml": sparsity}, "prune.deployment", "prune.speedup_tolerance"]
    assert len(sparsity) == 26
