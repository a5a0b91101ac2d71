"""int8 quantization of an exported classifier with ONNX Runtime's quantization tools.

Two methods, compared on real models in docs/experiments/int8.md:

- "dynamic": weights quantized to int8 ahead of time (per output channel); each
  activation's scale computed at run time from its range (``quantize_dynamic``).
- "static": activation scales fixed ahead of time from calibration batches, the
  training examples (``quantize_static``, QDQ format, per-channel weights).

Only the matrix products are quantized (MatMul, Gemm): LayerNorm, softmax, GELU and
the embeddings stay fp32, where int8 would cost accuracy and save little time.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from cofi.deployment import INT8_METHODS

QUANTIZED_OPS = ["MatMul", "Gemm"]


def quantize_onnx(fp32: Path, out: Path, method: str = "dynamic",
                  calibration: Iterable[Mapping[str, np.ndarray]] | None = None) -> Path:
    """Write the int8 quantization of the fp32 graph ``fp32`` to ``out``; returns ``out``.

    ``calibration`` (static only): batches of the model's inputs (input_ids, attention_mask,
    token_type_ids as arrays), e.g. tokenised training examples."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_dynamic, quantize_static)

    if method not in INT8_METHODS:
        raise ValueError(f"int8 method={method!r}; allowed: {', '.join(INT8_METHODS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the tools log advice at WARNING on the root logger
    try:
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            # shape inference and graph clean-up first, as the tools ask: better-placed quantization
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # the export has its shapes
            if method == "dynamic":
                quantize_dynamic(str(prepared), str(out), per_channel=True, weight_type=QuantType.QInt8,
                                 op_types_to_quantize=QUANTIZED_OPS)
            else:
                if calibration is None:
                    raise ValueError("static int8 quantization needs calibration batches")

                import onnx

                names = {i.name for i in onnx.load(str(prepared)).graph.input}  # an unread input is dropped

                class Feeds(CalibrationDataReader):
                    def __init__(self) -> None:
                        self.feeds = ({k: np.asarray(v, dtype=np.int64) for k, v in feed.items() if k in names}
                                      for feed in calibration)

                    def get_next(self):
                        return next(self.feeds, None)

                quantize_static(str(prepared), str(out), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=QUANTIZED_OPS, calibrate_method=CalibrationMethod.MinMax)
    finally:
        logging.getLogger().setLevel(quiet)
    return out

