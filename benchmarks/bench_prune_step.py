"""What CoFi pruning costs, and what its compact models gain, on one device.

Three measurements on a random-weight model of a named shape (BERT-base by
default: 12 layers, d=768, 12 heads, d_f=3072):

1. **Step time**: one pruning step (sampled masks, masked forward and backward,
   the Lagrangian, three optimisers) against one plain distillation step, through
   ``Trainer.train_step``, in fp32 and bf16; and a pruning step to a speedup
   target (the Lagrangian on a latency model's expected latency) against one to a
   sparsity target. The configurations are interleaved
   (one step of each per round, order rotated) so that load from other processes
   hits them alike; warm-up rounds are discarded; medians and IQRs are reported.
2. **Host-read cost**: the same pruning steps when the host reads the logged
   values after every step (``log_steps=1``, a device sync per step) against
   every 10 steps (the default).
3. **Left-out units**: a pruning step whose gates sit at each of the sparsities
   (as in 4), with the heads and FFN units whose sampled mask is 0 left out (what
   the model does) against every unit computed and masked, interleaved.
4. **Efficiency of compact models**: structures at the given sparsities (random
   gate values, shifted until the deterministic masks hit the sparsity),
   compacted, timed against the unpruned model at the paper's setting (batch 128,
   sequence 128, fp32); efficiency = measured speedup / FLOP-ratio speedup.
5. **Attention kernel in training**: a pruning step with the trainer's kernel
   rule (``cofi.trainer.training_attention``: the math kernel on CPU under bf16)
   against SDPA's own choice (without dropout, the fused kernel), interleaved,
   per precision. Where the rule is a no-op (fp32, or a GPU) the two are the same
   step and the ratio reads about 1.

The models train with ``--dropout`` (0: params.yaml's teacher.dropout, which the
students inherit), which decides SDPA's kernel: with attention dropout it takes
the math kernel anyway.

    python benchmarks/bench_prune_step.py --device cuda                 # a GPU: the paper's sizes
    python benchmarks/bench_prune_step.py --threads 1 --eval-batch 8    # this 2-core CPU
    python benchmarks/bench_prune_step.py --shape tiny --repeats 1      # smoke run (the suite runs it)
    python benchmarks/bench_prune_step.py --shape minilm --threads 2 --precision fp32 --compile \
        --read-steps 0 --sparsities                                     # compiled steps against eager ones
    python benchmarks/bench_prune_step.py --shape minilm --seq-len 16 --read-steps 0 --sparsities \
        --repeats 30 --warmup 5                                         # the kernel rule at SST-2's lengths
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType

import torch

from cofi import CofiForSequenceClassification, modeling_cofi, trainer as trainer_module
from cofi.batching import Collator
from cofi.benchmark import SHAPES, environment, shape_config, time_forward
from cofi.compact import compact
from cofi.distill import DistillationLoss, LayerDistillLoss, PredictionDistillLoss, default_teacher_layers
from cofi.flops import forward_flops
from cofi.gates import GateConfig, HardConcreteGates
from cofi.deployment import Deployment
from cofi.latency import LatencyModel
from cofi.profiling import default_grids
from cofi.metrics import accuracy
from cofi.sparsity import ModelShape, mask_sparsity
from cofi.trainer import TrainConfig, Trainer
from cofi.pruning import PruneConfig

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="bert-base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32, help="training batch")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=3, help="discarded rounds")
    p.add_argument("--read-steps", type=int, default=20, help="pruning steps per host-read setting (0: skip)")
    p.add_argument("--sparsities", type=float, nargs="*", default=[0.6, 0.95])
    p.add_argument("--eval-batch", type=int, default=128, help="batch of the compact-model timing (paper: 128)")
    p.add_argument("--eval-seq", type=int, default=128, help="sequence length of the compact-model timing")
    p.add_argument("--keep-multiple", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    p.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout of the trained models")
    p.add_argument("--compile", action="store_true", help="also time each step compiled (TrainConfig.compile)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def random_model(shape: str, seed: int = 0, dropout: float = 0.0) -> CofiForSequenceClassification:
    torch.manual_seed(seed)
    config = shape_config(shape)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    return CofiForSequenceClassification(config)


def flop_latency_model(config) -> LatencyModel:
    """A latency model of ``config``'s shape on the default grids whose tables are FLOP
    shares (no timing): the constraint's cost per step depends on the grids, not the values."""
    hidden, heads, units = default_grids(config)
    d, H, U, L = config.hidden_size, config.num_attention_heads, config.intermediate_size, config.num_hidden_layers
    return LatencyModel(Deployment(), {}, 1.0, hidden, heads, units, fixed=[0.05 * x / d for x in hidden],
                        attention=[[0.35 * (h / H) * (x / d) / L for h in heads] for x in hidden],
                        ffn=[[0.6 * (u / U) * (x / d) / L for u in units] for x in hidden])


