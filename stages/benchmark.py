"""Stage `benchmark`: time the teacher and every compact model the same way, in every
runtime and precision it can be served in, and measure each one's dev metric in each
precision, so accuracy and speed are comparable.

Per model: dev metric in fp32 (and, beside the teacher's, the difference with its 95%
paired-bootstrap interval), in bf16 and int8 where those are timed (each against the
teacher's fp32 and against the model's own fp32), sparsity, parameters (total and
prunable), FLOPs per example from its actual structure, and per configuration (runtime ×
precision × batch × sequence, then every deployment target in its own configuration) the
latency, the measured speedup over the teacher in the same configuration (interleaved
rounds, as `profile` measures), the FLOP-ratio speedup the structure allows, their
quotient (the efficiency), and what preparing it took (compilation, quantization). Then,
per batch and sequence length, each model's fastest configuration against the teacher's
fastest: the headline speedup ("best against best"). With the onnxruntime runtime each
model is exported to ONNX (outputs/onnx/<model>.onnx) and checked against PyTorch in
fp32; with int8 quantized too (outputs/onnx/<model>.int8.onnx), label names beside both.

Writes outputs/benchmark.json (everything, with the environment) and
metrics/benchmark/<model>.json (flat, for `dvc metrics`); logs both to MLflow."""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import mlflow
import numpy as np
import torch

from cofi.batching import batches
from cofi.benchmark import environment, random_inputs
from cofi.compact import load_model
from cofi.data import TaskSpec
from cofi.flops import forward_flops
from cofi.deployment import SUPPORTED, Deployment
from cofi.profiling import interleaved_rounds, stopwatch
from cofi.manifest import read_manifest
from cofi.metrics import paired_bootstrap
from cofi.onnx_export import export_onnx, labels_path, max_logit_difference, onnx_session
from cofi.quantize import quantize_onnx
from cofi.serving import Served, predict_served, serve
from cofi.sparsity import PRUNABLE_LINEARS, count_prunable_parameters
from cofi.trainer import device_name, predict, resolve_device, supports_bf16
from pipeline import lineage, tracking
from pipeline.params import Benchmark, Params
from pipeline.paths import Paths, Speedup, target_name
from pipeline.runtime import collator, load_stage_data, mlflow_run, require_device, setup, task_spec_of, write_json

STAGE = "benchmark"
ONNX_TOLERANCE = 1e-4  # max |Δlogit| between ONNX Runtime and PyTorch in fp32
COMPILE_TOLERANCE = 1e-4  # max |Δlogit| between a compiled fp32 model and the eager one
CALIBRATION_BATCHES, CALIBRATION_BATCH_SIZE = 8, 32  # training examples that calibrate static int8


