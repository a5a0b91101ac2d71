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
(``dvc queue start -j 2``): the database and the experiment are created under
a file lock, and writes that meet "database is locked" are retried.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import random
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from cofi.trainer import TrainerCallback
from pipeline.codestate import git_state

log = logging.getLogger(__name__)

__all__ = [
    "TrackingUnavailableError",
    "tracking_uri",
    "check_tracking_server",
    "store_client",
    "retry_locked",
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

LOCK_RETRY_DEADLINE_S = 120.0

T = TypeVar("T")


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
    if not uri.startswith("sqlite:"):
        return None
    path = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


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
    retries; a connection error, a timeout or a 5xx answer (a proxy in front
    of a dead server) raises :class:`TrackingUnavailableError` naming the URI.
    It also lowers the MLflow client's retries and request timeout (unless the
    environment sets them) so a server that dies later costs seconds, not
    minutes.
    """
    if is_http(uri):
        for name, value in HTTP_CLIENT_ENV.items():
            os.environ.setdefault(name, value)
        url = uri.rstrip("/") + "/health"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler(_proxies_for(uri)))
        try:
            with opener.open(urllib.request.Request(url, method="GET"), timeout=timeout_s) as response:
                response.read(64)
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                raise TrackingUnavailableError(
                    f"MLflow tracking server {uri} is unavailable: GET {url} answered HTTP {e.code}"
                ) from e
            # 4xx: something answers (e.g. a server without /health or behind a path prefix)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailableError(
                f"MLflow tracking server {uri} does not answer within {timeout_s:g} s ({reason}); "
                "start it, or unset MLFLOW_TRACKING_URI to use the embedded SQLite store"
            ) from e
        return
    db = sqlite_path(uri)
    if db is not None:
        db.absolute().parent.mkdir(parents=True, exist_ok=True)


def _proxies_for(uri: str) -> dict[str, str]:
    """The environment's proxies, unless NO_PROXY (or a loopback host) excludes the server."""
    host = urllib.parse.urlparse(uri).hostname or ""
    if host in ("localhost", "127.0.0.1", "::1") or urllib.request.proxy_bypass(host):
        return {}
    return urllib.request.getproxies()


# ----------------------------------------------------------------------------
# SQLite concurrency


def _is_lock_error(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if "database is locked" in text or "database table is locked" in text or "database is busy" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def retry_locked(fn: Callable[[], T], what: str, deadline_s: float = LOCK_RETRY_DEADLINE_S) -> T:
    """Call ``fn`` (one MLflow store call) and return its result, retrying with jittered backoff
    while SQLite says the database is locked, for up to ``deadline_s``; ``what`` names the call in
    the warning logged per retry. Any other error, or the lock past the deadline, is raised.
    Every module that calls the store directly wraps its calls in this.

    MLflow's SQLite sessions wait 20 s for a lock (busy_timeout), but SQLite
    answers "database is locked" at once when waiting could deadlock, and a
    long migration or a busy sibling can exceed the wait. Each MLflow store
    call is one transaction that is rolled back on error, so repeating it is safe.
    """
    start = time.monotonic()
    delay = 0.05
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            attempt += 1
            if not _is_lock_error(e) or time.monotonic() - start > deadline_s:
                raise
            log.warning("MLflow store locked during %s (attempt %d); retrying", what, attempt)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)


def lock_file(db: Path) -> Path:
    """A SQLite store's lock: beside its database, as SQLite's own -journal and -wal files
    are, so it goes with the store (one per store path in the temp directory outlived them all)."""
    return db.with_name(db.name + "-lock")