def build_trainer(args: argparse.Namespace, prune: str | None, precision: str, log_steps: int = 10,
                  compile: bool = False) -> Trainer:
    """A trainer whose every step prunes (``prune``: "sparsity" or "speedup" target) or
    only distils (None), on one batch of random tokens; ``compile``: TrainConfig.compile."""
    student, teacher = random_model(args.shape, dropout=args.dropout), random_model(args.shape, dropout=args.dropout)
    layers = student.config.num_hidden_layers
    distill = DistillationLoss(PredictionDistillLoss(2.0),
                               LayerDistillLoss(student.config.hidden_size, default_teacher_layers(layers)), 0.5)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, 30522, (args.seq_len,), generator=g).tolist(), "label": i % 2}
            for i in range(args.batch_size)]  # one step per epoch
    # many epochs: the learning rate and the target sparsity stay about constant over the benchmark
    config = TrainConfig(epochs=100_000, batch_size=args.batch_size, bf16=precision == "bf16", device=args.device,
                         progress=False, log_steps=log_steps, compile=compile)
    target = {"sparsity": {"target_sparsity": 0.6},
              "speedup": {"target_speedup": 2.0, "latency": flop_latency_model(student.config)}}.get(prune)
    schedule = PruneConfig(**target, distill_epochs=0, sparsity_warmup_epochs=1_000,
                           gates=GateConfig(keep_multiple=args.keep_multiple)) if target else None
    trainer = Trainer(student, data, data[:8], config, metric_fn=accuracy, primary_metric="accuracy",
                      collate=Collator(0), teacher=teacher, distill=distill, prune=schedule)
    trainer.model.train()
    return trainer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_step(trainer: Trainer, indices: list[int], device: str) -> float:
    """ms of one training step, the device synchronised on both sides; the logged values read after."""
    sync(device)
    start = time.perf_counter()
    trainer.train_step(indices)
    sync(device)
    ms = (time.perf_counter() - start) * 1000
    trainer.read_logged()
    return ms


