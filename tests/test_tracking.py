"""MLflow tracking (pipeline/tracking.py) against a real `mlflow server` and the embedded SQLite store.

The server runs as a subprocess on 127.0.0.1 with its own temporary SQLite
backend and artifact root; it is started once for the module (it is slow to
boot) and always killed at teardown. The embedded-store tests use copies of
one database migrated once for the module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import isolated_mlflow, stop_process_group

mlflow = pytest.importorskip("mlflow")
pd = pytest.importorskip("pandas")

from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from cofi.structure import structure_summary, structure_table  # noqa: E402
from pipeline import tracking  # noqa: E402
from pipeline.plotting import structure_figure  # noqa: E402
from pipeline.tracking import (  # noqa: E402
    MlflowCallback,
    TrackingUnavailableError,
    check_tracking_server,
    stage_run,
)

SERVER_START_TIMEOUT_S = 120
EXPERIMENT = "tracking-test"
MODEL_NAME = "cofi-test-model"
TRAIN_DIGEST = hashlib.sha256(b"train split").hexdigest()  # 64 characters; MLflow keeps 36
VERSION_TAGS = {"cofi.lineage.kind": "compact", "cofi.lineage.teacher_sha256": "ab" * 32}
PARAMS = {
    "seed": 42,
    "data": {"task": "sst2", "custom": None},
    "compute": {"bf16": True},
    "prune": {"targets": [0.6, 0.9], "epochs": 4, "reg_learning_rate": 0.05},
    "many": {f"p{i:03d}": i for i in range(150)},  # more than one log_batch of params
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No tracking URI from outside; whatever a test sets (mlflow.set_tracking_uri exports
    MLFLOW_TRACKING_URI, check_tracking_server sets MLFLOW_HTTP_*) is undone. The working
    directory is a temporary one, so MLflow's default store (./mlflow.db) is never the repo's."""
    monkeypatch.chdir(tmp_path)
    with isolated_mlflow():
        yield


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    """A migrated, empty MLflow SQLite database (migrating a fresh one takes seconds; copies are free)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module", autouse=True)
def _server_boot(tmp_path_factory):
    """Start `mlflow server` (on a fresh SQLite file) as the module starts: it boots and migrates
    in the background while the embedded-store tests run. Always killed at the end."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers (huey) for a test
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}", log_path
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def server(_server_boot) -> str:
    """The server's URI once /health answers (bounded wait)."""
    proc, uri, log_path = _server_boot
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1) as response:
                if response.status == 200:
                    return uri
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not answer within {SERVER_START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def _git_repo(path: Path) -> str | None:
    if shutil.which("git") is None:
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (path / ".gitignore").write_text("mlruns/\nmlflow.db\nmodels/\n")
    git("add", ".gitignore")
    git("-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "init")
    return git("rev-parse", "HEAD")


def _wait_for_system_metrics(run_id: str, timeout_s: float = 30.0) -> None:
    """Until the system metrics monitor has published a sample (it drops a partial interval at the end)."""
    from mlflow.tracking import fluent

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        monitor = getattr(fluent, "run_id_to_system_metrics_monitor", {}).get(run_id)
        if monitor is None or getattr(monitor, "_logging_step", 1) >= 1:
            return
        time.sleep(0.1)


@dataclass
class Logged:
    kind: str
    uri: str
    run_id: str
    model: object
    version: object
    model_dir: Path
    commit: str | None


@pytest.fixture(scope="module", params=["sqlite", "server"])
def logged(request, tmp_path_factory, template_db) -> Logged:
    """One stage run with everything the pipeline logs, against the embedded store or the server."""
    project = tmp_path_factory.mktemp(f"project-{request.param}")
    commit = _git_repo(project)
    server = request.getfixturevalue("server") if request.param == "server" else None
    if server is None:
        shutil.copy(template_db, project / "mlflow.db")
    model_dir = project / "models" / "compact"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text('{"model_type": "cofi"}')
    (model_dir / "model.safetensors").write_bytes(os.urandom(2048))
    frame = pd.DataFrame({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]})
    with isolated_mlflow(server):
        os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
        with stage_run("prune@0.6", params=PARAMS, group="sweep-1", tags={"extra": "yes"},
                       project_dir=project, experiment=EXPERIMENT) as run:
            callback = MlflowCallback()
            for step in range(1, 6):
                callback.on_step(step, {"loss": 1.0 / step, "loss_distill": 0.5 / step, "expected_sparsity": 0.1 * step,
                                        "target_sparsity": 0.12 * step, "lambda_1": -0.01 * step, "lambda_2": 0.02 * step,
                                        "learning_rate": 5e-5})
            callback.on_evaluate(3, {"accuracy": 0.8, "sparsity": 0.3})
            callback.on_evaluate(5, {"accuracy": 0.85, "sparsity": 0.6})
            callback.on_step(6, {"loss": 0.1})  # not flushed: stage_run waits for it before the run ends
            tracking.log_dataset(frame, name="sst2-train", digest=TRAIN_DIGEST, source="data/glue", context="train")
            tracking.log_dataset(project / "validation.parquet", name="sst2-validation", digest="abc123",
                                 source="hub:nyu-mll/glue", context="validation")
            table = structure_table([4, 2, 0], [32, 10, 0], 4, 32)
            tracking.log_structure(table, structure_figure(table, 4, 32), name="structure-0.6",
                                   summary=structure_summary(table, 4, 32))
            model = tracking.log_model(model_dir, "cofi-0.6", tags=VERSION_TAGS, params={"target": 0.6},
                                       metrics={"dev_accuracy": 0.85, "sparsity": 0.6}, weights_sha256="f" * 64)
            version = tracking.register_model(model_dir, MODEL_NAME, tags=VERSION_TAGS, model=model)
            _wait_for_system_metrics(run.info.run_id)
        uri = tracking.tracking_uri(project)
        yield Logged(request.param, uri, run.info.run_id, model, version, model_dir, commit)


def test_store_kind(logged):
    if logged.kind == "server":
        assert logged.uri.startswith("http://127.0.0.1:")
    else:
        assert logged.uri.startswith("sqlite:///") and logged.uri.endswith("/mlflow.db")


def test_run_params_flattened_and_batched(logged):
    run = MlflowClient(logged.uri).get_run(logged.run_id)
    params = run.data.params
    assert params["seed"] == "42"
    assert params["data.task"] == "sst2" and params["data.custom"] == "null"
    assert params["compute.bf16"] == "true"
    assert params["prune.targets"] == "[0.6, 0.9]" and params["prune.reg_learning_rate"] == "0.05"
    assert sum(k.startswith("many.") for k in params) == 150
    assert params == tracking.flatten_params(PARAMS)


def test_run_tags(logged):
    run = MlflowClient(logged.uri).get_run(logged.run_id)
    tags = run.data.tags
    assert run.info.run_name == "prune@0.6" and run.info.status == "FINISHED"
    assert tags["cofi.stage"] == "prune@0.6"
    assert tags["cofi.group"] == "sweep-1"
    assert tags["extra"] == "yes"
    assert tags["mlflow.source.name"]
    if logged.commit is not None:
        assert tags["cofi.git.commit"] == logged.commit == tags["mlflow.source.git.commit"]
        assert tags["cofi.git.dirty"] == "false"
    assert tags["cofi.registered_model"] == f"{MODEL_NAME}/{logged.version.version}"


def test_stage_run_is_nested_under_its_pipeline_run(logged):
    client = MlflowClient(logged.uri)
    run = client.get_run(logged.run_id)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["cofi.group"] == "sweep-1" and parent.data.tags["cofi.role"] == "pipeline"
    assert parent.info.run_name == tracking.pipeline_run_name("sweep-1")
    assert parent.info.status == "FINISHED"  # ended with its last stage
    assert parent.data.params == run.data.params  # one group: the same params
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view


def test_model_is_a_logged_model_with_linked_metrics(logged):
    client = MlflowClient(logged.uri)
    model = client.get_logged_model(logged.model.model_id)
    assert model.name == "cofi-0_6" and model.source_run_id == logged.run_id
    assert model.tags["cofi.weights_sha256"] == "f" * 64 and VERSION_TAGS.items() <= model.tags.items()
    assert model.tags["cofi.registered_model"] == f"{MODEL_NAME}/{logged.version.version}"
    assert model.params == {"target": "0.6"}
    assert {m.key: m.value for m in model.metrics} == {"dev_accuracy": 0.85, "sparsity": 0.6}
    assert all(m.run_id == logged.run_id for m in model.metrics)
    mlflow.set_tracking_uri(logged.uri)
    assert tracking.find_model("f" * 64, model.experiment_id).model_id == model.model_id
    assert tracking.find_model("0" * 64, model.experiment_id) is None


def test_best_alias_on_the_registered_version(logged):
    mlflow.set_tracking_uri(logged.uri)
    experiment_id = MlflowClient(logged.uri).get_run(logged.run_id).info.experiment_id
    done = tracking.set_best_aliases({"f" * 64: ("best at ~2.0×", 2.0)}, experiment_id)
    assert done == {f"{MODEL_NAME}/{logged.version.version}": "best-2x"}
    client = MlflowClient(logged.uri)
    assert client.get_model_version_by_alias(MODEL_NAME, "best-2x").version == logged.version.version
    assert client.get_logged_model(logged.model.model_id).tags["cofi.best"] == "best at ~2.0×"
    assert tracking.best_alias(1.5) == "best-1_5x"
    # a later report where it no longer wins removes the alias and the tag
    assert tracking.set_best_aliases({}, experiment_id, compared=["f" * 64]) == {}
    assert "best-2x" not in client.get_registered_model(MODEL_NAME).aliases
    assert "cofi.best" not in client.get_logged_model(logged.model.model_id).tags


def test_step_metric_histories(logged):
    client = MlflowClient(logged.uri)
    loss = client.get_metric_history(logged.run_id, "loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in loss}[4] == pytest.approx(0.25)
    for key in ("loss_distill", "expected_sparsity", "target_sparsity", "lambda_1", "lambda_2", "learning_rate"):
        assert sorted(m.step for m in client.get_metric_history(logged.run_id, key)) == [1, 2, 3, 4, 5], key
    lam = {m.step: m.value for m in client.get_metric_history(logged.run_id, "lambda_1")}
    assert lam[5] == pytest.approx(-0.05)


def test_eval_metrics_prefixed(logged):
    client = MlflowClient(logged.uri)
    history = client.get_metric_history(logged.run_id, "eval_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(3, 0.8), (5, 0.85)]
    assert "accuracy" not in client.get_run(logged.run_id).data.metrics


def test_dataset_inputs_carry_the_digest(logged):
    inputs = MlflowClient(logged.uri).get_run(logged.run_id).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"sst2-train", "sst2-validation"}
    train = by_name["sst2-train"]
    assert train.dataset.digest == TRAIN_DIGEST[:36]  # MLflow's digest column holds 36 characters
    tags = {t.key: t.value for t in train.tags}
    assert tags["cofi.data.digest"] == TRAIN_DIGEST and tags["mlflow.data.context"] == "train"
    assert json.loads(train.dataset.source) == {"uri": "data/glue"}
    assert "sentence" in train.dataset.schema  # a DataFrame records its schema
    validation = by_name["sst2-validation"]
    assert validation.dataset.digest == "abc123"
    vtags = {t.key: t.value for t in validation.tags}
    assert vtags["mlflow.data.context"] == "validation" and vtags["cofi.data.digest"] == "abc123"
    assert json.loads(validation.dataset.source) == {"uri": "hub:nyu-mll/glue"}


def test_structure_table_and_figure(logged, tmp_path):
    client = MlflowClient(logged.uri)
    names = {a.path for a in client.list_artifacts(logged.run_id, "structure")}
    assert names == {f"structure/structure-0.6.{ext}" for ext in ("json", "csv", "png")}
    local = Path(mlflow.artifacts.download_artifacts(
        run_id=logged.run_id, artifact_path="structure", dst_path=str(tmp_path), tracking_uri=logged.uri))
    table = json.loads((local / "structure-0.6.json").read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert [r["heads"] for r in rows] == [4, 2, 0] and [r["ffn_units"] for r in rows] == [32, 10, 0]
    assert [r["removed"] for r in rows] == [False, False, True]
    assert rows[1]["heads_kept"] == pytest.approx(0.5)
    assert (local / "structure-0.6.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = client.get_run(logged.run_id).data.metrics
    assert metrics["structure/heads_kept"] == pytest.approx(6 / 12)
    assert metrics["structure/layers_removed"] == 1.0


def test_registered_model_version(logged, tmp_path):
    client = MlflowClient(logged.uri)
    version = client.get_model_version(MODEL_NAME, logged.version.version)
    assert version.run_id == logged.run_id
    assert VERSION_TAGS.items() <= version.tags.items()
    assert version.status == "READY"
    assert version.source == f"models:/{logged.model.model_id}"  # registered from the LoggedModel
    if logged.kind == "server":  # the LoggedModel's artifacts are proxied through the server
        assert client.get_logged_model(logged.model.model_id).artifact_location.startswith("mlflow-artifacts:/")
    # MLflow 3.17's models:/ resolution ignores the registry_uri argument and reads the global one
    mlflow.set_tracking_uri(logged.uri)
    local = Path(mlflow.artifacts.download_artifacts(
        f"models:/{MODEL_NAME}/{version.version}", dst_path=str(tmp_path), tracking_uri=logged.uri,
        registry_uri=logged.uri))
    for name in ("config.json", "model.safetensors"):
        assert (local / name).read_bytes() == (logged.model_dir / name).read_bytes()


def test_system_metrics_logged(logged):
    metrics = MlflowClient(logged.uri).get_run(logged.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)


# ----------------------------------------------------------------------------
# embedded store behaviour


def test_failed_stage_ends_run_failed(tmp_path, template_db):
    shutil.copy(template_db, tmp_path / "mlflow.db")
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("teacher", params={}, group="g", tags={}, project_dir=tmp_path, experiment=EXPERIMENT,
                       system_metrics=False) as run:
            callback = MlflowCallback()
            callback.on_step(1, {"loss": 2.0})
            raise RuntimeError("boom")
    assert mlflow.active_run() is None
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1]  # flushed on failure too
    assert finished.data.tags["cofi.git.commit"] == "unknown"  # no git here
    experiment = client.get_experiment(finished.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlruns" / EXPERIMENT).as_uri()


STORE_DELAY_S = 0.5


def test_steps_do_not_wait_for_a_slow_store_and_the_stage_waits_for_them(tmp_path, template_db, monkeypatch):
    """Every write of the store takes STORE_DELAY_S: the trainer's steps return at once (MLflow's
    asynchronous logging writes them), and the run ends only once all of them are in the store."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    shutil.copy(template_db, tmp_path / "mlflow.db")
    write = SqlAlchemyStore.log_batch

    def slow_write(self, *args, **kwargs):
        time.sleep(STORE_DELAY_S)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", slow_write)  # before this store is opened
    with stage_run("prune@0.6", params={}, group="g", tags={}, project_dir=tmp_path, experiment=EXPERIMENT,
                   system_metrics=False) as run:
        callback = MlflowCallback()
        start = time.monotonic()
        for step in range(1, 9):
            callback.on_step(step, {"loss": 1.0 / step})
        callback.on_evaluate(8, {"accuracy": 0.75})
        assert time.monotonic() - start < STORE_DELAY_S  # nine writes of STORE_DELAY_S each, none waited for
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 9))
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_accuracy")] == [(8, 0.75)]


def test_a_store_error_surfaces_when_the_metrics_are_flushed(tmp_path, template_db):
    """Metrics for a run the store refuses (deleted): the steps return, flush raises the store's error."""
    shutil.copy(template_db, tmp_path / "mlflow.db")
    with stage_run("teacher", params={}, group="g", tags={}, project_dir=tmp_path, experiment=EXPERIMENT,
                   system_metrics=False) as run:
        client = MlflowClient(tracking.tracking_uri(tmp_path))
        gone = client.create_run(run.info.experiment_id).info.run_id
        client.delete_run(gone)
        callback = MlflowCallback(gone)
        callback.on_step(1, {"loss": 2.0})
        with pytest.raises(MlflowException, match=f"(?s)async logging.*{gone}.*active"):
            callback.flush()
        callback.flush()  # what failed is reported once
    assert client.get_metric_history(gone, "loss") == []


def test_tracking_uri(tmp_path, monkeypatch):
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.absolute()}/mlflow.db"
    workspace = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    assert tracking.tracking_uri(workspace) == f"sqlite:///{tmp_path.absolute()}/mlflow.db"  # dvc queue workspace
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.tracking_uri(tmp_path) == "http://tracking.example:5000"


def test_ui_link_opens_the_training_layout():
    # a tracking server may be a plain `mlflow server`: the address asks for the layout
    assert tracking.ui_link("http://tracking.example:5000/", "7") == (
        "http://tracking.example:5000/#/experiments/7/models?workflowType=machine_learning")
    # a local store is served by `cofi ui`, whose page opens the training layout itself
    assert tracking.ui_link("sqlite:////p/mlflow.db", "7") == (
        "cofi ui, then open http://127.0.0.1:5000/#/experiments/7/models")


def _cofi_ui(project: Path, **env: str) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", project / "params.yaml")
    environ = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | env
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "ui", "--params", str(project / "params.yaml")],
                          capture_output=True, text=True, env=environ, cwd=project, timeout=120)


def test_cofi_ui_without_a_store_names_it_and_creates_nothing(tmp_path):
    done = _cofi_ui(tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: no MLflow store at {tmp_path.absolute() / 'mlflow.db'} yet: run `dvc repro` first "
        "(or set MLFLOW_TRACKING_URI to the store the runs went to)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_cofi_ui_with_a_tracking_server_points_to_its_ui(tmp_path):
    done = _cofi_ui(tmp_path, MLFLOW_TRACKING_URI="http://tracking.example:5000")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("this project logs to the tracking server http://tracking.example:5000: its UI is "
                                   "there (`mlflow server --app-name cofi` opens it in the Model-training layout)")


def test_cofi_ui_page_defaults_the_layout_before_mlflow_runs():
    from pipeline.mlflow_app import with_training_layout

    page = '<html><head><script defer src="main.js"></script></head><body></body></html>'
    assert with_training_layout(page) == (
        '<html><head><script>try{if(localStorage.getItem("mlflow.workflowType_v1")===null)'
        'localStorage.setItem("mlflow.workflowType_v1","\\"machine_learning\\"")}catch(e){}</script>'
        '<script defer src="main.js"></script></head><body></body></html>')
    assert with_training_layout("<html>no head</html>") == "<html>no head</html>"  # served as MLflow wrote it


def test_flatten_params():
    assert tracking.flatten_params({"a": {"b": {"c": 1}}, "d": [1, 2], "e": None, "f": {}, "g": "x", "h": 0.5}) == {
        "a.b.c": "1", "d": "[1, 2]", "e": "null", "f": "{}", "g": "x", "h": "0.5"}


def test_structure_figure_marks_removed_layers():
    from matplotlib.figure import Figure

    figure = structure_figure(structure_table([12, 0, 3], [3072, 0, 100], 12, 3072), 12, 3072)
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    assert len(ax.patches) >= 6  # two bars per layer
    assert any(t.get_text() == "removed" for t in ax.texts)
    heights = sorted(p.get_height() for p in ax.patches if p.get_height() > 0)
    assert heights[-1] == pytest.approx(1.0)


# ----------------------------------------------------------------------------
# an unreachable server fails fast


def test_unreachable_server_fails_fast():
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as e:
        check_tracking_server(uri)
    assert time.monotonic() - start < 5
    assert uri in str(e.value)
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2  # later client calls give up quickly too


def test_stage_run_against_unreachable_server_fails_fast(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=uri):
        with stage_run("data", params={}, group="g", tags={}, project_dir=tmp_path, experiment=EXPERIMENT):
            pytest.fail("the stage body must not run")
    assert time.monotonic() - start < 5


def test_silent_server_times_out():
    """A server that accepts connections but never answers (hung, or a firewall) must not hang us."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # never accepts: the kernel completes the handshake, nobody answers
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingUnavailableError, match=uri):
            check_tracking_server(uri, timeout_s=1.0)
        assert time.monotonic() - start < 4


# ----------------------------------------------------------------------------
# concurrent stage processes on one fresh SQLite store

def _worker(project: str, name: str, barrier, results) -> None:
    """One stage process: a run with per-step metric writes and a model registration."""
    try:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        barrier.wait(timeout=60)
        with stage_run(name, params={"worker": name}, group="concurrent", tags={}, project_dir=Path(project),
                       experiment="concurrent", system_metrics=False) as run:
            callback = MlflowCallback()  # one write transaction per step
            for step in range(40):
                callback.on_step(step, {"loss": 1.0 / (step + 1), "lambda_1": float(step)})
            model = Path(project) / "models" / name
            model.mkdir(parents=True)
            (model / "weights.bin").write_bytes(name.encode())
            tracking.register_model(model, "concurrent-model", tags={"worker": name})
        results.put((name, "ok", run.info.run_id))
    except BaseException as e:  # reported to the test, not lost in the child
        import traceback

        results.put((name, "error", "".join(traceback.format_exception(e))[-4000:]))


def test_two_processes_share_a_fresh_sqlite_store(tmp_path):
    """Both processes open the fresh database at once: MLflow 3.17 migrates it in each of them
    without a lock ("table ... already exists"); stage_run serialises that and retries locks."""
    import multiprocessing

    # fork: the children start at once with everything imported (spawn re-imports torch & co.)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    project = tmp_path / "project"
    project.mkdir()
    temp_before = set(Path(tempfile.gettempdir()).iterdir())
    barrier = context.Barrier(2)
    results = context.Queue()
    procs = [context.Process(target=_worker, args=(str(project), name, barrier, results)) for name in ("w0", "w1")]
    for p in procs:
        p.start()
    try:
        outcomes = {}
        for _ in procs:
            name, status, detail = results.get(timeout=240)
            outcomes[name] = (status, detail)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    for name, (status, detail) in sorted(outcomes.items()):
        assert status == "ok", f"{name} failed:\n{detail}"
    run_ids = {name: detail for name, (_, detail) in outcomes.items()}
    client = MlflowClient(tracking.tracking_uri(project))
    experiment = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("cofi.role") == "pipeline"]  # one parent for the group
    stages = [r for r in runs if r.info.run_id != parent.info.run_id]
    assert sorted((r.info.run_name, r.info.status) for r in stages) == [("w0", "FINISHED"), ("w1", "FINISHED")]
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {parent.info.run_id}
    for run_id in run_ids.values():
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(40))
    versions = client.search_model_versions("name = 'concurrent-model'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == set(run_ids.values())
    # the store's lock sits beside its database and leaves nothing in the temp directory
    db = tracking.sqlite_path(tracking.tracking_uri(project))
    assert tracking.lock_file(db) == db.with_name("mlflow.db-lock") and tracking.lock_file(db).is_file()
    assert not {p for p in set(Path(tempfile.gettempdir()).iterdir()) - temp_before if "mlflow" in p.name}


DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "glue"  # shipped with the repository


def test_a_real_stage_logs_to_the_server(server, tmp_path):
    """`cofi data` as DVC runs it, with MLFLOW_TRACKING_URI pointing at the loopback server."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source=str(DATA_DIR), train_limit=24)
    params["mlflow"]["experiment"] = "stage-against-server"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": server}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "data"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded store

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("stage-against-server")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("cofi.role") == "pipeline"]
    (run,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert run.info.status == "FINISHED" and parent.info.status == "FINISHED"
    assert run.data.tags["cofi.stage"] == "data"
    assert run.data.params["data.train_limit"] == "24"
    assert run.data.metrics["train.rows"] == 24
    meta = json.loads((tmp_path / "outputs" / "data" / "meta.json").read_text())
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert inputs == {"sst2-train": meta["splits"]["train"]["digest"][:36],
                      "sst2-validation": meta["splits"]["validation"]["digest"][:36]}
