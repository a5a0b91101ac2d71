"""`dvc repro` end to end in a temporary copy of the project: a slice of real SST-2,
the real offline teacher, a couple of short epochs. Checks outputs, metrics,
dvc.lock, a no-op second repro, what a params change invalidates, one MLflow run
per stage with lineage tags, and `cofi lineage` (good chain, then a corrupt file)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cofi.batching import Collator
from cofi.compact import load_model
from cofi.trainer import predict, supports_bf16
from pipeline.paths import Paths
from pipeline.runtime import load_stage_data

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data" / "glue"  # the demo data shipped with the repository (params.yaml's data.source)
TARGETS = [0.3, 0.5]
SPEEDUP = 1.5  # a speedup target on deployment cpu-b1
MODELS = ("0.3", "0.5", "1.5x")  # every pruned model's name

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc is not installed"),
]

TINY = {
    "data": {"max_length": 32, "train_limit": 64},
    "compute": {"bf16": True},
    "teacher": {"epochs": 1, "batch_size": 16},
    "prune": {"targets": TARGETS, "speedups": [SPEEDUP], "deployment": "cpu-b1", "epochs": {0.3: 2, 0.5: 2.5},
              "distill_epochs": 0.25, "sparsity_warmup_epochs": 0.75, "batch_size": 16, "reg_learning_rate": 0.5,
              "evals_per_epoch": 2, "freeze_word_embeddings": True, "sparsity_ramp": "cubic"},
    # per target: 0.3 and the 1.5x model (sparsity 1/3) take the nearest entry, 0: no fine-tuning
    "finetune": {"epochs": {0.4: 0, 0.5: 1}, "batch_size": 16, "evals_per_epoch": 1},
    "benchmark": {"batch_sizes": [1], "sequence_lengths": [16], "runtimes": ["torch", "torch-compile", "onnxruntime"],
                  "precisions": ["fp32", "int8"], "warmup": 1, "repeats": 2},
    "deployments": {"cpu-b1": {"device": "cpu", "runtime": "torch", "precision": "fp32", "batch_size": 1,
                               "sequence_length": 16, "threads": 1}},
}


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=1200)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def merge(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s values; a mapping with keys ``base`` lacks (a map value
    such as prune.epochs) replaces the base's instead of merging into it."""
    def nested(k):
        return isinstance(override.get(k), dict) and isinstance(base[k], dict) and set(override[k]) <= set(base[k])
    return {k: merge(base[k], override[k]) if nested(k) else override.get(k, base[k]) for k in base}


def copy_project(project: Path, overrides: dict) -> Path:
    """A git repository at ``project`` holding the project's tracked files (tests left out),
    with params.yaml = the real one merged with ``overrides``; DVC is initialised already."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if name.startswith("tests/") or not (ROOT / name).exists():
            continue
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(merge(params, overrides), sort_keys=False))
    commit(project, "copy", init=True)
    return project


def commit(project: Path, message: str, init: bool = False) -> None:
    if init:
        run(["git", "init", "-q"], project)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    run([*git, "add", "-A"], project)
    run([*git, "commit", "-qm", message], project)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC copy of the project with tiny params, after one `dvc repro`."""
    project = copy_project(tmp_path_factory.mktemp("project"), TINY)
    repro = run(["dvc", "repro"], project)
    (project.parent / "repro.log").write_text(repro.stdout + repro.stderr)  # beside the project: not in its git tree
    return project


