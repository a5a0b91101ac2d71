"""Baselines and ablations: the library pieces against hand checks, then every baseline
and ablation switch end to end on a tiny random model, through the benchmark and
the report (the stage functions DVC runs, without DVC)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model, tiny_project
from cofi.ablations import ABLATIONS
from cofi.baselines import (
    iterative_magnitude_pruning,
    layer_subset,
    magnitude_masks,
    prunable_weights,
    size_matching_flops,
    subset_student,
)
from cofi.flops import forward_flops
from pipeline.params import ablated, load_params
from pipeline.paths import ablation_variant


def inputs(seed: int = 0) -> dict:
    ids = torch.randint(2, 50, (3, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def test_layer_subset_copies_the_chosen_layers():
    model = tiny_model(num_hidden_layers=3).eval()
    whole = layer_subset(model, [1, 2, 3]).eval()
    assert torch.equal(whole(**inputs()).logits, model(**inputs()).logits)
    top = layer_subset(model, [3])
    assert top.config.num_hidden_layers == 1
    assert torch.equal(top.layers[0].ffn_up.weight, model.layers[2].ffn_up.weight)
    assert torch.equal(top.pooler.weight, model.pooler.weight)
    with pytest.raises(ValueError, match=r"increasing 1-based layers of 1..3"):
        layer_subset(model, [3, 1])


def test_size_matching_flops_picks_the_closest_candidate_and_builds_it():
    model = tiny_model(num_hidden_layers=4)
    half = forward_flops(layer_subset(model, [2, 4]), 16)
    size = size_matching_flops(model, half, 16)
    # 4 layers at half width cost exactly what 2 full layers cost; the tie goes to more layers
    assert (size.layers, size.head_fraction, size.ffn_fraction, size.flops) == ((1, 2, 3, 4), 0.5, 0.5, half)
    quarter = size_matching_flops(model, forward_flops(layer_subset(model, [4]), 16), 16)
    assert quarter.flops == forward_flops(layer_subset(model, [4]), 16)
    narrow = size_matching_flops(model, int(half * 0.6), 16)
    student = subset_student(model, narrow)
    assert forward_flops(student, 16) == narrow.flops  # the search's count is the built model's


def test_magnitude_masks_drop_exactly_the_smallest_weights_and_stay_nested():
    model = tiny_model()
    weights = torch.cat([w.detach().abs().flatten() for w in prunable_weights(model).values()])
    masks = magnitude_masks(model, 0.3)
    kept = torch.cat([m.flatten() for m in masks.values()]).bool()
    assert int((~kept).sum()) == round(0.3 * weights.numel())
    assert weights[~kept].max() <= weights[kept].min()
    with torch.no_grad():  # even if a pruned weight grew back, it stays pruned
        for w in prunable_weights(model).values():
            w.add_(1.0)
    more = magnitude_masks(model, 0.5, masks)
    more_kept = torch.cat([m.flatten() for m in more.values()]).bool()
    assert not (more_kept & ~kept).any()
    assert int((~more_kept).sum()) == round(0.5 * weights.numel())


def test_iterative_magnitude_pruning_rewinds_and_keeps_zeros():
    teacher = tiny_model(seed=1)
    seen = []

    def train(model, keep_pruned, r):
        with torch.no_grad():  # a "training step" that touches every weight
            for w in prunable_weights(model).values():
                w.add_(0.01)
        keep_pruned.on_step(1, {})
        seen.append(r)
        return None

    model, masks, _ = iterative_magnitude_pruning(teacher, 0.6, 3, train)
    assert seen == [1, 2, 3]
    total = sum(m.numel() for m in masks.values())
    assert sum(int((m == 0).sum()) for m in masks.values()) == round(0.6 * total)
    for name, w in prunable_weights(model).items():
        assert torch.all(w[masks[name] == 0] == 0)
        teacher_w = prunable_weights(teacher)[name]
        kept = masks[name] != 0
        assert torch.allclose(w[kept], teacher_w[kept] + 0.01)  # rewound to the teacher, then trained once


# ---------------------------------------------------------------------------------------
# end to end on a tiny random model


DEPLOYMENT = "cpu-s8"  # a deployment target, timed by the benchmark stage
TARGET = 0.5


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project directory with tiny data and a tiny random teacher, then every stage function."""
    import os

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path_factory.mktemp("tiny-project")

    def tiny(params: dict) -> None:
        params["prune"].update(targets=[TARGET], epochs=2, distill_epochs=0.25, sparsity_warmup_epochs=0.75,
                               batch_size=8, reg_learning_rate=0.5, evals_per_epoch=1)
        params["finetune"].update(epochs=1, batch_size=8, evals_per_epoch=1)
        params["compute"]["bf16"] = False
        params["benchmark"].update(batch_sizes=[1], sequence_lengths=[16], precisions=["fp32"], warmup=1, repeats=2)
        params["deployments"] = {DEPLOYMENT: {"device": "cpu", "runtime": "torch", "precision": "fp32", "batch_size": 2,
                                              "sequence_length": 8, "threads": 1}}  # a length the grid lacks
        params["baselines"].update(methods=["layer_subset", "magnitude"], ablations=list(ABLATIONS), target=TARGET,
                                   magnitude_rounds=2)
        params["mlflow"]["register_models"] = False

    tiny_project(root, tiny)

    from stages import baseline, benchmark, compact, finetune, prune, profile, report

    p = load_params(root / "params.yaml")
    profile.run(p, DEPLOYMENT, root)
    prune.run(p, TARGET, root)
    finetune.run(p, TARGET, root)
    compact.run(p, TARGET, root)
    for method in p.baselines.methods:
        baseline.run(p, method, root)
    for name in p.baselines.ablations:  # as dvc.yaml runs them: prune → finetune → compact in the variant
        for stage in (prune, finetune, compact):
            stage.run(ablated(p, name), TARGET, root, ablation_variant(name))
    benchmark.run(p, root)
    report.run(p, root)
    return root


