"""Where a served model's time goes: per-operator time of the benchmark's own exports.

After `dvc repro` (the benchmark stage writes outputs/onnx/<model>.onnx and .int8.onnx),
runs each graph in ONNX Runtime with its profiler on, one input of batch × sequence random
tokens, and sums each operator type's time per pass (the median pass's wall time beside
it). Operators are grouped by what their cost scales with:

- ``matrix products``: the weight products (MatMul, Gemm and their int8 forms), which
  pruning heads, FFN units and hidden dimensions shrinks;
- ``attention scores``: Q·Kᵀ, softmax and ·V, which scale with the kept heads;
- ``full-width elementwise``: LayerNorm, residual adds, GELU, the embeddings and int8's
  quantize/dequantize steps, which scale with the hidden width alone;
- ``other``: shape bookkeeping (Reshape, Transpose, Cast, ...), a fixed cost per node.

    python benchmarks/profile_ops.py --models teacher cofi-0.9 --precision int8 --batch-size 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

MATRIX_PRODUCTS = {"MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul",
                   "QGemm", "QLinearMatMul"}
FULL_WIDTH = {"LayerNormalization", "SkipLayerNormalization", "Add", "Sub", "Mul", "Div", "Gelu", "BiasGelu",
              "FastGelu", "Erf", "Gather", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "Tanh",
              "EmbedLayerNormalization", "Pow", "Sqrt", "ReduceMean"}
ATTENTION = {"Softmax", "Attention", "MultiHeadAttention"}


def group_of(op: str, attention_product: bool) -> str:
    if op in MATRIX_PRODUCTS:
        return "attention scores" if attention_product else "matrix products"
    if op in ATTENTION:
        return "attention scores"
    return "full-width elementwise" if op in FULL_WIDTH else "other"


def weightless_matmuls(graph: Path) -> set[str]:
    """Names of the MatMul nodes whose inputs are both activations (Q·Kᵀ and ·V)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return {n.name for n in model.graph.node if n.op_type in MATRIX_PRODUCTS and not weights & set(n.input)}


def profile(graph: Path, batch: int, length: int, passes: int, threads: int) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feed = {"input_ids": rng.integers(1000, 20000, (batch, length), dtype=np.int64),
                "attention_mask": np.ones((batch, length), dtype=np.int64),
                "token_type_ids": np.zeros((batch, length), dtype=np.int64)}
        feed = {i.name: feed[i.name] for i in session.get_inputs()}
        for _ in range(3):
            session.run(None, feed)
        wall = []
        for _ in range(passes):
            start = time.perf_counter()
            session.run(None, feed)
            wall.append((time.perf_counter() - start) * 1e3)
        events = json.loads(Path(session.end_profiling()).read_text())
    products = weightless_matmuls(graph)
    runs = [e for e in events if e.get("name") == "model_run"][-passes:]
    first = runs[0]["ts"] if runs else 0
    by_op: dict[str, float] = defaultdict(float)
    by_group: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < first:
            continue
        op = e["args"]["op_name"]
        node = e["name"].removesuffix("_kernel_time")
        by_op[op] += e["dur"] / 1e3 / passes
        by_group[group_of(op, node in products)] += e["dur"] / 1e3 / passes
        nodes[op] += 1
    return {"wall_ms": statistics.median(wall), "by_op": dict(by_op), "by_group": dict(by_group),
            "nodes": {op: n // passes for op, n in nodes.items()}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--models", nargs="+", default=["teacher", "cofi-0.9"])
    p.add_argument("--precision", choices=["fp32", "int8"], default="int8")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--passes", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    suffix = ".int8.onnx" if args.precision == "int8" else ".onnx"
    results = {name: profile(args.project / "outputs" / "onnx" / f"{name}{suffix}", args.batch_size, args.seq_len,
                             args.passes, args.threads) for name in args.models}
    print(f"ONNX Runtime {ort.__version__} {args.precision}, batch {args.batch_size} × {args.seq_len}, "
          f"threads {args.threads or 'default'}; ms per pass (share of the summed kernel time)")
    print(f"| group | {' | '.join(args.models)} |\n|---|{'---|' * len(args.models)}")
    groups = ["matrix products", "attention scores", "full-width elementwise", "other"]
    for group in groups:
        cells = []
        for name in args.models:
            r = results[name]
            total = sum(r["by_group"].values())
            cells.append(f"{r['by_group'].get(group, 0.0):.2f} ({r['by_group'].get(group, 0.0) / total:.0%})")
        print(f"| {group} | {' | '.join(cells)} |")
    summed = [f"{sum(results[n]['by_group'].values()):.2f}" for n in args.models]
    print(f"| summed kernels | {' | '.join(summed)} |")
    walls = [f"{results[n]['wall_ms']:.2f}" for n in args.models]
    print(f"| wall, median pass | {' | '.join(walls)} |")
    print(f"| nodes | {' | '.join(str(sum(results[n]['nodes'].values())) for n in args.models)} |")
    for name in args.models:
        top = sorted(results[name]["by_op"].items(), key=lambda kv: -kv[1])[:8]
        print(f"{name}: " + ", ".join(f"{op} {ms:.2f} ms ×{results[name]['nodes'][op]}" for op, ms in top))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