def test_repro_writes_every_output_and_metric(project):
    for t in MODELS:
        for kind in ("pruned", "finetuned", "compact"):
            assert (project / "outputs" / kind / t / "manifest.json").exists()
        compact = json.loads((project / "metrics" / f"compact-{t}.json").read_text())
        # the masks' sparsity is the sparsity counted in the compact model's tensors
        assert compact["sparsity_counted"] == pytest.approx(compact["sparsity_masks"], abs=1e-9)
    # prune.epochs per target: 2 and 2.5 epochs of 4 steps (64 examples, batch 16)
    last_step = {t: pd.read_csv(project / "plots" / f"prune-{t}.csv")["step"].max() for t in ("0.3", "0.5")}
    assert last_step["0.5"] - last_step["0.3"] == 2
    # finetune.epochs per target: 0.5 fine-tuned for 1 epoch; 0.3 and 1.5x (0 epochs) passed on as pruned
    assert pd.read_csv(project / "plots" / "finetune-0.5.csv")["step"].max() == 4
    for t in ("0.3", "1.5x"):
        assert pd.read_csv(project / "plots" / f"finetune-{t}.csv")["step"].tolist() == [0], t
        accuracy = {s: json.loads((project / "metrics" / f"{s}-{t}.json").read_text())["accuracy"] for s in ("prune", "finetune")}
        assert accuracy["finetune"] == accuracy["prune"], t
    bench = {p.stem: json.loads(p.read_text()) for p in (project / "metrics" / "benchmark").glob("*.json")}
    assert set(bench) == {"teacher", "cofi-0.3", "cofi-0.5", "cofi-1.5x"}
    assert bench["teacher"]["speedup_torch_fp32_b1_s16"] == pytest.approx(1.0)
    assert bench["teacher"]["efficiency_onnxruntime_fp32_b1_s16"] == pytest.approx(1.0)
    for name in ("cofi-0.3", "cofi-0.5", "cofi-1.5x"):
        assert bench[name]["onnx_max_abs_logit_difference"] <= 1e-4
        assert bench[name]["flops_s16"] < bench["teacher"]["flops_s16"]
        assert (project / "outputs" / "onnx" / f"{name}.onnx").exists()
        # beside the teacher: the exact difference, inside its paired-bootstrap interval
        difference = bench[name]["accuracy_vs_teacher"]
        assert difference == bench[name]["accuracy"] - bench["teacher"]["accuracy"]
        assert bench[name]["accuracy_vs_teacher_ci95_low"] <= difference <= bench[name]["accuracy_vs_teacher_ci95_high"]
    assert "accuracy_vs_teacher" not in bench["teacher"]
    full = json.loads((project / "outputs" / "benchmark.json").read_text())["models"]
    for name, entry in full.items():
        # int8: an ONNX Runtime graph of integer products with the label names beside it, its dev metric measured
        int8 = project / "outputs" / "onnx" / f"{name}.int8.onnx"
        assert entry["onnx"]["int8_path"] == f"outputs/onnx/{name}.int8.onnx" and int8.stat().st_size > 0
        assert (project / "outputs" / "onnx" / f"{name}.int8.labels.json").read_text() == (
            project / "outputs" / "onnx" / f"{name}.labels.json").read_text()
        assert bench[name]["accuracy_int8"] == entry["by_precision"]["int8"]["accuracy"]
        assert bench[name]["accuracy_int8_vs_fp32"] == pytest.approx(bench[name]["accuracy_int8"] - bench[name]["accuracy"])
        # compiled: checked against eager, its compile time recorded
        compiled = next(t for t in entry["timings"] if t["key"] == "torch-compile_fp32_b1_s16")
        assert compiled["max_abs_logit_difference"] <= 1e-4 and compiled["prepare_s"] > 0
        assert bench[name]["compile_s_torch-compile_fp32_b1_s16"] == compiled["prepare_s"]
        # best against best: the model's fastest configuration against the teacher's fastest
        (best,) = entry["best"]
        fastest = min(entry["timings"], key=lambda t: t["fastest_ms"])
        teacher_fastest = min(full["teacher"]["timings"], key=lambda t: t["fastest_ms"])
        assert (best["key"], best["teacher_key"]) == (fastest["key"], teacher_fastest["key"])
        assert bench[name]["best_speedup_b1_s16"] == teacher_fastest["fastest_ms"] / fastest["fastest_ms"]
        assert bench[name]["best_accuracy_b1_s16"] == entry["by_precision"][fastest["precision"]]["accuracy"]
    assert {t["key"] for t in full["teacher"]["timings"]} == {
        "torch_fp32_b1_s16", "torch-compile_fp32_b1_s16", "onnxruntime_fp32_b1_s16", "onnxruntime_int8_b1_s16", "cpu-b1"}
    report_text = (project / "report" / "report.md").read_text()
    assert report_text.index("## Each model at its fastest") < report_text.index("## Every configuration")
    assert (project / "report" / "report.md").exists()
    assert (project / "report" / "accuracy_vs_speedup.png").exists()
    # report/summary.md: the README's results table, under its provenance line, from these metrics
    summary = (project / "report" / "summary.md").read_text().splitlines()
    provenance = re.fullmatch(r"Provenance: (\d{4}-\d{2}-\d{2}) · commit ([0-9a-f]{7})(\+dirty)? · (.+) · torch (\S+)",
                              summary[0])
    assert provenance, summary[0]
    run(["git", "cat-file", "-e", f"{provenance.group(2)}^{{commit}}"], project)  # the project's code version
    environment = json.loads((project / "outputs" / "benchmark.json").read_text())["environment"]
    assert provenance.group(5) == environment["torch"] == torch.__version__
    assert environment["cpu"] in provenance.group(4)
    assert summary[2] == ("| model | sparsity | accuracy % (fp32) | vs teacher, points [95% CI] | "
                          "batch 1 × 16: speedup, fastest runtime, accuracy % |")
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in summary[4:])}
    assert set(rows) == set(bench)
    for name, cells in rows.items():
        m = bench[name]
        versus = "—" if name == "teacher" else (
            f"{100 * m['accuracy_vs_teacher']:+.2f} [{100 * m['accuracy_vs_teacher_ci95_low']:+.2f}, "
            f"{100 * m['accuracy_vs_teacher_ci95_high']:+.2f}]")
        (best,) = full[name]["best"]
        assert cells == [f"{m['sparsity']:.3f}", f"{100 * m['accuracy']:.2f}", versus,
                         f"**{m['best_speedup_b1_s16']:.2f}×**, {best['runtime']} {best['precision']}, "
                         f"{100 * m['best_accuracy_b1_s16']:.2f}"], name
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)
    assert not plots.get("errors"), plots["errors"]
    rendered = set(plots["data"])
    assert "accuracy vs speedup" in rendered
    assert {f"report/curves/{kind}/{t}.csv" for kind in ("sparsity", "multipliers", "losses") for t in ("0.3", "0.5")} <= rendered
    assert {f"report/curves/{kind}/1.5x.csv" for kind in ("speedup", "multipliers", "losses")} <= rendered
    # every output is readable by other accounts where the umask lets it (a serving container):
    # no file keeps the owner-only mode of a temporary file (safetensors', mkstemp's)
    umask = os.umask(0o022)
    os.umask(umask)
    produced = [p for d in ("outputs", "metrics", "plots", "report") for p in (project / d).rglob("*") if p.is_file()]
    assert len(produced) > 50 and any(p.suffix == ".safetensors" for p in produced)
    owner_only = [p.relative_to(project).as_posix() for p in produced if p.stat().st_mode & 0o044 != 0o044 & ~umask]
    assert owner_only == []
    # and no output names the directory the project happens to be in (meta.json's sources)
    assert all(str(project) not in p.read_text() for p in produced if p.suffix in (".json", ".csv", ".md", ".yaml"))
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    expected = {"data", "teacher", "profile@cpu-b1", "benchmark", "report"}
    expected |= {f"{s}@{t}" for s in ("prune", "finetune", "compact") for t in ("0.3", "0.5")}
    expected |= {f"{s}-speedup@1.5" for s in ("prune", "finetune", "compact")}
    assert set(lock["stages"]) == expected


