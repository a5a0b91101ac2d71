"""The stage commands of the ``cofi`` command line: one subcommand per DVC stage (what
:mod:`pipeline.launch` and its torchrun workers run; :mod:`pipeline.cli` adds the tools).

Stage commands validate the whole params file before any work and run in the
project root (where DVC runs them). Stage ``<name>`` is the function ``run`` of
module ``stages.<name>``, looked up by name when the command runs: the pipeline
layer imports no stage module. Heavy imports happen inside the commands so that
``cofi --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from pipeline.processes import die_with_launcher

app = typer.Typer(help="CoFi structured pruning of BERT-family classifiers.", no_args_is_help=True)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="The params file, validated before any work.")
TARGET = typer.Option(
    ..., "--target",
    help="A target sparsity (0.6), one of prune.targets, or a target speedup (2x), one of prune.speedups.",
)
ABLATION = typer.Option(
    None, "--ablation",
    help="Run this ablation of baselines.ablations (CoFi with one part switched off) at --target, "
         "which must then be baselines.target; its outputs are named ablation-<name>-<target>.",
)


def _params(path: Path):
    from pipeline.params import ParamsError, load_params

    try:
        return load_params(path)
    except ParamsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _one_of(value, allowed: list, what: str):
    """``value`` if the params allow it, else exit 2 naming the params key."""
    if value not in allowed:
        typer.echo(f"error: {value!r} is not in {what} {allowed}", err=True)
        raise typer.Exit(2)
    return value


def _stage(name: str, *args: Any, **kwargs: Any) -> None:
    importlib.import_module(f"stages.{name}").run(*args, **kwargs)


def _sweep_stage(name: str, params_path: Path, target: str, ablation: str | None) -> None:
    """A stage run once per target (prune, finetune, compact), or for an ablation."""
    from pipeline.params import ablated
    from pipeline.paths import Speedup, ablation_variant, parse_target

    p = _params(params_path)
    try:
        parsed = parse_target(target)
    except ValueError as e:
        typer.echo(f"error: --target {e}", err=True)
        raise typer.Exit(2) from None
    if isinstance(parsed, Speedup):
        _one_of(parsed.factor, p.prune.speedups, "prune.speedups")
    else:
        _one_of(parsed, p.prune.targets, "prune.targets")
    if ablation is None:
        _stage(name, p, parsed, params_path.parent)
        return
    _one_of(ablation, p.baselines.ablations, "baselines.ablations")
    _one_of(parsed, [p.baselines.target], "baselines.target")
    _stage(name, ablated(p, ablation), parsed, params_path.parent, ablation_variant(ablation))


@app.command()
def data(params: Path = PARAMS) -> None:
    """Read the task's data, shuffle and limit the training split, tokenise it."""
    _stage("data", _params(params), params.parent)


@app.command()
def teacher(params: Path = PARAMS) -> None:
    """Fine-tune the base model on the task (gold labels)."""
    _stage("teacher", _params(params), params.parent)


@app.command()
def prune(target: str = TARGET, ablation: Optional[str] = ABLATION, params: Path = PARAMS) -> None:
    """CoFi pruning of a copy of the teacher to one target sparsity or speedup."""
    _sweep_stage("prune", params, target, ablation)


@app.command()
def finetune(target: str = TARGET, ablation: Optional[str] = ABLATION, params: Path = PARAMS) -> None:
    """Fine-tune the pruned (compacted) structure with distillation; a target's finetune.epochs 0 passes it on as it is."""
    _sweep_stage("finetune", params, target, ablation)


@app.command()
def compact(target: str = TARGET, ablation: Optional[str] = ABLATION, params: Path = PARAMS) -> None:
    """Export the compact model (remote code, tokenizer, manifest) and register it in MLflow."""
    _sweep_stage("compact", params, target, ablation)


@app.command()
def baseline(
    method: str = typer.Argument(..., help="layer_subset or magnitude (one of baselines.methods)."),
    params: Path = PARAMS,
) -> None:
    """Train a comparison model from the same teacher: a layer-subset distilled student or magnitude pruning."""
    p = _params(params)
    _stage("baseline", p, _one_of(method, p.baselines.methods, "baselines.methods"), params.parent)


@app.command()
def profile(
    name: str = typer.Argument(..., help="A deployment target's name (a key of deployments)."),
    params: Path = PARAMS,
) -> None:
    """Measure a latency model of the teacher's sublayers on one deployment target, and check its fit."""
    p = _params(params)
    _one_of(name, list(p.deployments), "deployments")
    _stage("profile", p, name, params.parent)


@app.command()
def benchmark(params: Path = PARAMS) -> None:
    """Time and evaluate the teacher and every compact model the same way."""
    _stage("benchmark", _params(params), params.parent)


@app.command()
def report(params: Path = PARAMS) -> None:
    """Write report/report.md with its figures, and log it to MLflow."""
    _stage("report", _params(params), params.parent)


def main() -> None:
    """Run the command line. Errors in the user's input (params, data, models, checkpoints,
    the tracking server) print one line naming the problem and exit 1; set
    COFI_TRACEBACK=1 for the traceback. A training stage stopped by SIGINT or SIGTERM
    has saved a checkpoint; it exits with 128 + the signal's number."""
    import os

    die_with_launcher()
    try:
        app()
    except Exception as e:
        from cofi.manifest import ManifestError
        from cofi.errors import NonFiniteLossError, TrainingInterrupted
        from pipeline.tracking import TrackingUnavailableError

        if isinstance(e, TrainingInterrupted):
            typer.echo(f"error: {e}", err=True)
            sys.exit(128 + e.signum)
        user_errors = (ValueError, OSError, ManifestError, NonFiniteLossError, TrackingUnavailableError)
        if not isinstance(e, user_errors) or os.environ.get("COFI_TRACEBACK"):
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
