"""``cofi lineage``: verify a model's provenance chain, or list what a teacher produced.

Mount on a typer app with ``app.command()(lineage)``. Nothing heavy (torch,
MLflow) is imported until the command runs.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer


def lineage(
    model_dir: Optional[Path] = typer.Argument(
        None, help="A model directory with a manifest.json (outputs/teacher, a pruned or compact model)."
    ),
    teacher: Optional[str] = typer.Option(
        None,
        "--teacher",
        help="List every run and registered model produced from this teacher: its digest "
        "(or a unique prefix of at least 8 characters) or its MLflow run id.",
    ),
    project_dir: Path = typer.Option(
        Path("."), "--project-dir", help="Project root; its mlflow.db is used unless MLFLOW_TRACKING_URI is set."
    ),
    experiment: Optional[str] = typer.Option(
        None, "--experiment", help="With --teacher: search only this MLflow experiment (default: all)."
    ),
) -> None:
    """Print a model's provenance chain and verify every file hash (exit 1 on a mismatch),
    or with --teacher list the models produced from a teacher."""
    if (model_dir is None) == (teacher is None):
        typer.echo("give a MODEL_DIR to verify, or --teacher to list its descendants (not both)", err=True)
        raise typer.Exit(2)

    from cofi.manifest import ManifestError
    from pipeline.lineage import find_descendants, format_chain, verify

    if model_dir is not None:
        try:
            chain = verify(model_dir)
        except ManifestError as e:
            typer.echo(f"lineage check FAILED: {e}", err=True)
            raise typer.Exit(1) from None
        typer.echo(format_chain(chain))
        checked = sum(len(entry["manifest"]["files"]) for entry in chain if entry["on_disk"])
        gone = [entry for entry in chain if not entry["on_disk"]]
        typer.echo(
            f"OK: {len(chain)} link(s), {checked} file hash(es) verified"
            + (f"; {len(gone)} ancestor(s) no longer on disk, known by their recorded digest" if gone else "")
        )
        return

    from pipeline.tracking import TrackingUnavailableError

    try:
        found = find_descendants(teacher, project_dir, experiment)
    except (ValueError, TrackingUnavailableError) as e:  # ValueError: an ambiguous hash prefix
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    if not found:
        typer.echo(f"no runs descend from teacher {teacher}")
        return
    typer.echo(f"{len(found)} run(s) descend from teacher {found[0]['teacher_sha256'] or teacher}:")
    for entry in found:
        started = (
            datetime.fromtimestamp(entry["start_time"] / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            if entry.get("start_time")
            else "-"
        )
        models = ", ".join(entry["model_versions"]) or "-"
        typer.echo(
            f"  {entry['run_name'] or '-':<16} {entry['kind'] or '-':<10} {str(entry['weights_sha256'] or '-')[:12]:<12}  "
            f"run {entry['run_id']}  {entry['status']:<8} {started}  registered: {models}"
        )