def test_the_shipped_model_is_the_fine_tuned_model_and_scores_its_accuracy(project):
    """outputs/compact/<t> predicts, in fp32, exactly what outputs/finetuned/<t> predicts, and
    metrics/compact-<t>.json's accuracy is that of these predictions. Where fine-tuning's
    own evaluation ran in fp32 too (0.3 and 1.5x are passed on as pruned, evaluated in fp32;
    0.5 where this CPU has no native bf16), the same predict() on the same model: the
    fine-tuning stage's accuracy, exactly."""
    data = load_stage_data(Paths(project))
    collate = Collator(data.meta["pad_token_id"])
    for t in MODELS:
        finetuned, gold = predict(load_model(project / "outputs" / "finetuned" / t), data.validation, collate)
        shipped, _ = predict(load_model(project / "outputs" / "compact" / t), data.validation, collate)
        assert np.array_equal(shipped, finetuned), (t, int((shipped != finetuned).sum()))
        compact = json.loads((project / "metrics" / f"compact-{t}.json").read_text())
        assert compact["accuracy"] == float((finetuned == gold).mean()), t
        if t != "0.5" or not supports_bf16(torch.device("cpu")):
            finetune = json.loads((project / "metrics" / f"finetune-{t}.json").read_text())
            assert compact["accuracy"] == finetune["accuracy"], t


