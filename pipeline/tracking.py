"""MLflow tracking for the pipeline stages (the ``cofi`` library knows nothing of MLflow).

One pipeline execution (``cofi.group``: same params and code) = one parent run;
each DVC stage = one run nested under it::

    with stage_run("compact@0.6", params=params, group=group, tags={}, project_dir=root,
                   experiment="cofi") as run:
        callback = MlflowCallback()
        train(..., callbacks=[callback])
        log_structure(table, figure, "structure-0.6")
        model = log_model(model_dir, "cofi-0.6", tags=lineage_tags(manifest), metrics={...})
        register_model(model_dir, "cofi-sst2-0.6", tags=lineage_tags(manifest), model=model)

Every model is an MLflow 3 LoggedModel (its metrics linked with ``model_id``),
so the experiment's Models tab compares them side by side; the experiment is
tagged to open in the model-training view, not the GenAI one.

Store: ``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite file
``<project>/mlflow.db`` with artifacts in ``<project>/mlruns``. A tracking
server that does not answer fails the stage within seconds instead of after
MLflow's minutes of retries. Several stage processes may share one SQLite file
(``dvc queue start -j 2``): MLflow's SQLite sessions wait for each other's
writes (busy_timeout 20 s); what MLflow does not lock (migrating a fresh
database, creating the experiment, the group's parent run) runs under a file
lock beside the database.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import urllib.parse
import warnings
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import mlflow
import requests
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from sqlalchemy.engine import make_url

from pipeline.codestate import git_state

log = logging.getLogger(__name__)

__all__ = [
    "TrackingUnavailableError",
    "tracking_uri",
    "check_tracking_server",
    "store_client",
    "stage_run",
    "flatten_params",
    "MlflowCallback",
    "log_dataset",
    "log_structure",
    "log_model",
    "find_model",
    "log_model_metrics",
    "model_run",
    "register_model",
    "set_best_aliases",
    "TAG_STAGE",
    "TAG_GROUP",
    "TAG_GIT_COMMIT",
    "TAG_GIT_DIRTY",
]

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"

TAG_STAGE = "cofi.stage"
TAG_GROUP = "cofi.group"
TAG_GIT_COMMIT = "cofi.git.commit"
TAG_GIT_DIRTY = "cofi.git.dirty"
TAG_REGISTERED = "cofi.registered_model"
# the full digest on a dataset input (MLflow keeps 36 characters); the run tag is lineage.TAG_DATA_DIGEST
DATASET_INPUT_DIGEST_TAG = "cofi.data.digest"
TAG_ROLE = "cofi.role"  # "pipeline" on the parent run of a group
TAG_MODEL_WEIGHTS = "cofi.weights_sha256"  # on a LoggedModel: which model directory it is
TAG_BEST = "cofi.best"  # on a LoggedModel: "best at ~2.0×" (the report's mark)
# on a training run: "bf16" or "fp32", what trained; compute.bf16 asks for bf16, the device decides
TAG_TRAINING_PRECISION = "cofi.training_precision"
ROLE_PIPELINE = "pipeline"
# The experiment tag the MLflow 3 UI reads to choose its layout (mlflow/server/js: ExperimentKind);
# without it an experiment with no runs yet, or only traces, opens in the GenAI view.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
BEST_ALIAS_PREFIX = "best-"

# MLflow's own limits (mlflow.utils.validation); fixed here so that an import
# path moving between MLflow versions cannot break the pipeline. (Batch sizes
# are not: MlflowClient.log_batch splits a batch into MLflow's chunks itself.)
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_DATASET_DIGEST = 36
MAX_INPUT_TAG_VALUE = 500

# What the MLflow client does against a server once check_tracking_server has
# seen it answer: a couple of quick retries, not MLflow's default of 7 with
# exponential backoff (minutes) and a 120 s timeout per request.
HTTP_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server does not answer."""


# ----------------------------------------------------------------------------
# where to track


