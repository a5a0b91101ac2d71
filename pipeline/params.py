"""The schema of params.yaml: every stage validates the whole file before doing any work.

``load_params`` reads and validates; on failure it raises ``ParamsError`` listing every
problem, one per line, as ``dotted.key[i] = value: what is allowed``. Validation is
strict: unknown keys, wrong types (``"0.6"`` is not a number, ``true`` is not an
integer) and out-of-range values are all errors. Cross-field rules run once the
fields of their section are valid.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from cofi.ablations import ABLATIONS
from cofi.data import TASKS
from cofi.metrics import METRICS
from cofi.deployment import INT8_METHODS, PRECISIONS, RUNTIMES, check_supported
from pipeline.paths import Speedup, Target


class ParamsError(ValueError):
    """Invalid parameters; ``problems`` holds one line per problem."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


# ---- field types ---------------------------------------------------------------------


def _unique(values: list) -> list:
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise PydanticCustomError("unique", f"must not repeat {', '.join(map(repr, repeated))}")
    return values


def _increasing(values: list) -> list:
    if any(a >= b for a, b in zip(values, values[1:])):
        raise PydanticCustomError("increasing", "must be strictly increasing")
    return values


def _unique_list(item: Any, **length: int) -> Any:
    """A list of ``item`` with at least one element and no repeats."""
    return Annotated[list[item], Field(min_length=1, **length), AfterValidator(_unique)]


def _epochs_per_target(allow_zero: bool) -> Callable[[Any], float | dict[float, float]]:
    """A validator of epochs per target: one number for every target, or a map target → epochs
    (read with epochs_at). allow_zero: 0 is valid and means no training."""
    bound = ">= 0" if allow_zero else "> 0"

    def check(value: Any) -> float | dict[float, float]:
        per_target = isinstance(value, Mapping)
        if per_target and not value:
            raise PydanticCustomError("per_target", "must be a number of epochs or a map with at least one target")
        for target, epochs in value.items() if per_target else [(None, value)]:
            entry = f"entry {target!r} " if per_target else ""
            if per_target and (isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1):
                raise PydanticCustomError("per_target", f"key {target!r} must be a target sparsity in [0, 1)")
            if isinstance(epochs, bool) or not isinstance(epochs, (int, float)):
                raise PydanticCustomError("per_target", f"{entry}must be a number of epochs, not {_kind(epochs)}")
            if not math.isfinite(epochs):
                raise PydanticCustomError("per_target", f"{entry}must be a finite number")
            if epochs < 0 or (epochs == 0 and not allow_zero):
                raise PydanticCustomError("per_target", f"{entry}must be {bound}")
        return {float(t): float(e) for t, e in value.items()} if per_target else float(value)

    return check


def epochs_at(epochs: float | dict[float, float], target: Target) -> float:
    """The epochs of ``target`` from a validated epochs-per-target value: the number, or the
    map's entry for ``target``, linear between the two nearest entries, the nearest one
    beyond them. A speedup k takes the epochs of sparsity 1 − 1/k (the map's keys are sparsities)."""
    if not isinstance(epochs, dict):
        return epochs
    if isinstance(target, Speedup):
        target = 1 - 1 / target.factor
    points = sorted(epochs.items())
    below = [p for p in points if p[0] <= target] or points[:1]
    above = [p for p in points if p[0] >= target] or points[-1:]
    (t0, e0), (t1, e1) = below[-1], above[0]
    return e0 if t1 == t0 else e0 + (e1 - e0) * (target - t0) / (t1 - t0)


Text = Annotated[str, Field(min_length=1)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Ratio = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)
Count = Annotated[int, Field(ge=1)]
Threads = Annotated[int, Field(ge=0)]  # 0: torch's default

Task = Literal[(*TASKS, "custom")]
Metric = Literal[tuple(METRICS)]
# The names of cofi.sparsity.FAMILIES and cofi.lagrangian.RAMPS (tests/test_params.py holds them
# equal), written out so that the schema, which every stage runs, imports no pruning code
Family = Literal["hidden", "head", "mha", "intermediate", "ffn"]
Ramp = Literal["linear", "cubic"]


# ---- sections ------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class CustomData(_Section):
    dataset: Text | None = None  # data.source "hub": a Hub dataset id (or a local dataset directory)
    dataset_config: Text | None = None  # the Hub dataset's config (subset), if it has several
    train: Text  # a file in data.source, or a split name of the Hub dataset
    validation: Text
    text_columns: _unique_list(Text, max_length=2)  # one sentence, or a pair
    label_column: Text
    labels: Annotated[list[Text], Field(min_length=2), AfterValidator(_unique)] | None = None  # class names in id order
    metric: Metric

    @model_validator(mode="after")
    def _labels_for_classification(self) -> CustomData:
        if self.labels is not None and self.metric == "pearson_spearman":
            raise PydanticCustomError(
                "conflict",
                "data.custom.labels is set but data.custom.metric is 'pearson_spearman' (regression, one number "
                "per example); set data.custom.labels: null, or a classification metric",
            )
        return self


