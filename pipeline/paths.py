"""Where every stage reads and writes, relative to the project root (the
directory holding params.yaml and dvc.yaml, where DVC runs the commands)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

# Files a pruned model directory holds besides the model (written by stage prune, read by finetune)
MASKS_FILE, GATES_FILE, LAYER_MAP_FILE = "masks.safetensors", "gates.safetensors", "layer_map.safetensors"


@dataclass(frozen=True)
class Speedup:
    """A speedup target (one of prune.speedups) over the teacher, on prune.deployment."""

    factor: float

    def __str__(self) -> str:
        return f"{self.factor:g}x"


Target = Union[float, Speedup]  # a sparsity (one of prune.targets) or a speedup


def target_name(target: Target) -> str:
    """A target as it appears in paths and stage names: sparsity 0.6 → "0.6", speedup 2 → "2x"."""
    return str(target) if isinstance(target, Speedup) else f"{target:g}"


def parse_target(text: str) -> Target:
    """The inverse of ``target_name``: "0.6" → 0.6, "2x" → Speedup(2.0); ValueError otherwise."""
    speedup = text.endswith("x")
    try:
        value = float(text[:-1] if speedup else text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a sparsity (0.6) nor a speedup (2x)") from None
    return Speedup(value) if speedup else value


def ablation_variant(name: str) -> str:
    """The variant (see Paths) holding ablation ``name``'s models, metrics and curves."""
    return f"ablation-{name}"


class Paths:
    """``variant`` (e.g. "ablation-no_distill") keeps a variant's pruned, fine-tuned and
    compact models, metrics and curves apart from the main sweep's: its model for
    target 0.6 is named "ablation-no_distill-0.6" instead of "0.6"."""

    def __init__(self, root: Path | str = ".", variant: str | None = None):
        self.root = Path(root).resolve()
        self.variant = variant

    def model_name(self, target: Target) -> str:
        return f"{self.variant}-{target_name(target)}" if self.variant else target_name(target)

    def run_name(self, stage: str, target: Target) -> str:
        """The stage's name in MLflow and its checkpoint directory: prune@0.6."""
        return f"{stage}@{self.model_name(target)}"

    # tokenised data
    @property
    def data_dir(self) -> Path:
        return self.root / "outputs" / "data"

    def data_split(self, split: str) -> Path:
        return self.data_dir / f"{split}.parquet"

    @property
    def data_meta(self) -> Path:
        return self.data_dir / "meta.json"

    # models: each a Hugging Face directory with manifest.json
    @property
    def teacher(self) -> Path:
        return self.root / "outputs" / "teacher"

    def pruned(self, target: Target) -> Path:
        return self.root / "outputs" / "pruned" / self.model_name(target)

    def finetuned(self, target: Target) -> Path:
        return self.root / "outputs" / "finetuned" / self.model_name(target)

    def compact(self, target: Target) -> Path:
        return self.root / "outputs" / "compact" / self.model_name(target)

    def baseline(self, method: str) -> Path:
        return self.root / "outputs" / "compact" / f"baseline-{method}"

    @property
    def benchmark(self) -> Path:
        return self.root / "outputs" / "benchmark.json"

    def onnx(self, model_name: str) -> Path:
        return self.root / "outputs" / "onnx" / f"{model_name}.onnx"

    def onnx_int8(self, model_name: str) -> Path:
        return self.root / "outputs" / "onnx" / f"{model_name}.int8.onnx"

    def latency_model(self, deployment: str) -> Path:
        return self.root / "outputs" / "latency" / f"{deployment}.json"

    def benchmark_metrics(self, model_name: str) -> Path:
        return self.root / "metrics" / "benchmark" / f"{model_name}.json"

    # metrics, plots, report
    def metrics(self, stage: str, target: Target | None = None) -> Path:
        suffix = "" if target is None else f"-{self.model_name(target)}"
        return self.root / "metrics" / f"{stage}{suffix}.json"

    def curve(self, stage: str, target: Target | None = None) -> Path:
        suffix = "" if target is None else f"-{self.model_name(target)}"
        return self.root / "plots" / f"{stage}{suffix}.csv"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    # resumable training state: not a DVC output (DVC deletes outputs before a
    # stage runs), removed once the stage has finished
    def checkpoints(self, stage: str, fingerprint: str) -> Path:
        return self.root / "checkpoints" / stage / fingerprint
