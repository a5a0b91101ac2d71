"""Stage `teacher`: fine-tune the base model on the task with gold labels, or, with
`teacher.fine_tuned`, take an already fine-tuned classifier as the teacher as it is
(evaluated on the dev split, no training).

Reads outputs/data; writes outputs/teacher (model with the task's label names,
tokenizer, manifest.json), metrics/teacher.json and plots/teacher.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from transformers import AutoConfig

from cofi.convert import load_pretrained_with_report, load_tokenizer
from cofi.trainer import predict
from pipeline.params import Params
from pipeline.paths import Paths
from pipeline.runtime import base_model_path, collator, load_stage_data, setup, task_spec_of, write_curve
from pipeline.training import Manifest, Trained, result_metrics, run_training_stage, train, train_config

STAGE = "teacher"


def run(params: Params, root: Path = Path(".")) -> dict:
    setup(params)
    paths = Paths(root)
    data = load_stage_data(paths)
    spec = task_spec_of(params)
    base = base_model_path(params.teacher.base_model)
    labels = data.meta["labels"]
    if params.teacher.fine_tuned and labels:
        check_label_order(params.teacher.base_model, AutoConfig.from_pretrained(base).id2label, labels)
    model, report = load_pretrained_with_report(
        base, num_labels=data.meta["num_labels"], seed=params.seed, id2label=dict(enumerate(labels)) if labels else None,
        dropout=params.teacher.dropout,
    )
    if params.teacher.fine_tuned and report.fresh:
        raise ValueError(
            f"teacher.fine_tuned is true, but {params.teacher.base_model} has no classification head "
            f"({', '.join(report.fresh)} would be freshly initialised); set teacher.fine_tuned: false to train one"
        )
    tokenizer = load_tokenizer(base)

    def fit() -> Trained:
        if params.teacher.fine_tuned:  # the teacher as it is: evaluated, not trained
            preds, gold = predict(model, data.validation, collator(data.meta["pad_token_id"]), bf16=False)
            write_curve(paths.curve(STAGE), [{"step": 0, "loss": float("nan")}])
            return Trained(model, spec.metric_fn(preds, gold), extra=tokenizer.save_pretrained)
        config = train_config(params, params.teacher, evals_per_epoch=1, num_examples=len(data.train))
        trainer, result = train(STAGE, params, paths, data, model, config, data.meta["digest"], paths.curve(STAGE))
        return Trained(trainer.model, result_metrics(result), [trainer], extra=tokenizer.save_pretrained)

    return run_training_stage(
        STAGE, params, paths, fit, out=paths.teacher, metrics_file=paths.metrics(STAGE),
        manifest=Manifest(kind=STAGE, parent_dir=None, data_digest=data.meta["digest"],
                          base_model=(params.teacher.base_model, base)),
    )


def check_label_order(model_name: str, id2label: dict[int, str], labels: Sequence[str]) -> None:
    """Refuse a fine-tuned classifier whose outputs name the task's classes in another order
    (its predictions would be read as the wrong classes). Generic names (LABEL_0, ...) and
    names that are not the task's classes are left to the user."""
    theirs = [str(id2label[i]) for i in sorted(id2label)]
    if sorted(n.lower() for n in theirs) == sorted(n.lower() for n in labels) and \
            [n.lower() for n in theirs] != [n.lower() for n in labels]:
        raise ValueError(
            f"teacher {model_name} orders its classes {theirs}, the data {list(labels)}; "
            f"set data.custom.labels: {theirs} to use the model's order"
        )
