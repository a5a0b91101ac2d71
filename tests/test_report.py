"""The report stage renders every table and figure from a small fixed set of inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import tiny_model
from cofi.compact import compact, save_model
from pipeline import lineage
from pipeline.params import load_params
from pipeline.paths import Paths
from stages import report
from stages.benchmark import add_best, add_speedups

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [0.5, 0.8]


def timing(key_runtime: str, precision: str, ms: float) -> dict:
    return {"runtime": key_runtime, "batch_size": 32, "sequence_length": 128, "precision": precision, "device": "cpu",
            "threads": 2, "repeats": 10, "median_ms": ms, "q1_ms": ms * 0.95, "q3_ms": ms * 1.05, "iqr_ms": ms * 0.1,
            "fastest_ms": ms * 0.95, "key": f"{key_runtime}_{precision}_b32_s128", "deployment": None, "rounds": 5,
            "prepare_s": 0.0}


def served_in(accuracy: float, int8_cost: float) -> dict:
    """A model's dev metric per precision (stages.benchmark.by_precision's form)."""
    versus = {"difference": -int8_cost, "ci95": [-int8_cost - 0.01, -int8_cost + 0.01]}
    return {"fp32": {"accuracy": accuracy, "vs_fp32": {"difference": 0.0, "ci95": [0.0, 0.0]}},
            "int8": {"accuracy": accuracy - int8_cost, "vs_fp32": versus}}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prune"]["targets"] = TARGETS
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    paths = Paths(tmp_path)

    teacher = tiny_model(seed=1)
    save_model(teacher, paths.teacher, extra=lambda d: lineage.write_manifest(
        d, kind="teacher", parent_dir=None, data_digest="d", mlflow_run_id=None))
    models = {"teacher": {"method": "teacher", "accuracy": 0.9, "sparsity": 0.0, "parameters": 10_000,
                          "prunable_parameters": 6_000, "nonzero_prunable_parameters": 6_000,
                          "flops": {"128": 4_000_000}, "by_precision": served_in(0.9, 0.005),
                          "timings": [timing("torch", "fp32", 40.0), timing("onnxruntime", "fp32", 30.0),
                                      timing("onnxruntime", "int8", 24.0)]}}
    for i, t in enumerate(TARGETS):
        heads = torch.ones(2, 4)
        heads[1, : 2 + i] = 0
        save_model(compact(teacher.eval(), {"head": heads}), paths.compact(t), extra=lambda d: lineage.write_manifest(
            d, kind="compact", parent_dir=paths.teacher, data_digest=None, mlflow_run_id=None))
        models[f"cofi-{t:g}"] = {"method": "cofi", "accuracy": 0.88 - 0.05 * i, "sparsity": t,
                                 "parameters": 8_000 - 1000 * i, "prunable_parameters": 3_000 - 1000 * i,
                                 "nonzero_prunable_parameters": 3_000 - 1000 * i, "flops": {"128": 2_000_000 - 800_000 * i},
                                 "by_precision": served_in(0.88 - 0.05 * i, 0.002),
                                 "timings": [timing("torch", "fp32", 25.0 - 10 * i), timing("onnxruntime", "fp32", 20.0 - 8 * i),
                                             timing("onnxruntime", "int8", 15.0 - 6 * i)]}
        paths.metrics("prune", t).parent.mkdir(parents=True, exist_ok=True)
        paths.metrics("prune", t).write_text(json.dumps({"target_reached": i == 0, "accuracy": 0.8}))
        paths.metrics("compact", t).write_text(json.dumps(
            {"sparsity_expected": t, "sparsity_masks": t - 0.01, "sparsity_counted": t - 0.01}))
        paths.curve("prune", t).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"step": [1, 2, 3], "loss": [1.0, 0.8, 0.7], "pred": [0.5, 0.4, 0.3], "layer": [0.5, 0.4, 0.4],
                      "lagrangian": [0.0, 0.01, 0.02], "expected_sparsity": [0.0, 0.2, t + 0.02],
                      "mask_sparsity": [0.0, 0.25, t],
                      "target_sparsity": [0.0, 0.25, t], "lambda_1": [0.0, -0.1, -0.2], "lambda_2": [0.0, 0.1, 0.3]}
                     ).to_csv(paths.curve("prune", t), index=False)
    # a layer-subset baseline as fast as cofi-0.5 (24 vs 25 ms: within 10%) but less accurate
    models["baseline-layer_subset"] = {"method": "baseline-layer_subset", "accuracy": 0.86, "sparsity": 0.5,
                                       "parameters": 7_000, "prunable_parameters": 3_000,
                                       "nonzero_prunable_parameters": 3_000, "flops": {"128": 2_000_000},
                                       "by_precision": served_in(0.86, 0.0),
                                       "timings": [timing("torch", "fp32", 24.0), timing("onnxruntime", "fp32", 19.0),
                                                   timing("onnxruntime", "int8", 15.5)]}
    teacher_ms = {t["key"]: t["median_ms"] for t in models["teacher"]["timings"]}
    for entry in models.values():  # the benchmark measures these in rounds; here: the ratio of the medians
        for t in entry["timings"]:
            t["speedup"] = teacher_ms[t["key"]] / t["median_ms"]
    add_speedups(models)
    add_best(models, "accuracy")
    models["cofi-0.5"]["vs_teacher"] = {"difference": -0.02, "ci95": [-0.0325, -0.005]}
    paths.benchmark.write_text(json.dumps(sort_keys=True, obj={"environment": {"device": "cpu", "cpu": "test CPU", "gpu": None, "cores": 2,
                                                           "threads": 2, "torch": "x", "transformers": "y",
                                                           "onnxruntime": "z"}, "models": models}))
    return tmp_path


def test_report_renders_every_table_and_figure(project):
    text = report.run(load_params(project / "params.yaml"), project)
    out = project / "report"
    assert (out / "report.md").read_text() == text
    best, every = text.split("## Every configuration")
    # first, best against best: the teacher at its fastest (ONNX Runtime int8, 24 ms) against each model's fastest
    table = [line for line in best.splitlines() if line.startswith("| ")]
    assert table[0] == ("| model | sparsity | accuracy (fp32) | vs teacher, points [95% CI] | "
                        "batch 32 × 128: fastest · ms · speedup · accuracy | wins |")
    row = next(line for line in table if line.startswith("| cofi-0.5 "))
    assert row == "| cofi-0.5 | 0.500 | 0.8800 | -2.00 [-3.25, -0.50] | onnxruntime int8 · 14.2 · **1.60×** · 0.8780 | best at ~1.5× |"
    assert next(line for line in table if line.startswith("| teacher ")).startswith(
        "| teacher | 0.000 | 0.9000 |  | onnxruntime int8 · 22.8 · **1.00×** · 0.8950 |")
    assert [line.split(" | ")[0] for line in table[1:]] == ["| teacher", "| baseline-layer_subset", "| cofi-0.5", "| cofi-0.8"]
    assert next(line for line in table if line.startswith("| baseline-")).endswith("|  |")  # as fast (1.55×), less accurate
    # then every configuration, the same runtime for the model and the teacher
    table = [line for line in every.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | method | sparsity | parameters | prunable (nonzero) | accuracy | "
                               "vs teacher, points [95% CI] | GFLOPs/example")
    assert "torch_fp32_b32_s128: ms · speedup · eff." in table[0] and "onnxruntime_int8_b32_s128" in table[0]
    # teacher 40 ms, cofi-0.5 25 ms → 1.60×; FLOP ratio 4.0/2.0 → efficiency 0.80
    row = next(line for line in table if line.startswith("| cofi-0.5 "))
    assert "| 25.0 · 1.60× · 0.80 |" in row and "| 0.8800 | -2.00 [-3.25, -0.50] | " in row
    assert "| 0.9000 |  | " in next(line for line in table if line.startswith("| teacher "))
    # and the metric in each served precision, with what int8 costs against the model's own fp32
    assert "| cofi-0.8 | 0.8300 | 0.8280 · -0.20 [-1.20, +0.80] |" in every
    assert "target not reached" in text  # target 0.8 is marked
    for name in ["accuracy_vs_speedup.png", "structure-0.5.png", "structure-0.8.png", "curves-0.5.png", "curves-0.8.png"]:
        assert (out / name).stat().st_size > 1000, name
        assert f"({name})" in text
    sweep = pd.read_csv(out / "sweep.csv")
    assert list(sweep["model"]) == ["teacher", "baseline-layer_subset", "cofi-0.5", "cofi-0.8"]  # teacher first
    assert sweep["speedup"].tolist() == pytest.approx([1.0, 24 / 15.5, 24 / 15, 24 / 9])  # best against best
    assert sweep["accuracy"].tolist() == pytest.approx([0.895, 0.86, 0.878, 0.828])  # in int8, where each is fastest
    assert not (out / "curves" / "speedup").exists()  # only speedup targets have that curve
    for name, columns in report.CURVES.items():
        if name == "speedup":
            continue
        curve = pd.read_csv(out / "curves" / name / "0.8.csv")
        assert list(curve.columns) == ["step", *columns]


def test_the_summary_is_the_results_table_under_its_provenance_line(project):
    """report/summary.md, the block the README's results table is copied from: the date, the
    code version (pipeline.codestate), the benchmark's processor and torch, then one row per
    model with its sparsity, metric, difference from the teacher and its speedup best against best."""
    from datetime import datetime, timezone

    from pipeline.codestate import code_state

    report.run(load_params(project / "params.yaml"), project)
    lines = (project / "report" / "summary.md").read_text().splitlines()
    today = datetime.now(timezone.utc).date().isoformat()
    assert lines[0] == f"Provenance: {today} · commit {report.code_version(code_state())} · test CPU · torch x"
    assert lines[1:] == [
        "",
        "| model | sparsity | accuracy % (fp32) | vs teacher, points [95% CI] "
        "| batch 32 × 128: speedup, fastest runtime, accuracy % |",
        "|---|---|---|---|---|",
        # best against best: the teacher's fastest (int8, 24 ms) over each model's fastest, accuracy in int8
        "| teacher | 0.000 | 90.00 | — | **1.00×**, onnxruntime int8, 89.50 |",
        "| baseline-layer_subset | 0.500 | 86.00 | — | **1.55×**, onnxruntime int8, 86.00 |",  # 24 / 15.5
        "| cofi-0.5 | 0.500 | 88.00 | -2.00 [-3.25, -0.50] | **1.60×**, onnxruntime int8, 87.80 |",
        "| cofi-0.8 | 0.800 | 83.00 | — | **2.67×**, onnxruntime int8, 82.80 |",
    ]


def test_the_code_version_is_the_short_commit_marked_dirty():
    commit = "784ec70" + "0" * 33
    assert report.code_version({"git_commit": commit, "dirty": False}) == "784ec70"
    assert report.code_version({"git_commit": commit, "dirty": True}) == "784ec70+dirty"
    assert report.code_version({"git_commit": None, "dirty": None}) == "unknown"
    env = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "gpu": None, "torch": "2.13.0"}
    assert report.provenance_line(env, {"git_commit": commit, "dirty": False}, "2026-11-24") == (
        "Provenance: 2026-11-24 · commit 784ec70 · AMD EPYC (AVX512) · torch 2.13.0")


def test_a_speed_model_is_compared_with_the_sparsity_targets_at_its_speed():
    """The speed target's line reads the sparsity targets' models (and the teacher, at 1×)
    linearly between the two nearest in speed on its deployment, never beyond them."""
    from pipeline.paths import Speedup

    def model(accuracy: float, on_deployment: float) -> dict:  # another configuration's speedup must not count
        return {"accuracy": accuracy, "timings": [{"deployment": None, "speedup": 99.0},
                                                  {"deployment": "d", "speedup": on_deployment}]}

    models = {"teacher": model(0.90, 1.0), "cofi-0.6": model(0.88, 2.0), "cofi-0.8": model(0.84, 4.0)}
    names = ["teacher", "cofi-0.6", "cofi-0.8"]
    assert report.sparsity_curve_at(models, names, "accuracy", "d", 3.0) == pytest.approx(0.86, abs=1e-12)
    assert report.sparsity_curve_at(models, names, "accuracy", "d", 1.5) == pytest.approx(0.89, abs=1e-12)
    assert report.sparsity_curve_at(models, names, "accuracy", "d", 4.0) == 0.84
    assert report.sparsity_curve_at(models, names, "accuracy", "d", 4.01) is None  # beyond the fastest: no extrapolation
    assert report.sparsity_curve_at(models, ["teacher"], "accuracy", "d", 1.0) is None  # no sparsity target to compare

    models["cofi-3x"] = {**model(0.87, 3.0), "speedup_target": {"measured_speedup": 3.0}}
    prune = {"predicted_speedup": 3.04, "deployment": "d"}
    line = report.speedup_line(Speedup(3), prune, models, names[1:], "accuracy")
    assert line.startswith("Speedup over the teacher: requested 3×, predicted 3.04× (the latency model, for the "
                           "shipped structure), measured 3.00× (the benchmark, on d).")
    assert line.endswith("reach accuracy 0.8600; this model 0.8700, +1.00 points.")
    models["cofi-3x"]["speedup_target"]["measured_speedup"] = 5.0
    assert line.split(" At that speed")[0] == report.speedup_line(Speedup(3), prune, models, names[1:], "accuracy").replace(
        "5.00×", "3.00×")
    assert "At that speed" not in report.speedup_line(Speedup(3), prune, models, names[1:], "accuracy")
