"""Stage `compact@<target>`: export the fine-tuned compact model as the deliverable.

Writes outputs/compact/<target>: a self-contained Hugging Face directory (model,
remote code, tokenizer, manifest.json) that loads with
``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)``,
registers it in the MLflow model registry with its lineage, and writes
metrics/compact-<target>.json with fp32 dev accuracy, the target (and for a speedup
target the latency model's predicted speedup) and the three sparsities: expected
(gates), of the deterministic masks, and counted from the tensors."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from transformers import AutoTokenizer

from cofi.compact import load_model, save_model
from cofi.manifest import read_manifest
from cofi.sparsity import count_prunable_parameters, model_sparsity
from cofi.trainer import predict
from pipeline import lineage, tracking
from pipeline.params import Params
from pipeline.paths import Paths, Target, target_name
from pipeline.runtime import collator, load_stage_data, mlflow_run, setup, task_spec_of, write_json

STAGE = "compact"


def run(params: Params, target: Target, root: Path = Path("."), variant: str | None = None) -> dict:
    setup(params)
    paths = Paths(root, variant)
    data = load_stage_data(paths)
    spec = task_spec_of(params)
    finetuned = paths.finetuned(target)
    model = load_model(finetuned, verify=True)
    tokenizer = AutoTokenizer.from_pretrained(paths.teacher)
    prune_metrics = json.loads(paths.metrics("prune", target).read_text())
    name = paths.run_name(STAGE, target)
    digest = data.meta["digest"]

    with mlflow_run(name, params, paths.root, tags=lineage.run_tags(STAGE, finetuned, digest)) as run:
        def extra(directory: Path) -> None:
            tokenizer.save_pretrained(directory)
            lineage.write_manifest(directory, kind=STAGE, parent_dir=finetuned, data_digest=digest,
                                   mlflow_run_id=run.info.run_id)

        out = save_model(model, paths.compact(target), extra=extra)
        shipped = load_model(out)  # as shipped; its files were hashed into its manifest just now
        preds, labels = predict(shipped, data.validation, collator(data.meta["pad_token_id"]), bf16=False)
        metrics = {
            **spec.metric_fn(preds, labels),
            # the target (sparsity, or speedup with its latency model's prediction)
            **{k: prune_metrics[k] for k in ("target_sparsity", "target_speedup", "predicted_speedup") if k in prune_metrics},
            "sparsity_expected": prune_metrics["expected_sparsity"],
            "sparsity_masks": prune_metrics["sparsity"],
            "sparsity_counted": model_sparsity(shipped),
            "prunable_parameters": count_prunable_parameters(shipped),
            "parameters": sum(p.numel() for p in shipped.parameters()),
        }
        manifest = read_manifest(out)  # read back: no hashing
        tags = lineage.lineage_tags(manifest)
        mlflow.set_tags(tags)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        # a LoggedModel (the deliverable's files as its artifacts when it is registered)
        registered = params.mlflow.register_models
        logged = tracking.log_model(out if registered else None, paths.variant or f"cofi-{target_name(target)}", tags=tags,
                                    params={"target": target_name(target), "variant": paths.variant or "cofi",
                                            **({"deployment": prune_metrics["deployment"]} if "deployment" in prune_metrics else {})}, metrics=metrics,
                                    weights_sha256=manifest["digest"])
        if registered:
            tracking.register_model(out, name=f"cofi-{params.data.task}-{paths.model_name(target)}", tags=tags,
                                    model=logged)
        write_json(paths.metrics(STAGE, target), metrics)
    return metrics