def test_the_target_rises_on_the_cubic_ramp_of_the_params(project):
    """prune.sparsity_ramp: cubic (here): 4 steps an epoch, pruning from step 1 (0.25 epoch),
    warm-up over 3 steps (0.75 epoch); a row's step is the 0-based step + 1."""
    curve = pd.read_csv(project / "plots" / "prune-0.3.csv").set_index("step")["target_sparsity"]
    start = curve[2]  # the masks' initial sparsity, where the ramp starts
    for row, p in ((3, 1 / 3), (4, 2 / 3), (5, 1.0), (6, 1.0)):
        assert curve[row] == pytest.approx(start + (0.3 - start) * (1 - (1 - p) ** 3), abs=1e-6), row


def test_students_keep_the_teachers_word_embeddings(project):
    """prune.freeze_word_embeddings (on here): pruning and fine-tuning left the table as the
    teacher's, bit for bit (compaction keeps the columns of the kept hidden dimensions), while
    the teacher's own training changed it from the base model's."""
    from safetensors.torch import load_file

    def table(directory: Path):
        return load_file(directory / "model.safetensors")["embeddings.word_embeddings.weight"]

    teacher = table(project / "outputs/teacher")
    for t in MODELS:
        assert torch.equal(table(project / "outputs/pruned" / t), teacher), t
        kept = load_file(project / "outputs/pruned" / t / "masks.safetensors").get("hidden")
        columns = teacher if kept is None else teacher[:, kept != 0]
        assert torch.equal(table(project / "outputs/finetuned" / t), columns), t  # 0.5: its best evaluation, step 0 or 4
    from pipeline.runtime import base_model_path
    base = load_file(Path(base_model_path("all-MiniLM-L6-v2")) / "model.safetensors")
    (key,) = [k for k in base if k.endswith("word_embeddings.weight")]
    assert not torch.equal(base[key], teacher)


def test_students_train_with_the_teachers_dropout(project):
    """teacher.dropout (params.yaml's 0.0 here) is saved in the teacher's config, which every
    pruned and fine-tuned student is built from; the base model's is 0.1."""
    from pipeline.runtime import base_model_path

    def dropouts(directory) -> tuple:
        config = json.loads((Path(directory) / "config.json").read_text())
        return config["hidden_dropout_prob"], config["attention_probs_dropout_prob"], config.get("classifier_dropout")

    assert dropouts(base_model_path("all-MiniLM-L6-v2")) == (0.1, 0.1, None)
    assert yaml.safe_load((project / "params.yaml").read_text())["teacher"]["dropout"] == 0.0
    for model in ["teacher", *(f"{stage}/{t}" for stage in ("pruned", "finetuned") for t in MODELS)]:
        assert dropouts(project / "outputs" / model) == (0.0, 0.0, 0.0), model


