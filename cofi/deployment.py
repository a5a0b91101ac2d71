"""Where a model is served: the runtimes and precisions the benchmark and the latency
model know, and a deployment (one runtime and precision at one input shape on one
device).

It imports nothing heavy, so that the params schema checks a deployment without
the serving code: a DVC stage that only reads params does not depend on cofi.serving.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNTIMES = ("torch", "torch-compile", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8")
SUPPORTED = {"torch": ("fp32", "bf16"), "torch-compile": ("fp32", "bf16"), "onnxruntime": ("fp32", "int8")}
INT8_METHODS = ("dynamic", "static")  # ONNX Runtime quantization methods (cofi.quantize)


def check_supported(device: str, runtime: str, precision: str) -> None:
    """ValueError, in one line, unless ``runtime`` serves ``precision`` on ``device``."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r}; allowed: {', '.join(RUNTIMES)}")
    if precision not in SUPPORTED[runtime]:
        raise ValueError(f"runtime {runtime} serves {' and '.join(SUPPORTED[runtime])}, not {precision}")
    if runtime == "onnxruntime" and device != "cpu":
        raise ValueError(f"runtime onnxruntime is served on the CPU here, not {device}")


@dataclass(frozen=True)
class Deployment:
    """Where the compact model will serve: what the latency model is measured on."""

    device: str = "cpu"
    runtime: str = "torch"  # cofi.deployment.RUNTIMES: torch, torch-compile, onnxruntime (CPU)
    precision: str = "fp32"  # fp32, bf16 (torch runtimes), int8 (onnxruntime)
    batch_size: int = 32
    sequence_length: int = 128
    threads: int = 0  # 0: the runtime's default

    def __post_init__(self):
        check_supported(self.device, self.runtime, self.precision)

    @property
    def key(self) -> str:
        """The benchmark's name for this configuration: torch_fp32_b32_s128."""
        return f"{self.runtime}_{self.precision}_b{self.batch_size}_s{self.sequence_length}"