class OnnxMismatchError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes."""


class CompileMismatchError(RuntimeError):
    """The compiled model does not compute what the eager model computes."""


def run(params: Params, root: Path = Path(".")) -> dict:
    setup(params)
    if params.benchmark.threads:
        torch.set_num_threads(params.benchmark.threads)
    threads = torch.get_num_threads()
    paths = Paths(root)
    data = load_stage_data(paths)
    spec = task_spec_of(params)
    collate = collator(data.meta["pad_token_id"])
    device = resolve_device(params.compute.device)
    bench = params.benchmark
    sources = model_sources(params, paths)
    configs = configurations(params, device, threads)
    results: dict = {"environment": {**environment(), "device": device.type, "threads": threads}, "models": {}}
    skipped = [p for p in bench.precisions if p not in timed_precisions(bench, device)]
    if skipped:
        print(f"warning: benchmark.precisions {', '.join(skipped)} not timed: {device_name(device)} has no native bf16",
              flush=True)
        results["environment"]["precisions_not_timed"] = skipped
    precisions = {d.precision for d, _ in configs.values()}
    exported = any(d.runtime == "onnxruntime" for d, _ in configs.values())
    calibration = calibration_batches(data.train, collate) if "int8" in precisions and bench.int8 == "static" else None

    with mlflow_run(STAGE, params, paths.root, tags=lineage.data_tags(paths.teacher)):
        models = {name: load_model(path, verify=True).to(device) for name, path in sources.items()}
        onnx_files: dict[str, Path] = {}
        int8_files: dict[str, Path] = {}
        check_inputs = collate(data.validation[:32])
        predictions: dict[str, dict[str, np.ndarray]] = {}  # model -> precision -> dev predictions
        for name, model in models.items():
            preds, labels = predict(model, data.validation, collate, bf16=False)
            predictions[name] = {"fp32": preds}
            if "bf16" in precisions:
                predictions[name]["bf16"] = predict(model, data.validation, collate, bf16=True)[0]
            nonzero = count_nonzero_prunable(model)
            entry = results["models"][name] = {
                **spec.metric_fn(preds, labels),
                "method": method_of(name),
                # against the teacher's prunable weights, zeros included: one scale for every method
                "sparsity": 1.0 - nonzero / count_prunable_parameters(models["teacher"]),
                "parameters": sum(p.numel() for p in model.parameters()),
                "prunable_parameters": count_prunable_parameters(model),
                "nonzero_prunable_parameters": nonzero,
                "flops": {str(s): forward_flops(model, s) for s in timed_lengths(params)},
                "weights_sha256": read_manifest(sources[name])["digest"],
                "timings": [],
            }
            if exported:  # exported from a fresh fp32 CPU copy: the timed model stays where it is
                cpu_model = copy.deepcopy(model).float().cpu()
                path = export_onnx(cpu_model, paths.onnx(name))
                onnx_files[name] = path
                difference = max_logit_difference(cpu_model, onnx_session(path, threads), check_inputs)
                if difference > ONNX_TOLERANCE:
                    raise OnnxMismatchError(
                        f"{name}: ONNX Runtime logits differ from PyTorch by {difference:.3g} > {ONNX_TOLERANCE} ({path})"
                    )
                entry["onnx"] = {"path": str(path.relative_to(paths.root)), "max_abs_logit_difference": difference}
                if "int8" in precisions:
                    int8_files[name] = quantized(path, paths.onnx_int8(name), bench.int8, calibration)
                    served = serve(cpu_model, "onnxruntime", "int8", onnx=int8_files[name], threads=threads,
                                   int8_method="given")
                    predictions[name]["int8"] = predict_served(served, data.validation, collate)[0]
                    entry["onnx"]["int8_path"] = str(int8_files[name].relative_to(paths.root))

        for name, entry in results["models"].items():
            entry["by_precision"] = {
                precision: by_precision(spec, preds, predictions[name]["fp32"], predictions["teacher"]["fp32"], labels)
                for precision, preds in predictions[name].items()}
            if name != "teacher":
                entry["vs_teacher"] = versus_teacher(spec, predictions[name]["fp32"], predictions["teacher"]["fp32"], labels)

        for key, (config, deployment) in configs.items():
            torch.set_num_threads(threads)  # a deployment's own count is set by its stopwatch
            print(f"timing {len(models)} models: {key}", flush=True)
            files = int8_files if config.precision == "int8" else onnx_files
            for name, timing in time_configuration(models, files, config, bench).items():
                results["models"][name]["timings"].append({**timing, "key": key, "deployment": deployment})
        torch.set_num_threads(threads)
        add_speedups(results["models"])
        add_best(results["models"], spec.primary_metric)
        add_speedup_targets(params, results["models"])

        for name, entry in results["models"].items():
            flat = flat_metrics(entry, spec.primary_metric)
            write_json(paths.benchmark_metrics(name), flat)
            log_model_results(name, entry, flat)
        mlflow.log_dict(results, "benchmark.json")
        write_json(paths.benchmark, results)
    return results


def calibration_batches(train: list, collate) -> list[dict[str, np.ndarray]]:
    """The first training examples, as batches of model inputs: what static int8 calibrates on."""
    examples = train[: CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE]
    return [{k: v.numpy() for k, v in b.items() if k != "labels"} for b in batches(examples, CALIBRATION_BATCH_SIZE, collate)]


def quantized(fp32: Path, out: Path, method: str, calibration: list | None) -> Path:
    """The int8 graph of an exported model, with its label names beside it."""
    quantize_onnx(fp32, out, method, calibration)
    labels_path(out).write_text(labels_path(fp32).read_text())
    return out


def log_model_results(name: str, entry: dict, flat: dict) -> None:
    """One model's results in MLflow: a run nested under this stage's run, its metrics
    linked to the model's LoggedModel (the compact stage's, else a new external one),
    so that the experiment's Models tab compares every model side by side."""
    with tracking.model_run(f"{STAGE}/{name}", tags={"cofi.model": name, "cofi.method": entry["method"]}) as run:
        model = tracking.find_model(entry["weights_sha256"])
        if model is None:  # teacher, baselines: no stage of theirs made one
            model = tracking.log_model(None, name, params={"method": entry["method"]},
                                       weights_sha256=entry["weights_sha256"], tags={"cofi.method": entry["method"]})
        tracking.log_model_metrics(model.model_id, flat, run_id=run.info.run_id)
        mlflow.set_logged_model_tags(model.model_id, {  # which runtime and precision the headline speedup is in
            f"cofi.best_{best_key(b)}": f"{b['runtime']} {b['precision']}" for b in entry["best"]})