@contextmanager
def _store_lock(uri: str, timeout_s: float = 600.0) -> Iterator[None]:
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    from filelock import FileLock

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
        return retry_locked(lambda: MlflowClient(uri), "opening the MLflow store")


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it (and a fresh SQLite database: migrations) once under a lock."""

    def get_or_create() -> str:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(name, artifact_location=_default_artifact_location(uri, name),
                                                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if TAG_EXPERIMENT_KIND not in experiment.tags:  # created before the tag was set; a user's choice is kept
            client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return experiment.experiment_id

    with _store_lock(uri):
        client = retry_locked(lambda: MlflowClient(uri), "opening the MLflow store")
        return retry_locked(get_or_create, f"creating experiment {name!r}")


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
    client = MlflowClient()
    items = [Param(k, v) for k, v in flat.items()]
    retry_locked(lambda: client.log_batch(run_id, params=items), "logging params")  # MLflow chunks it
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


def _system_metrics_available() -> bool:
    # mlflow.start_run(log_system_metrics=True) raises *after* creating the run
    # when psutil is missing, leaving it RUNNING forever; check first.
    return importlib.util.find_spec("psutil") is not None


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
    system metrics (CPU, memory, GPU when pynvml is present) if psutil is
    installed. Metrics buffered by :class:`MlflowCallback` objects of this run
    are flushed before it ends. An exception ends the run FAILED (KILLED for
    Ctrl-C) and propagates.
    """
    project_dir = Path(project_dir)
    uri = tracking_uri(project_dir)
    check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(uri, experiment)
    run_tags = _run_tags(stage, group, tags, project_dir)
    sysmetrics = system_metrics and _system_metrics_available()
    if system_metrics and not sysmetrics:
        log.warning("psutil is not installed; running without MLflow system metrics")

    parent_id = _pipeline_run(uri, experiment_id, group, params, run_tags)
    run = retry_locked(
        lambda: mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=run_tags,
                                 parent_run_id=parent_id, log_system_metrics=sysmetrics),
        f"starting run {stage!r}",
    )
    run_id = run.info.run_id
    try:
        log_params(params, run_id)
        yield run
        _flush_callbacks(run_id)
    except BaseException as e:
        status = RunStatus.KILLED if isinstance(e, KeyboardInterrupt) else RunStatus.FAILED
        try:
            _flush_callbacks(run_id, raise_errors=False)
            _end_run(RunStatus.to_string(status))
            _end_pipeline_run(parent_id, RunStatus.to_string(status))
        except Exception:  # never hide the original error
            log.exception("could not end MLflow run %s as %s", run_id, RunStatus.to_string(status))
        raise
    _end_run(RunStatus.to_string(RunStatus.FINISHED))
    _end_pipeline_run(parent_id, RunStatus.to_string(RunStatus.FINISHED))


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

    def find_or_create() -> str:
        found = find()
        if found:
            return found[0].info.run_id
        tags = {TAG_GROUP: group, TAG_ROLE: ROLE_PIPELINE, TAG_STAGE: ROLE_PIPELINE}
        tags.update({k: v for k, v in stage_tags.items() if k.startswith(("mlflow.source.", "cofi.git."))})
        created = client.create_run(experiment_id, run_name=pipeline_run_name(group), tags=tags)
        log_params(params, created.info.run_id)
        found = find()
        for duplicate in found[1:]:
            if duplicate.info.run_id == created.info.run_id:
                client.delete_run(created.info.run_id)
        return found[0].info.run_id if found else created.info.run_id

    with _store_lock(uri):
        parent_id = retry_locked(find_or_create, f"finding the pipeline run of group {group}")
    retry_locked(lambda: client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING)), "resuming pipeline run")
    return parent_id


def _end_pipeline_run(parent_id: str, status: str) -> None:
    client = MlflowClient()
    retry_locked(lambda: client.set_terminated(parent_id, status), "ending the pipeline run")


def _end_run(status: str) -> None:
    run = mlflow.active_run()
    if run is None:
        return
    run_id = run.info.run_id
    try:
        mlflow.end_run(status)
    except Exception as e:
        if not _is_lock_error(e):
            raise
        # end_run already popped the run and stopped its monitor; record the status directly
        retry_locked(lambda: MlflowClient().set_terminated(run_id, status), "ending run")


# ----------------------------------------------------------------------------
# metrics


_live_callbacks: "weakref.WeakSet[MlflowCallback]" = weakref.WeakSet()


