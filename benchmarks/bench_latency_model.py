"""How well the latency model (cofi/latency.py) predicts whole-model latency, and
what profiling costs, on one deployment configuration of this machine.

Profiles a random-weight model of the named shape (all-MiniLM-L6-v2's by default),
then times random compact structures (``cofi.profiling.random_structures``: from
nearly whole to nearly empty, as pruning to 1.5x or to 20x makes them) and compares
with the prediction.

    python benchmarks/bench_latency_model.py                                          # torch fp32, batch 32 x 128
    python benchmarks/bench_latency_model.py --runtime onnxruntime --batch-size 1      # ONNX Runtime, batch 1 x 128
    python benchmarks/bench_latency_model.py --shape tiny --structures 3 --repeats 1   # smoke run (the suite runs it)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cofi.benchmark import SHAPES, shape_config
from cofi.deployment import INT8_METHODS, PRECISIONS, RUNTIMES, Deployment
from cofi.profiling import check_fit, default_grids, profile, random_structures, stopwatch

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="minilm")
    p.add_argument("--runtime", choices=RUNTIMES, default="torch")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--int8", choices=INT8_METHODS, default="dynamic", help="how int8 models are quantized")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="0: the runtime's default")
    p.add_argument("--structures", type=int, default=20, help="random structures to check the fit on")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per model per round (the profile stage's)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each model's fastest timing is kept)")
    p.add_argument("--calibration", type=int, default=8, help="random structures fixing the model's scale")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = shape_config(args.shape, vocab_size=30522 if args.shape != "tiny" else 100)
    keep_multiple = 16 if args.shape != "tiny" else 4
    deployment = Deployment(args.device, args.runtime, args.precision, args.batch_size, args.seq_len, args.threads)
    prepare = stopwatch(deployment, repeats=args.repeats, int8_method=args.int8)
    start = time.perf_counter()
    model = profile(config, deployment, default_grids(config, keep_multiple), prepare=prepare, rounds=args.rounds,
                    calibration=random_structures(config, args.calibration, keep_multiple, seed=1),
                    progress=lambda m: print(f"  profile: {m}", flush=True))
    profiled = time.perf_counter() - start
    fit = check_fit(model, config, random_structures(config, args.structures, keep_multiple), prepare, args.rounds)
    checked = time.perf_counter() - start - profiled

    print(f"\n{args.shape}, {deployment.key} on {deployment.device}, hardware {model.hardware.get('cpu')}")
    print(f"unpruned model: {model.reference_ms:.2f} ms; scale {model.scale:.3f}; profile: {profiled:.1f} s; "
          f"fit check on {fit['structures']} structures: {checked:.1f} s")
    print(f"{'hidden':>6} {'heads':>6} {'units':>6} {'measured':>9} {'predicted':>9} {'error':>7}   (speedup)")
    for r in fit["rows"]:
        print(f"{r['hidden']:>6} {sum(r['heads']):>6} {sum(r['units']):>6} {r['measured_speedup']:>8.2f}x "
              f"{r['predicted_speedup']:>8.2f}x {r['relative_error']:>+7.1%}")
    print(f"worst |error| {fit['worst_relative_error']:.1%}, mean {fit['mean_relative_error']:.1%}")
    result = {"shape": args.shape, "deployment": deployment.key, "profile_s": profiled, "check_s": checked,
              "model": model.to_dict()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