def model_sources(params: Params, paths: Paths) -> dict[str, Path]:
    """Every model to benchmark, by report name: the teacher, the CoFi sweep, baselines, ablations."""
    sources = {"teacher": paths.teacher}
    sources.update({f"cofi-{target_name(t)}": paths.compact(t) for t in params.prune.all_targets})
    sources.update({f"baseline-{m}": paths.baseline(m) for m in params.baselines.methods})
    for name in params.baselines.ablations:
        sources[f"ablation-{name}"] = Paths(paths.root, f"ablation-{name}").compact(params.baselines.target)
    return sources


def method_of(name: str) -> str:
    """teacher | cofi (a sparsity target) | cofi-speedup (a speedup target: cofi-2x) | baseline-<method> | ablation-<name>."""
    if name.startswith("cofi-"):
        return "cofi-speedup" if name.endswith("x") else "cofi"
    return name


def count_nonzero_prunable(model) -> int:
    return sum(int(getattr(layer, n).weight.count_nonzero()) for layer in model.layers for n in PRUNABLE_LINEARS)


def timed_lengths(params: Params) -> list[int]:
    """The sequence lengths timed: the grid's and the deployments' (FLOPs are counted at each)."""
    return sorted(set(params.benchmark.sequence_lengths) | {d.sequence_length for d in params.deployments.values()})


def timed_precisions(bench: Benchmark, device: torch.device) -> list[str]:
    """benchmark.precisions less bf16 where the device only emulates it (a CPU without
    AVX-512-BF16 or AMX, a GPU before Ampere): there no one serves in bf16, and timing it
    costs minutes (on an AVX2 EPYC a MiniLM pass at batch 32 took 5.2 s in bf16, 0.66 s in fp32)."""
    return [p for p in bench.precisions if p != "bf16" or supports_bf16(device)]


def configurations(params: Params, device: torch.device, threads: int) -> dict[str, tuple[Deployment, str | None]]:
    """What to time, by key: the benchmark's grid (batch × sequence × runtime × precision, each
    runtime in the precisions it serves: torch runtimes on compute.device, ONNX Runtime on the
    CPU), then every deployment target with its own device, runtime and threads, keyed by its name."""
    bench = params.benchmark
    configs: dict[str, tuple[Deployment, str | None]] = {}
    for batch in bench.batch_sizes:
        for length in bench.sequence_lengths:
            for runtime in bench.runtimes:
                on = "cpu" if runtime == "onnxruntime" else device.type
                grid = [Deployment(on, runtime, p, batch, length, threads)
                        for p in timed_precisions(bench, device) if p in SUPPORTED[runtime]]
                configs.update({d.key: (d, None) for d in grid})
    for name in params.deployments:
        configs[name] = (require_device(params, name), name)
    return configs