def _outer_project_dir(project_dir: Path) -> Path:
    """The repository root, also from inside a DVC experiment's temporary workspace.

    ``dvc exp run --queue`` / ``dvc queue start`` run stages in a copy of the
    repository under ``<root>/.dvc/tmp/exps/<tmpdir>`` that is deleted
    afterwards; an embedded store there would be lost with it.
    """
    project_dir = Path(project_dir).absolute()
    parts = project_dir.parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return project_dir


def tracking_uri(project_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project_dir>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{_outer_project_dir(project_dir) / DEFAULT_DB}"


def is_http(uri: str) -> bool:
    return urllib.parse.urlparse(uri).scheme in ("http", "https")


UI_PORT = 5000  # `mlflow ui`'s default, and `cofi ui`'s


def ui_link(uri: str, experiment_id: str, tab: str = "models") -> str:
    """Where to compare an experiment's models in the MLflow UI, for a person to open.

    A local store is served by ``cofi ui`` (:mod:`pipeline.mlflow_app`), which opens MLflow
    3.17's UI in its Model-training layout. A tracking server may be a plain ``mlflow server``,
    whose UI starts every browser on its GenAI layout, so its link asks for the training
    layout in the address (``workflowType=machine_learning``).
    """
    page = f"#/experiments/{experiment_id}/{tab}"
    if is_http(uri):
        return f"{uri.rstrip('/')}/{page}?workflowType=machine_learning"
    return f"cofi ui, then open http://127.0.0.1:{UI_PORT}/{page}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory SQLite)."""
    database = make_url(uri).database if uri.startswith("sqlite:") else None
    return Path(database) if database and database != ":memory:" else None


def _default_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store live next to the database file (``mlruns/<experiment>``),
    not under the current directory (MLflow's default), which may be a DVC temporary workspace."""
    db = sqlite_path(uri)
    if db is None:
        return None
    folder = re.sub(r"[^\w.\-]+", "_", experiment).strip("._") or "experiment"
    return (db.absolute().parent / DEFAULT_ARTIFACTS / folder).as_uri()


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast if an HTTP(S) tracking server does not answer; prepare a SQLite store's directory.

    For http(s) URIs: one ``GET <uri>/health`` with ``timeout_s`` and no
    retries, through ``requests`` as MLflow's own client (so the same proxies
    and NO_PROXY apply); a connection error, a timeout or a 5xx answer (a proxy
    in front of a dead server) raises :class:`TrackingUnavailableError` naming
    the URI. It also lowers the MLflow client's retries and request timeout
    (unless the environment sets them) so a server that dies later costs
    seconds, not minutes.
    """
    if is_http(uri):
        for name, value in HTTP_CLIENT_ENV.items():
            os.environ.setdefault(name, value)
        url = uri.rstrip("/") + "/health"
        try:
            status = requests.get(url, timeout=timeout_s).status_code
        except requests.RequestException as e:
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} does not answer within {timeout_s:g} s ({e}); "
                "start it, or unset MLFLOW_TRACKING_URI to use the embedded SQLite store"
            ) from e
        if status >= 500:  # 4xx: something answers (a server without /health, or behind a path prefix)
            raise TrackingUnavailableError(f"MLflow tracking server {uri} is unavailable: GET {url} answered HTTP {status}")
        return
    db = sqlite_path(uri)
    if db is not None:
        db.absolute().parent.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------
# SQLite: what MLflow does not lock


def lock_file(db: Path) -> Path:
    """A SQLite store's lock: beside its database, as SQLite's own -journal and -wal files
    are, so it goes with the store (one per store path in the temp directory outlived them all)."""
    return db.with_name(db.name + "-lock")


@contextmanager
def _store_lock(uri: str, timeout_s: float = 600.0) -> Iterator[None]:
    """The file lock of a SQLite store (nothing for other stores)."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    lock = lock_file(db)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock), timeout=timeout_s):
        yield


def store_client(uri: str) -> MlflowClient:
    """An MlflowClient for ``uri`` whose store is opened under the store's file lock.

    MLflow 3.17's SqlAlchemyStore runs the schema migrations of a fresh
    database in its constructor *without* a lock (``_safe_initialize_tables``
    exists but the stores call ``_initialize_tables``), so two processes
    opening a new SQLite file at once fail with "table ... already exists" /
    "duplicate column name" and can leave the schema half-migrated. The
    store object is cached per process, so only the first client pays.
    """
    with _store_lock(uri):
        return MlflowClient(uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it (and a fresh SQLite database: migrations) once under a lock.
    A tracking server has no such lock: of two stages creating it at once, one finds the other's."""
    with _store_lock(uri):
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=_default_artifact_location(uri, name),
                                                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
            except MlflowException as e:
                experiment = client.get_experiment_by_name(name)
                if e.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if TAG_EXPERIMENT_KIND not in experiment.tags:  # created before the tag was set; a user's choice is kept
            client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return experiment.experiment_id


# ----------------------------------------------------------------------------
# runs


_KEY_BAD_CHARS = re.compile(r"[^\w./\- :]")


def _key(name: str) -> str:
    """A valid MLflow param/metric/tag key: allowed characters, no empty or '..' path parts."""
    key = _KEY_BAD_CHARS.sub("_", str(name))
    parts = [p if p not in ("", ".", "..") else "_" for p in key.split("/")]
    key = "/".join(parts)
    return key[:MAX_KEY_LENGTH]


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys with string values: {"prune": {"epochs": 4}} -> {"prune.epochs": "4"}.

    Lists and other values are JSON (``[0.6, 0.9]``, ``true``, ``null``); an
    empty mapping stays one key with value ``{}``.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = _value(value)
    return flat


def _truncate(value: str, limit: int, what: str) -> str:
    if len(value) <= limit:
        return value
    log.warning("%s is %d characters; MLflow keeps %d, truncating", what, len(value), limit)
    return value[: limit - 3] + "..."


def log_params(params: Mapping[str, Any], run_id: str | None = None) -> dict[str, str]:
    """Log flattened params (one ``log_batch``; MLflow splits it into requests). Returns what was logged."""
    run_id = run_id or _active_run_id()
    flat = {}
    for key, value in flatten_params(params).items():
        flat[_key(key)] = _truncate(value, MAX_PARAM_VAL_LENGTH, f"param {key}")
    MlflowClient().log_batch(run_id, params=[Param(k, v) for k, v in flat.items()])  # MLflow chunks it
    return flat


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run; call this inside `with stage_run(...)`")
    return run.info.run_id


def _source_name(project_dir: Path) -> str:
    """The entry point that runs, relative to the project (``stages/prune.py``) when inside it."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] else "")
    if path:
        try:
            return Path(path).absolute().relative_to(Path(project_dir).absolute()).as_posix()
        except ValueError:
            pass
    if spec is not None and spec.name:
        return spec.name
    return path or "<interactive>"


def _run_tags(stage: str, group: str, tags: Mapping[str, str], project_dir: Path) -> dict[str, str]:
    commit, dirty = git_state(project_dir)
    run_tags = {
        TAG_STAGE: stage,
        TAG_GROUP: group,
        "mlflow.source.name": _source_name(project_dir),
        "mlflow.source.type": "LOCAL",
    }
    if commit is not None:
        run_tags[TAG_GIT_COMMIT] = commit
        run_tags["mlflow.source.git.commit"] = commit
        run_tags[TAG_GIT_DIRTY] = "true" if dirty else "false"
    else:
        run_tags[TAG_GIT_COMMIT] = "unknown"
    run_tags.update({str(k): str(v) for k, v in tags.items()})
    return {_key(k): _truncate(v, MAX_TAG_VAL_LENGTH, f"tag {k}") for k, v in run_tags.items()}


@contextmanager
def stage_run(
    stage: str,
    *,
    params: Mapping[str, Any],
    group: str,
    tags: Mapping[str, str],
    project_dir: Path,
    experiment: str,
    system_metrics: bool = True,
) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for one pipeline stage, nested under its group's pipeline run; yields the active run.

    Sets the tracking URI (:func:`tracking_uri`), checks a server answers,
    creates the experiment if needed (tagged for the model-training view),
    finds or creates the parent run of ``group`` (:func:`_pipeline_run`),
    starts a run named ``stage`` under it (tag ``mlflow.parentRunId``) with tags
    ``cofi.stage``, ``cofi.group``, ``cofi.git.commit``/``cofi.git.dirty``,
    ``mlflow.source.*`` and ``tags``, logs ``params`` flattened, and enables
    system metrics (CPU, memory, GPU when pynvml is present). Before the run
    ends, MLflow's asynchronous logging is flushed: every metric handed to it
    (:class:`MlflowCallback`) is in the store. An exception ends the run FAILED
    (KILLED for Ctrl-C) and propagates.
    """
    project_dir = Path(project_dir)
    uri = tracking_uri(project_dir)
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(uri, experiment)
    run_tags = _run_tags(stage, group, tags, project_dir)
    parent_id = _pipeline_run(uri, experiment_id, group, params, run_tags)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=run_tags, parent_run_id=parent_id,
                           log_system_metrics=system_metrics)
    try:
        log_params(params, run.info.run_id)
        yield run
    except BaseException as e:
        status = RunStatus.to_string(RunStatus.KILLED if isinstance(e, KeyboardInterrupt) else RunStatus.FAILED)
        try:
            mlflow.flush_async_logging()
            mlflow.end_run(status)
            MlflowClient().set_terminated(parent_id, status)
        except Exception:  # never hide the original error
            log.exception("could not end MLflow run %s as %s", run.info.run_id, status)
        raise
    mlflow.flush_async_logging()
    mlflow.end_run()
    MlflowClient().set_terminated(parent_id, RunStatus.to_string(RunStatus.FINISHED))


def pipeline_run_name(group: str) -> str:
    return f"pipeline {group[:12]}"


def _pipeline_run(uri: str, experiment_id: str, group: str, params: Mapping[str, Any], stage_tags: Mapping[str, str]) -> str:
    """The id of the parent run of ``group`` (one pipeline execution), created by its first stage.

    Found by the tags ``cofi.group`` and ``cofi.role = pipeline``. On a SQLite
    store the search-or-create runs under the store's file lock, so concurrent
    stages of one group (``dvc queue start -j 2``) find one parent. A tracking
    server has no such lock: two stages creating the parent at once both
    create one, and both then keep the oldest (the other is deleted). The
    parent is RUNNING while one of its stages runs, and ends with the status of
    the last stage that ended.
    """
    client = MlflowClient()
    filter_string = f"tags.`{TAG_GROUP}` = '{group}' AND tags.`{TAG_ROLE}` = '{ROLE_PIPELINE}'"

    def find() -> list:
        return client.search_runs([experiment_id], filter_string, order_by=["attributes.start_time ASC"], max_results=10)

    with _store_lock(uri):
        found = find()
        if found:
            parent_id = found[0].info.run_id
        else:
            tags = {TAG_GROUP: group, TAG_ROLE: ROLE_PIPELINE, TAG_STAGE: ROLE_PIPELINE}
            tags.update({k: v for k, v in stage_tags.items() if k.startswith(("mlflow.source.", "cofi.git."))})
            created = client.create_run(experiment_id, run_name=pipeline_run_name(group), tags=tags).info.run_id
            log_params(params, created)
            found = find()
            oldest = found[0].info.run_id if found else created
            if oldest != created:
                client.delete_run(created)
            parent_id = oldest
    client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
    return parent_id


# ----------------------------------------------------------------------------
# metrics


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class MlflowCallback:
    """A `cofi.trainer.TrainerCallback` (by its two methods) that records the trainer's step logs and evaluations (prefixed ``eval_``) as MLflow metrics
    of the run, at the trainer's step numbers.

    Each step's and each evaluation's values go to MLflow's asynchronous logging
    (``log_batch(..., synchronous=False)``, the queue ``mlflow.log_metrics(..., synchronous=False)``
    feeds, without its synchronous read of the run per call): training does not wait for the store. At most
    ``max_pending`` batches are in flight; past that a step waits for the oldest (memory
    stays bounded when the store falls behind). :meth:`flush` waits for every batch and
    raises the store's error, as does a step that waits; :func:`stage_run` waits for
    whatever is left before the run ends, an ended stage included.
    """

    def __init__(self, run_id: str | None = None, *, eval_prefix: str = "eval_", max_pending: int = 1000) -> None:
        self.run_id = run_id or _active_run_id()
        self.client = MlflowClient()
        self.eval_prefix = eval_prefix
        self.max_pending = max_pending
        self._pending: deque = deque()  # MLflow's RunOperations, oldest first

    def _log(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        timestamp = int(time.time() * 1000)
        numbers = _metric_values({f"{prefix}{name}": value for name, value in values.items()})
        metrics = [Metric(key, number, timestamp, int(step)) for key, number in numbers.items()]
        if metrics:
            self._pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))
        if len(self._pending) > self.max_pending:
            self._pending.popleft().wait()

    def on_step(self, step: int, logs: Mapping[str, float]) -> None:
        self._log(step, logs)

    def on_evaluate(self, step: int, metrics: Mapping[str, float]) -> None:
        self._log(step, metrics, prefix=self.eval_prefix)

    def flush(self) -> None:
        """Wait until every metric handed to MLflow is in the store; raises the store's error."""
        while self._pending:
            self._pending.popleft().wait()


