"""What a user sees in the MLflow UI: `cofi ui` serving a real store on loopback, a real headless Chromium.

A store is filled over HTTP the way one pipeline execution fills it (stage runs
from `pipeline.tracking.stage_run`, compact models logged and registered as the
compact stage does, benchmark results through `stages.benchmark.log_model_results`,
the report's best-at-speed alias), then the experiment is opened in the browser:
its plain address opens the Model-training layout in a fresh browser, the stage
runs are nested under one pipeline run, and the Models tab lists every model as a
LoggedModel with its metrics side by side. Screenshots are saved to
the test's temporary directory (and to $COFI_UI_SCREENSHOTS when set).

Needs Debian's `chromium` (/usr/bin/chromium, or $CHROMIUM) and the `playwright`
Python package (the `test` extra); skipped with the reason when either is missing.
Playwright's own browser download is not used.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

mlflow = pytest.importorskip("mlflow")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set $CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

from conftest import isolated_mlflow, stop_process_group  # noqa: E402
from pipeline import tracking  # noqa: E402
from stages.benchmark import log_model_results  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SERVER_START_TIMEOUT_S = 120
UI_TIMEOUT_MS = 30_000
EXPERIMENT = "cofi-ui"
GROUP = "0123456789abcdef"
HEADLINE = "torch_fp32_b32_s128"
MODELS = {  # name → method, accuracy, sparsity, speedup
    "teacher": ("teacher", 0.91, 0.0, 1.0),
    "cofi-0.6": ("cofi", 0.89, 0.6, 2.1),
    "cofi-0.9": ("cofi", 0.84, 0.9, 4.3),
    "baseline-magnitude": ("baseline-magnitude", 0.86, 0.6, 1.0),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`cofi ui` on a project whose store and experiment exist (as after `dvc repro`); filled over HTTP below."""
    root = tmp_path_factory.mktemp("ui-server")
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["mlflow"]["experiment"] = EXPERIMENT
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with isolated_mlflow():
        store = tracking.tracking_uri(root)
        experiment_id = tracking.ensure_experiment(store, EXPERIMENT)  # as the first stage of `dvc repro` does
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    command = [sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port), "--params", str(root / "params.yaml"),
               "--x-frame-options", "DENY"]  # an option of `mlflow server` (its default: SAMEORIGIN), passed on
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1) as health:
                    assert health.headers["X-Frame-Options"] == "DENY"
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer within {SERVER_START_TIMEOUT_S} s")
            time.sleep(0.2)
        assert log_path.read_text().splitlines()[0] == (
            f"MLflow UI for {store}: {uri}/#/experiments/{experiment_id}/models (Ctrl-C stops it)")
        yield uri
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def filled(server, tmp_path_factory) -> str:
    """One pipeline execution's runs and models on the server; returns the experiment id."""
    project = tmp_path_factory.mktemp("ui-project")
    common = dict(params={"prune": {"targets": [0.6, 0.9]}, "data": {"task": "sst2"}}, group=GROUP, tags={},
                  project_dir=project, experiment=EXPERIMENT, system_metrics=False)
    with isolated_mlflow(server):
        for stage in ("data", "teacher"):
            with tracking.stage_run(stage, **common):
                mlflow.log_metric("done", 1.0)
        for name in ("cofi-0.6", "cofi-0.9"):
            target = name.removeprefix("cofi-")
            with tracking.stage_run(f"compact@{target}", **common):
                directory = project / name
                directory.mkdir()
                (directory / "config.json").write_text("{}")
                tags = {"cofi.lineage.kind": "compact"}
                model = tracking.log_model(directory, name, tags=tags, params={"target": target},
                                           metrics={"accuracy": MODELS[name][1]}, weights_sha256=name)
                tracking.register_model(directory, f"cofi-sst2-{target}", tags=tags, model=model)
        with tracking.stage_run("benchmark", **common):
            for name, (method, accuracy, sparsity, speedup) in MODELS.items():
                flat = {"accuracy": accuracy, "sparsity": sparsity, "parameters": 22e6 * (1 - sparsity),
                        f"latency_ms_{HEADLINE}": 40 / speedup, f"speedup_{HEADLINE}": speedup}
                log_model_results(name, {"method": method, "weights_sha256": name, "best": []}, flat)
        with tracking.stage_run("report", **common):
            tracking.set_best_aliases({"cofi-0.6": ("best at ~2.1×", 2.1)})
        return mlflow.MlflowClient(server).get_experiment_by_name(EXPERIMENT).experiment_id


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _new_page(browser, layout: str | None = None):
    """A page in a browser profile of its own; ``layout`` is a layout its user chose before."""
    page = browser.new_context(viewport={"width": 2400, "height": 1000}).new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    if layout is not None:
        page.add_init_script(f"localStorage.setItem('mlflow.workflowType_v1', JSON.stringify('{layout}'))")
    return page


