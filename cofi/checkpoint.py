"""Atomic, hash-verified training checkpoints.

A checkpoint directory holds numbered state files and ``manifest.json`` naming
the current one with its SHA-256. Each save writes a new state file, then
atomically replaces the manifest, then deletes the previous state file: a crash
at any moment leaves a manifest that names a complete file with the right hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

MANIFEST = "manifest.json"


class CorruptCheckpointError(RuntimeError):
    pass


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``content`` (text as UTF-8, bytes, or ``content(file)`` writing a binary file) to a
    temporary sibling, then rename it to ``path``: readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any], step: int) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = read_manifest(directory)
    path = directory / f"state-{step:08d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    manifest = {"file": path.name, "sha256": sha256_file(path), "step": step}
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2))
    if previous and previous["file"] != path.name:
        (directory / previous["file"]).unlink(missing_ok=True)
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{path}: unreadable checkpoint manifest ({e})") from e


def load_checkpoint(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The latest checkpoint's state, or None if there is none; a corrupt one raises."""
    manifest = read_manifest(directory)
    if manifest is None:
        return None
    path = Path(directory) / manifest["file"]
    if not path.exists():
        raise CorruptCheckpointError(f"{path}: named by {MANIFEST} but missing")
    actual = sha256_file(path)
    if actual != manifest["sha256"]:
        raise CorruptCheckpointError(
            f"{path}: SHA-256 {actual[:12]}… does not match the manifest's {manifest['sha256'][:12]}… "
            "(truncated or modified); delete the checkpoint directory to start over"
        )
    return torch.load(path, map_location="cpu", weights_only=False)