# ----------------------------------------------------------------------------
# data sets


class PipelineDatasetSource(DatasetSource):
    """A source MLflow has no resolver for (a local copy, ``hub:<id>``): recorded, never loaded."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "cofi"

    def load(self, **kwargs: Any) -> str:
        return self.uri

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> "PipelineDatasetSource":
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict[str, Any]) -> "PipelineDatasetSource":
        return cls(source_dict["uri"])


def _dataset_source(source: str) -> DatasetSource:
    if urllib.parse.urlparse(source).scheme in ("http", "https"):
        return HTTPDatasetSource(url=source)
    return PipelineDatasetSource(source)


def log_dataset(frame_or_path: Any, name: str, digest: str, source: str, context: str) -> None:
    """Record a data set as an input of the active run, identified by ``digest``.

    ``frame_or_path``: a pandas DataFrame (its schema and row count are
    recorded) or a path (metadata only, nothing is read). MLflow stores at
    most 36 characters of a data set digest; a longer one (a SHA-256) is
    stored as its first 36 characters, and in full in the input tag
    ``cofi.data.digest``, which every digest also gets.
    """
    from mlflow.data.meta_dataset import MetaDataset

    src = _dataset_source(str(source))
    short = str(digest)[:MAX_DATASET_DIGEST]
    dataset = None
    try:
        import pandas as pd

        if isinstance(frame_or_path, pd.DataFrame):
            with warnings.catch_warnings():  # "Hint: Inferred schema contains integer column(s)..."
                warnings.filterwarnings("ignore", message=".*Inferred schema contains integer", category=UserWarning)
                dataset = mlflow.data.from_pandas(frame_or_path, source=src, name=name, digest=short)
    except Exception as e:  # schema inference can fail on unusual columns
        log.warning("recording data set %s without its schema: %s", name, e)
    if dataset is None:
        dataset = MetaDataset(source=src, name=name, digest=short)
    input_tags = {DATASET_INPUT_DIGEST_TAG: str(digest)}
    if isinstance(frame_or_path, (str, os.PathLike)):
        input_tags["cofi.data.path"] = _truncate(str(frame_or_path), MAX_INPUT_TAG_VALUE, "data set path")
    mlflow.log_input(dataset, context=context, tags=input_tags)


# ----------------------------------------------------------------------------
# pruned structure


def log_structure(table: Mapping[str, list], figure: Any, name: str, summary: Mapping[str, float] | None = None) -> None:
    """Log a pruned structure: ``structure/<name>.json`` (an MLflow table), ``.csv`` and ``.png``,
    and ``summary`` as metrics ``structure/<key>``.

    ``table``: :func:`cofi.structure.structure_table`; ``figure``: a matplotlib
    figure (:func:`pipeline.plotting.structure_figure`); ``summary``:
    :func:`cofi.structure.structure_summary`.
    """
    import pandas as pd

    stem = f"structure/{_key(name).replace('/', '_')}"
    mlflow.log_table(data=dict(table), artifact_file=f"{stem}.json")
    mlflow.log_text(pd.DataFrame(table).to_csv(index=False), f"{stem}.csv")
    mlflow.log_figure(figure, f"{stem}.png")
    if summary:
        mlflow.log_metrics({f"structure/{k}": float(v) for k, v in summary.items()})


# ----------------------------------------------------------------------------
# models: MLflow 3 LoggedModels and the registry

_MODEL_NAME_BAD_CHARS = re.compile(r"[/:.%\"']")


def model_name(name: str) -> str:
    """A valid LoggedModel name (MLflow forbids / : . % and quotes): "cofi-0.6" -> "cofi-0_6"."""
    return _MODEL_NAME_BAD_CHARS.sub("_", name) or "model"


def _metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        number = _float(v)
        if number is not None:
            out[_key(k)] = number
    return out


def log_model(
    model_dir: Path | None,
    name: str,
    *,
    tags: Mapping[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    weights_sha256: str | None = None,
    model_type: str = "cofi",
):
    """An MLflow 3 LoggedModel of the active run: ``model_dir``'s files as its artifacts
    (None: an external model, the files stay where they are), ``tags``, ``params``
    (flattened), ``metrics`` linked to it (``model_id``), and the tag
    ``cofi.weights_sha256`` that :func:`find_model` looks it up by. Returns the LoggedModel.
    """
    run_id = _active_run_id()
    model_tags = {_key(k): _truncate(str(v), MAX_TAG_VAL_LENGTH, f"tag {k}") for k, v in (tags or {}).items()}
    if weights_sha256:
        model_tags[TAG_MODEL_WEIGHTS] = weights_sha256
    model_params = {_key(k): _truncate(v, MAX_PARAM_VAL_LENGTH, f"param {k}")
                    for k, v in flatten_params(params or {}).items()}
    kwargs = dict(name=model_name(name), source_run_id=run_id, tags=model_tags, params=model_params,
                  model_type=model_type)
    if model_dir is None:
        model = mlflow.create_external_model(**kwargs)
    else:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise NotADirectoryError(f"{model_dir} is not a model directory")
        model = mlflow.initialize_logged_model(**kwargs)
        try:
            MlflowClient().log_model_artifacts(model.model_id, str(model_dir))
        except BaseException:
            mlflow.finalize_logged_model(model.model_id, "FAILED")
            raise
        model = mlflow.finalize_logged_model(model.model_id, "READY")
    if metrics:
        log_model_metrics(model.model_id, metrics)
    return model


def log_model_metrics(model_id: str, metrics: Mapping[str, Any], run_id: str | None = None) -> None:
    """Log ``metrics`` to the active run (or ``run_id``) linked to the LoggedModel ``model_id``."""
    run_id = run_id or _active_run_id()
    timestamp = int(time.time() * 1000)
    batch = [Metric(k, v, timestamp, 0, model_id=model_id) for k, v in _metric_values(metrics).items()]
    MlflowClient().log_batch(run_id, metrics=batch)


def find_model(weights_sha256: str, experiment_id: str | None = None):
    """The newest LoggedModel of the experiment (default: the active run's) tagged with these weights, or None."""
    if experiment_id is None:
        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("no active MLflow run; pass experiment_id")
        experiment_id = run.info.experiment_id
    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"tags.`{TAG_MODEL_WEIGHTS}` = '{weights_sha256}'",
        order_by=[{"field_name": "creation_time", "ascending": False}], max_results=1, output_format="list")
    return found[0] if found else None


