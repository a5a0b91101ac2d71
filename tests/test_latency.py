"""The latency model (cofi/latency.py): exact where the cost is what the model assumes,
a file format that round-trips, and a real profile that runs on both runtimes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from cofi import CofiConfig
from cofi.benchmark import shape_config
from cofi.deployment import Deployment
from cofi.latency import LatencyModel, Structure, fingerprint
from cofi.profiling import (check_fit, default_grids, full_structure, model_of, monotone, profile, random_structures,
                            relative_latencies)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = CofiConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)


def additive_cost(model) -> float:
    """A runtime whose latency is exactly F(d) + Σ A(h, d) + Σ B(u, d), bilinear in
    (h, d) and (u, d): what the model's tables interpolate exactly."""
    s = Structure.of(model.config)
    fixed = 1.0 + 0.01 * s.hidden
    attention = sum(0.3 + 0.002 * h * s.hidden for h in s.heads if h)
    ffn = sum(0.2 + 0.0001 * u * s.hidden + 0.001 * u for u in s.units if u)
    return fixed + attention + ffn


def exact(model):
    """A stopwatch whose every pass takes additive_cost(model) ms."""
    return lambda: additive_cost(model)


FULL_MS = additive_cost(model_of(CONFIG, full_structure(CONFIG)))


def test_an_additive_runtime_is_predicted_exactly():
    model = profile(CONFIG, Deployment(), prepare=exact)
    assert model.reference_ms == FULL_MS
    structures = random_structures(CONFIG, 20, keep_multiple=16, seed=1)
    fit = check_fit(model, CONFIG, structures, prepare=exact)
    assert fit["structures"] == 20 and fit["worst_relative_error"] <= 1e-12
    # off the grids too: widths between and beyond the measured ones
    for s in (Structure(40, (1, 3, 4), (8, 100, 128)), Structure(64, (0, 0, 0), (0, 0, 0)), Structure(24, (2, 0, 1), (0, 16, 0))):
        assert model.predict_ms(s) == pytest.approx(additive_cost(model_of(CONFIG, s)), rel=1e-12)
        assert model.speedup(s) == pytest.approx(FULL_MS / additive_cost(model_of(CONFIG, s)), rel=1e-12)
    assert model.speedup(full_structure(CONFIG)) == pytest.approx(1.0, rel=1e-12)


def test_a_removed_sublayer_costs_nothing():
    model = profile(CONFIG, Deployment(), prepare=exact)
    empty = Structure(48, (0, 0, 0), (0, 0, 0))
    assert model.predict_ms(empty) == pytest.approx(1.0 + 0.01 * 48, rel=1e-12)  # F(48) alone


