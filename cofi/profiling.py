"""Measuring a latency model (cofi.latency) on one deployment.

``profile`` measures F, A and B on grids of d, h and u by timing *whole models*
whose layers are all alike: L attention-only layers of h heads take
F(d) + L·A(h, d). Every number is the runtime's own whole-model latency (PyTorch
or ONNX Runtime, through the benchmark's harness), as a fraction of the unpruned
model's latency timed in the same round, so a prediction is directly a speedup.
Each sublayer's costs are made non-decreasing in h (or u) (``monotone``); between
grid points the tables are interpolated linearly in h (or u), then in d.
``check_fit`` compares predicted and measured speedups on random structures.
"""

from __future__ import annotations

import random
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from sklearn.isotonic import isotonic_regression

from cofi.benchmark import environment, random_inputs, time_served
from cofi.compact import compact_config
from cofi.configuration_cofi import CofiConfig
from cofi.deployment import Deployment
from cofi.latency import LatencyModel, Structure
from cofi.modeling_cofi import CofiForSequenceClassification
from cofi.serving import Served, serve


def hardware_fingerprint(device: str) -> dict:
    """What the timings depend on besides the deployment config: processor (or GPU), cores, library
    versions, the allocator."""
    env = environment()
    keys = ("cpu", "cpu_capability", "cores", "torch", "onnxruntime", "gpu", "allocator")
    return {k: env[k] for k in keys if k in env} | {"device": device}


# ---- measuring ------------------------------------------------------------------------
# Other tenants slow this 2-core machine in spells of a few seconds: one pass of the
# unpruned model at batch 32 varies by 12-15% (CV), passes timed seconds apart slow
# down together (correlation 0.6-0.85), and no spell makes a pass faster than the
# machine undisturbed. So every model is timed in interleaved rounds, the unpruned
# reference every few models throughout, and a latency is a model's fastest timing:
# the least disturbed one. A spell costs a round, not a model's estimate, and a
# ratio of fastest timings is directly a speedup. Against the median of ratios to the
# reference timed just before, a repeated check moved 16-70% less (docs/experiments/latency-model-fit.md).

Stopwatch = Callable[..., Callable[[], float]]  # prepare(model, onnx=None) -> timer (a Timer, or a fake's function)


@dataclass
class Timer:
    """A model as a deployment serves it (``served``), ready to be timed: each call times it
    and returns the median of its passes, in ms."""

    served: Served
    time: Callable[[], float]

    def __call__(self) -> float:
        return self.time()
REFERENCE_EVERY = 6  # models timed per timing of the reference


def model_of(config: CofiConfig, s: Structure) -> CofiForSequenceClassification:
    """A compact model of structure ``s`` cut from ``config``'s full shape, random weights
    (latency depends on the shapes alone)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():  # a removed sublayer's empty weight "cannot be initialised"
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return CofiForSequenceClassification(compact_config(config, s.hidden, list(s.heads), list(s.units))).eval()


def full_structure(config: CofiConfig) -> Structure:
    L = config.num_hidden_layers
    return Structure(config.hidden_size, (config.num_attention_heads,) * L, (config.intermediate_size,) * L)


def stopwatch(deployment: Deployment, repeats: int = 2, warmup: int = 1, int8_method: str = "dynamic") -> Stopwatch:
    """``prepare(model, onnx=None)`` readies a model as ``deployment`` serves it (cofi.serving:
    moved to its device in place, compiled, or exported to ONNX unless ``onnx`` is its exported
    file, and quantized for int8), runs it ``warmup`` times, and returns a function timing it:
    the median of ``repeats`` passes, in ms. ONNX Runtime: a new session for each timing,
    after ``warmup`` discarded passes. Static int8 calibrates on random tokens: the scales
    change the values, not the speed."""
    if deployment.threads:
        torch.set_num_threads(deployment.threads)
    batch, length = deployment.batch_size, deployment.sequence_length

    def prepare(model: torch.nn.Module, onnx: Path | None = None) -> Timer:
        vocab = model.config.vocab_size
        calibration = [{k: v.numpy() for k, v in random_inputs(vocab, batch, length, torch.device("cpu"), seed).items()}
                       for seed in range(4)] if int8_method == "static" else None
        served = serve(model, deployment.runtime, deployment.precision, deployment.device, onnx, deployment.threads,
                       calibration, int8_method)

        def run(warmup: int, n: int) -> float:
            return time_served(served, vocab, batch, length, warmup, n).median_ms

        if deployment.runtime != "onnxruntime":  # torch: warmed up once here (and compiled)
            if warmup:
                run(warmup - 1, 1)
            return Timer(served, lambda: run(0, repeats))
        return Timer(served, lambda: run(warmup, repeats))  # a fresh session each time: warmed up each time

    return prepare


@dataclass
class Rounds:
    """Timers timed in interleaved rounds with a reference (see ``interleaved_rounds``)."""

    ms: list[list[float]]  # [timer][round]: the timer's latency
    reference_ms: list[float]  # every timing of the reference

    @property
    def relative(self) -> list[float]:
        """Each timer's fastest timing ÷ the reference's fastest (see "measuring" above)."""
        fastest = min(self.reference_ms)
        return [min(ms) / fastest for ms in self.ms]


def interleaved_rounds(timers: Sequence[Callable[[], float]], reference: Callable[[], float], rounds: int) -> Rounds:
    """Each round times the reference, then the timers in order, the reference again every
    REFERENCE_EVERY of them: every model meets every spell of the machine's in a different round."""
    ms: list[list[float]] = [[] for _ in timers]
    reference_ms: list[float] = []
    for _ in range(rounds):
        for i, time_model in enumerate(timers):
            if i % REFERENCE_EVERY == 0:
                reference_ms.append(reference())
            ms[i].append(time_model())
    if not timers:
        reference_ms = [reference() for _ in range(rounds)]
    return Rounds(ms, reference_ms)