def test_a_speedup_target_is_pruned_against_the_latency_model(project):
    """prune-speedup@1.5 reads the deployment's latency model: the Lagrangian controls its
    predicted speedup (the curve), the metrics, the benchmark and the report show requested,
    predicted and measured speedup, and MLflow's LoggedModel carries all three."""
    from cofi.configuration_cofi import CofiConfig
    from cofi.latency import LatencyModel, Structure

    prune = json.loads((project / "metrics" / "prune-1.5x.json").read_text())
    assert prune["target_speedup"] == SPEEDUP and prune["deployment"] == "cpu-b1" and "target_sparsity" not in prune
    latency = LatencyModel.from_dict(json.loads((project / "outputs" / "latency" / "cpu-b1.json").read_text()))
    structure = Structure.of(CofiConfig.from_pretrained(project / "outputs" / "compact" / "1.5x"))
    assert prune["predicted_speedup"] == pytest.approx(latency.speedup(structure), rel=1e-6)  # of the shipped model
    if prune["target_reached"]:
        assert abs(prune["predicted_speedup"] / SPEEDUP - 1) <= 0.03
    curve = pd.read_csv(project / "plots" / "prune-1.5x.csv")
    pruning = curve.dropna(subset=["target_speedup"])
    assert pruning["target_speedup"].iloc[-1] == pytest.approx(SPEEDUP)
    assert {"predicted_speedup", "expected_speedup", "mask_sparsity"} <= set(curve)

    compact = json.loads((project / "metrics" / "compact-1.5x.json").read_text())
    assert (compact["target_speedup"], compact["predicted_speedup"]) == (SPEEDUP, prune["predicted_speedup"])
    bench = json.loads((project / "metrics" / "benchmark" / "cofi-1.5x.json").read_text())
    assert bench["target_speedup"] == SPEEDUP
    assert bench["measured_speedup"] == bench["speedup_cpu-b1"]  # timed on the deployment itself
    full = json.loads((project / "outputs" / "benchmark.json").read_text())["models"]
    (on_deployment,) = [t for t in full["cofi-1.5x"]["timings"] if t["deployment"] == "cpu-b1"]
    assert (on_deployment["key"], on_deployment["threads"], on_deployment["batch_size"]) == ("cpu-b1", 1, 1)
    assert next(t for t in full["teacher"]["timings"] if t["key"] == "cpu-b1")["speedup"] == 1.0
    report = (project / "report" / "report.md").read_text()
    assert "## Target speedup 1.5x on cpu-b1" in report
    assert (f"requested 1.5×, predicted {prune['predicted_speedup']:.2f}× (the latency model, for the shipped "
            f"structure), measured {bench['measured_speedup']:.2f}×") in report
    assert re.search(r"\| cofi-1.5x \| 1.5× \| [0-9.]+× \| [0-9.]+× \|", report), report
    # beside the sparsity targets' models at its measured speed: linear between the two nearest there
    measured, accuracy = bench["measured_speedup"], full["cofi-1.5x"]["accuracy"]
    curve = sorted((next(t["speedup"] for t in full[n]["timings"] if t["deployment"] == "cpu-b1"), full[n]["accuracy"])
                   for n in ("teacher", "cofi-0.3", "cofi-0.5"))
    slower, faster = [p for p in curve if p[0] <= measured], [p for p in curve if p[0] >= measured]
    if not slower or not faster:
        assert "At that speed" not in report
    else:
        (x0, y0), (x1, y1) = slower[-1], faster[0]
        at = y0 if x1 == x0 else y0 + (y1 - y0) * (measured - x0) / (x1 - x0)
        assert f"reach accuracy {at:.4f}; this model {accuracy:.4f}, {100 * (accuracy - at):+.2f} points." in report
    assert (project / "report" / "curves" / "speedup" / "1.5x.csv").exists()
    assert not (project / "report" / "curves" / "speedup" / "0.3.csv").exists()