def time_configuration(models: dict[str, torch.nn.Module], onnx_files: dict[str, Path], config: Deployment,
                       bench: Benchmark) -> dict[str, dict]:
    """Every model timed on ``config`` in ``bench.rounds`` interleaved rounds (cofi.profiling, as
    `profile` times): each round times the teacher, then each model. A model's latency is the
    median over rounds (with its spread), ``fastest_ms`` its fastest round; its speedup is the
    teacher's fastest timing ÷ its own, the estimate a slow spell of the machine's moves least
    (cofi/profiling.py), and the one the latency model predicts. ``onnx_files``: the
    graphs ONNX Runtime serves (int8 ones for an int8 configuration). A compiled fp32 model
    must give the eager model's logits (``COMPILE_TOLERANCE``)."""
    given = config.runtime == "onnxruntime" and config.precision == "int8"
    prepare = stopwatch(config, bench.repeats, bench.warmup, int8_method="given" if given else bench.int8)
    others = [n for n in models if n != "teacher"]
    timers = {n: prepare(models[n], onnx_files.get(n)) for n in ["teacher", *others]}
    checked = ({n: compiled_difference(models[n], t.served, config) for n, t in timers.items()}
               if config.runtime == "torch-compile" else {})
    timed = interleaved_rounds([timers[n] for n in others], timers["teacher"], bench.rounds)
    per_round = {"teacher": timed.reference_ms, **dict(zip(others, timed.ms))}
    speedups = {"teacher": 1.0, **{n: 1.0 / r for n, r in zip(others, timed.relative)}}
    used_threads = config.threads if config.runtime == "onnxruntime" else torch.get_num_threads()
    out = {}
    for name, ms in per_round.items():
        q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
        out[name] = {"runtime": config.runtime, "precision": config.precision, "batch_size": config.batch_size,
                     "sequence_length": config.sequence_length, "device": config.device, "threads": used_threads,
                     "rounds": bench.rounds, "repeats": bench.repeats, "median_ms": median, "q1_ms": q1, "q3_ms": q3,
                     "iqr_ms": q3 - q1, "fastest_ms": min(ms), "speedup": speedups[name],
                     "prepare_s": timers[name].served.prepare_s}
        if name in checked:
            out[name]["max_abs_logit_difference"] = checked[name]
    return out


def compiled_difference(model: torch.nn.Module, compiled: Served, config: Deployment) -> float:
    """max |Δlogit| between ``model`` compiled as ``config`` serves it (``compiled``) and the
    eager model, on random inputs of ``config``'s shape (already compiled for); fp32 must
    agree within COMPILE_TOLERANCE, bf16 is recorded (both round to bf16, in different orders)."""
    inputs = random_inputs(model.config.vocab_size, config.batch_size, config.sequence_length, torch.device(config.device))
    compiled = compiled.logits([inputs])[0]
    eager = serve(model, "torch", config.precision, config.device).logits([inputs])[0]
    difference = float((compiled - eager).abs().max())
    if config.precision == "fp32" and difference > COMPILE_TOLERANCE:
        raise CompileMismatchError(f"compiled logits differ from eager ones by {difference:.3g} > {COMPILE_TOLERANCE} "
                                   f"({config.key})")
    return difference


def add_speedups(models: dict) -> None:
    """Per timing (its speedup measured in rounds): the FLOP-ratio speedup at that sequence
    length, and efficiency = speedup / FLOP ratio."""
    for entry in models.values():
        for t in entry["timings"]:
            length = str(t["sequence_length"])
            t["flop_speedup"] = models["teacher"]["flops"][length] / entry["flops"][length]
            t["efficiency"] = t["speedup"] / t["flop_speedup"]


def add_best(models: dict, metric: str) -> None:
    """Best against best: per (device, batch, sequence length), each model's fastest
    configuration (runtime and precision, by its fastest timing) against the teacher's
    fastest there. The speedup is the ratio of those two timings, from different
    configurations timed at different moments; each configuration's own speedup (same
    runtime for both, interleaved rounds) stays in its timing. The metric is the model's
    in that precision (measured, int8 included), with its difference from the teacher's fp32."""
    def fastest(entry: dict) -> dict[tuple, dict]:
        best: dict[tuple, dict] = {}
        for t in entry["timings"]:
            shape = (t["device"], t["batch_size"], t["sequence_length"])
            if shape not in best or t["fastest_ms"] < best[shape]["fastest_ms"]:
                best[shape] = t
        return best

    teacher = fastest(models["teacher"])
    reference = models["teacher"]["by_precision"]["fp32"][metric]
    for entry in models.values():
        entry["best"] = []
        for shape, t in fastest(entry).items():
            accuracy = entry["by_precision"][t["precision"]][metric]
            entry["best"].append({
                "device": shape[0], "batch_size": shape[1], "sequence_length": shape[2],
                "key": t["key"], "runtime": t["runtime"], "precision": t["precision"], "fastest_ms": t["fastest_ms"],
                "teacher_key": teacher[shape]["key"], "teacher_fastest_ms": teacher[shape]["fastest_ms"],
                "speedup": teacher[shape]["fastest_ms"] / t["fastest_ms"], metric: accuracy,
                f"{metric}_vs_teacher": accuracy - reference})