@contextmanager
def model_run(name: str, tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run nested under the active stage run for one model's results (so that each model's
    metrics have their own run, not one key per model in the stage's run)."""
    stage = mlflow.get_run(_active_run_id())
    group = stage.data.tags.get(TAG_GROUP, "")
    # the experiment is the stage run's, not MLflow's active (default) one
    run = mlflow.start_run(run_name=name, nested=True, experiment_id=stage.info.experiment_id,
                           tags={TAG_GROUP: group, **(tags or {})})
    try:
        yield run
    except BaseException as e:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED if isinstance(e, KeyboardInterrupt) else RunStatus.FAILED))
        raise
    mlflow.end_run()


def register_model(model_dir: Path, name: str, tags: dict[str, str], model: Any = None, artifact_path: str = "model"):
    """Register a model as a new version of ``name``, with ``tags`` on the version.

    ``model``: the LoggedModel of ``model_dir`` (:func:`log_model`); None logs
    one (named after the registered model). Registration goes through
    ``mlflow.register_model("models:/<model_id>", tags=...)``: the version is
    linked to the LoggedModel and its source run. Returns the ``ModelVersion``;
    the run and the LoggedModel get the tag ``cofi.registered_model = <name>/<version>``.
    """
    run_id = _active_run_id()
    if model is None:
        model = log_model(model_dir, name, tags=tags)
    version_tags = {_key(k): str(v) for k, v in tags.items()}
    version = mlflow.register_model(f"models:/{model.model_id}", name, tags=version_tags)
    registered = f"{name}/{version.version}"
    MlflowClient().set_tag(run_id, TAG_REGISTERED, registered)
    mlflow.set_logged_model_tags(model.model_id, {TAG_REGISTERED: registered})
    return version


