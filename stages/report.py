"""Stage `report`: one Markdown page (and the same in MLflow) for the whole sweep.

Reads the metrics, curves and benchmark of every target; writes report/report.md,
its figures (accuracy vs speedup, structure per model, training curves) and
report/sweep.csv (the accuracy-vs-speedup points, for `dvc plots`)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from cofi.compact import load_model  # noqa: E402
from pipeline import lineage, tracking  # noqa: E402
from pipeline.params import Params  # noqa: E402
from pipeline.paths import Paths, target_name  # noqa: E402
from pipeline.runtime import mlflow_run, task_spec_of, write_curve  # noqa: E402

STAGE = "report"
REFERENCE_CONFIG = ("fp32", 32, 128)  # the configuration the sweep plot and headline use, when measured


def headline_timing(timings: list[dict]) -> dict:
    """The reference configuration if measured, else the first one."""
    for t in timings:
        if (t["precision"], t["batch_size"], t["sequence_length"]) == REFERENCE_CONFIG:
            return t
    return timings[0]


def sweep_figure(rows: list[dict], metric: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for row in rows:
        ax.scatter(row["speedup"], row[metric], color="C1" if row["model"] == "teacher" else "C0")
        ax.annotate(row["model"], (row["speedup"], row[metric]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("speedup over teacher")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title("accuracy vs speedup")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def curves_figure(curve: pd.DataFrame, title: str) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    if "expected_sparsity" in curve:
        axes[0].plot(curve["step"], curve["expected_sparsity"], label="expected sparsity")
        axes[0].plot(curve["step"], curve["target_sparsity"], label="target", linestyle="--")
        axes[1].plot(curve["step"], curve["lambda_1"], label="λ1")
        axes[1].plot(curve["step"], curve["lambda_2"], label="λ2")
    for part in ("pred", "layer", "lagrangian", "ce", "loss"):
        if part in curve:
            axes[2].plot(curve["step"], curve[part], label=part, linewidth=0.8)
    for ax, name in zip(axes, ("sparsity", "multipliers", "losses")):
        ax.set_title(f"{title}: {name}")
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run(params: Params, root: Path = Path(".")) -> str:
    paths = Paths(root)
    spec = task_spec_of(params)
    metric = spec.primary_metric
    bench = json.loads(paths.benchmark.read_text())
    out = paths.report_dir
    out.mkdir(parents=True, exist_ok=True)

    rows, lines = [], []
    for name, entry in bench["models"].items():
        t = headline_timing(entry["timings"])
        rows.append({"model": name, metric: entry[metric], "sparsity": entry["sparsity"], "speedup": t["speedup"]})
    write_curve(out / "sweep.csv", rows)

    config_names = [f"{t['precision']} b{t['batch_size']} s{t['sequence_length']}" for t in bench["models"]["teacher"]["timings"]]
    lines += [f"# CoFi report: {params.data.task}", "",
              f"Environment: {bench['environment']['cpu']}, {bench['environment']['threads']} threads, "
              f"torch {bench['environment']['torch']}, device {bench['environment']['device']}.", "",
              "| model | target | sparsity | parameters | " + metric + " | " + " | ".join(f"speedup {c}" for c in config_names) + " |",
              "|---" * (5 + len(config_names)) + "|"]
    for name, entry in bench["models"].items():
        target = "-" if name == "teacher" else name.split("-", 1)[1]
        speedups = " | ".join(f"{t['speedup']:.2f}× ({t['median_ms']:.1f} ms)" for t in entry["timings"])
        lines.append(f"| {name} | {target} | {entry['sparsity']:.3f} | {entry['parameters']:,} | {entry[metric]:.4f} | {speedups} |")

    figures = {"accuracy_vs_speedup.png": sweep_figure(rows, metric)}
    lines += ["", "![accuracy vs speedup](accuracy_vs_speedup.png)", ""]
    for target in params.prune.targets:
        t = target_name(target)
        config = load_model(paths.compact(target)).config
        figures[f"structure-{t}.png"] = tracking.structure_figure(
            config.layer_num_heads, config.layer_intermediate_size, config.num_attention_heads, config.intermediate_size,
            title=f"structure at target {t}",
        )
        prune_metrics = json.loads(paths.metrics("prune", target).read_text())
        compact_metrics = json.loads(paths.metrics("compact", target).read_text())
        lines += [f"## Target sparsity {t}", "",
                  f"Sparsity: expected {compact_metrics['sparsity_expected']:.4f}, deterministic masks "
                  f"{compact_metrics['sparsity_masks']:.4f}, counted in the compact model {compact_metrics['sparsity_counted']:.4f}"
                  f"{'' if prune_metrics['target_reached'] else ' (target not reached within tolerance)'}.", "",
                  f"![structure](structure-{t}.png)", ""]
        curve = pd.read_csv(paths.curve("prune", target))
        figures[f"curves-{t}.png"] = curves_figure(curve, f"prune@{t}")
        lines += [f"![pruning curves](curves-{t}.png)", ""]

    for filename, fig in figures.items():
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    with mlflow_run(STAGE, params, paths.root, tags=lineage.teacher_tags(paths.teacher)):
        mlflow.log_artifacts(str(out), artifact_path="report")
        mlflow.log_text(report, "report.md")
    return report
