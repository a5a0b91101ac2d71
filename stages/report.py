"""Stage `report`: one Markdown page (and the same in MLflow) for the whole sweep.

Reads the metrics, curves and benchmark of every target; writes report/report.md,
its figures (accuracy vs speedup, structure per model, training curves),
report/sweep.csv (the accuracy-vs-speedup points, for `dvc plots`) and
report/summary.md: the headline results table under one provenance line (date, code
version, processor, torch), the block the README's results table is copied from."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cofi.benchmark import processor  # noqa: E402
from cofi.configuration_cofi import CofiConfig  # noqa: E402
from cofi.latency import LatencyModel, Structure  # noqa: E402
from cofi.structure import structure_table  # noqa: E402
from pipeline import lineage, tracking  # noqa: E402
from pipeline.codestate import code_state  # noqa: E402
from pipeline.params import Params  # noqa: E402
from pipeline.paths import Paths, Speedup, target_name  # noqa: E402
from pipeline.plotting import structure_figure  # noqa: E402
from pipeline.runtime import mlflow_run, task_spec_of, write_curve  # noqa: E402

STAGE = "report"
HEADLINE = "torch_fp32_b32_s128"  # the configuration of the same-runtime sweep, when measured (see headline_key)
CURVES = {  # report/curves/<name>/<target>.csv, drawn by the top-level plots of dvc.yaml
    "sparsity": ["mask_sparsity", "expected_sparsity", "target_sparsity"],
    "speedup": ["predicted_speedup", "expected_speedup", "target_speedup"],  # speedup targets
    "multipliers": ["lambda_1", "lambda_2"],
    "losses": ["loss", "pred", "layer", "lagrangian"],
}


def headline_key(params: Params, models: dict) -> str:
    """The configuration models are compared in: the speedup targets' deployment (they were
    pruned for it; the benchmark times every deployment), else HEADLINE if timed, else the first."""
    timed = [t["key"] for t in models["teacher"]["timings"]]
    deployment = params.prune.speedups and params.prune.deployment
    return next((k for k in (deployment, HEADLINE) if k in timed), timed[0])


def headline_timing(timings: list[dict], key: str) -> dict:
    return next(t for t in timings if t["key"] == key)


def best_at(entry: dict, shape: tuple) -> dict:
    """A model's best-against-best entry (stages.benchmark.add_best) at (device, batch, sequence)."""
    return next(b for b in entry["best"] if (b["device"], b["batch_size"], b["sequence_length"]) == shape)


def headline_shape(params: Params, models: dict) -> tuple:
    """The (device, batch, sequence) of the headline comparison, best against best: the
    speedup targets' deployment's, else that of HEADLINE if timed, else the largest batch."""
    teacher = models["teacher"]
    key = headline_key(params, models)
    t = headline_timing(teacher["timings"], key)
    shapes = [(b["device"], b["batch_size"], b["sequence_length"]) for b in teacher["best"]]
    shape = (t["device"], t["batch_size"], t["sequence_length"])
    return shape if shape in shapes else max(shapes, key=lambda s: s[1])


def shape_name(shape: tuple) -> str:
    device, batch, length = shape
    return f"batch {batch} × {length}" + ("" if device == "cpu" else f" on {device}")


SAME_SPEED = 1.10  # models whose headline speedups are within 10% compete at "the same speed"
STYLES = {  # method → matplotlib marker style for the sweep figure
    "teacher": dict(color="C1", marker="*", s=120),
    "cofi": dict(color="C0", marker="o"),
    "cofi-speedup": dict(color="C5", marker="D"),
    "baseline-layer_subset": dict(color="C2", marker="s"),
    "baseline-magnitude": dict(color="C3", marker="X"),
}
ABLATION_STYLE = dict(color="C4", marker="^")
LABELS = {"cofi": "CoFi, sparsity target", "cofi-speedup": "CoFi, speedup target"}