def _flush_callbacks(run_id: str, raise_errors: bool = True) -> None:
    for callback in list(_live_callbacks):
        if callback.run_id != run_id:
            continue
        try:
            callback.flush()
        except Exception:
            if raise_errors:
                raise
            log.exception("could not flush buffered metrics of run %s", run_id)


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class MlflowCallback(TrainerCallback):
    """Records the trainer's step logs and evaluations as MLflow metrics.

    Metrics are buffered and handed to MLflow's asynchronous logging
    (``log_batch(..., synchronous=False)``: training does not wait for the
    store) every ``flush_every`` steps and after every evaluation. :meth:`flush`
    (also called before the :func:`stage_run` of their run ends) waits for
    them and logs synchronously, retrying while SQLite is locked, whatever is
    left or failed; it raises if that fails. A failed periodic hand-over keeps
    the buffer (up to ``max_buffer`` metrics) for the next one.
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        flush_every: int = 50,
        eval_prefix: str = "eval_",
        client: MlflowClient | None = None,
        max_buffer: int = 200_000,
    ) -> None:
        self.run_id = run_id or _active_run_id()
        self.client = client or MlflowClient(mlflow.get_tracking_uri())
        self.flush_every = max(1, int(flush_every))
        self.eval_prefix = eval_prefix
        self.max_buffer = max_buffer
        self._buffer: list[Metric] = []
        self._pending: list[tuple[Any, list[Metric]]] = []  # MLflow async operations not yet waited for
        self._pid = os.getpid()  # MLflow's async queue thread does not survive a fork
        self._steps_since_flush = 0
        _live_callbacks.add(self)

    def _add(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        timestamp = int(time.time() * 1000)
        for name, value in values.items():
            number = _float(value)
            if number is None:
                continue
            self._buffer.append(Metric(_key(f"{prefix}{name}"), number, timestamp, int(step)))
        if len(self._buffer) > self.max_buffer:
            dropped = len(self._buffer) - self.max_buffer
            log.warning("MLflow metric buffer full; dropping the %d oldest metrics", dropped)
            del self._buffer[:dropped]

    def on_step(self, step: int, logs: Mapping[str, float]) -> None:
        self._add(step, logs)
        self._steps_since_flush += 1
        if self._steps_since_flush >= self.flush_every:
            self._try_flush()

    def on_evaluate(self, step: int, metrics: Mapping[str, float]) -> None:
        self._add(step, metrics, prefix=self.eval_prefix)
        self._try_flush()

    def _try_flush(self) -> None:
        """Hand the buffer to MLflow's asynchronous logging (training does not wait for the store);
        :meth:`flush` waits for it, and logs again, with lock retries, what did not get through."""
        self._steps_since_flush = 0
        if not self._buffer:
            return
        if os.getpid() != self._pid:
            try:
                self.flush()
            except Exception as e:
                log.warning("could not log metrics to MLflow (will retry at the next flush): %s", e)
            return
        batch = list(self._buffer)
        try:
            operation = self.client.log_batch(self.run_id, metrics=batch, synchronous=False)
        except Exception as e:
            log.warning("could not log metrics to MLflow (will retry at the next flush): %s", e)
            return
        del self._buffer[: len(batch)]
        self._pending.append((operation, batch))

    def flush(self) -> None:
        """Write every buffered metric now: wait for the asynchronous batches, then log the rest
        (and any batch that failed) in one synchronous ``log_batch`` (MLflow splits it into requests)."""
        self._steps_since_flush = 0
        pending, self._pending = self._pending, []
        failed: list[Metric] = []
        for operation, batch in pending:
            try:
                operation.wait()
            except Exception as e:  # logging a metric again is harmless: the store keeps one (same key, step, time, value)
                log.warning("asynchronous MLflow metric logging failed (%s); logging again", e)
                failed.extend(batch)
        self._buffer[:0] = failed
        if self._buffer:
            batch = list(self._buffer)
            retry_locked(lambda: self.client.log_batch(self.run_id, metrics=batch), "logging metrics")
            del self._buffer[: len(batch)]

    def __enter__(self) -> "MlflowCallback":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()


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
    retry_locked(lambda: mlflow.log_input(dataset, context=context, tags=input_tags), f"logging data set {name}")


# ----------------------------------------------------------------------------
# pruned structure


def log_structure(table: Mapping[str, list], figure: Any, name: str, summary: Mapping[str, float] | None = None) -> None:
    """Log a pruned structure: ``structure/<name>.json`` (an MLflow table), ``.csv`` and ``.png``,
    and ``summary`` as metrics ``structure/<key>``.

    ``table``: :func:`cofi.structure.structure_table`; ``figure``: a matplotlib
    figure (:func:`pipeline.plotting.structure_figure`); ``summary``:
    :func:`cofi.structure.structure_summary`.
    """
    stem = f"structure/{_key(name).replace('/', '_')}"
    csv = io.StringIO()
    columns = list(table)
    csv.write(",".join(columns) + "\n")
    for row in zip(*table.values()):
        csv.write(",".join(str(v) for v in row) + "\n")
    retry_locked(lambda: mlflow.log_table(data=dict(table), artifact_file=f"{stem}.json"), "logging structure table")
    mlflow.log_text(csv.getvalue(), f"{stem}.csv")
    mlflow.log_figure(figure, f"{stem}.png")
    if summary:
        metrics = {f"structure/{k}": float(v) for k, v in summary.items()}
        retry_locked(lambda: mlflow.log_metrics(metrics), "logging structure metrics")


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
        model = retry_locked(lambda: mlflow.create_external_model(**kwargs), f"creating model {name!r}")
    else:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise NotADirectoryError(f"{model_dir} is not a model directory")
        model = retry_locked(lambda: mlflow.initialize_logged_model(**kwargs), f"creating model {name!r}")
        try:
            MlflowClient().log_model_artifacts(model.model_id, str(model_dir))
        except BaseException:
            retry_locked(lambda: mlflow.finalize_logged_model(model.model_id, "FAILED"), "failing model")
            raise
        model = retry_locked(lambda: mlflow.finalize_logged_model(model.model_id, "READY"), f"finalizing model {name!r}")
    if metrics:
        log_model_metrics(model.model_id, metrics)
    return model


def log_model_metrics(model_id: str, metrics: Mapping[str, Any], run_id: str | None = None) -> None:
    """Log ``metrics`` to the active run (or ``run_id``) linked to the LoggedModel ``model_id``."""
    run_id = run_id or _active_run_id()
    timestamp = int(time.time() * 1000)
    batch = [Metric(k, v, timestamp, 0, model_id=model_id) for k, v in _metric_values(metrics).items()]
    client = MlflowClient()
    retry_locked(lambda: client.log_batch(run_id, metrics=batch), "logging model metrics")


def find_model(weights_sha256: str, experiment_id: str | None = None):
    """The newest LoggedModel of the experiment (default: the active run's) tagged with these weights, or None."""
    if experiment_id is None:
        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("no active MLflow run; pass experiment_id")
        experiment_id = run.info.experiment_id
    found = retry_locked(
        lambda: mlflow.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"tags.`{TAG_MODEL_WEIGHTS}` = '{weights_sha256}'",
            order_by=[{"field_name": "creation_time", "ascending": False}], max_results=1, output_format="list"),
        "searching models",
    )
    return found[0] if found else None


