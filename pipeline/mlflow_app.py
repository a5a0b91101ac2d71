"""MLflow's tracking server, with its UI opening in the Model-training layout.

MLflow 3.17's UI picks between its GenAI and Model-training layouts with a per-browser
switch kept in ``localStorage`` (key ``mlflow.workflowType_v1``, a JSON string). The switch
starts on GenAI, and the UI does not read the experiment's ``mlflow.experimentKind`` tag,
so a fresh browser opens our experiment on an empty traces page. This is MLflow's own
server as an ``mlflow.app`` plugin (the mechanism of MLflow's ``basic-auth`` app; entry
point ``cofi`` in pyproject.toml): its page sets the switch to Model training in a browser
that has not chosen yet, before MLflow's code runs. A layout the user picks later is kept.

Run it with ``cofi ui`` (the project's store), or ``mlflow server --app-name cofi ...``
for a shared tracking server.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

WORKFLOW_KEY = "mlflow.workflowType_v1"
TRAINING_LAYOUT = "machine_learning"
# runs before the UI's deferred bundle; only where nothing is stored yet
DEFAULT_LAYOUT_SCRIPT = (
    "<script>try{if(localStorage.getItem(%s)===null)localStorage.setItem(%s,%s)}catch(e){}</script>"
    % (json.dumps(WORKFLOW_KEY), json.dumps(WORKFLOW_KEY), json.dumps(json.dumps(TRAINING_LAYOUT)))
)

_log = logging.getLogger(__name__)


def with_training_layout(index_html: str) -> str:
    """MLflow's ``index.html`` with :data:`DEFAULT_LAYOUT_SCRIPT` first in its head."""
    if "<head>" not in index_html:
        _log.warning("cofi: MLflow's index.html has no <head>; the UI opens in its own default layout")
        return index_html
    return index_html.replace("<head>", "<head>" + DEFAULT_LAYOUT_SCRIPT, 1)


def create_app():
    """The ASGI app ``mlflow server --app-name cofi`` runs: MLflow's, with the page above."""
    from flask import Response
    from mlflow.server import app as flask_app
    from mlflow.server.fastapi_app import create_fastapi_app

    index = Path(flask_app.static_folder) / "index.html"
    if index.exists():  # a source install of MLflow has no built UI; MLflow's page then says so
        page = with_training_layout(index.read_text(encoding="utf-8"))

        def serve() -> Response:
            return Response(page, mimetype="text/html")

        flask_app.view_functions["serve"] = serve  # MLflow's route for the UI's one page
    return create_fastapi_app(flask_app)


def server_command(backend_store_uri: str, host: str, port: int) -> list[str]:
    """``mlflow server`` with this app on ``backend_store_uri`` (argv, for exec)."""
    return [sys.executable, "-m", "mlflow", "server", "--app-name", "cofi",
            "--backend-store-uri", backend_store_uri, "--host", host, "--port", str(port), "--workers", "1"]