class Data(_Section):
    task: Task
    source: Text  # "hub", or a directory: a GLUE copy in the Hub's nyu-mll/glue layout, or your files
    custom: CustomData | None
    max_length: Annotated[int, Field(ge=8, le=512)]
    train_limit: Count | None

    @model_validator(mode="after")
    def _custom_iff_task_custom(self) -> Data:
        if self.task == "custom" and self.custom is None:
            raise PydanticCustomError(
                "conflict",
                "data.task 'custom' requires data.custom (train, validation, text_columns, label_column, metric), "
                "but data.custom is null",
            )
        if self.task != "custom" and self.custom is not None:
            raise PydanticCustomError(
                "conflict",
                f"data.custom is set but data.task is {self.task!r}; set data.custom: null, or data.task: custom",
            )
        return self

    @model_validator(mode="after")
    def _custom_source(self) -> Data:
        if self.custom is None:
            return self
        hub = self.source == "hub"
        if hub and self.custom.dataset is None:
            raise PydanticCustomError(
                "conflict", "data.source 'hub' reads data.custom.dataset, but data.custom.dataset is null"
            )
        if not hub and self.custom.dataset is not None:
            raise PydanticCustomError(
                "conflict",
                f"data.custom.dataset is set but data.source is {self.source!r}, a directory; "
                "set data.source: hub to read the dataset, or data.custom.dataset: null to read files",
            )
        for split in ("train", "validation") if not hub else ():
            path = Path(getattr(self.custom, split))
            if path.is_absolute() or ".." in path.parts:
                raise PydanticCustomError(
                    "conflict",
                    f"data.custom.{split} = {str(path)!r}: must be a file inside data.source ({self.source!r}, the "
                    "data stage's DVC dependency), named relative to it without '..'",
                )
        return self


class Compute(_Section):
    device: Literal["auto", "cpu", "cuda"]
    bf16: bool
    group_by_length: bool
    processes: Count
    accumulation_steps: Count
    compile: bool  # torch.compile the training step (cofi.trainer.TrainConfig.compile)
    threads: Threads
    teacher_cache_gb: NonNegative  # GiB of the training device for the teacher's outputs (cofi.teacher_cache)


class Teacher(_Section):
    base_model: Text
    fine_tuned: bool  # true: base_model is already a classifier for this task, the teacher as it is
    epochs: Positive
    batch_size: Count
    learning_rate: Positive
    warmup_ratio: Ratio
    dropout: Ratio | None  # every dropout of the teacher's config, so of the students built from it; null: the base model's


class Prune(_Section):
    targets: Annotated[list[Ratio], AfterValidator(_unique)]  # sparsities
    speedups: Annotated[list[Annotated[float, Field(gt=1)]], AfterValidator(_unique)]  # over the teacher, on deployment
    deployment: Text | None  # a key of deployments: the latency model speedup targets are pruned against
    speedup_tolerance: Annotated[float, Field(gt=0, lt=1)]  # relative
    epochs: Annotated[Any, AfterValidator(_epochs_per_target(allow_zero=False))]  # a number, or a map target → epochs
    distill_epochs: NonNegative
    sparsity_warmup_epochs: NonNegative
    sparsity_ramp: Ramp
    batch_size: Count
    learning_rate: Positive
    freeze_word_embeddings: bool  # students (prune, finetune, baselines) keep the teacher's word-embedding table
    reg_learning_rate: Positive
    lambda_2_init: NonNegative
    temperature: Positive
    prediction_weight: Annotated[float, Field(ge=0, le=1)]
    distillation: Literal["layer_and_prediction", "prediction", "none"]
    teacher_layers: Annotated[list[Count], Field(min_length=1), AfterValidator(_increasing)] | None
    layer_matching: Literal["dynamic", "monotone", "fixed"]
    families: _unique_list(Family)
    keep_multiple: Count
    sparsity_tolerance: Annotated[float, Field(gt=0, lt=1)]
    evals_per_epoch: Count

    @property
    def all_targets(self) -> list[Target]:
        return [*self.targets, *map(Speedup, self.speedups)]

    def epochs_for(self, target: Target) -> float:
        return epochs_at(self.epochs, target)

    @model_validator(mode="after")
    def _warmup_within_training(self) -> Prune:
        if not self.all_targets:
            raise PydanticCustomError("conflict", "prune.targets and prune.speedups are both empty: nothing to prune")
        shortest = min(self.epochs_for(t) for t in self.all_targets)
        if self.distill_epochs + self.sparsity_warmup_epochs >= shortest:
            raise PydanticCustomError(
                "conflict",
                f"sparsity warm-up longer than training: prune.distill_epochs ({self.distill_epochs:g}) + "
                f"prune.sparsity_warmup_epochs ({self.sparsity_warmup_epochs:g}) "
                f"must be < prune.epochs ({shortest:g})",
            )
        return self