@contextmanager
def model_run(name: str, tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run nested under the active stage run for one model's results (so that each model's
    metrics have their own run, not one key per model in the stage's run)."""
    stage = mlflow.get_run(_active_run_id())
    group = stage.data.tags.get(TAG_GROUP, "")
    run = retry_locked(  # the experiment is the stage run's, not MLflow's active (default) one
        lambda: mlflow.start_run(run_name=name, nested=True, experiment_id=stage.info.experiment_id,
                                 tags={TAG_GROUP: group, **(tags or {})}),
        f"starting run {name!r}",
    )
    try:
        yield run
    except BaseException as e:
        status = RunStatus.KILLED if isinstance(e, KeyboardInterrupt) else RunStatus.FAILED
        _end_run(RunStatus.to_string(status))
        raise
    _end_run(RunStatus.to_string(RunStatus.FINISHED))


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
    version = retry_locked(
        lambda: mlflow.register_model(f"models:/{model.model_id}", name, tags=version_tags),
        f"registering a version of {name!r}",
    )
    registered = f"{name}/{version.version}"
    retry_locked(lambda: MlflowClient().set_tag(run_id, TAG_REGISTERED, registered), "tagging run")
    retry_locked(lambda: mlflow.set_logged_model_tags(model.model_id, {TAG_REGISTERED: registered}), "tagging model")
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
        retry_locked(lambda: mlflow.set_logged_model_tags(model.model_id, {TAG_BEST: label}), "tagging model")
        registered = model.tags.get(TAG_REGISTERED)
        if not registered:
            continue
        name, version = registered.rsplit("/", 1)
        alias = best_alias(speedup)
        retry_locked(lambda: client.set_registered_model_alias(name, alias, version), f"setting alias {alias}")
        set_aliases[registered] = alias
        keep.setdefault(name, set()).add(alias)
    for weights in compared:
        model = find_model(weights, experiment_id)
        if model is not None and weights not in marks and TAG_BEST in model.tags:
            retry_locked(lambda: client.delete_logged_model_tag(model.model_id, TAG_BEST), "untagging model")
        registered = model.tags.get(TAG_REGISTERED) if model is not None else None
        if not registered:
            continue
        name = registered.rsplit("/", 1)[0]
        aliases = retry_locked(lambda: client.get_registered_model(name).aliases, "reading aliases")
        for alias in aliases:
            if alias.startswith(BEST_ALIAS_PREFIX) and alias not in keep.get(name, set()):
                retry_locked(lambda: client.delete_registered_model_alias(name, alias), f"removing alias {alias}")
    return set_aliases
