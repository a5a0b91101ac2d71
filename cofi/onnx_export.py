"""ONNX export of a compact classifier, checked against PyTorch and timed with ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cofi.manifest import atomic_write

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class _LogitsOnly(nn.Module):
    """The classifier as a plain (input_ids, attention_mask, token_type_ids) → logits function."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids, attention_mask, token_type_ids).logits


def labels_path(path: Path) -> Path:
    """Where the label names of an exported model sit: ``model.onnx`` → ``model.labels.json``."""
    return path.with_suffix(".labels.json")


def export_onnx(model: nn.Module, path: Path, opset: int = 17) -> Path:
    """Export with dynamic batch and sequence axes (fp32, on CPU); returns ``path``.

    The graph's output is the logits; the class names of its columns (the model's
    ``id2label`` and ``label2id``) are written beside it, see ``labels_path``."""
    model = model.float().cpu().eval()
    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        _LogitsOnly(model), example, str(path), input_names=list(INPUT_NAMES), output_names=["logits"],
        dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=opset, dynamo=False,
    )
    id2label = {int(i): name for i, name in model.config.id2label.items()}
    labels = {"id2label": {str(i): id2label[i] for i in sorted(id2label)}, "label2id": {n: i for i, n in id2label.items()}}
    atomic_write(labels_path(path), json.dumps(labels, indent=2) + "\n")
    return path


def onnx_session(model: Path | bytes, threads: int = 0):
    """An ONNX Runtime CPU session of a model file (or its bytes); ``threads`` 0 lets ORT choose."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_feed(session, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The inputs the session's graph declares. The exporter drops an input the model
    never reads: a compact model with no attention head left has no attention_mask."""
    return {i.name: inputs[i.name].cpu().numpy() for i in session.get_inputs()}


def onnx_logits(session, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    return session.run(["logits"], onnx_feed(session, inputs))[0]


@torch.inference_mode()
def max_logit_difference(model: nn.Module, session, inputs: dict[str, torch.Tensor]) -> float:
    """max |logits(ONNX Runtime) − logits(PyTorch fp32)| on ``inputs``."""
    model = model.float().cpu().eval()
    reference = model(**{k: v.cpu() for k, v in inputs.items()}).logits.numpy()
    return float(np.abs(onnx_logits(session, inputs) - reference).max())