def test_the_profile_stage_writes_a_checked_latency_model(project):
    from cofi.latency import LatencyModel

    model = LatencyModel.from_dict(json.loads((project / "outputs" / "latency" / "cpu-b1.json").read_text()))
    assert model.deployment.key == "torch_fp32_b1_s16" and model.hardware["cpu"]
    # timed with freed memory kept, as the benchmark times (docs/benchmarking.md#the-memory-allocator)
    benchmark = json.loads((project / "outputs" / "benchmark.json").read_text())
    assert model.hardware["allocator"] == benchmark["environment"]["allocator"] == "freed memory kept"
    assert model.hidden_grid == [16, 64, 128, 192, 288, 384] and model.head_grid[-1] == 12 and model.unit_grid[-1] == 1536
    metrics = json.loads((project / "metrics" / "profile-cpu-b1.json").read_text())
    assert metrics["structures"] == 20 == len(model.fit["rows"])
    assert metrics["fingerprint"] == model.fingerprint
    assert metrics["worst_relative_error"] == max(abs(r["relative_error"]) for r in model.fit["rows"])
    report = (project / "report" / "report.md").read_text()
    assert "### cpu-b1: torch_fp32_b1_s16 on cpu" in report
    for t in ("0.3", "0.5"):  # predicted beside measured: the benchmark times every deployment
        assert re.search(rf"\| cofi-{t} \| — \| [0-9.]+× \| [0-9.]+× \|", report), report


