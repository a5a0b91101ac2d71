"""The ``cofi`` console script: the stage commands of :mod:`pipeline.stage_cli` (run by
:mod:`pipeline.launch`: per-stage lock, torchrun) and the tools to inspect what they made.

The tools live here, not beside the stage commands, so that no stage's code dependencies
(its import closure, :mod:`pipeline.stage_deps`) include them: editing a tool reruns nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from pipeline import launch
from pipeline.cli_lineage import lineage
from pipeline.stage_cli import PARAMS, _params, app
from pipeline.stage_cli import main as run_app


@app.command()
def structure(model_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="A saved CoFi model directory.")) -> None:
    """Print the per-layer structure of a saved (compact) model: heads and FFN units kept."""
    from cofi.compact import load_model
    from cofi.sparsity import count_prunable_parameters, model_sparsity

    model = load_model(model_dir)
    config = model.config
    typer.echo(f"hidden size {config.hidden_size} of {config.full_hidden_size}, head size {config.attention_head_size}")
    typer.echo(f"{'layer':>5} {'heads':>5} {'FFN units':>9}")
    for i, (heads, units) in enumerate(zip(config.layer_num_heads, config.layer_intermediate_size)):
        typer.echo(f"{i:>5} {heads:>5} {units:>9}")
    typer.echo(f"prunable parameters: {count_prunable_parameters(model):,} (sparsity {model_sparsity(model):.4f})")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ui(
    ctx: typer.Context,
    port: int = typer.Option(5000, help="The port to serve the UI on."),
    host: str = typer.Option("127.0.0.1", help="The address to listen on (0.0.0.0: other machines too; "
                                              "MLflow then asks for --allowed-hosts)."),
    params: Path = PARAMS,
) -> None:
    """Serve the MLflow UI on the project's store, opening in its Model-training layout (Ctrl-C stops it).

    Other options go to `mlflow server` as they are (--allowed-hosts, --x-frame-options, ...)."""
    import os

    from pipeline import tracking
    from pipeline.mlflow_app import server_command

    p = _params(params)
    uri = tracking.tracking_uri(params.parent)
    if tracking.is_http(uri):
        typer.echo(f"this project logs to the tracking server {uri}: its UI is there "
                   "(`mlflow server --app-name cofi` opens it in the Model-training layout)")
        return
    db = tracking.sqlite_path(uri)
    if db is not None and not db.exists():
        typer.echo(f"error: no MLflow store at {db} yet: run `dvc repro` first "
                   "(or set MLFLOW_TRACKING_URI to the store the runs went to)", err=True)
        raise typer.Exit(1)
    experiment = tracking.store_client(uri).get_experiment_by_name(p.mlflow.experiment)
    page = f"#/experiments/{experiment.experiment_id}/models" if experiment else ""
    typer.echo(f"MLflow UI for {uri}: http://{host}:{port}/{page} (Ctrl-C stops it)")
    command = server_command(uri, host, port) + ctx.args
    os.execv(command[0], command)  # the server replaces this process: Ctrl-C and kill reach it


app.command()(lineage)


def main() -> None:
    """The console script: a stage command goes through the launcher, a tool runs here."""
    args = sys.argv[1:]
    if args and args[0] in launch.STAGES:
        launch.main(args)
    else:
        run_app()


if __name__ == "__main__":
    main()
