"""Pruning to a speedup (issue 15): the Lagrangian controls the predicted latency of
the structure that ships, computed from a latency model profiled on a runtime; measured
on that runtime, the shipped model's speedup is the target's, within the fit's error."""

from __future__ import annotations

import math

import pytest
import torch

from safetensors.torch import load_file

from cofi.compact import compact, load_model
from cofi.gates import GateConfig, HardConcreteGates
from cofi.deployment import Deployment
from cofi.latency import Structure
from cofi.profiling import default_grids, model_of, profile
from cofi.sparsity import ModelShape, mask_sparsity
from cofi.pruning import PruneConfig
from pipeline.paths import MASKS_FILE, Speedup
from tests.conftest import FINE_GRID, tiny_config
from tests.test_latency import exact
from tests.test_trainer import Recorder, make_trainer

CONFIG = tiny_config(**FINE_GRID)
SHAPE = ModelShape.from_config(CONFIG)


@pytest.fixture(scope="module")
def latency():
    """A latency model of the fine-grid shape on a runtime whose cost is exactly
    additive (tests/test_latency.py): its predictions are exact."""
    return profile(CONFIG, Deployment(), grids=default_grids(CONFIG, keep_multiple=4), prepare=exact)


def curved_cost(model) -> float:
    """A runtime outside the latency model's family (cofi.latency: a fixed cost and one cost
    per sublayer, each piecewise linear between the profiled widths): wider products run
    more efficiently (the square roots), and the layers share a cache, so the total is not
    the sum of its parts (the power). The latency model only sees its timings on the grid."""
    s = Structure.of(model.config)
    fixed = 1.0 + 0.01 * s.hidden + 0.05 * math.sqrt(s.hidden)
    attention = sum(0.3 + 0.002 * h * s.hidden + 0.02 * math.sqrt(h * s.hidden) for h in s.heads if h)
    ffn = sum(0.2 + 0.0001 * u * s.hidden + 0.001 * u + 0.01 * math.sqrt(u * s.hidden) for u in s.units if u)
    return (fixed + attention + ffn) ** 0.9


def curved(model):
    """A stopwatch whose every pass takes curved_cost(model) ms."""
    return lambda: curved_cost(model)


@pytest.fixture(scope="module")
def curved_latency():
    return profile(CONFIG, Deployment(), grids=default_grids(CONFIG, keep_multiple=4), prepare=curved)


def test_the_speedup_of_counts_is_the_latency_models_prediction_of_the_structure(latency):
    """Exact counts give exactly ``LatencyModel.relative`` of the structure they describe,
    a closed layer gate removing its sublayer; the expected latency is differentiable in
    log α and equals the exact one where the gates saturate."""
    gates = HardConcreteGates(SHAPE, GateConfig(keep_multiple=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for a in gates.log_alpha.values():
            a.copy_(torch.randn_like(a) * 3)
        gates.log_alpha["mha"][1] = -5.0  # layer 2's attention dropped
    counts = gates.deterministic_counts()
    heads = tuple(int(h * g) for h, g in zip(counts["head"], counts["mha"]))
    units = tuple(int(u * g) for u, g in zip(counts["intermediate"], counts["ffn"]))
    structure = Structure(int(counts["hidden"]), heads, units)
    assert heads[1] == 0
    assert float(latency.relative_of_counts(SHAPE, counts)) == pytest.approx(latency.relative(structure), rel=1e-12)

    expected = latency.relative_of_counts(SHAPE, gates.expected_counts())
    grads = torch.autograd.grad(expected, list(gates.log_alpha.values()))
    assert all(torch.isfinite(g).all() for g in grads) and all(g.abs().sum() > 0 for g in grads)
    assert all((g >= 0).all() for g in grads)  # a larger log α keeps more: never a faster model

    with torch.no_grad():  # saturated gates: every keep probability 0 or 1, nothing to round
        for a in gates.log_alpha.values():
            a.copy_(torch.where(torch.rand_like(a) < 0.7, 1e4, -1e4))
    saturated = HardConcreteGates(SHAPE, GateConfig(keep_multiple=1))
    saturated.load_state_dict(gates.state_dict())
    assert float(latency.relative_of_counts(SHAPE, saturated.expected_counts()).detach()) == pytest.approx(
        float(latency.relative_of_counts(SHAPE, saturated.deterministic_counts())), rel=1e-6)


@pytest.mark.parametrize("families", [GateConfig().families, ("head", "intermediate", "mha", "ffn")])
def test_stacked_counts_predict_each_structure_as_alone(latency, families):
    """Counts with a leading batch dimension (pruning stacks the expected and the
    deterministic counts) give each structure's prediction, also with a family not
    pruned (filled for every structure) and for expected counts, gradient included."""
    structures = []
    for seed in (0, 1, 2):
        gates = HardConcreteGates(SHAPE, GateConfig(families=families, keep_multiple=4))
        torch.manual_seed(seed)
        with torch.no_grad():
            for a in gates.log_alpha.values():
                a.copy_(torch.randn_like(a) * 3)
        structures += [gates.deterministic_counts(), {f: c.double() for f, c in gates.expected_counts().items()}]
    stacked = {f: torch.stack([s[f] for s in structures]) for f in structures[0]}
    alone = torch.stack([latency.relative_of_counts(SHAPE, s) for s in structures])
    together = latency.relative_of_counts(SHAPE, stacked)
    assert together.shape == (6,)
    assert torch.equal(together.detach(), alone.detach())  # the same ops on the same numbers
    grads_alone = torch.autograd.grad(alone.sum(), list(gates.log_alpha.values()), retain_graph=True)
    grads_together = torch.autograd.grad(together.sum(), list(gates.log_alpha.values()))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) and a.abs().sum() > 0 for a, b in zip(grads_alone, grads_together))


