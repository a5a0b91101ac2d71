"""Stage `profile@<name>`: a latency model of the teacher's shape on one deployment target.

Measures F(d), A(h, d) and B(u, d) (cofi/latency.py, by cofi/profiling.py) on deployments[<name>], each
as a fraction of the unpruned model's latency in interleaved rounds, then checks
the model on random compact structures: predicted against measured speedup. A fit
worse than FIT_GOAL has its tables measured once more (the better fit is kept).
Writes outputs/latency/<name>.json (the tables, the hardware fingerprint and the
fit, row by row) and metrics/profile-<name>.json (the fit's summary, the stage's
own time); logs both to MLflow."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow

from cofi.configuration_cofi import CofiConfig
from cofi.profiling import check_fit, default_grids, profile, random_structures, stopwatch
from cofi.manifest import atomic_write
from pipeline import lineage
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runtime import mlflow_run, require_device, seed_everything, write_json

STAGE = "profile"
FIT_STRUCTURES = 20  # random compact structures the fit is checked on
CALIBRATION_STRUCTURES = 8  # others, for the latency model's scale
# interleaved rounds (fastest timings kept), timed passes per model per round: one pass per round
# halves the time at batch 32 (about 90 s here instead of 160) and fits no worse (docs/experiments/latency-model-fit.md)
ROUNDS, REPEATS = 3, 1
# A slow spell while the tables are timed mis-predicts small models: one ort-b1 profile on the
# AVX-512 EPYC read 24.6% worst, the next 5.0% (docs/experiments/latency-model-fit.md). Beyond FIT_GOAL the tables are measured
# again, at most MEASUREMENTS times in all (about a minute each), and the better fit is kept.
FIT_GOAL, MEASUREMENTS = 0.10, 2


def run(params: Params, name: str, root: Path = Path(".")) -> dict:
    seed_everything(params.seed)  # not setup(): compute.threads is for training, the deployment has its own
    deployment = require_device(params, name)
    paths = Paths(root)
    config = CofiConfig.from_pretrained(paths.teacher)  # the shape; no weights needed
    keep_multiple = params.prune.keep_multiple
    with mlflow_run(f"{STAGE}@{name}", params, paths.root, tags=lineage.data_tags(paths.teacher)):
        start = time.perf_counter()
        prepare = stopwatch(deployment, REPEATS, int8_method=params.benchmark.int8)
        calibration = random_structures(config, CALIBRATION_STRUCTURES, keep_multiple, params.seed + 1)
        checked = random_structures(config, FIT_STRUCTURES, keep_multiple, params.seed)
        measured = []
        for attempt in range(1, MEASUREMENTS + 1):
            model = profile(config, deployment, default_grids(config, keep_multiple), prepare, ROUNDS, calibration,
                            progress=lambda m: print(m, flush=True))
            print(f"checking the fit on {FIT_STRUCTURES} random structures", flush=True)
            worst = check_fit(model, config, checked, prepare, ROUNDS)["worst_relative_error"]
            measured.append(model)
            if worst <= FIT_GOAL:
                break
            print(f"worst |error| {worst:.1%} > {FIT_GOAL:.0%}: "
                  + ("measuring the tables again" if attempt < MEASUREMENTS else "keeping the better fit"), flush=True)
        model = min(measured, key=lambda m: m.fit["worst_relative_error"])
        fit = model.fit
        seconds = time.perf_counter() - start
        metrics = {
            "worst_relative_error": fit["worst_relative_error"],
            "mean_relative_error": fit["mean_relative_error"],
            "structures": fit["structures"],
            "measurements": len(measured),
            "reference_ms": model.reference_ms,
            "profile_seconds": seconds,
        }
        out = paths.latency_model(name)
        atomic_write(out, json.dumps(model.to_dict(), indent=1))
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"cofi.deployment": deployment.key, "cofi.latency.fingerprint": model.fingerprint})
        mlflow.log_artifact(str(out))
        write_json(paths.metrics(f"{STAGE}-{name}"), {**metrics, "fingerprint": model.fingerprint})
    print(f"{name} ({deployment.key}): worst |error| {metrics['worst_relative_error']:.1%}, "
          f"mean {metrics['mean_relative_error']:.1%} on {FIT_STRUCTURES} structures; {seconds:.0f} s")
    return metrics