def winners(models: dict, metric: str, shape: tuple) -> dict[str, str]:
    """{model: "best at ~k×"} for the most accurate model of each group of similar speed
    (best-against-best speedups at ``shape`` within SAME_SPEED of the group's slowest),
    where the group holds more than one method. The teacher is not a contender."""
    speed = {n: best_at(e, shape)["speedup"] for n, e in models.items() if n != "teacher"}
    groups: list[list[str]] = []
    for name in sorted(speed, key=speed.get):
        if groups and speed[name] <= SAME_SPEED * speed[groups[-1][0]]:
            groups[-1].append(name)
        else:
            groups.append([name])
    marks = {}
    for group in groups:
        if len({models[n]["method"] for n in group}) > 1:
            best = max(group, key=lambda n: models[n][metric])
            marks[best] = f"best at ~{speed[group[0]]:.1f}×"
    return marks


def best_marks(models: dict, metric: str, shape: tuple) -> dict[str, tuple[str, float]]:
    """The winners as weights_sha256 -> (label, speedup), for MLflow's tags and registry aliases."""
    marks = {}
    for name, label in winners(models, metric, shape).items():
        weights = models[name].get("weights_sha256")
        if weights:
            marks[weights] = (label, float(re.search(r"~([0-9.]+)×", label).group(1)))
    return marks


