"""Latency harness, FLOP and parameter counts, and ONNX export of compact models."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from cofi.benchmark import environment, time_forward, time_served
from cofi.compact import compact
from cofi.data import TASKS
from cofi.flops import forward_flops
from cofi.metrics import accuracy, accuracy_and_f1, matthews, paired_bootstrap
from cofi.sparsity import count_prunable_parameters

ROOT = Path(__file__).resolve().parents[1]

ort = pytest.importorskip("onnxruntime")
from cofi.onnx_export import export_onnx, max_logit_difference, onnx_session  # noqa: E402
from cofi.serving import serve  # noqa: E402
from stages.benchmark import flat_metrics, versus_teacher  # noqa: E402


@pytest.fixture
def heterogeneous():
    """A compact model with 3 heads in layer 0, none in layer 1, FFN widths 5 and 32, hidden 16 → 12."""
    model = tiny_model(seed=3).eval()
    masks = {
        "head": torch.tensor([[1.0, 0.7, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]),
        "intermediate": torch.cat([torch.tensor([[0.9] * 5 + [0.0] * 27]), torch.full((1, 32), 0.8)]),
        "hidden": torch.tensor([1.0] * 12 + [0.0] * 4),
        "ffn": torch.tensor([1.0, 0.6]),
    }
    return compact(model, masks)


def test_timing_is_well_formed_and_the_environment_recorded():
    model = tiny_model()
    for precision in ("fp32", "bf16"):
        t = time_forward(model, batch_size=2, sequence_length=8, precision=precision, warmup=1, repeats=5)
        assert (t.runtime, t.batch_size, t.sequence_length, t.precision, t.device, t.repeats) == (
            "torch", 2, 8, precision, "cpu", 5)
        assert 0 < t.q1_ms <= t.median_ms <= t.q3_ms
        assert t.iqr_ms == pytest.approx(t.q3_ms - t.q1_ms)
        assert t.threads == torch.get_num_threads()
        assert t.as_dict()["key"] == f"torch_{precision}_b2_s8"
    env = environment()
    for key in ("cpu", "cores", "threads", "torch", "transformers", "onnxruntime", "python"):
        assert env[key], key
    with pytest.raises(ValueError, match="precision='fp16'"):
        time_forward(model, 1, 8, precision="fp16")


def test_flops_and_parameters_equal_a_hand_count(heterogeneous):
    config = heterogeneous.config
    assert config.layer_num_heads == [3, 0] and config.layer_intermediate_size == [5, 32]
    C, D, T = 12, 4, 10  # kept hidden size, head size, tokens
    layer0 = 3 * 2 * T * C * (3 * D) + 2 * 2 * T * T * (3 * D) + 2 * T * (3 * D) * C + 2 * 2 * T * C * 5
    layer1 = 2 * 2 * T * C * 32  # no attention left
    head = 2 * C * 16 + 2 * 16 * 2  # pooler C → 16 (its output width is not pruned), classifier 16 → 2
    assert forward_flops(heterogeneous, T) == layer0 + layer1 + head
    # prunable weights: Q, K, V, O and FFN up, down
    assert count_prunable_parameters(heterogeneous) == 4 * C * 3 * D + 2 * C * 5 + 2 * C * 32
    full = tiny_model()
    assert forward_flops(full, T) == 2 * (3 * 2 * T * 16 * 16 + 2 * 2 * T * T * 16 + 2 * T * 16 * 16
                                          + 2 * 2 * T * 16 * 32) + 2 * 16 * 16 + 2 * 16 * 2


def test_onnx_export_of_a_heterogeneous_model_matches_pytorch(heterogeneous, tmp_path):
    path = export_onnx(heterogeneous, tmp_path / "model.onnx")
    session = onnx_session(path, threads=1)
    generator = torch.Generator().manual_seed(0)
    for batch, length in ((1, 5), (3, 17)):  # dynamic batch and sequence axes
        ids = torch.randint(2, 50, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, length // 2:] = 0  # padding
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        assert max_logit_difference(heterogeneous, session, inputs) <= 1e-5
    # the attention in its ONNX form (modeling_cofi.exported_attention): a constant scale, the mask
    # added once per score, none of the exported SDPA's run-time scale (Sqrt) and NaN guard (IsNaN, Where)
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    attending = sum(1 for heads in heterogeneous.config.layer_num_heads if heads)
    assert "IsNaN" not in ops and "Sqrt" not in ops and ops.count("Softmax") == attending > 0, sorted(set(ops))
    t = time_served(serve(heterogeneous, "onnxruntime", "fp32", onnx=path, threads=1), vocab_size=50, batch_size=2,
                    sequence_length=8, warmup=1, repeats=3, threads=1)
    assert (t.runtime, t.precision, t.key, t.threads) == ("onnxruntime", "fp32", "onnxruntime_fp32_b2_s8", 1)
    assert 0 < t.q1_ms <= t.median_ms <= t.q3_ms


def test_the_exported_attention_is_sdpas_with_the_padding_masked():
    """modeling_cofi.exported_attention, what the ONNX graph computes, against SDPA on
    scores sharp enough that attending to a padded token would show."""
    from cofi.modeling_cofi import exported_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 8, generator=g) * 3 for _ in range(3))  # (B, H, T, D)
    keep = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    keep[0, ..., 4:] = False
    keep[2, ..., 1:] = False
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(exported_attention(q, k, v, keep, 8 ** -0.5), want, rtol=1e-5, atol=1e-6)
    unmasked = exported_attention(q, k, v, torch.ones_like(keep), 8 ** -0.5)
    assert (unmasked[0] - want[0]).abs().max() > 0.1  # the padding matters here


def test_a_model_with_no_attention_left_exports_runs_and_times_in_onnx(tmp_path):
    """With every head pruned the attention mask is read by nothing, and the exporter
    drops it from the graph: feeding it anyway was an error (RTE at 90%, 0 heads)."""
    masks = {"head": torch.zeros(2, 4), "intermediate": torch.ones(2, 32), "hidden": torch.ones(16), "ffn": torch.ones(2)}
    model = compact(tiny_model(seed=3).eval(), masks)
    assert model.config.layer_num_heads == [0, 0]
    session = onnx_session(export_onnx(model, tmp_path / "model.onnx"), threads=1)
    assert "attention_mask" not in {i.name for i in session.get_inputs()}
    ids = torch.randint(2, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    assert max_logit_difference(model, session, inputs) <= 1e-5
    served = serve(model, "onnxruntime", "fp32", onnx=tmp_path / "model.onnx", threads=1)
    assert time_served(served, vocab_size=50, batch_size=2, sequence_length=8, warmup=1, repeats=2).median_ms > 0


def test_the_prune_step_benchmark_runs_at_a_tiny_size(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_prune_step", ROOT / "benchmarks" / "bench_prune_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from cofi.trainer import training_attention as rule

    out = tmp_path / "bench.json"
    assert bench.main(["--shape", "tiny", "--device", "cpu", "--batch-size", "4", "--seq-len", "8", "--repeats", "1",
                       "--warmup", "0", "--read-steps", "2", "--eval-batch", "2", "--eval-seq", "8",
                       "--keep-multiple", "4", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {"distill/fp32", "prune/fp32", "prune-speedup/fp32", "prune_over_distill/bf16",
            "speedup_over_sparsity_target/fp32"} <= set(results["steps"])
    assert set(results["host_reads"]) == {"log_steps_1/bf16_ms_per_step", "log_steps_10/bf16_ms_per_step"}
    for target in ("0.6", "0.95"):
        r = results["compact"][f"sparsity_{target}"]
        assert abs(r["sparsity"] - float(target)) <= 0.1 and r["flop_speedup"] > 1.0
        step = results["left_out_units"][f"sparsity_{target}"]
        assert abs(step["sparsity"] - float(target)) <= 0.1 and step["left_out_ms"] > 0 and step["all_computed_ms"] > 0
    for precision in ("fp32", "bf16"):
        r = results["attention_kernels"][precision]
        assert r["rule_ms"] > 0 and r["rule_over_sdpa_choice"] == r["rule_ms"] / r["sdpa_choice_ms"]
    from cofi import modeling_cofi, trainer
    assert modeling_cofi.computed_units({"intermediate": torch.ones(1, 2)}) != {}  # the switches are put back
    assert trainer.training_attention is rule


# ---- the benchmark stage's timing: interleaved rounds, the grid and every deployment -------------

def test_the_stage_measures_speedups_in_rounds_so_drift_cancels(monkeypatch):
    """A machine that slows by 5% on every timing: a model's speedup is the teacher's fastest
    timing ÷ its own, each model's first, right after the teacher's (exact: 2/g and 4/g² for
    costs 1/2 and 1/4), while its median latency drifts with the clock."""
    from types import SimpleNamespace

    from cofi.deployment import Deployment
    from cofi.profiling import Timer
    from stages import benchmark

    g, clock = 1.05, {"factor": 1.0}

    def fake_stopwatch(config, repeats, warmup, int8_method):
        def prepare(model, onnx=None):
            def time_once():
                clock["factor"] *= g
                return model.cost * clock["factor"]
            return Timer(SimpleNamespace(prepare_s=model.cost / 10), time_once)
        return prepare

    monkeypatch.setattr(benchmark, "stopwatch", fake_stopwatch)
    models = {"teacher": SimpleNamespace(cost=10.0), "a": SimpleNamespace(cost=5.0), "b": SimpleNamespace(cost=2.5)}
    config = Deployment("cpu", "torch", "fp32", 1, 16, 1)
    timed = benchmark.time_configuration(models, {}, config, SimpleNamespace(rounds=5, repeats=2, warmup=1, int8="dynamic"))
    assert timed["teacher"]["speedup"] == 1.0
    assert timed["a"]["speedup"] == pytest.approx(2 / g, rel=1e-12)
    assert timed["b"]["speedup"] == pytest.approx(4 / g**2, rel=1e-12)
    assert timed["a"]["median_ms"] == pytest.approx(5.0 * g ** (3 * 2 + 2), rel=1e-12)  # round 3's second timing
    assert timed["a"]["q1_ms"] < timed["a"]["median_ms"] < timed["a"]["q3_ms"]
    assert timed["b"]["fastest_ms"] == pytest.approx(2.5 * g ** 3, rel=1e-12)  # round 1, third timing
    assert [timed[n]["prepare_s"] for n in ("teacher", "a", "b")] == [1.0, 0.5, 0.25]
    assert {t["rounds"] for t in timed.values()} == {5} and {t["batch_size"] for t in timed.values()} == {1}


def test_the_stage_times_the_grid_then_every_deployment_in_its_own_configuration():
    import yaml

    from pipeline.params import validate_params
    from stages.benchmark import configurations

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["benchmark"].update(batch_sizes=[1, 32], sequence_lengths=[128], runtimes=["torch", "torch-compile", "onnxruntime"],
                               precisions=["fp32", "int8"])
    params["deployments"] = {"ort-b1": {"device": "cpu", "runtime": "onnxruntime", "precision": "int8", "batch_size": 1,
                                        "sequence_length": 64, "threads": 1}}
    configs = configurations(validate_params(params), torch.device("cpu"), threads=2)
    # each runtime in the precisions it serves: int8 only on ONNX Runtime
    assert list(configs) == ["torch_fp32_b1_s128", "torch-compile_fp32_b1_s128", "onnxruntime_fp32_b1_s128",
                             "onnxruntime_int8_b1_s128", "torch_fp32_b32_s128", "torch-compile_fp32_b32_s128",
                             "onnxruntime_fp32_b32_s128", "onnxruntime_int8_b32_s128", "ort-b1"]
    assert {c.threads for c, _ in list(configs.values())[:-1]} == {2}
    deployment, name = configs["ort-b1"]
    assert name == "ort-b1" and (deployment.runtime, deployment.precision, deployment.sequence_length,
                                 deployment.threads) == ("onnxruntime", "int8", 64, 1)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_timed_only_where_the_device_runs_it_natively(monkeypatch, native):
    import yaml

    from pipeline.params import validate_params
    from stages.benchmark import configurations

    monkeypatch.setattr("stages.benchmark.supports_bf16", lambda device: native)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["benchmark"].update(batch_sizes=[32], sequence_lengths=[128], runtimes=["torch", "torch-compile"],
                               precisions=["fp32", "bf16"])
    params["deployments"] = {"cpu-bf16": {"device": "cpu", "runtime": "torch", "precision": "bf16", "batch_size": 1,
                                          "sequence_length": 64, "threads": 1}}
    configs = configurations(validate_params(params), torch.device("cpu"), threads=2)
    # a deployment is timed as named, even in emulated bf16: the user serves there
    assert list(configs) == (["torch_fp32_b32_s128"] + ["torch_bf16_b32_s128"] * native + ["torch-compile_fp32_b32_s128"]
                             + ["torch-compile_bf16_b32_s128"] * native + ["cpu-bf16"])


@pytest.mark.parametrize(("runtime", "precision", "message"), [
    ("torch", "int8", "deployments.bad: runtime torch serves fp32 and bf16, not int8"),
    ("onnxruntime", "bf16", "deployments.bad: runtime onnxruntime serves fp32 and int8, not bf16"),
    ("tensorrt", "fp32", "deployments.bad.runtime"),
])
def test_a_deployment_a_runtime_does_not_serve_is_refused_naming_it(runtime, precision, message):
    import yaml

    from pipeline.params import ParamsError, validate_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["deployments"] = {"bad": {"device": "cpu", "runtime": runtime, "precision": precision, "batch_size": 1,
                                     "sequence_length": 64, "threads": 1}}
    with pytest.raises(ParamsError, match=re.escape(message)):
        validate_params(params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_gpu_deployment_on_a_machine_without_one_is_refused_in_one_line():
    import yaml

    from pipeline.params import validate_params
    from stages.benchmark import configurations

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["deployments"] = {"gpu-b32": {"device": "cuda", "runtime": "torch", "precision": "bf16", "batch_size": 32,
                                         "sequence_length": 128, "threads": 0}}
    with pytest.raises(ValueError, match=r"^deployments 'gpu-b32': device cuda, but torch sees no CUDA GPU on this machine$"):
        configurations(validate_params(params), torch.device("cpu"), threads=2)


def paired_se(preds: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> float:
    """The standard error of a paired accuracy difference (McNemar's counts): the normal
    approximation the bootstrap should agree with on a large set."""
    n = len(labels)
    gained = int(((preds == labels) & (reference != labels)).sum())  # model right, teacher wrong
    lost = int(((preds != labels) & (reference == labels)).sum())
    return math.sqrt(gained + lost - (gained - lost) ** 2 / n) / n


@pytest.mark.parametrize("classes", [2, 3])
def test_accuracy_f1_and_matthews_are_scikit_learns_exactly(classes):
    """The numpy metrics the bootstrap calls thousands of times equal scikit-learn's to the last
    bit, on random sets and on the degenerate ones (one class only, no positives, all wrong)."""
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(classes)
    sets = [(rng.integers(0, classes, n), rng.integers(0, classes, n)) for n in (1, 2, 7, 100, 872)]
    sets += [(np.zeros(9, int), np.zeros(9, int)), (np.zeros(9, int), np.ones(9, int)),
             (np.ones(9, int), np.zeros(9, int)), (np.arange(9) % 2, 1 - np.arange(9) % 2)]
    for preds, labels in sets:
        assert matthews(preds, labels)["matthews"] == sklearn_metrics.matthews_corrcoef(labels, preds)
        if classes == 2:
            ours = accuracy_and_f1(preds, labels)
            assert ours["accuracy"] == sklearn_metrics.accuracy_score(labels, preds)
            assert ours["f1"] == sklearn_metrics.f1_score(labels, preds, zero_division=0.0)
        else:
            assert accuracy(preds, labels)["accuracy"] == sklearn_metrics.accuracy_score(labels, preds)


def test_the_paired_bootstrap_interval_is_the_paired_normal_interval_on_sst2_sized_sets():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 872)
    teacher = labels.copy()
    teacher[:100] ^= 1  # the teacher misses 0–99
    model = labels.copy()
    model[50:160] ^= 1  # the model misses 50–159: 50 gained, 60 lost
    low, high = paired_bootstrap(accuracy, "accuracy", model, teacher, labels, resamples=4000)
    difference, se = -10 / 872, paired_se(model, teacher, labels)
    assert (low, high) == pytest.approx((difference - 1.96 * se, difference + 1.96 * se), abs=0.1 * 1.96 * se)
    assert low < 0 < high  # 10 sentences of 872: not told apart
    assert paired_bootstrap(accuracy, "accuracy", model, teacher, labels, resamples=4000) == (low, high)  # seeded
    # the same predictions differ by exactly 0 in every draw
    assert paired_bootstrap(accuracy, "accuracy", teacher, teacher, labels) == (0.0, 0.0)
    # pairing makes it narrower than the interval of two independent accuracies would be
    unpaired = [accuracy(p, labels)["accuracy"] for p in (model, teacher)]
    assert high - low < 0.85 * 2 * 1.96 * math.sqrt(sum(a * (1 - a) for a in unpaired) / 872)


def test_the_difference_from_the_teacher_is_exact_and_flattened_for_dvc_and_mlflow():
    labels = np.array([0, 1] * 20)
    teacher, model = labels.copy(), labels.copy()
    teacher[:4] ^= 1
    model[:10] ^= 1
    versus = versus_teacher(TASKS["sst2"], model, teacher, labels)
    assert versus["difference"] == accuracy(model, labels)["accuracy"] - accuracy(teacher, labels)["accuracy"]
    assert versus["difference"] == pytest.approx(-6 / 40)
    low, high = versus["ci95"]
    assert low <= versus["difference"] <= high < 0  # every miss of the teacher is one of the model's too
    flat = flat_metrics({"accuracy": 0.75, "sparsity": 0.5, "parameters": 1, "prunable_parameters": 1,
                         "nonzero_prunable_parameters": 1, "flops": {}, "timings": [], "vs_teacher": versus,
                         "by_precision": {}, "best": []}, "accuracy")
    assert (flat["accuracy_vs_teacher"], flat["accuracy_vs_teacher_ci95_low"], flat["accuracy_vs_teacher_ci95_high"]) \
        == (versus["difference"], low, high)


# ---- serving: every runtime computes the eager model's function; int8 is really int8 ------------

def test_a_compiled_model_computes_the_eager_models_logits_and_reports_its_compile_time(heterogeneous):
    inputs = {"input_ids": torch.randint(2, 50, (2, 8), generator=torch.Generator().manual_seed(1))}
    inputs.update(attention_mask=torch.ones_like(inputs["input_ids"]), token_type_ids=torch.zeros_like(inputs["input_ids"]))
    inputs["attention_mask"][1, 5:] = 0
    eager = serve(heterogeneous, "torch", "fp32").logits([inputs])[0]
    with torch.no_grad():
        assert torch.equal(eager, heterogeneous(**inputs).logits)
    compiled = serve(heterogeneous, "torch-compile", "fp32")
    assert compiled.prepare_s == 0.0  # compiled on the first call of a shape, not before
    assert (compiled.logits([inputs])[0] - eager).abs().max() <= 1e-5
    first = compiled.prepare_s
    assert first > 0
    compiled.logits([inputs])  # the same shape: no second compilation
    assert compiled.prepare_s == first


def test_int8_graphs_hold_int8_products_and_stay_close_to_fp32(heterogeneous, tmp_path):
    """Dynamic int8 replaces every MatMul with an integer one; static puts QDQ pairs around
    them from calibration ranges. Both stay within 15% of the fp32 logits' largest magnitude
    (a tiny random model: its logits are about 0.02, and int8 rounding is relative)."""
    import onnx

    from cofi.quantize import quantize_onnx

    fp32 = export_onnx(heterogeneous, tmp_path / "model.onnx")
    generator = torch.Generator().manual_seed(0)
    feeds = [{"input_ids": torch.randint(2, 50, (4, 12), generator=generator)} for _ in range(4)]
    for f in feeds:
        f.update(attention_mask=torch.ones_like(f["input_ids"]), token_type_ids=torch.zeros_like(f["input_ids"]))
    calibration = [{k: v.numpy() for k, v in f.items()} for f in feeds]
    reference = torch.cat(serve(heterogeneous, "onnxruntime", "fp32", onnx=fp32, threads=1).logits(feeds))
    ops = {}
    for method in ("dynamic", "static"):
        path = quantize_onnx(fp32, tmp_path / f"{method}.onnx", method, calibration if method == "static" else None)
        ops[method] = [n.op_type for n in onnx.load(str(path)).graph.node]
        int8 = torch.cat(serve(heterogeneous, "onnxruntime", "int8", onnx=path, threads=1, int8_method="given").logits(feeds))
        assert not torch.equal(int8, reference)  # it is not the fp32 graph
        assert (int8 - reference).abs().max() <= 0.15 * reference.abs().max(), method
    graph = onnx.load(str(fp32)).graph
    weights = {i.name for i in graph.initializer}
    products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    of_weights = sum(any(i in weights for i in n.input) for n in products)
    assert of_weights == 10 and len(products) == 12  # Q, K, V, O, up, down; FFN up, down; pooler; classifier; QKᵀ, PV
    # dynamic: each product with a weight becomes an integer one; the two of activations stay fp32
    assert ops["dynamic"].count("MatMulInteger") == of_weights and ops["dynamic"].count("MatMul") == 2
    # static: every product keeps its op, its inputs quantized and dequantized around it
    assert ops["static"].count("MatMul") + ops["static"].count("Gemm") == 12
    assert ops["static"].count("DequantizeLinear") >= 2 * 12
    with pytest.raises(ValueError, match="static int8 quantization needs calibration batches"):
        quantize_onnx(fp32, tmp_path / "x.onnx", "static")


def test_best_against_best_is_the_teachers_fastest_over_each_models_fastest():
    """Per batch size, each model's fastest configuration against the teacher's fastest (in
    any runtime and precision), with the metric measured in the winning precision."""
    from stages.benchmark import add_best, flat_metrics

    def timing(runtime, precision, batch, ms):
        return {"runtime": runtime, "precision": precision, "device": "cpu", "batch_size": batch, "sequence_length": 128,
                "key": f"{runtime}_{precision}_b{batch}_s128", "fastest_ms": ms, "median_ms": ms, "iqr_ms": 0.0,
                "speedup": 1.0, "efficiency": 1.0, "prepare_s": 0.0}

    models = {
        "teacher": {"timings": [timing("torch", "fp32", 1, 40.0), timing("onnxruntime", "int8", 1, 10.0),
                                timing("torch", "fp32", 32, 400.0), timing("torch-compile", "bf16", 32, 100.0)],
                    "by_precision": {"fp32": {"accuracy": 0.90}, "int8": {"accuracy": 0.89}, "bf16": {"accuracy": 0.91}}},
        "small": {"timings": [timing("torch", "fp32", 1, 5.0), timing("onnxruntime", "int8", 1, 2.0),
                              timing("torch", "fp32", 32, 20.0), timing("torch-compile", "bf16", 32, 25.0)],
                  "by_precision": {"fp32": {"accuracy": 0.88}, "int8": {"accuracy": 0.86}, "bf16": {"accuracy": 0.87}}},
    }
    add_best(models, "accuracy")
    best = {b["batch_size"]: b for b in models["small"]["best"]}
    assert (best[1]["key"], best[1]["teacher_key"], best[1]["speedup"]) == ("onnxruntime_int8_b1_s128",
                                                                          "onnxruntime_int8_b1_s128", 5.0)
    assert best[1]["accuracy"] == 0.86 and best[1]["accuracy_vs_teacher"] == pytest.approx(-0.04)
    # at batch 32 the model is fastest in eager fp32, the teacher compiled in bf16: 100 / 20
    assert (best[32]["key"], best[32]["teacher_key"], best[32]["speedup"]) == ("torch_fp32_b32_s128",
                                                                             "torch-compile_bf16_b32_s128", 5.0)
    assert best[32]["accuracy"] == 0.88
    assert {b["speedup"] for b in models["teacher"]["best"]} == {1.0}
    entry = {"accuracy": 0.88, "sparsity": 0.9, "parameters": 1, "prunable_parameters": 1, "nonzero_prunable_parameters": 1,
             "flops": {}, "timings": [], "by_precision": {"fp32": models["small"]["by_precision"]["fp32"]},
             "best": models["small"]["best"]}
    flat = flat_metrics(entry, "accuracy")
    assert (flat["best_speedup_b1_s128"], flat["best_ms_b1_s128"], flat["best_accuracy_b32_s128"]) == (5.0, 2.0, 0.88)