def test_pruning_to_a_speedup_ships_that_speedup(task, curved_latency):
    """At every pruning step the Lagrangian sees the latency saved by the deterministic
    structure (recomputed here from the masks, through compaction); the best checkpoint is
    within the tolerance of the target, and the compact model, timed on the runtime the
    latency model was profiled on (curved_cost, which the model only approximates), is
    within 10% of the target: the speedup that is measured, not only predicted."""
    latency = curved_latency
    prune = PruneConfig(target_speedup=3.0, latency=latency, distill_epochs=1, sparsity_warmup_epochs=8,
                        reg_learning_rate=0.1, lambda_2_init=100.0, gates=GateConfig(keep_multiple=4))
    recorder = Recorder()
    trainer = make_trainer(task, prune=prune, model=FINE_GRID, epochs=25, eval_steps=12, callbacks=[recorder])
    seen: dict[int, tuple[float, float]] = {}  # step → (the Lagrangian's value, 1 − 1/speedup of the structure)
    logs: dict[int, dict[str, float]] = {}  # step → what the step should log, each value computed alone

    def record(module, args):
        gates = trainer.pruning.gates
        masks = gates.deterministic()
        structure = Structure.of(compact(trainer.model, masks).config)
        seen[trainer.step] = (float(args[0].detach()), 1 - latency.relative(structure))
        logs[trainer.step] = {"predicted_speedup": latency.speedup(structure),
                              "expected_speedup": 1 / float(latency.relative_of_counts(SHAPE, gates.expected_counts())),
                              "mask_sparsity": mask_sparsity(SHAPE, masks),
                              "expected_sparsity": float(gates.expected_sparsity())}

    trainer.pruning.lagrangian.register_forward_pre_hook(record)
    result = trainer.fit()

    assert sorted(seen) == list(range(trainer.pruning.start, trainer.total_steps))
    assert all(abs(controlled - shipped) <= 1e-6 for controlled, shipped in seen.values())
    for step, expected in logs.items():  # one batched latency call per step logs what separate ones compute
        assert {k: recorder.by_step[step + 1][k] for k in expected} == pytest.approx(expected, rel=1e-6)  # 1-based
    last = recorder.steps[-1]
    assert last["target_speedup"] == pytest.approx(3.0)
    assert {"predicted_speedup", "expected_speedup", "mask_sparsity", "expected_sparsity"} <= set(last)
    assert "target_sparsity" not in last

    assert result.target_reached
    best = result.best_metrics["predicted_speedup"]
    assert abs(best / 3.0 - 1) <= prune.speedup_tolerance
    shipped = compact(trainer.model, result.masks)
    assert latency.speedup(Structure.of(shipped.config)) == pytest.approx(best, rel=1e-9)
    full = model_of(CONFIG, Structure(CONFIG.hidden_size, (CONFIG.num_attention_heads,) * 3, (CONFIG.intermediate_size,) * 3))
    measured = curved_cost(full) / curved_cost(shipped)
    assert abs(measured / 3.0 - 1) <= 0.10, measured
    assert abs(measured / best - 1) > 1e-4  # measured, not the prediction restated
    assert result.best_metrics["sparsity"] == pytest.approx(mask_sparsity(trainer.pruning.shape, result.masks))


@pytest.mark.parametrize("speedup", [1.0, 0.5])
def test_a_speedup_of_one_or_less_is_refused(latency, speedup):
    with pytest.raises(ValueError, match=rf"target_speedup={speedup!r} is out of range; allowed: \(1.0, inf\)"):
        PruneConfig(target_speedup=speedup, latency=latency)