def relative_latencies(
    timers: Sequence[Callable[[], float]], reference: Callable[[], float], rounds: int
) -> tuple[list[float], float]:
    """Each timer's latency ÷ the reference's, timed in ``rounds`` interleaved rounds
    (``Rounds.relative``); and the reference's latency in ms (its fastest timing)."""
    timed = interleaved_rounds(timers, reference, rounds)
    return timed.relative, min(timed.reference_ms)


def default_grids(config: CofiConfig, keep_multiple: int = 16) -> tuple[list[int], list[int], list[int]]:
    """Hidden widths, head counts and FFN widths to measure. The hidden widths reach down to
    the narrowest a pruned model can have (``keep_multiple``): the fixed costs at residual
    width d (embeddings, LayerNorms, residual adds) are what bounds a compact model's speed
    once heads and units are gone, so a speed target must see what narrowing d buys, and
    ``max_speedup`` is computed where the profile measured, not extrapolated."""
    d, H, U = config.hidden_size, config.num_attention_heads, config.intermediate_size
    step = max(keep_multiple, 1)

    def rounded(x: float, top: int) -> int:
        return min(top, max(step, int(round(x / step)) * step))

    hidden = sorted({rounded(d * f, d) for f in (0.0, 1 / 6, 1 / 3, 0.5, 0.75, 1.0)})
    heads = sorted({max(1, round(H * f)) for f in (1 / H, 0.25, 0.5, 0.75, 1.0)})
    units = sorted({rounded(U * f, U) for f in (1 / 96, 1 / 24, 0.125, 0.25, 0.5, 0.75, 1.0)})
    return hidden, heads, units


def monotone(costs: Sequence[float]) -> list[float]:
    """A sublayer's measured costs along its grid (more heads or units), made non-negative
    and non-decreasing by isotonic regression (a dip is averaged with its neighbours).
    Keeping more cannot cost less, so a dip is timing noise, and pruning steers into it:
    a 1,152-unit FFN timed cheaper than a 768-unit one made an 8× target overshoot to 11×."""
    return isotonic_regression(list(costs), y_min=0.0).tolist()


