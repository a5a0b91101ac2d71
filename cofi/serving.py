"""How a classifier is served on each runtime and precision.

One place turns a model (the teacher or a compact model) into what a deployment
runs, for timing it (cofi.profiling's stopwatch, the benchmark stage) and for
measuring its accuracy in that form (the benchmark stage):

  runtime        precisions   what runs
  torch          fp32, bf16   the eager module (bf16: autocast)
  torch-compile  fp32, bf16   ``torch.compile`` (inductor; on CUDA with CUDA graphs,
                              mode="reduce-overhead"), compiled on the first call
                              of each input shape
  onnxruntime    fp32, int8   the ONNX export (cofi.onnx_export), or its int8
                              quantization (cofi.quantize), in an ONNX Runtime CPU session

torch int8 (torchao) is not offered: on CPUs without int8 matrix instructions
(VNNI, AMX) torchao's int8 products run on a reference path, 30x slower than
fp32 for an FFN block (docs/experiments/int8.md); ONNX Runtime's int8 kernels
run on every x86 CPU.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from cofi.deployment import PRECISIONS, RUNTIMES, SUPPORTED, check_supported

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}

# Every compiled model shares the code of CofiForSequenceClassification.forward, whose
# compiled graphs dynamo keeps per input and weight shape, at most 8 by default: a profile
# compiles about a hundred structures, and beyond the limit dynamo would silently run
# the rest eagerly.
RECOMPILE_LIMIT = 4096


@dataclass
class Served:
    """A model in its serving form. ``bind(inputs)`` returns a call that runs one forward
    pass on those inputs (prepared once, as a server holds its buffers); ``logits(batches)``
    the logits of each batch, as CPU tensors, from one session or module that is released
    afterwards (an idle ONNX Runtime session spins its threads); ``prepare_s`` is what preparing took (export and
    quantization, or the compilation of the first input shape bound so far)."""

    runtime: str
    precision: str
    device: str
    bind: Callable[[Mapping[str, Tensor]], Callable[[], object]]
    logits: Callable[[Iterable[Mapping[str, Tensor]]], list[Tensor]]
    prepare_s: float = 0.0


def serve(model: nn.Module, runtime: str, precision: str, device: str = "cpu", onnx: Path | bytes | None = None,
          threads: int = 0, calibration: Iterable[Mapping[str, np.ndarray]] | None = None,
          int8_method: str = "dynamic") -> Served:
    """``model`` as ``runtime`` serves it in ``precision`` on ``device``.

    torch runtimes move ``model`` to ``device`` in place. onnxruntime uses ``onnx`` (an
    exported fp32 graph: its path or bytes; for int8 the fp32 graph it quantizes, or an
    already quantized graph when ``int8_method`` is "given"), else exports ``model``;
    ``calibration`` feeds static int8 quantization (cofi.quantize)."""
    check_supported(device, runtime, precision)
    if runtime == "onnxruntime":
        return _serve_onnx(model, precision, onnx, threads, calibration, int8_method)
    return _serve_torch(model.to(device).eval(), runtime, precision)


def _serve_torch(model: nn.Module, runtime: str, precision: str) -> Served:
    device = next(model.parameters()).device
    dtype = AUTOCAST[precision]
    forward = model
    if runtime == "torch-compile":
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, RECOMPILE_LIMIT)
        # static shapes: a server pads to fixed shapes, and dynamic ones compile slower kernels
        forward = torch.compile(model, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)
    served = Served(runtime, precision, device.type, bind=None, logits=None)  # type: ignore[arg-type]
    compiled_shapes: set[tuple] = set()

    @torch.inference_mode()
    def call(inputs: Mapping[str, Tensor]) -> Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return forward(**inputs).logits

    def first_call(inputs: Mapping[str, Tensor]) -> None:
        """Compiles for this input shape (torch-compile), timed into ``prepare_s``."""
        shape = tuple(inputs["input_ids"].shape)
        if runtime == "torch-compile" and shape not in compiled_shapes:
            start = time.perf_counter()
            call(inputs)
            _synchronize(device)
            served.prepare_s += time.perf_counter() - start
            compiled_shapes.add(shape)

    def bind(inputs: Mapping[str, Tensor]) -> Callable[[], object]:
        inputs = {k: v.to(device) for k, v in inputs.items()}
        first_call(inputs)
        return lambda: call(inputs)

    def logits(batches: Iterable[Mapping[str, Tensor]]) -> list[Tensor]:
        out = []
        for inputs in batches:
            inputs = {k: v.to(device) for k, v in inputs.items()}
            first_call(inputs)
            out.append(call(inputs).float())
        return [t.cpu() for t in out]  # one read of the device, at the end

    served.bind, served.logits = bind, logits
    return served


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _serve_onnx(model: nn.Module, precision: str, onnx: Path | bytes | None, threads: int,
                calibration: Iterable[Mapping[str, np.ndarray]] | None, int8_method: str) -> Served:
    from cofi.onnx_export import export_onnx, onnx_feed, onnx_session
    from cofi.quantize import quantize_onnx

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if onnx is None:
            onnx = export_onnx(copy.deepcopy(model), Path(tmp) / "model.onnx")  # the export moves it to the CPU
        graph = onnx if isinstance(onnx, bytes) else Path(onnx).read_bytes()
        if precision == "int8" and int8_method != "given":
            source = Path(tmp) / "fp32.onnx"
            source.write_bytes(graph)
            graph = quantize_onnx(source, Path(tmp) / "int8.onnx", int8_method, calibration).read_bytes()
    prepare_s = time.perf_counter() - start

    def bind(inputs: Mapping[str, Tensor]) -> Callable[[], object]:
        # a new session per binding: an idle session's threads spin after each run and take
        # the cores from the next one timed (34 live sessions: the unpruned model 3.6x slower)
        session = onnx_session(graph, threads)
        feed = onnx_feed(session, inputs)
        return lambda: session.run(None, feed)

    def logits(batches: Iterable[Mapping[str, Tensor]]) -> list[Tensor]:
        session = onnx_session(graph, threads)
        return [torch.from_numpy(session.run(["logits"], onnx_feed(session, b))[0]) for b in batches]

    return Served("onnxruntime", precision, "cpu", bind, logits, prepare_s)


def predict_served(served: Served, dataset: Sequence[Mapping], collate: Callable, batch_size: int = 128
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and gold labels of a served model on a dataset, as ``cofi.trainer.predict``
    makes them (batched by length, returned in dataset order): the accuracy of the model in
    the form it is served, int8 included."""
    from cofi.batching import batches

    order = torch.tensor(sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"])))
    inputs = [{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
              for b in batches(dataset, batch_size, collate, order)]
    logits = torch.cat(served.logits(inputs))[order.argsort()]
    preds = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
    labels = torch.tensor([dataset[i]["label"] for i in range(len(dataset))])
    return preds.numpy(), labels.numpy()
