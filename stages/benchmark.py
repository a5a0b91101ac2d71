"""Stage `benchmark`: time the teacher and every compact model the same way, and
evaluate each on the dev set in fp32, so accuracy and speed are comparable.

Writes outputs/benchmark.json (per model: accuracy, sparsity, parameters, a
timing per device × precision × batch × sequence with its speedup over the
teacher, and the environment) and metrics/benchmark.json, a flat summary for
`dvc metrics`."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch

from cofi.benchmark import environment, time_forward
from cofi.compact import load_model
from cofi.sparsity import count_prunable_parameters, model_sparsity
from cofi.trainer import predict, resolve_device
from pipeline import lineage
from pipeline.params import Params
from pipeline.paths import Paths, target_name
from pipeline.runtime import collator, mlflow_run, setup, task_spec_of, write_json
from pipeline.training import load_stage_data

STAGE = "benchmark"


def run(params: Params, root: Path = Path(".")) -> dict:
    setup(params)
    if params.benchmark.threads:
        torch.set_num_threads(params.benchmark.threads)
    paths = Paths(root)
    data = load_stage_data(paths)
    spec = task_spec_of(params)
    device = resolve_device(params.compute.device)
    models = {"teacher": paths.teacher, **{f"cofi-{target_name(t)}": paths.compact(t) for t in params.prune.targets}}
    configs = [(p, b, s) for p in params.benchmark.precisions for b in params.benchmark.batch_sizes
               for s in params.benchmark.sequence_lengths]
    results: dict = {"environment": {**environment(), "device": device.type}, "models": {}}

    with mlflow_run(STAGE, params, paths.root, tags=lineage.teacher_tags(paths.teacher)):
        loaded = {name: load_model(path).to(device) for name, path in models.items()}
        for name, model in loaded.items():
            preds, labels = predict(model, data.validation, collator(data.meta["pad_token_id"]), bf16=False)
            results["models"][name] = {
                **spec.metric_fn(preds, labels),
                "sparsity": model_sparsity(model),
                "prunable_parameters": count_prunable_parameters(model),
                "parameters": sum(p.numel() for p in model.parameters()),
                "weights_sha256": lineage.read_manifest(models[name])["weights_sha256"],
                "timings": [],
            }
        # interleave models within each configuration so drifting machine load hits all alike
        for precision, batch, length in configs:
            for name, model in loaded.items():
                timing = time_forward(model, batch, length, precision, params.benchmark.warmup, params.benchmark.repeats)
                results["models"][name]["timings"].append(timing.as_dict())
        for name, entry in results["models"].items():
            for timing, base in zip(entry["timings"], results["models"]["teacher"]["timings"]):
                timing["speedup"] = base["median_ms"] / timing["median_ms"]
                key = f"{timing['precision']}_b{timing['batch_size']}_s{timing['sequence_length']}"
                mlflow.log_metrics({f"{name}.latency_ms.{key}": timing["median_ms"], f"{name}.speedup.{key}": timing["speedup"]})
            mlflow.log_metric(f"{name}.{spec.primary_metric}", entry[spec.primary_metric])
        mlflow.log_dict(results, "benchmark.json")
        write_json(paths.benchmark, results)
        write_json(paths.metrics(STAGE), summary(results, spec.primary_metric))
    return results


def summary(results: dict, primary_metric: str) -> dict:
    """{model: {metric, sparsity, speedup_<precision>_b<batch>_s<seq>, ...}}"""
    out = {}
    for name, entry in results["models"].items():
        row = {primary_metric: entry[primary_metric], "sparsity": entry["sparsity"]}
        for t in entry["timings"]:
            key = f"{t['precision']}_b{t['batch_size']}_s{t['sequence_length']}"
            row[f"latency_ms_{key}"] = t["median_ms"]
            row[f"speedup_{key}"] = t["speedup"]
        out[name] = row
    return out