def test_pruning_computes_each_examples_teacher_outputs_once(project):
    """compute.teacher_cache_gb (2 GiB, the default) keeps all 64 examples' teacher outputs:
    64 forward passes of an example per run, the rest of its 8 or 10 steps of 16 read back."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cofi").experiment_id], max_results=200)
    metrics = {r.data.tags["cofi.stage"]: r.data.metrics for r in runs if r.data.tags.get("cofi.stage", "").startswith("prune@")}
    assert {t: (m["teacher_forward_examples"], m["teacher_cache_reused_examples"]) for t, m in metrics.items()} == {
        "prune@0.3": (64, 8 * 16 - 64), "prune@0.5": (64, 10 * 16 - 64), "prune@1.5x": (64, 8 * 16 - 64)}
    assert "teacher outputs kept for 64 of 64 training examples" in (project.parent / "repro.log").read_text()


def test_second_repro_does_nothing(project):
    out = run(["dvc", "repro"], project)
    assert "Running stage" not in out.stdout + out.stderr


@pytest.mark.parametrize("section, key, value, stale, fresh", [
    ("finetune", "learning_rate", 1.0e-5, {"finetune@0.3", "finetune@0.5", "finetune-speedup@1.5"},
     {"data", "teacher", "prune@0.3", "prune@0.5", "prune-speedup@1.5", "profile@cpu-b1"}),
    ("prune", "temperature", 4.0,  # pruning and fine-tuning distil at that temperature
     {f"{s}{kind}@{t}" for s in ("prune", "finetune") for kind, t in (("", "0.3"), ("", "0.5"), ("-speedup", "1.5"))},
     {"data", "teacher", "profile@cpu-b1", "compact@0.3", "benchmark"}),
    ("compute", "teacher_cache_gb", 0.0,  # every training with a teacher, not the teacher's own
     {f"{s}{kind}@{t}" for s in ("prune", "finetune") for kind, t in (("", "0.3"), ("", "0.5"), ("-speedup", "1.5"))},
     {"data", "teacher", "profile@cpu-b1", "compact@0.3", "benchmark"}),
    ("prune", "freeze_word_embeddings", False,  # every student's training, not the teacher's
     {f"{s}{kind}@{t}" for s in ("prune", "finetune") for kind, t in (("", "0.3"), ("", "0.5"), ("-speedup", "1.5"))},
     {"data", "teacher", "profile@cpu-b1", "compact@0.3", "benchmark"}),
    ("deployments", "ort-b1",  # a new deployment: profiled and timed; cpu-b1's latency model and speed model kept
     {"device": "cpu", "runtime": "onnxruntime", "precision": "fp32", "batch_size": 1, "sequence_length": 16, "threads": 1},
     {"profile@ort-b1", "benchmark"},
     {"profile@cpu-b1", "prune-speedup@1.5", "compact-speedup@1.5", "prune@0.3", "compact@0.3"}),
])
def test_a_param_invalidates_only_the_stages_that_read_it(project, section, key, value, stale, fresh):
    params_file = project / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params[section][key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    finally:
        params_file.write_text(original)
    changed = set(status)
    assert stale <= changed and not changed & fresh, changed


PRUNE_STAGES = {"prune@0.3", "prune@0.5", "prune-speedup@1.5"}


@pytest.mark.parametrize("edited, stale", [
    ("stages/report.py", {"report"}),
    ("pipeline/plotting.py", PRUNE_STAGES | {"report"}),  # the structure figure: pruning logs it, the report draws it
    ("pipeline/cli_lineage.py", set()),  # a tool of the console script, no stage's code
    ("cofi/lagrangian.py", PRUNE_STAGES),  # pruning code: no teacher, data or fine-tuning stage runs it
])
def test_a_code_edit_invalidates_only_the_stages_that_import_it(project, edited, stale):
    """dvc.yaml's code deps are each stage's import closure (pipeline/stage_deps.py)."""
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}
    path = project / edited
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        status = json.loads(run(["dvc", "status", "--json"], project).stdout)
    finally:
        path.write_text(original)
    assert set(status) == stale, status
    assert all(status[stage] == [{"changed deps": {edited: "modified"}}] for stage in stale), status


def test_one_mlflow_run_per_stage_with_lineage_tags(project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cofi")
    everything = client.search_runs([experiment.experiment_id], max_results=200)
    (parent,) = [r for r in everything if r.data.tags.get("cofi.role") == "pipeline"]  # one pipeline execution
    runs = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]  # its stages
    stages = sorted(r.data.tags["cofi.stage"] for r in runs)
    assert len(runs) == 14 and len(set(stages)) == 14, stages
    assert {r.data.tags["cofi.group"] for r in everything} == {parent.data.tags["cofi.group"]}
    (benchmark,) = [r for r in runs if r.data.tags["cofi.stage"] == "benchmark"]
    per_model = [r for r in everything if r.data.tags.get("mlflow.parentRunId") == benchmark.info.run_id]
    models = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
    assert {"teacher", "cofi-0_3", "cofi-0_5", "cofi-1_5x"} <= set(models) and len(per_model) == len(models)
    requested = {m.key: m.value for m in models["cofi-1_5x"].metrics}
    assert requested["target_speedup"] == SPEEDUP and {"predicted_speedup", "measured_speedup"} <= set(requested)
    speedups = {name: {m.key for m in model.metrics if m.key.startswith("speedup_")} for name, model in models.items()}
    assert all(speedups.values()), speedups  # per-configuration speedups linked to every model
    assert {"accuracy_vs_teacher", "accuracy_vs_teacher_ci95_low"} <= {m.key for m in models["cofi-0_5"].metrics}
    teacher_sha = json.loads((project / "outputs" / "teacher" / "manifest.json").read_text())["digest"]
    compact_runs = [r for r in runs if r.data.tags["cofi.stage"].startswith("compact")]
    assert all(r.data.tags["cofi.lineage.teacher_sha256"] == teacher_sha for r in compact_runs)
    # compute.bf16 is on: what trained is bf16 where this CPU has it natively, else fp32
    precision = "bf16" if supports_bf16(torch.device("cpu")) else "fp32"
    trained = {r.data.tags["cofi.stage"]: r.data.tags.get("cofi.training_precision") for r in runs
               if r.data.tags["cofi.stage"].split("@")[0] in ("teacher", "prune", "prune-speedup", "finetune", "finetune-speedup")}
    untrained = {"finetune@0.3", "finetune@1.5x"}  # finetune.epochs 0: nothing trained, no precision
    assert len(trained) == 7 and {trained.pop(s) for s in untrained} == {None}, trained
    assert set(trained.values()) == {precision}, trained
    # fine-tuning evaluates the pruned model first: it ships the better of it and each later evaluation
    (finetuned,) = [r for r in runs if r.data.tags["cofi.stage"] == "finetune@0.5"]
    evaluations = {m.step: m.value for m in client.get_metric_history(finetuned.info.run_id, "eval_accuracy")}
    assert sorted(evaluations) == [0, 4]
    best = json.loads((project / "metrics" / "finetune-0.5.json").read_text())
    assert best["accuracy"] == max(evaluations.values()) and evaluations[best["best_step"]] == best["accuracy"]
    # the report stage's last words: where to compare the models, in the model-training layout
    link = f"compare the models in MLflow: cofi ui, then open http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/models"
    assert link in (project.parent / "repro.log").read_text()


def test_exp_run_with_a_param_override_shows_in_exp_show_and_metrics_diff(project):
    """The user's experiment loop: commit a baseline, `dvc exp run -S`, compare."""
    commit(project, "baseline results")
    # a benchmark param: two stages rerun (which params rerun which stages: the test above)
    out = run(["dvc", "exp", "run", "-S", "benchmark.repeats=3", "--name", "r3"], project)
    rerun = {line.split("'")[1] for line in (out.stdout + out.stderr).splitlines() if line.startswith("Running stage")}
    assert rerun == {"benchmark", "report"}

    params_diff = json.loads(run(["dvc", "params", "diff", "--json"], project).stdout)
    change = params_diff["params.yaml"]["benchmark.repeats"]
    assert (change["old"], change["new"]) == (2, 3)
    metrics_diff = json.loads(run(["dvc", "metrics", "diff", "--json"], project).stdout)
    changed = {key for name, diffs in metrics_diff.items() if "benchmark" in name for key in diffs}
    assert "latency_ms_cpu-b1" in changed, metrics_diff

    show = json.loads(run(["dvc", "exp", "show", "--json"], project).stdout)
    experiments = [exp for baseline in show for entry in baseline.get("experiments") or [] for exp in entry["revs"]]
    (r3,) = [e for e in experiments if e.get("name") == "r3"]
    assert r3["data"]["params"]["params.yaml"]["data"]["benchmark"]["repeats"] == 3
    assert "metrics/prune-0.3.json" in r3["data"]["metrics"]