def best_key(best: dict) -> str:
    """The name of a best-against-best entry in flat metrics: b32_s128 (cuda_b32_s128 on a GPU)."""
    return f"{'' if best['device'] == 'cpu' else best['device'] + '_'}b{best['batch_size']}_s{best['sequence_length']}"


def add_speedup_targets(params: Params, models: dict) -> None:
    """For each model pruned to a speedup: the target, its deployment, and the speedup this
    benchmark measured there (every deployment is timed)."""
    name = params.prune.deployment
    for k in params.prune.speedups:
        entry = models[f"cofi-{target_name(Speedup(k))}"]
        measured = next(t["speedup"] for t in entry["timings"] if t["deployment"] == name)
        entry["speedup_target"] = {"target_speedup": k, "deployment": name, "measured_speedup": measured}


def versus_teacher(spec: TaskSpec, preds: np.ndarray, teacher_preds: np.ndarray, labels: np.ndarray) -> dict:
    """The primary metric's difference from the teacher's on the dev set, with its 95%
    paired-bootstrap interval (cofi.metrics.paired_bootstrap): how much of the gap the
    dev set's size can tell apart."""
    key = spec.primary_metric
    difference = spec.metric_fn(preds, labels)[key] - spec.metric_fn(teacher_preds, labels)[key]
    return {"difference": difference, "ci95": list(paired_bootstrap(spec.metric_fn, key, preds, teacher_preds, labels))}


def by_precision(spec: TaskSpec, preds: np.ndarray, own_fp32: np.ndarray, teacher_fp32: np.ndarray,
                 labels: np.ndarray) -> dict:
    """A model's dev metrics in one precision, and that metric's difference (with its 95%
    paired-bootstrap interval) from the teacher's in fp32 and from the model's own in fp32
    (what the precision costs)."""
    return {**spec.metric_fn(preds, labels), "vs_teacher": versus_teacher(spec, preds, teacher_fp32, labels),
            "vs_fp32": versus_teacher(spec, preds, own_fp32, labels)}


def flat_metrics(entry: dict, primary_metric: str) -> dict:
    """One model's results as flat key → number, for `dvc metrics` and MLflow."""
    out = {primary_metric: entry[primary_metric], "sparsity": entry["sparsity"], "parameters": entry["parameters"],
           "prunable_parameters": entry["prunable_parameters"],
           "nonzero_prunable_parameters": entry["nonzero_prunable_parameters"]}
    out.update({f"flops_s{s}": n for s, n in entry["flops"].items()})
    if "vs_teacher" in entry:
        out[f"{primary_metric}_vs_teacher"] = entry["vs_teacher"]["difference"]
        out[f"{primary_metric}_vs_teacher_ci95_low"], out[f"{primary_metric}_vs_teacher_ci95_high"] = entry["vs_teacher"]["ci95"]
    target = entry.get("speedup_target")
    if target:
        out["target_speedup"] = target["target_speedup"]
        out["measured_speedup"] = target["measured_speedup"]
    if "onnx" in entry:
        out["onnx_max_abs_logit_difference"] = entry["onnx"]["max_abs_logit_difference"]
    for precision, values in entry["by_precision"].items():
        if precision != "fp32":
            out[f"{primary_metric}_{precision}"] = values[primary_metric]
            out[f"{primary_metric}_{precision}_vs_fp32"] = values["vs_fp32"]["difference"]
    for t in entry["timings"]:
        out.update({f"latency_ms_{t['key']}": t["median_ms"], f"iqr_ms_{t['key']}": t["iqr_ms"],
                    f"speedup_{t['key']}": t["speedup"], f"efficiency_{t['key']}": t["efficiency"]})
        if t["runtime"] == "torch-compile":
            out[f"compile_s_{t['key']}"] = t["prepare_s"]
    for best in entry["best"]:
        out[f"best_speedup_{best_key(best)}"] = best["speedup"]
        out[f"best_ms_{best_key(best)}"] = best["fastest_ms"]
        out[f"best_{primary_metric}_{best_key(best)}"] = best[primary_metric]
    return out
