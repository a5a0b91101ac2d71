"""The state of the code a stage runs: the git commit, whether the code differs
from it, and the installed package version. Used by manifests (pipeline.lineage)
and MLflow runs (pipeline.tracking, pipeline.runtime)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

PACKAGE = "cofi-pipeline"

CODE_PATHSPECS = (":(top,glob)**/*.py", ":(top)pyproject.toml", ":(top)dvc.yaml", ":(top,glob)**/requirements*.txt")


def git_state(directory: str | os.PathLike) -> tuple[str | None, bool | None]:
    """(HEAD commit, dirty) of the git work tree containing ``directory``; (None, None) without git.

    Dirty means the *code* differs from the commit: a modified, staged or new
    (not ignored) Python file, pyproject.toml, dvc.yaml or requirements file.
    Data and results are left out on purpose: DVC rewrites dvc.lock and
    git-tracked metrics as stages finish, and ``dvc exp run`` edits
    params.yaml (logged as params anyway), so counting them would mark
    every stage of a pipeline run dirty.
    """
    directory = Path(directory)
    if not directory.is_dir():
        directory = directory.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=directory, capture_output=True, text=True, timeout=30, check=True
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    try:
        status = git("status", "--porcelain", "--untracked-files=all", "--", *CODE_PATHSPECS)
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return commit or None, dirty


def code_state() -> dict[str, Any]:
    """git commit and dirty flag of the source tree this code runs from, and the package version."""
    from importlib.metadata import PackageNotFoundError, version

    commit, dirty = git_state(Path(__file__).resolve().parent)
    try:
        package_version = version(PACKAGE)
    except PackageNotFoundError:
        package_version = None
    return {"git_commit": commit, "dirty": dirty, "package_version": package_version}