def test_every_model_is_timed_on_the_deployment_in_its_own_configuration(project):
    import json

    models = json.loads((project / "outputs" / "benchmark.json").read_text())["models"]
    for name, entry in models.items():
        (timing,) = [t for t in entry["timings"] if t["deployment"] == DEPLOYMENT]
        assert (timing["key"], timing["batch_size"], timing["sequence_length"], timing["threads"]) == (DEPLOYMENT, 2, 8, 1)
        assert timing["flop_speedup"] == models["teacher"]["flops"]["8"] / entry["flops"]["8"]
        assert timing["speedup"] > 0 and (name != "teacher" or timing["speedup"] == 1.0)
    report = (project / "report" / "report.md").read_text()
    assert f"{DEPLOYMENT}: ms · speedup · eff." in report and f"### {DEPLOYMENT}: torch_fp32_b2_s8 on cpu" in report


def test_no_fine_tuning_passes_the_compacted_pruned_model_on(project, tmp_path):
    """finetune.epochs 0 (the default at 0.6): the stage writes the pruned model, compacted,
    with the accuracy the pruning run measured for it (compaction is exact)."""
    import shutil

    from cofi.compact import compact as compact_model, load_model
    from pipeline.paths import MASKS_FILE
    from stages import finetune

    for part in ("outputs/data", "outputs/teacher", "outputs/pruned"):
        shutil.copytree(project / part, tmp_path / part)
    shutil.copy(project / "params.yaml", tmp_path / "params.yaml")
    p = load_params(tmp_path / "params.yaml")
    p = p.model_copy(update={"finetune": p.finetune.model_copy(update={"epochs": 0})})
    finetune.run(p, TARGET, tmp_path)

    pruned_dir = tmp_path / "outputs" / "pruned" / str(TARGET)
    expected = compact_model(load_model(pruned_dir), load_file(pruned_dir / MASKS_FILE)).state_dict()
    written = load_model(tmp_path / "outputs" / "finetuned" / str(TARGET)).state_dict()
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    accuracy = json.loads((tmp_path / "metrics" / f"finetune-{TARGET}.json").read_text())["accuracy"]
    assert accuracy == json.loads((project / "metrics" / f"prune-{TARGET}.json").read_text())["accuracy"]