def test_an_unreachable_speedup_is_refused_naming_the_largest_one(task, latency):
    fastest = latency.max_speedup(SHAPE, GateConfig().families, keep_multiple=4)
    assert 1 < fastest < math.inf
    # everything removed but the fixed costs at the narrowest residual stream: F(4) alone
    assert fastest == pytest.approx(latency.reference_ms / (1.0 + 0.01 * 4), rel=1e-9)
    prune = PruneConfig(target_speedup=fastest * 1.01, latency=latency, distill_epochs=1, sparsity_warmup_epochs=2,
                        gates=GateConfig(keep_multiple=4))
    with pytest.raises(ValueError, match=rf"the latency model allows at most {fastest:.2f}x"):
        make_trainer(task, prune=prune, model=FINE_GRID, epochs=5)


def test_a_speedup_target_needs_a_latency_model_and_only_one_target():
    with pytest.raises(ValueError, match="target_speedup needs a latency model"):
        PruneConfig(target_speedup=2.0)
    with pytest.raises(ValueError, match="give one of target_sparsity and target_speedup"):
        PruneConfig(target_sparsity=0.5, target_speedup=2.0)


def test_the_prune_stage_prunes_to_a_speedup_and_refuses_an_unreachable_one(tmp_path):
    """Through the stage command: `prune --target 2x` reads prune.deployment's latency model
    and reports the target and the predicted speedup of what it wrote; a speedup beyond
    the latency model's reach stops before training with one line naming the largest,
    writing nothing; a missing latency model is named with the stage that makes it."""
    import json
    import os
    import subprocess
    import sys

    from cofi.configuration_cofi import CofiConfig
    from pipeline.paths import Paths
    from tests.conftest import tiny_project

    def tiny(params):
        params["prune"].update(targets=[], speedups=[2, 1000], deployment="tiny", epochs=6, distill_epochs=1,
                               sparsity_warmup_epochs=2, batch_size=8, reg_learning_rate=0.5, evals_per_epoch=2)
        params["deployments"] = {"tiny": {"device": "cpu", "runtime": "torch", "precision": "fp32", "batch_size": 1,
                                          "sequence_length": 8, "threads": 1}}
        params["compute"]["device"] = "cpu"

    tiny_project(tmp_path, tiny)
    paths = Paths(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def prune(target: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", "prune", "--target", target], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)

    missing = prune("2x")
    assert missing.returncode == 1 and "latency/tiny.json" in missing.stderr and "profile@tiny" in missing.stderr

    config = CofiConfig.from_pretrained(paths.teacher)
    model = profile(config, Deployment(batch_size=1, sequence_length=8, threads=1), prepare=exact)
    paths.latency_model("tiny").parent.mkdir(parents=True)
    paths.latency_model("tiny").write_text(json.dumps(model.to_dict()))

    unreachable = prune("1000x")
    fastest = model.max_speedup(ModelShape.from_config(config), GateConfig().families, keep_multiple=16)
    errors = [line for line in unreachable.stderr.splitlines() if line.startswith("error:")]
    assert unreachable.returncode == 1 and len(errors) == 1, unreachable.stderr
    assert f"target_speedup=1000 cannot be reached on torch_fp32_b1_s8: the latency model allows at most {fastest:.2f}x" in errors[0]
    assert not paths.pruned(Speedup(1000)).exists() and not paths.metrics("prune", Speedup(1000)).exists()

    done = prune("2x")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(paths.metrics("prune", Speedup(2)).read_text())
    assert metrics["target_speedup"] == 2 and metrics["deployment"] == "tiny" and "target_sparsity" not in metrics
    masks = load_file(paths.pruned(Speedup(2)) / MASKS_FILE)
    shipped = compact(load_model(paths.pruned(Speedup(2))), masks)
    assert metrics["predicted_speedup"] == pytest.approx(model.speedup(Structure.of(shipped.config)), rel=1e-6)


def test_the_latency_constraint_stays_on_the_device(latency):
    """The latency of counts on the meta device (shapes only): no value is read back to the
    host and no table is built there per call; a GPU step would wait for the device otherwise."""
    counts = {k: v.to("meta") for k, v in HardConcreteGates(SHAPE, GateConfig()).deterministic_counts().items()}
    value = latency.relative_of_counts(SHAPE, counts)
    assert value.device.type == "meta" and value.shape == ()
    tables = latency._tables(counts["hidden"])
    assert latency._tables(counts["hidden"]) is tables  # built once per device and dtype
    assert "_tables_cache" not in latency.to_dict()