def best_table(models: dict, metric: str, shape: tuple) -> list[str]:
    """Markdown rows, best against best: per model and batch, its fastest runtime and
    precision, that timing, its speedup over the teacher's fastest at the same batch, and
    the model's dev metric in that precision; then the fp32 metric against the teacher's."""
    shapes = [(b["device"], b["batch_size"], b["sequence_length"]) for b in models["teacher"]["best"]]
    header = ["model", "sparsity", f"{metric} (fp32)", "vs teacher, points [95% CI]"]
    header += [f"{shape_name(s)}: fastest · ms · speedup · {metric}" for s in shapes]
    header.append("wins")
    marks = winners(models, metric, shape)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in models.items():
        cells = [name, f"{entry['sparsity']:.3f}", f"{entry[metric]:.4f}", versus_teacher_cell(entry.get("vs_teacher"))]
        for s in shapes:
            b = best_at(entry, s)
            cells.append(f"{b['runtime']} {b['precision']} · {b['fastest_ms']:.1f} · **{b['speedup']:.2f}×** · "
                         f"{b[metric]:.4f}")
        cells.append(marks.get(name, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def results_table(models: dict, metric: str) -> list[str]:
    """Markdown rows: one per model; speedup and efficiency per timed configuration (the same
    runtime and precision for the model and the teacher)."""
    keys = [t["key"] for t in models["teacher"]["timings"]]
    header = ["model", "method", "sparsity", "parameters", "prunable (nonzero)", metric,
              "vs teacher, points [95% CI]", "GFLOPs/example"]
    header += [f"{k}: ms · speedup · eff." for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in models.items():
        by_key = {t["key"]: t for t in entry["timings"]}
        flops = "/".join(f"{n / 1e9:.2f}" for n in entry["flops"].values())
        cells = [name, entry["method"], f"{entry['sparsity']:.3f}", f"{entry['parameters']:,}",
                 f"{entry['prunable_parameters']:,} ({entry['nonzero_prunable_parameters']:,})",
                 f"{entry[metric]:.4f}", versus_teacher_cell(entry.get("vs_teacher")), flops]
        cells += [f"{by_key[k]['median_ms']:.1f} · {by_key[k]['speedup']:.2f}× · {by_key[k]['efficiency']:.2f}"
                  for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def versus_teacher_cell(versus: dict | None) -> str:
    """The metric's difference from the teacher in points (×100) with its paired-bootstrap
    interval: "-0.69 [-2.18, +0.80]". An interval that holds 0 means the dev set cannot
    tell the model from the teacher."""
    if versus is None:
        return ""
    low, high = versus["ci95"]
    return f"{100 * versus['difference']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def code_version(code: dict) -> str:
    """The short commit of the code that ran, "+dirty" where the code differs from it
    (pipeline.codestate), "unknown" outside git."""
    if not code.get("git_commit"):
        return "unknown"
    return code["git_commit"][:7] + ("+dirty" if code.get("dirty") else "")


def provenance_line(env: dict, code: dict, date: str) -> str:
    """What the README's results table carries above it: "Provenance: <date> · commit <hash> ·
    <processor> · torch <version>" (the processor and torch of the benchmark's environment)."""
    return f"Provenance: {date} · commit {code_version(code)} · {processor(env)} · torch {env['torch']}"


def summary_table(models: dict, metric: str) -> list[str]:
    """Markdown rows: per model its sparsity, the metric (×100, fp32) with its difference from
    the teacher and the 95% interval, then per batch shape the speedup best against best
    (stages.benchmark.add_best), the runtime and precision it is reached in, and the metric
    in that precision."""
    score = "accuracy %" if metric == "accuracy" else f"{metric} ×100"
    shapes = [(b["device"], b["batch_size"], b["sequence_length"]) for b in models["teacher"]["best"]]
    header = ["model", "sparsity", f"{score} (fp32)", "vs teacher, points [95% CI]",
              *(f"{shape_name(s)}: speedup, fastest runtime, {score}" for s in shapes)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in models.items():
        cells = [name, f"{entry['sparsity']:.3f}", f"{100 * entry[metric]:.2f}",
                 versus_teacher_cell(entry.get("vs_teacher")) or "—"]
        for s in shapes:
            b = best_at(entry, s)
            cells.append(f"**{b['speedup']:.2f}×**, {b['runtime']} {b['precision']}, {100 * b[metric]:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary(models: dict, metric: str, env: dict, code: dict, date: str) -> str:
    """report/summary.md: the provenance line, then the results table."""
    return "\n".join([provenance_line(env, code, date), "", *summary_table(models, metric)]) + "\n"


def precision_lines(models: dict, metric: str) -> list[str]:
    """The dev metric of each model in each precision it was served in, and what that
    precision costs against the model's own fp32 (with the 95% paired-bootstrap interval)."""
    precisions = [p for p in ("bf16", "int8") if p in models["teacher"]["by_precision"]]
    if not precisions:
        return []
    header = ["model", f"{metric} fp32"] + [f"{metric} {p} · vs its fp32, points [95% CI]" for p in precisions]
    lines = ["Dev metric in each served precision:", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in models.items():
        by = entry["by_precision"]
        lines.append("| " + " | ".join([name, f"{entry[metric]:.4f}"] + [
            f"{by[p][metric]:.4f} · {versus_teacher_cell(by[p]['vs_fp32'])}" for p in precisions]) + " |")
    return lines + [""]


def sweep_figure(rows: list[dict], metric: str, key: str) -> plt.Figure:
    """Accuracy against speedup in one configuration, the same runtime for every model."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    draw_sweep(ax, rows, metric)
    ax.set_xlabel(f"speedup over the teacher ({key})")
    ax.set_title(f"accuracy vs speedup on {key}")
    fig.tight_layout()
    return fig


def draw_sweep(ax, rows: list[dict], metric: str) -> None:
    labelled = set()
    for row in rows:
        method = row["method"]
        style = STYLES.get(method, ABLATION_STYLE)
        label = "ablation" if method.startswith("ablation") else LABELS.get(method, method)
        ax.scatter(row["speedup"], row[metric], label=None if label in labelled else label, **style)
        labelled.add(label)
        ax.annotate(row["model"], (row["speedup"], row[metric]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for method in ("cofi", "cofi-speedup"):  # each kind of target's sweep as a line
        sweep = sorted((r for r in rows if r["method"] == method), key=lambda r: r["speedup"])
        ax.plot([r["speedup"] for r in sweep], [r[metric] for r in sweep], color=STYLES[method]["color"], linewidth=0.8)
    ax.set_ylabel(f"dev {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def best_figure(models: dict, metric: str) -> plt.Figure:
    """Accuracy against best-against-best speedup, a panel per batch: each model at its fastest
    configuration and the metric of that precision; the teacher in every precision it was
    timed in (int8 included: the baseline a user would otherwise deploy), at its fastest
    timing in that precision over its fastest overall."""
    shapes = [(b["device"], b["batch_size"], b["sequence_length"]) for b in models["teacher"]["best"]]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    teacher = models["teacher"]
    for ax, shape in zip(axes[0], shapes):
        reference = best_at(teacher, shape)["fastest_ms"]
        rows = [{"model": n, "method": e["method"], "speedup": best_at(e, shape)["speedup"],
                 metric: best_at(e, shape)[metric]} for n, e in models.items() if n != "teacher"]
        for precision, values in teacher["by_precision"].items():
            timed = [t["fastest_ms"] for t in teacher["timings"] if t["precision"] == precision
                     and (t["device"], t["batch_size"], t["sequence_length"]) == shape]
            if timed:
                rows.append({"model": f"teacher {precision}", "method": "teacher", "speedup": reference / min(timed),
                             metric: values[metric]})
        draw_sweep(ax, rows, metric)
        ax.set_xlabel(f"speedup over the teacher's fastest, {shape_name(shape)}")
        ax.set_title("accuracy vs speedup, each model at its fastest")
    fig.tight_layout()
    return fig


def curves_figure(curve: pd.DataFrame, title: str) -> plt.Figure:
    """The controlled number (sparsity, or predicted speedup for a speedup target) against
    its target, the multipliers, and the loss parts."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    controlled = "speedup" if "predicted_speedup" in curve else "sparsity"
    if "expected_sparsity" in curve:
        if controlled == "speedup":
            axes[0].plot(curve["step"], curve["predicted_speedup"], label="predicted (controlled, shipped)")
            axes[0].plot(curve["step"], curve["expected_speedup"], label="expected (smooth)", linewidth=0.8)
            axes[0].plot(curve["step"], curve["target_speedup"], label="target", linestyle="--")
        else:
            axes[0].plot(curve["step"], curve["mask_sparsity"], label="masks (controlled, shipped)")
            axes[0].plot(curve["step"], curve["expected_sparsity"], label="expected ŝ (smooth)", linewidth=0.8)
            axes[0].plot(curve["step"], curve["target_sparsity"], label="target", linestyle="--")
        axes[1].plot(curve["step"], curve["lambda_1"], label="λ1")
        axes[1].plot(curve["step"], curve["lambda_2"], label="λ2")
    for part in ("pred", "layer", "lagrangian", "ce", "loss"):
        if part in curve:
            axes[2].plot(curve["step"], curve[part], label=part, linewidth=0.8)
    for ax, name in zip(axes, (controlled, "multipliers", "losses")):
        ax.set_title(f"{title}: {name}")
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def speedup_on(entry: dict, deployment: str) -> float:
    """A model's speedup as the benchmark measured it on ``deployment``'s own configuration."""
    return next(t["speedup"] for t in entry["timings"] if t["deployment"] == deployment)


def sparsity_curve_at(models: dict, names: list[str], metric: str, deployment: str, speedup: float) -> float | None:
    """The metric of the models ``names`` (the teacher and the sparsity targets' models) at
    ``speedup`` on ``deployment``: linear between the two nearest in measured speedup there;
    None outside their range (no extrapolation)."""
    points = sorted((speedup_on(models[n], deployment), models[n][metric]) for n in names)
    if len(points) < 2 or not points[0][0] <= speedup <= points[-1][0]:
        return None
    return float(np.interp(speedup, [x for x, _ in points], [y for _, y in points]))


def speedup_line(target: Speedup, prune_metrics: dict, models: dict, sparsity_models: list[str], metric: str) -> str:
    """Requested, predicted (latency model) and measured (benchmark) speedup of a speedup
    target's model, and its metric against the sparsity targets' models at the same speed."""
    entry = models[f"cofi-{target_name(target)}"]
    measured, deployment = entry["speedup_target"]["measured_speedup"], prune_metrics["deployment"]
    line = (f"Speedup over the teacher: requested {target.factor:g}×, predicted {prune_metrics['predicted_speedup']:.2f}× "
            f"(the latency model, for the shipped structure), measured {measured:.2f}× (the benchmark, on {deployment}).")
    curve = sparsity_curve_at(models, ["teacher", *sparsity_models], metric, deployment, measured)
    if curve is not None:
        line += (f" At that speed the sparsity targets' models (linear between the two nearest in speed on {deployment},"
                 f" the teacher at 1×) reach {metric} {curve:.4f}; this model {entry[metric]:.4f}, "
                 f"{100 * (entry[metric] - curve):+.2f} points.")
    return line


def latency_section(params: Params, paths: Paths, models: dict, env: dict,
                    structures: dict[str, Structure]) -> list[str]:
    """Each deployment's latency model: its fit, and each CoFi model's predicted speedup
    beside the benchmark's measurement on that deployment."""
    if not params.deployments:
        return []
    lines = ["## Latency models", "",
             "Measured by `profile@<name>` on each deployment target (cofi/profiling.py); the fit compares predicted "
             "and measured speedups of random compact structures.", ""]
    for deployment in params.deployments:
        model = LatencyModel.from_dict(json.loads(paths.latency_model(deployment).read_text()))
        fit, key = model.fit, model.deployment.key
        lines += [f"### {deployment}: {key} on {model.deployment.device}", "",
                  f"Fit on {fit['structures']} random structures: worst |error| {fit['worst_relative_error']:.1%}, "
                  f"mean {fit['mean_relative_error']:.1%}. Unpruned model: {model.reference_ms:.2f} ms.", ""]
        if processor(model.hardware) != processor(env):
            warning = f"profiled on {processor(model.hardware)}, benchmarked on {processor(env)}: predictions are for the former"
            print(f"warning: latency model {deployment} {warning}", flush=True)
            lines += [f"**Warning:** {warning}.", ""]
        lines += ["| model | requested speedup | predicted speedup | measured speedup |", "|---|---|---|---|"]
        for t in params.prune.all_targets:
            name = f"cofi-{target_name(t)}"
            requested = f"{t.factor:g}×" if isinstance(t, Speedup) and params.prune.deployment == deployment else "—"
            predicted = model.speedup(structures[name])
            measured = speedup_on(models[name], deployment)
            lines.append(f"| {name} | {requested} | {predicted:.2f}× | {measured:.2f}× |")
        lines.append("")
    return lines


def run(params: Params, root: Path = Path(".")) -> str:
    paths = Paths(root)
    spec = task_spec_of(params)
    metric = spec.primary_metric
    bench = json.loads(paths.benchmark.read_text())
    out = paths.report_dir
    out.mkdir(parents=True, exist_ok=True)

    # the teacher first, then the file's order (JSON files here are written with sorted keys)
    models = {"teacher": bench["models"]["teacher"], **{k: v for k, v in bench["models"].items() if k != "teacher"}}
    key, shape = headline_key(params, models), headline_shape(params, models)
    rows = [{"model": name, "method": entry["method"], metric: best_at(entry, shape)[metric], "sparsity": entry["sparsity"],
             "speedup": best_at(entry, shape)["speedup"]} for name, entry in models.items()]
    write_curve(out / "sweep.csv", rows)  # best against best at the headline batch: what `dvc plots show` draws

    env = bench["environment"]
    lines = [f"# CoFi report: {params.data.task}", "",
             f"Measured on {env['device']} ({processor(env)}), "
             f"{env['threads']} threads of {env['cores']} cores; torch {env['torch']}, transformers "
             f"{env['transformers']}, onnxruntime {env['onnxruntime']}."
             + (f" Not timed: {', '.join(env['precisions_not_timed'])}, which this {env['device'].upper()} only emulates."
                if env.get("precisions_not_timed") else ""), "",
             "## Each model at its fastest", "",
             "Per batch, each model in the runtime and precision it runs fastest in (torch eager, torch.compile, "
             "ONNX Runtime; fp32, bf16 where native, int8), against the teacher in its own fastest: the speedup a user "
             "serving each model at its best gets. The metric is the model's dev metric in that precision, measured; "
             "\"vs teacher\" is the fp32 metric's difference from the teacher's fp32 in points, with its 95% "
             "paired-bootstrap interval over the dev set's examples (an interval that holds 0: this dev set cannot "
             "tell the model from the teacher).", "",
             *best_table(models, metric, shape), "",
             "![accuracy vs speedup](accuracy_vs_speedup.png)", "",
             "## Every configuration", "",
             f"Each configuration (runtime, precision, batch, sequence) times the teacher and then every model in "
             f"{params.benchmark.rounds} interleaved rounds of {params.benchmark.repeats} forward passes (after "
             f"{params.benchmark.warmup} warm-up passes): latency is the median over rounds, speedup the teacher's "
             "fastest timing ÷ the model's in the same configuration; columns named after a deployment are timed in "
             "its own configuration; efficiency is speedup ÷ FLOP-ratio speedup (1.0: the model is as fast as its "
             "FLOPs allow).", "",
             *results_table(models, metric), "",
             *precision_lines(models, metric)]

    figures = {"accuracy_vs_speedup.png": best_figure(models, metric)}
    if params.prune.speedups:  # the speed models on the deployment they were pruned for, beside the sparsity models
        same = [{"model": n, "method": e["method"], metric: e[metric], "speedup": headline_timing(e["timings"], key)["speedup"]}
                for n, e in models.items()]
        figures[f"accuracy_vs_speedup_{key}.png"] = sweep_figure(same, metric, key)
        lines += [f"![accuracy vs speedup on {key}](accuracy_vs_speedup_{key}.png)", ""]
    structures: dict[str, Structure] = {}  # per CoFi model, for the latency section
    sparsity_models = [f"cofi-{target_name(t)}" for t in params.prune.targets]  # what speed models are compared with
    for target in params.prune.all_targets:
        t = target_name(target)
        config = CofiConfig.from_pretrained(paths.compact(target))  # the structure; no weights needed
        structures[f"cofi-{t}"] = Structure.of(config)
        full = (config.num_attention_heads, config.intermediate_size)
        table = structure_table(config.layer_num_heads, config.layer_intermediate_size, *full)
        figures[f"structure-{t}.png"] = structure_figure(table, *full, title=f"structure at target {t}")
        prune_metrics = json.loads(paths.metrics("prune", target).read_text())
        compact_metrics = json.loads(paths.metrics("compact", target).read_text())
        missed = "" if prune_metrics["target_reached"] else " (target not reached within tolerance)"
        sparsity = (f"counted in the compact model {compact_metrics['sparsity_counted']:.4f}, of the deterministic "
                    f"masks {compact_metrics['sparsity_masks']:.4f}, smooth expected ŝ "
                    f"{compact_metrics['sparsity_expected']:.4f}")
        if isinstance(target, Speedup):
            target_line = speedup_line(target, prune_metrics, models, sparsity_models, metric) + missed
            lines += [f"## Target speedup {t} on {prune_metrics['deployment']}", "", target_line, "",
                      f"Sparsity: {sparsity}.", ""]
        else:
            lines += [f"## Target sparsity {t}", "",
                      f"Sparsity: {sparsity.replace('masks', 'masks (the value the Lagrangian controls)', 1)} "
                      f"(ŝ lends its gradient only){missed}.", ""]
        lines += [f"![structure](structure-{t}.png)", ""]
        curve = pd.read_csv(paths.curve("prune", target))
        figures[f"curves-{t}.png"] = curves_figure(curve, f"prune@{t}")
        for name, columns in CURVES.items():
            if not set(columns) <= set(curve):  # dvc plots draws every column: a sparsity target has no speedup curve
                continue
            (out / "curves" / name).mkdir(parents=True, exist_ok=True)
            curve[["step", *columns]].to_csv(out / "curves" / name / f"{t}.csv", index=False)
        lines += [f"![pruning curves](curves-{t}.png)", ""]

    lines += latency_section(params, paths, models, env, structures)

    for filename, fig in figures.items():
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    today = datetime.now(timezone.utc).date().isoformat()
    (out / "summary.md").write_text(summary(models, metric, env, code_state(), today))
    with mlflow_run(STAGE, params, paths.root, tags=lineage.data_tags(paths.teacher)) as run:
        mlflow.log_artifacts(str(out), artifact_path="report")
        mlflow.log_text(report, "report.md")
        compared = [e["weights_sha256"] for e in models.values() if e.get("weights_sha256")]
        tracking.set_best_aliases(best_marks(models, metric, shape), compared=compared)
    if run.info.run_id:
        print(f"report: {out / 'report.md'}; compare the models in MLflow: "
              f"{tracking.ui_link(mlflow.get_tracking_uri(), run.info.experiment_id)}", flush=True)
    return report