def test_every_baseline_and_ablation_is_benchmarked_and_reported(project):
    bench = json.loads((project / "outputs" / "benchmark.json").read_text())["models"]
    expected = {"teacher", "cofi-0.5", "baseline-layer_subset", "baseline-magnitude"} | {f"ablation-{a}" for a in ABLATIONS}
    assert set(bench) == expected
    report = (project / "report" / "report.md").read_text()
    for name in expected:
        assert f"| {name} |" in report
        assert (project / "metrics" / "benchmark" / f"{name}.json").exists()
    sweep = pd.read_csv(project / "report" / "sweep.csv")
    assert set(sweep["model"]) == expected  # every method is placed on the accuracy-vs-speedup plot


def test_every_benchmarked_model_is_an_mlflow_logged_model_with_its_results(project):
    """One LoggedModel per benchmarked model (the compact stage's for CoFi and ablations),
    with accuracy, sparsity and per-configuration speedups linked to it."""
    from mlflow import MlflowClient

    from pipeline.params import load_params
    from pipeline.tracking import model_name, tracking_uri

    bench = json.loads((project / "outputs" / "benchmark.json").read_text())["models"]
    client = MlflowClient(tracking_uri(project))
    experiment = client.get_experiment_by_name(load_params(project / "params.yaml").mlflow.experiment)
    models = client.search_logged_models([experiment.experiment_id])
    by_weights = {m.tags["cofi.weights_sha256"]: m for m in models}
    assert len(by_weights) == len(models) == len(bench)  # no model logged twice
    for name, entry in bench.items():
        model = by_weights[entry["weights_sha256"]]
        assert model.name == model_name(name)
        metrics = {m.key: m.value for m in model.metrics}
        assert metrics["sparsity"] == pytest.approx(entry["sparsity"])
        assert metrics["accuracy"] == pytest.approx(entry["accuracy"])
        assert {k for k in metrics if k.startswith("speedup_")} == {f"speedup_{t['key']}" for t in entry["timings"]}


def test_the_baselines_are_what_they_claim(project):
    bench = json.loads((project / "outputs" / "benchmark.json").read_text())["models"]
    magnitude = bench["baseline-magnitude"]
    assert magnitude["prunable_parameters"] == bench["teacher"]["prunable_parameters"]  # dense tensors
    assert magnitude["sparsity"] == pytest.approx(TARGET, abs=1e-3)  # zeros
    assert magnitude["flops"] == bench["teacher"]["flops"]
    subset = json.loads((project / "metrics" / "baseline-layer_subset.json").read_text())
    cofi_flops = bench["cofi-0.5"]["flops"]["16"]
    assert subset["flops_s16"] == bench["baseline-layer_subset"]["flops"]["16"]
    assert subset["cofi_flops_s16"] == cofi_flops
    curve = pd.read_csv(project / "plots" / "baseline-magnitude.csv")  # the one curve dvc.yaml declares
    assert list(curve["round"].unique()) == [1, 2] and curve["step"].is_monotonic_increasing


def test_each_ablation_switch_changed_what_it_names(project):
    def pruned(name: str) -> dict:
        return json.loads((project / "metrics" / f"prune-ablation-{name}-0.5.json").read_text())

    assert pruned("no_hidden_masks")["hidden_size"] == 16  # the hidden dimension is never pruned
    masks = {name: load_file(project / "outputs" / "pruned" / f"ablation-{name}-0.5" / "masks.safetensors")
             for name in ABLATIONS}
    assert "hidden" not in masks["no_hidden_masks"]
    assert "mha" not in masks["no_layer_masks"] and "ffn" not in masks["no_layer_masks"]
    no_distill = pd.read_csv(project / "plots" / "prune-ablation-no_distill-0.5.csv")
    assert "ce" in no_distill and "pred" not in no_distill  # gold labels only
    no_layer = pd.read_csv(project / "plots" / "prune-ablation-no_layer_distill-0.5.csv")
    assert no_layer["pred"].gt(0).all() and no_layer["layer"].eq(0).all()
    for name in ABLATIONS:
        compact = json.loads((project / "metrics" / f"compact-ablation-{name}-0.5.json").read_text())
        assert 0 <= compact["accuracy"] <= 1
