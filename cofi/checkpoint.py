"""Atomic, hash-verified training checkpoints.

A checkpoint directory holds numbered state files and a manifest (cofi.manifest)
listing the current one with its SHA-256, plus the step. Each save writes a new
state file, then atomically replaces the manifest, then deletes the previous state
file: a crash at any moment leaves a manifest that names a complete file with the
right hash.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cofi.manifest import MANIFEST, ManifestError, atomic_write, hash_files, read_manifest, verify_files, write_manifest


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], step: int) -> Path:
    directory = Path(directory)
    previous = read_manifest(directory) if (directory / MANIFEST).exists() else None
    path = directory / f"state-{step:08d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    write_manifest(directory, hash_files(directory, [path.name]), step=step)
    for name in previous["files"] if previous else ():
        if name != path.name:
            (directory / name).unlink(missing_ok=True)
    return path


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The latest checkpoint's state, or None if there is none; a corrupt one raises ManifestError."""
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        return None
    try:
        manifest = read_manifest(directory)
        verify_files(directory, manifest, complete=False)  # a crash may leave the previous state file
    except ManifestError as e:
        raise ManifestError(f"{e}; delete the checkpoint directory to start over", e.path, e.expected, e.actual) from e
    (name,) = manifest["files"]
    return torch.load(directory / name, map_location="cpu", weights_only=False)
