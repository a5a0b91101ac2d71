"""Latency of a classifier's forward pass, measured the same way for every model.

Inputs are prepared beforehand; warm-up passes are discarded; each of N timed
repeats is one forward pass of a (batch, sequence) block of random tokens; the
median and interquartile range are reported. On CUDA the device is synchronised
around each pass and timed with CUDA events. ONNX Runtime sessions are timed by
the same loop, and every timing runs with freed memory kept (``keep_freed_memory``).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from cofi.allocator import keep_freed_memory
from cofi.serving import AUTOCAST, Served, serve

SHAPES = {  # the benchmarks' model shapes: hidden, layers, heads, intermediate
    "bert-base": (768, 12, 12, 3072),
    "minilm": (384, 6, 12, 1536),  # all-MiniLM-L6-v2
    "tiny": (32, 2, 4, 64),
}


def shape_config(shape: str, vocab_size: int = 30522):
    """A CoFi config of a named shape (random-weight models for timing: speed depends on shapes)."""
    from cofi.configuration_cofi import CofiConfig

    hidden, layers, heads, intermediate = SHAPES[shape]
    return CofiConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=intermediate, max_position_embeddings=512, num_labels=2)


@dataclass
class Timing:
    runtime: str  # cofi.deployment.RUNTIMES
    batch_size: int
    sequence_length: int
    precision: str
    device: str
    threads: int
    repeats: int
    median_ms: float
    q1_ms: float
    q3_ms: float

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def key(self) -> str:
        """A name for the configuration: torch_fp32_b32_s128."""
        return f"{self.runtime}_{self.precision}_b{self.batch_size}_s{self.sequence_length}"

    def as_dict(self) -> dict:
        return {**asdict(self), "iqr_ms": self.iqr_ms, "key": self.key}


def random_inputs(vocab_size: int, batch_size: int, sequence_length: int, device: torch.device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000 if vocab_size > 2000 else 1, vocab_size, (batch_size, sequence_length), generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "token_type_ids": torch.zeros_like(input_ids).to(device),
    }


def measure(call: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, float, float]:
    """(q1, median, q3) in milliseconds of ``repeats`` calls after ``warmup`` discarded ones.

    On CUDA each call is bracketed by CUDA events and the device synchronised
    after it, so the time is the GPU's, not the launch's. Freed memory is kept
    (``keep_freed_memory``) from the first call on.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; at least 1 timed repeat is needed")
    keep_freed_memory()
    samples = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            call()
            elapsed = (time.perf_counter() - t0) * 1000
        if i >= warmup:
            samples.append(elapsed)
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, median, q3


def time_forward(
    model: nn.Module,
    batch_size: int,
    sequence_length: int,
    precision: str = "fp32",
    warmup: int = 3,
    repeats: int = 10,
) -> Timing:
    """Latency of ``model``'s eager forward pass on a (batch, sequence) block of random tokens."""
    if precision not in AUTOCAST:
        raise ValueError(f"precision={precision!r}; allowed: {sorted(AUTOCAST)}")
    return time_served(serve(model, "torch", precision, next(model.parameters()).device.type), model.config.vocab_size,
                       batch_size, sequence_length, warmup, repeats)


def time_served(served: Served, vocab_size: int, batch_size: int, sequence_length: int, warmup: int = 3,
                repeats: int = 10, threads: int | None = None) -> Timing:
    """Latency of a served model (cofi.serving: any runtime and precision) on a (batch,
    sequence) block of random tokens; a compiled model is compiled for that shape first,
    outside the timing. ``threads``: the runtime's thread count, for the record (torch's own
    count when None)."""
    device = torch.device(served.device)
    call = served.bind(random_inputs(vocab_size, batch_size, sequence_length, device))
    q1, median, q3 = measure(call, device, warmup, repeats)
    return Timing(served.runtime, batch_size, sequence_length, served.precision, device.type,
                  torch.get_num_threads() if threads is None else threads, repeats, median, q1, q3)


def processor(env: Mapping) -> str:
    """The processor that timed, in words, from ``environment()``'s record: the GPU, or the
    CPU with its vector extensions."""
    if env.get("gpu"):
        return env["gpu"]
    return f"{env.get('cpu')} ({env['cpu_capability']})" if env.get("cpu_capability") else str(env.get("cpu"))


def environment() -> dict:
    """What a timing depends on, recorded next to every result."""
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    env = {
        "cpu": cpu,
        # the vector extensions torch uses: two CPUs of one model name ("AMD EPYC") can differ
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "allocator": "freed memory kept" if keep_freed_memory() else "the C library's default",
    }
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    return env