def summary(ms: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return {"median_ms": median, "iqr_ms": q3 - q1, "n": len(ms)}


def step_times(args: argparse.Namespace) -> dict:
    kinds = {"distill": None, "prune": "sparsity", "prune-speedup": "speedup"}
    configs = {f"{name}/{precision}": build_trainer(args, kind, precision)
               for precision in args.precision for name, kind in kinds.items()}
    if args.compile:  # the same steps compiled (their first, warm-up rounds compile them)
        configs |= {f"{name}+compiled/{precision}": build_trainer(args, kind, precision, compile=True)
                    for precision in args.precision for name, kind in kinds.items()}
    indices = list(range(args.batch_size))
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.warmup + args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            ms = timed_step(configs[name], indices, args.device)
            if r >= args.warmup:
                times[name].append(ms)
        print(f"  step round {r + 1}/{args.warmup + args.repeats}", file=sys.stderr)
    results = {name: summary(ms) for name, ms in times.items()}
    for precision in args.precision:
        median = {name: results[f"{name}/{precision}"]["median_ms"] for name in kinds}
        results[f"prune_over_distill/{precision}"] = median["prune"] / median["distill"]
        results[f"speedup_over_sparsity_target/{precision}"] = median["prune-speedup"] / median["prune"]
        if args.compile:
            for name in kinds:
                results[f"compiled_over_eager/{name}/{precision}"] = (
                    results[f"{name}+compiled/{precision}"]["median_ms"] / median[name])
    return results


def read_cost(args: argparse.Namespace) -> dict:
    """ms per pruning step, with the host reading the logged values every 1 or 10 steps."""
    precision = "bf16" if "bf16" in args.precision else "fp32"
    indices = list(range(args.batch_size))
    results = {}
    for log_steps in (1, 10):
        trainer = build_trainer(args, "sparsity", precision, log_steps)
        for _ in range(args.warmup):
            trainer.train_step(indices)
        trainer.read_logged()
        sync(args.device)
        start = time.perf_counter()
        for step in range(1, args.read_steps + 1):
            trainer.train_step(indices)
            if step % log_steps == 0:
                trainer.read_logged()
        trainer.read_logged()
        sync(args.device)
        results[f"log_steps_{log_steps}/{precision}_ms_per_step"] = (time.perf_counter() - start) * 1000 / args.read_steps
    return results


def paired_medians(trainer: Trainer, indices: list[int], args: argparse.Namespace,
                   module: ModuleType, attribute: str, choices: dict[str, object]) -> dict[str, float]:
    """Median ms per step of ``trainer`` with ``module.attribute`` set to each of two
    choices before its step, interleaved, the order alternating per round; the attribute
    is put back after."""
    names, original = list(choices), getattr(module, attribute)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for r in range(args.warmup + args.repeats):
            for name in (names if r % 2 else names[::-1]):
                setattr(module, attribute, choices[name])
                ms = timed_step(trainer, indices, args.device)
                if r >= args.warmup:
                    times[name].append(ms)
    finally:
        setattr(module, attribute, original)
    return {name: summary(ms)["median_ms"] for name, ms in times.items()}


def gates_at(shape: ModelShape, sparsity: float, keep_multiple: int) -> HardConcreteGates:
    """Random gates, shifted until their deterministic masks' sparsity is closest to ``sparsity``."""
    gates = HardConcreteGates(shape, GateConfig(keep_multiple=keep_multiple))
    g = torch.Generator().manual_seed(0)
    base = {f: torch.randn(a.shape, generator=g) * 2.0 for f, a in gates.log_alpha.items()}
    low, high = -20.0, 20.0  # log α shift: sparsity falls as it rises
    for _ in range(40):
        middle = (low + high) / 2
        with torch.no_grad():
            for f, a in gates.log_alpha.items():
                a.copy_(base[f] + middle)
        low, high = (middle, high) if mask_sparsity(shape, gates.deterministic()) > sparsity else (low, middle)
    return gates


def left_out_units(args: argparse.Namespace) -> dict:
    """ms per pruning step with gates at each sparsity: units left out against all computed."""
    precision = "bf16" if "bf16" in args.precision else "fp32"
    indices = list(range(args.batch_size))
    every_unit = lambda masks: {}  # noqa: E731  (modeling_cofi's switch: compute and mask every unit)
    left_out = modeling_cofi.computed_units
    results = {}
    for target in args.sparsities:
        trainer = build_trainer(args, "sparsity", precision)
        at = gates_at(trainer.pruning.shape, target, args.keep_multiple)
        with torch.no_grad():
            for f, a in trainer.pruning.gates.log_alpha.items():
                a.copy_(at.log_alpha[f])
        median = paired_medians(trainer, indices, args, modeling_cofi, "computed_units",
                                {"left_out": left_out, "all_computed": every_unit})
        results[f"sparsity_{target:g}"] = {
            "sparsity": float(trainer.pruning.gates.deterministic_sparsity()), **{f"{k}_ms": v for k, v in median.items()},
            "speedup": median["all_computed"] / median["left_out"]}
    return results


def attention_kernels(args: argparse.Namespace) -> dict:
    """ms per pruning step with the trainer's attention-kernel rule against SDPA's own choice."""
    indices = list(range(args.batch_size))
    rule = trainer_module.training_attention
    sdpa_choice = lambda device, bf16: nullcontext()  # noqa: E731  (no rule: SDPA picks the kernel)
    results = {}
    for precision in args.precision:
        trainer = build_trainer(args, "sparsity", precision)
        median = paired_medians(trainer, indices, args, trainer_module, "training_attention",
                                {"rule": rule, "sdpa_choice": sdpa_choice})
        results[precision] = {**{f"{k}_ms": v for k, v in median.items()},
                              "rule_over_sdpa_choice": median["rule"] / median["sdpa_choice"]}
    return results


def efficiency(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    teacher = random_model(args.shape).to(device).eval()
    shape = ModelShape.from_config(teacher.config)

    def latency(model) -> float:
        return time_forward(model, args.eval_batch, args.eval_seq, "fp32", warmup=args.warmup,
                            repeats=max(3, args.repeats)).median_ms

    base_ms, base_flops = latency(teacher), forward_flops(teacher, args.eval_seq)
    results = {"teacher_ms": base_ms}
    for target in args.sparsities:
        masks = gates_at(shape, target, args.keep_multiple).deterministic()
        small = compact(teacher, masks)
        speedup = base_ms / latency(small)
        flop_speedup = base_flops / forward_flops(small, args.eval_seq)
        results[f"sparsity_{target:g}"] = {
            "sparsity": mask_sparsity(shape, masks), "layers_kept": sum(1 for layer in small.layers
                                                                        if layer.num_heads or layer.ffn_up.out_features),
            "speedup": speedup, "flop_speedup": flop_speedup, "efficiency": speedup / flop_speedup,
        }
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    env = environment()
    print(f"device {args.device} ({env['gpu'] or env['cpu']}), {env['threads']} threads, torch {env['torch']}; "
          f"{args.shape}, training batch {args.batch_size} x {args.seq_len}, dropout {args.dropout:g}")
    results = {"environment": env, "args": {k: str(v) for k, v in vars(args).items()}}

    results["steps"] = step_times(args)
    print(f"\n{'step':28s} {'median ms':>10s} {'IQR ms':>8s}")
    for name, s in results["steps"].items():
        if isinstance(s, dict):
            print(f"{name:28s} {s['median_ms']:10.1f} {s['iqr_ms']:8.1f}")
    for precision in args.precision:
        print(f"prune / distill, {precision}: {results['steps'][f'prune_over_distill/{precision}']:.3f}; "
              f"speedup target / sparsity target: {results['steps'][f'speedup_over_sparsity_target/{precision}']:.3f}")
        if args.compile:
            print(f"compiled / eager, {precision}: " + ", ".join(
                f"{kind} {results['steps'][f'compiled_over_eager/{kind}/{precision}']:.3f}"
                for kind in ("distill", "prune", "prune-speedup")))

    results["attention_kernels"] = attention_kernels(args)
    print("\npruning steps, the trainer's attention-kernel rule against SDPA's own choice:")
    for precision, r in results["attention_kernels"].items():
        print(f"  {precision}: rule {r['rule_ms']:.1f} ms, SDPA's choice {r['sdpa_choice_ms']:.1f} ms, "
              f"ratio {r['rule_over_sdpa_choice']:.3f}")

    if args.read_steps:
        results["host_reads"] = read_cost(args)
        print("\nhost reads of the logged values:")
        for name, ms in results["host_reads"].items():
            print(f"  {name:36s} {ms:8.1f} ms/step")

    if args.sparsities:
        results["left_out_units"] = left_out_units(args)
        print(f"\npruning steps, gates at a sparsity ({'bf16' if 'bf16' in args.precision else 'fp32'}):")
        print(f"{'target':>7s} {'sparsity':>9s} {'all computed ms':>16s} {'left out ms':>12s} {'speedup':>8s}")
        for target in args.sparsities:
            r = results["left_out_units"][f"sparsity_{target:g}"]
            print(f"{target:7.2f} {r['sparsity']:9.4f} {r['all_computed_ms']:16.1f} {r['left_out_ms']:12.1f} "
                  f"{r['speedup']:7.2f}x")

        results["compact"] = efficiency(args)
        print(f"\ncompact models, fp32, batch {args.eval_batch} x {args.eval_seq} "
              f"(unpruned: {results['compact']['teacher_ms']:.1f} ms):")
        print(f"{'target':>7s} {'sparsity':>9s} {'layers':>7s} {'speedup':>8s} {'FLOP speedup':>13s} {'efficiency':>11s}")
        for target in args.sparsities:
            r = results["compact"][f"sparsity_{target:g}"]
            print(f"{target:7.2f} {r['sparsity']:9.4f} {r['layers_kept']:7d} {r['speedup']:7.2f}x "
                  f"{r['flop_speedup']:12.2f}x {r['efficiency']:11.2f}")

    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