def best_alias(speedup: float) -> str:
    """The registry alias of the model best at ~``speedup``×: 2.0 -> "best-2x", 1.5 -> "best-1_5x"."""
    text = f"{speedup:.1f}".removesuffix(".0").replace(".", "_")
    return f"{BEST_ALIAS_PREFIX}{text}x"


def set_best_aliases(
    marks: Mapping[str, tuple[str, float]], experiment_id: str | None = None, compared: Sequence[str] = ()
) -> dict[str, str]:
    """Mark the report's winners: ``marks`` maps weights_sha256 -> (label, speedup).

    Every LoggedModel found gets the tag ``cofi.best = label``; a registered
    one also gets the alias :func:`best_alias` on its version (an alias moves
    to the newest winner). ``compared``: the weights of every model of the
    comparison; their ``cofi.best`` tags and the ``best-*`` aliases of their
    registered models that this report does not set are removed, so no mark
    outlives the report that set it. Returns {"<registered name>/<version>": alias}.
    """
    client = MlflowClient()
    set_aliases: dict[str, str] = {}
    keep: dict[str, set[str]] = {}  # registered name -> the best-* aliases set now
    for weights, (label, speedup) in marks.items():
        model = find_model(weights, experiment_id)
        if model is None:
            log.warning("no MLflow model with weights %s; not marking it %r", weights[:12], label)
            continue
        mlflow.set_logged_model_tags(model.model_id, {TAG_BEST: label})
        registered = model.tags.get(TAG_REGISTERED)
        if not registered:
            continue
        name, version = registered.rsplit("/", 1)
        alias = best_alias(speedup)
        client.set_registered_model_alias(name, alias, version)
        set_aliases[registered] = alias
        keep.setdefault(name, set()).add(alias)
    for weights in compared:
        model = find_model(weights, experiment_id)
        if model is not None and weights not in marks and TAG_BEST in model.tags:
            client.delete_logged_model_tag(model.model_id, TAG_BEST)
        registered = model.tags.get(TAG_REGISTERED) if model is not None else None
        if not registered:
            continue
        name = registered.rsplit("/", 1)[0]
        for alias in client.get_registered_model(name).aliases:
            if alias.startswith(BEST_ALIAS_PREFIX) and alias not in keep.get(name, set()):
                client.delete_registered_model_alias(name, alias)
    return set_aliases