@pytest.fixture(scope="module")
def page(browser):
    return _new_page(browser)


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path))
    keep = os.environ.get("COFI_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def _close_assistant(page) -> None:
    """The MLflow Assistant side panel takes a third of the width; close it if it is open."""
    close = page.locator("[aria-label='Close']").first
    if close.count():
        try:
            close.click(timeout=2000)
        except Exception:
            pass


def test_experiment_is_tagged_for_the_training_view(server, filled):
    experiment = mlflow.MlflowClient(server).get_experiment(filled)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_fresh_browser_opens_the_training_layout(server, filled, browser, tmp_path):
    """The experiment's plain address, no ``workflowType`` in it, in a browser that never chose a
    layout: `cofi ui`'s page opens the runs (MLflow's own opens the GenAI layout's traces). A
    layout the user chose is kept."""
    address = f"{server}/#/experiments/{filled}"
    fresh = _new_page(browser)
    fresh.goto(address)
    fresh.get_by_text(tracking.pipeline_run_name(GROUP), exact=True).wait_for()  # the Runs tab
    fresh.get_by_text("Model registry", exact=True).first.wait_for()  # the training layout's sidebar
    assert fresh.get_by_text("Observability", exact=True).count() == 0  # the GenAI layout's sidebar
    assert fresh.evaluate("localStorage.getItem('mlflow.workflowType_v1')") == '"machine_learning"'
    _close_assistant(fresh)
    assert _screenshot(fresh, tmp_path, "mlflow-fresh-browser.png").stat().st_size > 10_000

    chose_genai = _new_page(browser, layout="genai")
    chose_genai.goto(address)
    chose_genai.get_by_text("Observability", exact=True).first.wait_for()
    assert chose_genai.get_by_text(tracking.pipeline_run_name(GROUP), exact=True).count() == 0
    assert chose_genai.evaluate("localStorage.getItem('mlflow.workflowType_v1')") == '"genai"'


def test_runs_are_nested_under_the_pipeline_run(server, filled, page, tmp_path):
    page.goto(tracking.ui_link(server, filled, tab="runs"))  # the link the report stage prints
    parent = page.get_by_text(tracking.pipeline_run_name(GROUP), exact=True)
    parent.wait_for()
    _close_assistant(page)
    # one top-level row: the stages are collapsed under their parent until it is expanded
    assert page.get_by_text("compact@0.6", exact=True).count() == 0
    page.locator("[role='row']", has=parent).get_by_role("button").first.click()
    for stage in ("data", "teacher", "compact@0.6", "compact@0.9", "benchmark", "report"):
        page.get_by_text(stage, exact=True).first.wait_for()
    path = _screenshot(page, tmp_path, "mlflow-runs.png")
    assert path.stat().st_size > 10_000


def test_models_tab_compares_every_model(server, filled, page, tmp_path):
    page.goto(tracking.ui_link(server, filled, tab="models"))  # the link the report stage prints
    for name in MODELS:
        page.get_by_text(tracking.model_name(name), exact=True).first.wait_for()
    _close_assistant(page)
    page.get_by_text("cofi-sst2-0.6").first.wait_for()  # registered from its LoggedModel
    headers = " ".join(page.locator("[role='columnheader']").all_inner_texts())
    assert "accuracy" in headers, headers
    path = _screenshot(page, tmp_path, "mlflow-models.png")
    assert path.stat().st_size > 10_000
    # every metric, also those scrolled out of view, is linked to its model
    client = mlflow.MlflowClient(server)
    models = {m.name: m for m in client.search_logged_models([filled])}
    assert set(models) == {tracking.model_name(n) for n in MODELS}
    for name, (_, accuracy, _, speedup) in MODELS.items():
        metrics = {m.key: m.value for m in models[tracking.model_name(name)].metrics}
        assert metrics["accuracy"] == pytest.approx(accuracy)
        assert metrics[f"speedup_{HEADLINE}"] == pytest.approx(speedup)
    assert models["cofi-0_6"].tags["cofi.best"] == "best at ~2.1×"
    assert client.get_model_version_by_alias("cofi-sst2-0.6", "best-2_1x").version == "1"