class Finetune(_Section):
    epochs: Annotated[Any, AfterValidator(_epochs_per_target(allow_zero=True))]  # as prune.epochs; 0: none
    batch_size: Count
    learning_rate: Positive
    evals_per_epoch: Count

    def epochs_for(self, target: Target) -> float:
        return epochs_at(self.epochs, target)


class Benchmark(_Section):
    batch_sizes: _unique_list(Count)
    sequence_lengths: _unique_list(Annotated[int, Field(ge=1, le=512)])
    runtimes: _unique_list(Literal[RUNTIMES])
    precisions: _unique_list(Literal[PRECISIONS])
    int8: Literal[INT8_METHODS]  # how int8 models are quantized (cofi.quantize)
    warmup: Threads
    repeats: Count
    rounds: Count
    threads: Threads


BASELINE_METHODS = ("layer_subset", "magnitude")


class Baselines(_Section):
    methods: Annotated[list[Literal[BASELINE_METHODS]], AfterValidator(_unique)]
    ablations: Annotated[list[Literal[tuple(ABLATIONS)]], AfterValidator(_unique)]
    target: Ratio
    magnitude_rounds: Count


class DeploymentTarget(_Section):
    """Where compact models will serve (cofi.deployment.Deployment); the profile stage measures there."""

    device: Literal["cpu", "cuda"]
    runtime: Literal[RUNTIMES]
    precision: Literal[PRECISIONS]
    batch_size: Count
    sequence_length: Annotated[int, Field(ge=1, le=512)]
    threads: Threads = 0  # the runtime's default


def _deployment_names(targets: dict) -> dict:
    """Names become file and stage names, and DVC param paths (deployments.<name>: no '.');
    each runtime serves its own precisions (cofi.deployment.SUPPORTED)."""
    for name, target in targets.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise PydanticCustomError(
                "conflict",
                f"deployments: name {name!r} must be letters, digits, '_' or '-' (it names files, a stage and "
                f"the DVC param deployments.<name>)",
            )
        try:
            check_supported(target.device, target.runtime, target.precision)
        except ValueError as e:
            raise PydanticCustomError("conflict", f"deployments.{name}: {e}") from None
    return targets


class Mlflow(_Section):
    experiment: Text
    register_models: bool


class Params(_Section):
    seed: Annotated[int, Field(ge=0, lt=2**32)]
    data: Data
    compute: Compute
    teacher: Teacher
    prune: Prune
    finetune: Finetune
    benchmark: Benchmark
    baselines: Baselines
    deployments: Annotated[dict[str, DeploymentTarget], AfterValidator(_deployment_names)]
    mlflow: Mlflow

    @model_validator(mode="after")
    def _speedups_have_a_deployment(self) -> Params:
        p = self.prune
        if p.speedups and p.deployment not in self.deployments:
            known = ", ".join(self.deployments) or "none are defined"
            raise PydanticCustomError(
                "conflict",
                f"prune.deployment = {p.deployment!r}: the speedup targets prune.speedups "
                f"({', '.join(f'{k:g}' for k in p.speedups)}) need the name of a deployment to measure them on, "
                f"a key of deployments ({known})",
            )
        return self

    @model_validator(mode="after")
    def _baseline_target_in_sweep(self) -> Params:
        if (self.baselines.methods or self.baselines.ablations) and self.baselines.target not in self.prune.targets:
            raise PydanticCustomError(
                "conflict",
                f"baselines.target ({self.baselines.target:g}) must be one of prune.targets "
                f"({', '.join(f'{t:g}' for t in self.prune.targets)}): baselines are compared with that CoFi model",
            )
        return self


# ---- loading -------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                break  # SafeLoader reports the unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; ``ParamsError`` lists every problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ParamsError(f"{path}: cannot read the params file ({e.strerror or e})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    return validate_params(data, source=str(path))