def test_a_dip_in_the_measured_costs_is_smoothed_away():
    """Keeping more cannot cost less: a dip (timing noise) is pooled with its neighbours
    (isotonic regression), and a cost below 0 becomes 0."""
    assert monotone([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert monotone([0.5, 7.0, 4.0, 9.0]) == pytest.approx([0.5, 5.5, 5.5, 9.0], abs=1e-12)
    assert monotone([-0.1, 0.2]) == pytest.approx([0.0, 0.2], abs=1e-12)

    def dipping(model):  # the FFN-only model of 64 units a layer timed 2 ms cheaper than it is
        s = Structure.of(model.config)
        return lambda: additive_cost(model) - (2.0 if set(s.units) == {64} and not any(s.heads) else 0.0)

    grids = ([64], [1, 2, 4], [16, 32, 64, 128])
    model, truth = (profile(CONFIG, Deployment(), grids=grids, prepare=p) for p in (dipping, exact))
    (b16, b32, b64, b128), = truth.ffn
    dipped = b64 - 2.0 / FULL_MS / CONFIG.num_hidden_layers  # below b16: pooled with both
    pooled = (b16 + b32 + dipped) / 3
    assert model.ffn[0] == pytest.approx([pooled, pooled, pooled, b128], abs=1e-12)
    assert model.attention[0] == pytest.approx(truth.attention[0], abs=1e-12)  # nothing dips there


def test_a_slow_spell_costs_a_round_not_the_estimate():
    """Other tenants slow the machine in spells and never speed it up. Here the reference's
    first timing and the first model's rounds 2 and 3 run 1.5x slower: the fastest timings
    give the exact ratios (the median over rounds of ratios to the reference timed just
    before would read the first model 1.5x slower)."""
    passes = {"n": 0}
    slow = {0, 5, 9}  # pass numbers: per round the reference, then the three models

    def timer(cost):
        def time_once():
            passes["n"] += 1
            return cost * (1.5 if passes["n"] - 1 in slow else 1.0)
        return time_once

    ratios, reference_ms = relative_latencies([timer(c) for c in (1.0, 2.0, 3.0)], timer(10.0), rounds=3)
    assert passes["n"] == 12
    assert ratios == pytest.approx([0.1, 0.2, 0.3], rel=1e-12) and reference_ms == 10.0


def test_steady_drift_moves_ratios_by_at_most_the_drift_between_neighbours():
    """A machine that slows down by 1% on every pass: each model's fastest timing is its
    first, right after the reference's, so the ratios stay within a few passes' drift."""
    clock = {"factor": 1.0}

    def drifting(cost):
        def time_once():
            clock["factor"] *= 1.01
            return cost * clock["factor"]
        return time_once

    ratios, _ = relative_latencies([drifting(c) for c in (1.0, 2.0, 3.0)], drifting(10.0), rounds=5)
    assert ratios == pytest.approx([0.1 * 1.01, 0.2 * 1.01**2, 0.3 * 1.01**3], rel=1e-12)


def test_the_model_round_trips_through_json_and_names_its_target():
    model = profile(CONFIG, Deployment(batch_size=1), prepare=exact)
    loaded = LatencyModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert loaded == model and loaded.fingerprint == model.fingerprint
    s = random_structures(CONFIG, 1, seed=3)[0]
    assert loaded.speedup(s) == model.speedup(s)
    other = dataclasses.replace(model.deployment, runtime="onnxruntime")
    assert fingerprint(other, model.hardware) != model.fingerprint
    assert fingerprint(model.deployment, {**model.hardware, "cpu": "another CPU"}) != model.fingerprint


def test_deployment_settings_are_checked():
    with pytest.raises(ValueError, match="runtime='tensorrt'; allowed: torch, torch-compile, onnxruntime"):
        Deployment(runtime="tensorrt")
    with pytest.raises(ValueError, match="^runtime onnxruntime serves fp32 and int8, not bf16$"):
        Deployment(runtime="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="^runtime torch-compile serves fp32 and bf16, not int8$"):
        Deployment(runtime="torch-compile", precision="int8")
    with pytest.raises(ValueError, match="^runtime onnxruntime is served on the CPU here, not cuda$"):
        Deployment(device="cuda", runtime="onnxruntime")
    assert Deployment(runtime="onnxruntime", precision="int8", batch_size=1).key == "onnxruntime_int8_b1_s128"


def test_random_structures_are_what_pruning_makes():
    structures = random_structures(CONFIG, 50, keep_multiple=16, seed=0)
    assert structures == random_structures(CONFIG, 50, keep_multiple=16, seed=0)
    assert all(len(s.heads) == len(s.units) == 3 for s in structures)
    assert all(0 <= h <= 4 for s in structures for h in s.heads)
    assert all(u % 16 == 0 and 0 <= u <= 128 for s in structures for u in s.units)
    # half keep the full residual width, the rest down to the narrowest pruning keeps (16)
    assert all(s.hidden % 16 == 0 and 16 <= s.hidden <= 64 for s in structures)
    assert 15 <= sum(s.hidden == 64 for s in structures) <= 35 and any(s.hidden <= 32 for s in structures)
    assert any(0 in s.heads for s in structures) and any(0 in s.units for s in structures)


def test_random_structures_run_from_nearly_whole_to_nearly_empty():
    """The fit is checked where speed targets prune to, up to 8x and beyond: the first of
    20 structures keeps most of MiniLM's units and heads, the last a few percent."""
    minilm = shape_config("minilm")
    for seed in range(5):
        structures = random_structures(minilm, 20, keep_multiple=16, seed=seed)
        units = [sum(s.units) / (6 * 1536) for s in structures]
        heads = [sum(s.heads) / (6 * 12) for s in structures]
        assert units[0] > 0.4 and heads[0] > 0.5
        assert max(units[-3:]) < 0.12 and max(heads[-3:]) < 0.15  # a head is the least a sublayer keeps
        assert sum(units[:5]) > 5 * sum(units[-5:])


def test_default_grids_span_the_shape():
    hidden, heads, units = default_grids(CofiConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536))
    # down to the narrowest width pruning keeps: keep_multiple
    assert hidden == [16, 64, 128, 192, 288, 384] and heads[0] == 1 and heads[-1] == 12
    assert default_grids(CofiConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536), 32)[0] == [
        32, 64, 128, 192, 288, 384]
    assert units[0] == 16 and units[-1] == 1536 and all(u % 16 == 0 for u in units)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_the_latency_benchmark_runs_at_a_tiny_size(tmp_path, runtime):
    spec = importlib.util.spec_from_file_location("bench_latency_model", ROOT / "benchmarks" / "bench_latency_model.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "latency.json"
    result = bench.main(["--shape", "tiny", "--runtime", runtime, "--batch-size", "2", "--seq-len", "8",
                         "--structures", "3", "--repeats", "1", "--rounds", "1", "--threads", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["deployment"] == f"{runtime}_fp32_b2_s8" == result["deployment"]
    model = LatencyModel.from_dict(saved["model"])
    assert model.fit["structures"] == 3 and all(r["measured_speedup"] > 0 for r in model.fit["rows"])
    assert model.fingerprint == saved["model"]["fingerprint"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message of a machine without CUDA")
def test_a_cuda_deployment_without_a_gpu_is_refused_before_any_work(tmp_path):
    from pipeline.params import validate_params
    from stages import profile as profile_stage

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["deployments"] = {"gpu": {"device": "cuda", "runtime": "torch", "precision": "fp32", "batch_size": 32,
                                   "sequence_length": 128, "threads": 0}}
    with pytest.raises(ValueError, match="^deployments 'gpu': device cuda, but torch sees no CUDA GPU on this machine$"):
        profile_stage.run(validate_params(data), "gpu", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_profile_disturbed_while_its_tables_are_timed_is_measured_again(tmp_path, monkeypatch, capsys):
    """A slow spell over the first measurement's fixed-cost models (F(d) timed 3× too slow)
    spoils the fit; the stage measures the tables once more and keeps the exact second fit.
    Undisturbed, one measurement is enough."""
    from pipeline import lineage
    from pipeline.params import validate_params
    from stages import profile as profile_stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["deployments"] = {"cpu": {"device": "cpu", "runtime": "torch", "precision": "fp32", "batch_size": 1,
                                   "sequence_length": 16, "threads": 0}}
    data["prune"]["keep_multiple"] = 16
    teacher = tmp_path / "outputs" / "teacher"
    CONFIG.save_pretrained(teacher)
    lineage.write_manifest(teacher, kind="teacher", parent_dir=None, data_digest="d", mlflow_run_id=None)

    measurements = []  # one entry per profile() call: the stage's measurements of the tables
    monkeypatch.setattr(profile_stage, "profile", lambda *a, **k: measurements.append(1) or profile(*a, **k))

    def stopwatch(deployment, repeats, disturbed):
        def prepare(model):
            s = Structure.of(model.config)
            spell = disturbed and len(measurements) == 1 and not any(s.heads) and not any(s.units)
            return lambda: (3.0 if spell else 1.0) * additive_cost(model)
        return prepare

    params = validate_params(data)
    monkeypatch.setattr(profile_stage, "stopwatch", lambda d, r, int8_method: stopwatch(d, r, disturbed=True))
    metrics = profile_stage.run(params, "cpu", tmp_path)
    assert len(measurements) == 2 and metrics["measurements"] == 2
    assert "worst |error|" in capsys.readouterr().out.split("measuring the tables again")[0]
    saved = LatencyModel.from_dict(json.loads((tmp_path / "outputs" / "latency" / "cpu.json").read_text()))
    assert metrics["worst_relative_error"] == saved.fit["worst_relative_error"] <= 1e-12  # the second, exact fit

    measurements.clear()
    monkeypatch.setattr(profile_stage, "stopwatch", lambda d, r, int8_method: stopwatch(d, r, disturbed=False))
    metrics = profile_stage.run(params, "cpu", tmp_path)
    assert len(measurements) == 1 and metrics["measurements"] == 1 and metrics["worst_relative_error"] <= 1e-12