def test_lineage_verifies_then_detects_a_corrupt_weight_file(project):
    cofi = [sys.executable, "-m", "pipeline.cli"]
    good = run([*cofi, "lineage", "outputs/compact/0.5"], project)
    assert "teacher" in good.stdout
    weights = project / "outputs" / "compact" / "0.5" / "model.safetensors"
    original, mode = weights.read_bytes(), weights.stat().st_mode
    data = bytearray(original)
    data[-1] ^= 0xFF
    weights.chmod(0o644)
    try:
        weights.write_bytes(bytes(data))
        bad = run([*cofi, "lineage", "outputs/compact/0.5"], project, check=False)
        assert bad.returncode == 1
        assert "model.safetensors" in bad.stdout + bad.stderr
    finally:  # the module's other tests share this run's outputs
        weights.write_bytes(original)
        weights.chmod(mode)
    run([*cofi, "lineage", "outputs/compact/0.5"], project)  # the restored file checks out again


# last: it adds report runs to the pipeline execution that the tests above count
def test_a_latency_model_from_other_hardware_is_flagged(project):
    path = project / "outputs" / "latency" / "cpu-b1.json"
    original = path.read_text()
    moved = json.loads(original)
    cpu, capability = moved["hardware"]["cpu"], moved["hardware"]["cpu_capability"]
    # the same model name with other vector extensions: "AMD EPYC" is both an AVX2 Zen 3 and an AVX-512 Zen 4
    other = "AVX512" if capability != "AVX512" else "AVX2"
    moved["hardware"]["cpu_capability"] = other
    path.write_text(json.dumps(moved))
    try:
        out = run([sys.executable, "-m", "pipeline.launch", "report"], project)
        warning = f"profiled on {cpu} ({other}), benchmarked on {cpu} ({capability}): predictions are for the former"
        assert f"warning: latency model cpu-b1 {warning}" in out.stdout
        assert f"**Warning:** {warning}." in (project / "report" / "report.md").read_text()
        moved["hardware"] |= {"cpu": "Another CPU 9000", "cpu_capability": capability}
        path.write_text(json.dumps(moved))
        out = run([sys.executable, "-m", "pipeline.launch", "report"], project)
        assert f"warning: latency model cpu-b1 profiled on Another CPU 9000 ({capability}), benchmarked on {cpu} " in out.stdout
    finally:
        path.write_text(original)
        run(["dvc", "repro", "--single-item", "--force", "report"], project)  # the report of the real files again