def validate_params(data: Any, source: str = "params") -> Params:
    """Validate already-parsed params (e.g. a dict with overrides applied)."""
    if not isinstance(data, Mapping):
        raise ParamsError(f"{source}: must be a mapping of sections, got {_kind(data)}")
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        problems = [_describe(err) for err in e.errors()]
        s = "" if len(problems) == 1 else "s"
        message = f"{source}: {len(problems)} invalid parameter{s}:\n" + "\n".join(f"  {p}" for p in problems)
        raise ParamsError(message, problems) from None


def ablated(params: Params, name: str) -> Params:
    """``params`` with the prune overrides of ablation ``name`` (see cofi.ablations), validated like the file."""
    if name not in ABLATIONS:
        raise ParamsError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
    data = params.model_dump()
    data["prune"].update(ABLATIONS[name])
    return validate_params(data, source=f"ablation {name}")


def resolve_source(params: Params | Mapping, project_dir: Path) -> Path | None:
    """The local data directory, or None when ``data.source`` is "hub".

    Relative paths are relative to ``project_dir``, the directory holding params.yaml.
    """
    source = params.data.source if isinstance(params, Params) else params["data"]["source"]
    if source == "hub":
        return None
    return (Path(project_dir) / Path(source).expanduser()).resolve()


# ---- error messages ------------------------------------------------------------------

_TYPES = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "a mapping of keys",
    "dict_type": "a mapping of keys",
}


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}


def _kind(value: Any) -> str:
    return "null" if value is None else _KINDS.get(type(value), type(value).__name__)


def _dotted(loc: tuple) -> str:
    """``("prune", "targets", 1)`` -> ``prune.targets[1]``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "<root>"


def _describe(err: dict) -> str:
    """One line for one pydantic error: ``dotted.path = value: what is allowed``."""
    loc, kind, value, ctx = err["loc"], err["type"], err.get("input"), err.get("ctx", {})
    path = _dotted(loc)
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    if kind == "conflict":
        return err["msg"]
    if kind == "missing":
        return f"{path}: missing"
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _schema_at(loc[:-1]).get("properties", {}), n=1)
        return f"{path}: unknown key" + (f"; did you mean {_dotted((*loc[:-1], close[0]))}?" if close else "")
    if kind == "invalid_key":  # loc ends with the key itself
        return f"{_dotted(loc[:-1])}: key {value!r} must be a string"
    if kind in _TYPES:
        problem = f"must be {_TYPES[kind]}, not {_kind(value)}"
        if isinstance(value, str) and kind in ("int_type", "float_type"):
            problem += _number_hint(value)
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        problem = f"must be {_interval(_schema_at(loc)) or err['msg'].removeprefix('Input should be ')}"
    elif kind == "literal_error":
        problem = f"must be one of {ctx['expected']}"
    elif kind == "string_too_short":
        problem = "must not be empty"
    elif kind == "too_short":
        problem = f"must have at least {ctx['min_length']} item{'s' if ctx['min_length'] != 1 else ''}"
    elif kind == "too_long":
        problem = f"must have at most {ctx['max_length']} items"
    elif kind == "finite_number":
        problem = "must be a finite number"
    else:  # our own validators' messages, or anything unforeseen
        problem = err["msg"][0].lower() + err["msg"][1:]
    return f"{path} = {shown}: {problem}"


def _number_hint(text: str) -> str:
    """How to write a number that YAML read as a string (YAML 1.1 reads 5e-5 and 1.5e3 as strings)."""
    exponent = re.fullmatch(r"\s*([-+]?\d+)(\.\d*)?[eE]([-+]?)(\d+)\s*", text)
    if exponent:
        mantissa, fraction, sign, digits = exponent.groups()
        return f" (write {mantissa}{fraction or '.0'}e{sign or '+'}{digits}, without quotes)"
    try:
        float(text)
    except ValueError:
        return ""
    return " (remove the quotes)"


@functools.cache
def _json_schema() -> dict:
    return Params.model_json_schema()


def _schema_at(loc: tuple) -> dict:
    """The JSON schema of the value at ``loc`` ({} when there is none)."""
    root = _json_schema()

    def deref(node: dict) -> dict:
        if "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        options = [o for o in node.get("anyOf", []) if o.get("type") != "null"]
        return deref(options[0]) if options else node

    node = deref(root)
    for part in loc:
        node = node.get("items", {}) if isinstance(part, int) else node.get("properties", {}).get(part, {})
        node = deref(node)
    return node


def _interval(schema: dict) -> str:
    """``in [0, 1)`` or ``> 0``: a numeric schema's bounds as text ("" if it has none)."""
    low, low_open = schema.get("minimum", schema.get("exclusiveMinimum")), "exclusiveMinimum" in schema
    high, high_open = schema.get("maximum", schema.get("exclusiveMaximum")), "exclusiveMaximum" in schema
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""
