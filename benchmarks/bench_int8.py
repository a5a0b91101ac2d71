"""int8 with ONNX Runtime: dynamic against static quantization, on a project's real models.

After `dvc repro` (the benchmark stage exports every model to outputs/onnx/<model>.onnx),
quantizes each fp32 graph both ways (cofi.quantize: "dynamic"; "static", calibrated on
the first training examples as the benchmark stage calibrates), then measures, per model
and method, the dev metric with its difference from the model's own fp32 (95%
paired-bootstrap interval), and the latency at each batch size, fp32 and both int8
graphs timed in interleaved rounds (fastest round kept, as the benchmark does). Also
times ONNX Runtime's transformer graph optimizer (``onnxruntime.transformers.optimizer``,
fusing attention, LayerNorm + residual and bias + GELU) on the fp32 graph ("fp32-fused"),
against the session's own ORT_ENABLE_ALL optimizations that every graph gets, and
reports which fused operators it inserted.

    python benchmarks/bench_int8.py                          # the project in the current directory
    python benchmarks/bench_int8.py --models teacher cofi-0.9 --batch-sizes 1 32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from cofi.benchmark import environment, processor
from cofi.deployment import INT8_METHODS, Deployment
from cofi.profiling import interleaved_rounds, stopwatch
from cofi.metrics import paired_bootstrap
from cofi.quantize import quantize_onnx
from cofi.serving import predict_served, serve
from pipeline.params import load_params
from pipeline.paths import Paths
from pipeline.runtime import collator, load_stage_data, task_spec_of
from stages.benchmark import calibration_batches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--models", nargs="*", default=None, help="names in outputs/onnx (default: every fp32 export)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    paths = Paths(args.project)
    params = load_params(args.project / "params.yaml")
    spec, metric = task_spec_of(params), task_spec_of(params).primary_metric
    data = load_stage_data(paths)
    collate = collator(data.meta["pad_token_id"])
    calibration = calibration_batches(data.train, collate)
    onnx_dir = paths.onnx("x").parent
    names = args.models or sorted(p.stem for p in onnx_dir.glob("*.onnx") if ".int8" not in p.name)
    results: dict = {"environment": environment(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {}
        for name in names:
            fp32 = paths.onnx(name)
            graphs[name] = {"fp32": fp32, **{m: quantize_onnx(fp32, Path(tmp) / f"{name}.{m}.onnx", m, calibration)
                                             for m in INT8_METHODS}}
            graphs[name]["fp32-fused"], fused_ops = transformer_optimized(fp32, Path(tmp) / f"{name}.fused.onnx")
            served = {k: serve(None, "onnxruntime", "fp32" if k == "fp32" else "int8", onnx=g, threads=args.threads,
                               int8_method="given") for k, g in graphs[name].items()}
            preds = {k: predict_served(s, data.validation, collate)[0] for k, s in served.items()}
            labels = predict_served(served["fp32"], data.validation, collate)[1]
            entry = results["models"][name] = {"metric": {}, "ms": {}, "fused_ops": fused_ops}
            for k, p in preds.items():
                value = spec.metric_fn(p, labels)[metric]
                low, high = paired_bootstrap(spec.metric_fn, metric, p, preds["fp32"], labels)
                entry["metric"][k] = {metric: value, "vs_fp32": value - spec.metric_fn(preds["fp32"], labels)[metric],
                                      "ci95": [low, high]}
        for batch in args.batch_sizes:
            for precision, methods in (("fp32", ["fp32", "fp32-fused"]), ("int8", list(INT8_METHODS))):
                prepare = stopwatch(Deployment("cpu", "onnxruntime", precision, batch, args.seq_len, args.threads),
                                    args.repeats, 1, int8_method="given")
                for method in methods:
                    timers = {n: prepare(_vocab_stub(paths, n), graphs[n][method]) for n in names}
                    timed = interleaved_rounds(list(timers.values()), lambda: 0.0, args.rounds)
                    for n, ms in zip(timers, timed.ms):
                        results["models"][n]["ms"][f"{method}_b{batch}"] = min(ms)
    print(f"\nONNX Runtime int8 on {processor(results['environment'])}, sequence {args.seq_len}, fastest of "
          f"{args.rounds} rounds of {args.repeats} passes; {metric} on the dev set, difference from the model's fp32 "
          "[95% paired bootstrap], points")
    kinds = ("fp32", "fp32-fused", *INT8_METHODS)
    header = ["model"] + [f"{m} {metric}" for m in ("fp32", *INT8_METHODS)]
    header += [f"{m} b{b} ms" for b in args.batch_sizes for m in kinds] + ["fused operators"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, entry in results["models"].items():
        cells = [name, f"{100 * entry['metric']['fp32'][metric]:.2f}"]
        for m in INT8_METHODS:
            e = entry["metric"][m]
            cells.append(f"{100 * e[metric]:.2f} ({100 * e['vs_fp32']:+.2f} [{100 * e['ci95'][0]:+.2f}, "
                         f"{100 * e['ci95'][1]:+.2f}])")
        cells += [f"{entry['ms'][f'{m}_b{b}']:.1f}" for b in args.batch_sizes for m in kinds]
        cells.append(", ".join(f"{op} {n}" for op, n in sorted(entry["fused_ops"].items())) or "none")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def transformer_optimized(fp32: Path, out: Path) -> tuple[Path, dict[str, int]]:
    """The fp32 graph after ONNX Runtime's BERT graph optimizer (num_heads and hidden_size
    read from the graph: the layers of a compact model differ), and its fused operators."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(fp32), model_type="bert", num_heads=0, hidden_size=0, opt_level=1)
    optimized.save_model_to_file(str(out))
    fused = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "BiasGelu", "FastGelu",
             "Gelu", "EmbedLayerNormalization")
    ops = [n.op_type for n in optimized.model.graph.node]
    return out, {op: ops.count(op) for op in fused if op in ops}


def _vocab_stub(paths: Paths, name: str) -> torch.nn.Module:
    """What the stopwatch reads of a model it is given a graph for: the vocabulary size."""
    config = json.loads((paths.teacher / "config.json").read_text())
    stub = torch.nn.Module()
    stub.config = type("Config", (), {"vocab_size": config["vocab_size"]})()
    return stub


if __name__ == "__main__":
    main()
