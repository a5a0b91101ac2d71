"""The one manifest format, and the atomic writes it relies on.

``manifest.json`` in a directory records the SHA-256 of the directory's files, so a
reader can tell that the files it is about to use are the ones that were written::

    {"files": {"<path relative to the directory, POSIX>": "<sha256>", ...},
     "digest": "<sha256 over the sorted 'path:sha256' lines>",   # the identity of that set
     ...}                                                          # the writer's own fields

Training checkpoints (cofi.checkpoint) list their current state file and add the
step; model directories (pipeline.lineage) list every file and add their lineage.
The manifest is written last and atomically, so it only ever names complete files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Mapping

MANIFEST = "manifest.json"


class ManifestError(RuntimeError):
    """A directory does not match its manifest, or the manifest is missing or unreadable.

    ``path``, ``expected`` and ``actual`` name the offending file and its recorded
    and current SHA-256 (None where one side does not exist).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, expected: str | None = None,
                 actual: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.expected = expected
        self.actual = actual


def plain_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the process's umask. Reading
    the umask means setting it: for that moment it is 022, the usual value, so a file another
    thread creates then gets no wider mode."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``content`` (text as UTF-8, bytes, or ``content(file)`` writing a binary file) to a
    temporary sibling, then rename it to ``path``: readers see the old file or the new one, never a part.
    The file gets the mode a plain ``open(path, "w")`` gives (0644 under the usual umask), not the
    temporary file's owner-only 0600: a model is read by other accounts (a serving container)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), plain_file_mode())
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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def combined_digest(files: Mapping[str, str]) -> str:
    """One SHA-256 over ``path:sha256`` lines sorted by path: the identity of a set of files."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}:{files[name]}\n".encode())
    return digest.hexdigest()


def list_files(directory: str | os.PathLike) -> list[str]:
    """Every file under ``directory`` (recursively, POSIX relative paths, sorted) but its manifest
    and a temporary manifest that a crash in atomic_write left behind."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ManifestError(f"{directory}: not a directory", path=directory)
    names = []
    for path in sorted(directory.rglob("*")):
        top = path.parent == directory
        if path.is_file() and not (top and (path.name == MANIFEST or path.name.startswith(f".{MANIFEST}."))):
            names.append(path.relative_to(directory).as_posix())
    return names


def hash_files(directory: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, str]:
    """SHA-256 of the files ``names`` of ``directory`` (default: :func:`list_files`)."""
    directory = Path(directory)
    return {name: sha256_file(directory / name) for name in (list_files(directory) if names is None else names)}


def write_manifest(directory: str | os.PathLike, files: Mapping[str, str] | None = None, **fields: Any) -> dict:
    """Write ``directory/manifest.json`` atomically: ``files`` (default: every file of the
    directory, hashed), their digest and ``fields``. Returns the manifest as written."""
    files = dict(hash_files(directory) if files is None else files)
    if not files:
        raise ManifestError(f"{directory}: no files to record", path=directory)
    text = json.dumps({"files": files, "digest": combined_digest(files), **fields}, indent=2, default=str) + "\n"
    atomic_write(Path(directory) / MANIFEST, text)
    return json.loads(text)


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of ``directory``; ManifestError naming the path if it is missing or unreadable."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest (was this directory written by this package?)", path=path) from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the manifest ({e})", path=path) from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: corrupt manifest, not JSON ({e})", path=path) from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "digest" not in manifest:
        raise ManifestError(f"{path}: corrupt manifest, no 'files' and 'digest'", path=path)
    return manifest


def verify_files(directory: str | os.PathLike, manifest: Mapping[str, Any], complete: bool = True) -> None:
    """Check ``directory`` against ``manifest``: every listed file present with its SHA-256 (each
    file hashed once), with ``complete`` no file unlisted, and the digest consistent with the list.
    Raises ManifestError naming the file, the expected and the actual hash."""
    directory = Path(directory)
    listed: Mapping[str, str] = manifest["files"]
    for name in sorted(listed):
        path = directory / name
        if not path.is_file():
            raise ManifestError(f"{path}: listed in the manifest (sha256 {listed[name]}) but missing",
                                path=path, expected=listed[name])
        actual = sha256_file(path)
        if actual != listed[name]:
            raise ManifestError(f"{path}: SHA-256 mismatch: expected {listed[name]}, actual {actual} (modified or corrupt)",
                                path=path, expected=listed[name], actual=actual)
    if complete:
        for name in list_files(directory):
            if name not in listed:
                raise ManifestError(f"{directory / name}: not in the manifest; the directory was changed after it "
                                    "was recorded", path=directory / name)
    recorded = combined_digest(listed)
    if recorded != manifest["digest"]:
        raise ManifestError(
            f"{directory / MANIFEST}: digest mismatch: expected {manifest['digest']}, actual {recorded} "
            "(the manifest was edited)", path=directory / MANIFEST, expected=manifest["digest"], actual=recorded,
        )


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a directory: the names of files
    just written or renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