def profile(
    config: CofiConfig,
    deployment: Deployment,
    grids: tuple[list[int], list[int], list[int]] | None = None,
    prepare: Stopwatch | None = None,
    rounds: int = 3,
    calibration: Sequence[Structure] = (),
    progress: Callable[[str], None] = lambda _: None,
) -> LatencyModel:
    """Measure F, A and B for ``config``'s shape on ``deployment`` (see the module docstring).

    Layers of a real compact model differ, and on a CPU such a model runs a little
    faster than the sum of its parts measured in all-alike models (about 10% here:
    caches and threads are shared differently). ``calibration`` structures, timed in
    the same rounds, fix that scale: the median of measured ÷ additive prediction."""
    hidden_grid, head_grid, unit_grid = grids or default_grids(config)
    prepare = prepare or stopwatch(deployment)
    L, none = config.num_hidden_layers, (0,) * config.num_hidden_layers
    shapes = [Structure(d, none, none) for d in hidden_grid]
    shapes += [Structure(d, (h,) * L, none) for d in hidden_grid for h in head_grid]
    shapes += [Structure(d, none, (u,) * L) for d in hidden_grid for u in unit_grid]
    shapes += list(calibration)
    progress(f"preparing {len(shapes)} models")
    timers = [prepare(model_of(config, s)) for s in shapes]
    progress(f"timing them in {rounds} rounds")
    relative, reference_ms = relative_latencies(timers, prepare(model_of(config, full_structure(config))), rounds)
    n, H, U = len(hidden_grid), len(head_grid), len(unit_grid)
    fixed = relative[:n]
    attention = [monotone([(relative[n + i * H + j] - fixed[i]) / L for j in range(H)]) for i in range(n)]
    base = n + n * H
    ffn = [monotone([(relative[base + i * U + j] - fixed[i]) / L for j in range(U)]) for i in range(n)]
    model = LatencyModel(deployment, hardware_fingerprint(deployment.device), reference_ms, list(hidden_grid),
                         list(head_grid), list(unit_grid), fixed, attention, ffn)
    measured = relative[base + n * U:]
    if calibration:
        model.scale = statistics.median(m / model.additive(s) for s, m in zip(calibration, measured))
    return model


def random_structures(config: CofiConfig, n: int, keep_multiple: int = 16, seed: int = 0) -> list[Structure]:
    """``n`` structures as pruning makes them, from nearly whole to nearly empty (MiniLM
    1.4x to 21x faster here): structure i keeps a level k log-spaced from 1 down to 1/16 (a
    seeded jitter within its n-th of that range), and in each layer a sublayer is removed
    with probability (1 - k)/2, else keeps a fraction of its heads or units drawn
    uniformly in [k/2, min(1, 2k)]; half of the structures have a narrower residual
    stream, its width log-uniform between ``keep_multiple`` and the full width; widths
    rounded up to ``keep_multiple``. Speed targets reach into the nearly-empty end and
    into narrow residual streams, so the fit is checked there too."""
    rng = random.Random(seed)
    d, H, U, L = config.hidden_size, config.num_attention_heads, config.intermediate_size, config.num_hidden_layers
    step = max(keep_multiple, 1)

    def rounded_up(x: float, top: int) -> int:
        return min(top, -(-max(1, round(x)) // step) * step)

    out = []
    for i in range(n):
        k = 16.0 ** -((i + rng.random()) / n)  # log-uniform within the i-th stratum of [1/16, 1]

        def kept(top: int) -> float:
            return 0.0 if rng.random() < (1 - k) / 2 else top * rng.uniform(k / 2, min(1.0, 2 * k))

        heads = tuple(min(H, max(1, round(f))) if f else 0 for f in (kept(H) for _ in range(L)))
        units = tuple(rounded_up(f, U) if f else 0 for f in (kept(U) for _ in range(L)))
        narrowest = min(step, d)
        hidden = d if rng.random() < 0.5 else rounded_up(narrowest * (d / narrowest) ** rng.random(), d)
        out.append(Structure(hidden, heads, units))
    return out


def check_fit(
    model: LatencyModel,
    config: CofiConfig,
    structures: Sequence[Structure],
    prepare: Stopwatch | None = None,
    rounds: int = 3,
) -> dict:
    """Predicted against measured speedup over the unpruned model on ``structures``
    (timed like ``profile``); stores the summary in ``model.fit`` and returns it."""
    prepare = prepare or stopwatch(model.deployment)
    timers = [prepare(model_of(config, s)) for s in structures]
    measured, _ = relative_latencies(timers, prepare(model_of(config, full_structure(config))), rounds)
    rows = [{"hidden": s.hidden, "heads": list(s.heads), "units": list(s.units), "measured_speedup": 1 / m,
             "predicted_speedup": model.speedup(s), "relative_error": model.relative(s) / m - 1}
            for s, m in zip(structures, measured)]
    errors = [abs(r["relative_error"]) for r in rows]
    model.fit = {"structures": len(rows), "worst_relative_error": max(errors),
                 "mean_relative_error": sum(errors) / len(errors), "rows": rows}
    return model.fit
