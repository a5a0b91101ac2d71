"""Provenance manifests: which weights came from which parent, data, code and run.

Every model directory the pipeline writes gets ``manifest.json``::

    {"kind": "pruned",
     "weights": {"config.json": "<sha256>", "model.safetensors": "<sha256>", ...},
     "weights_sha256": "<sha256 over the sorted 'name:hash' lines>",
     "parent": {<the parent's whole manifest>} | null,
     "parent_dir": "../../teacher/model" | null,      # relative to this model directory
     "base_model": {"name": ..., "weights_sha256": ...} | null,
     "data": {"digest": ..., "source": ...} | null,
     "params": {...},
     "code": {"git_commit": ..., "dirty": ..., "package_version": ...},
     "mlflow_run_id": ... | null,
     "created": "2026-01-01T00:00:00Z",
     "extra": {...}}                                   # only when given

Embedding the parent's manifest makes each manifest a self-contained chain
down to the root (the fine-tuned teacher, whose ``base_model`` names the
pretrained weights), so :func:`verify` can tell when a parent on disk was
changed after its child was made. The MLflow side of the lineage is a set of
run / model-version tags (:func:`lineage_tags`) that :func:`find_descendants`
searches. This module imports MLflow only inside :func:`find_descendants`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from cofi.checkpoint import atomic_write, sha256_file
from pipeline.codestate import code_state

__all__ = [
    "MANIFEST",
    "LineageError",
    "TAG_KIND",
    "TAG_WEIGHTS_SHA256",
    "TAG_PARENT_SHA256",
    "TAG_PARENT_RUN_ID",
    "TAG_TEACHER_SHA256",
    "TAG_TEACHER_RUN_ID",
    "TAG_DATA_DIGEST",
    "LINEAGE_TAGS",
    "hash_files",
    "combined_digest",
    "directory_digest",
    "describe_base_model",
    "write_manifest",
    "read_manifest",
    "verify",
    "format_chain",
    "teacher_of",
    "lineage_tags",
    "find_descendants",
]

MANIFEST = "manifest.json"
TEACHER_KIND = "teacher"

# Tags on MLflow runs and registered model versions (see lineage_tags).
TAG_KIND = "cofi.lineage.kind"
TAG_WEIGHTS_SHA256 = "cofi.lineage.weights_sha256"
TAG_PARENT_SHA256 = "cofi.lineage.parent_sha256"
TAG_PARENT_RUN_ID = "cofi.lineage.parent_run_id"
TAG_TEACHER_SHA256 = "cofi.lineage.teacher_sha256"
TAG_TEACHER_RUN_ID = "cofi.lineage.teacher_run_id"
TAG_DATA_DIGEST = "cofi.lineage.data_digest"
LINEAGE_TAGS = (
    TAG_KIND,
    TAG_WEIGHTS_SHA256,
    TAG_PARENT_SHA256,
    TAG_PARENT_RUN_ID,
    TAG_TEACHER_SHA256,
    TAG_TEACHER_RUN_ID,
    TAG_DATA_DIGEST,
)

_HEX = re.compile(r"^[0-9a-f]+$")
MIN_PREFIX = 8


class LineageError(RuntimeError):
    """A model directory does not match its manifest, or a chain link is broken.

    ``path``, ``expected`` and ``actual`` name the offending file and its
    recorded and current SHA-256 (or None where one side does not exist).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, expected: str | None = None, actual: str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.expected = expected
        self.actual = actual


# ----------------------------------------------------------------------------
# hashing and code state


def _is_manifest_file(name: str) -> bool:
    # the manifest itself, and a temporary file atomic_write left behind by a crash
    return name == MANIFEST or (name.startswith(f".{MANIFEST}.") and name.endswith(".tmp"))


def hash_files(directory: str | os.PathLike) -> dict[str, str]:
    """SHA-256 of every file under ``directory`` (recursively, POSIX relative names), manifest excluded."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LineageError(f"{directory}: not a model directory", path=directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not (path.parent == directory and _is_manifest_file(path.name)):
            files[path.relative_to(directory).as_posix()] = sha256_file(path)
    return files


def combined_digest(files: Mapping[str, str]) -> str:
    """One SHA-256 over ``name:hash`` lines sorted by name: the identity of a set of weight files."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}:{files[name]}\n".encode())
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


def directory_digest(directory: str | os.PathLike, weights_only: bool = True) -> str:
    """:func:`combined_digest` of a directory's weight files (``weights_only``) or of all its files.

    Identifies a pretrained base model by its weights, whatever else (README,
    tokenizer files) its directory holds; falls back to all files when it
    has no file with a weight suffix.
    """
    files = hash_files(directory)
    if weights_only:
        files = {k: v for k, v in files.items() if k.endswith(WEIGHT_SUFFIXES)} or files
    return combined_digest(files)


def describe_base_model(name: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """``base_model`` entry for a root manifest: the name, and the digest of its weight files if local."""
    info: dict[str, Any] = {"name": name}
    if directory is not None:
        directory = Path(directory)
        files = hash_files(directory)
        weights = {k: v for k, v in files.items() if k.endswith(WEIGHT_SUFFIXES)} or files
        info["weights"] = weights
        info["weights_sha256"] = combined_digest(weights)
    return info


# ----------------------------------------------------------------------------
# manifests


def write_manifest(
    model_dir: Path,
    *,
    kind: str,
    parent_dir: Path | None,
    base_model: dict | None,
    data: dict | None,
    params: dict,
    mlflow_run_id: str | None,
    code: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Hash every file of ``model_dir`` and write ``model_dir/manifest.json`` atomically; returns it.

    The parent's current manifest is embedded whole (so ``parent_dir`` must
    hold one), and ``parent_dir`` is stored relative to ``model_dir``: the
    pair of directories may move together (a DVC experiment workspace, a
    copy of outputs/) and still verify.
    """
    model_dir = Path(model_dir)
    files = hash_files(model_dir)
    if not files:
        raise LineageError(f"{model_dir}: no files to record", path=model_dir)
    parent = None
    parent_rel = None
    if parent_dir is not None:
        parent = read_manifest(parent_dir)
        try:
            parent_rel = Path(os.path.relpath(Path(parent_dir).absolute(), model_dir.absolute())).as_posix()
        except ValueError:  # another drive
            parent_rel = str(Path(parent_dir).absolute())
    manifest: dict[str, Any] = {
        "kind": kind,
        "weights": files,
        "weights_sha256": combined_digest(files),
        "parent": parent,
        "parent_dir": parent_rel,
        "base_model": base_model,
        "data": data,
        "params": params,
        "code": code if code is not None else code_state(),
        "mlflow_run_id": mlflow_run_id,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if extra:
        manifest["extra"] = extra
    text = json.dumps(manifest, indent=2, default=str) + "\n"
    atomic_write(model_dir / MANIFEST, text)
    return json.loads(text)


REQUIRED_KEYS = ("kind", "weights", "weights_sha256", "parent")


def read_manifest(model_dir: str | os.PathLike) -> dict:
    """The manifest of ``model_dir``; LineageError naming the path if it is missing or unreadable."""
    path = Path(model_dir) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LineageError(f"{path}: no provenance manifest (was this directory written by the pipeline?)", path=path) from None
    except OSError as e:
        raise LineageError(f"{path}: cannot read the manifest ({e})", path=path) from e
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineageError(f"{path}: corrupt manifest, not JSON ({e})", path=path) from e
    _check_shape(manifest, path)
    return manifest


def load_verified(model_dir: str | os.PathLike):
    """``cofi.compact.load_model`` after checking every file of ``model_dir`` against its
    manifest: a truncated or modified weight file is a LineageError naming it, not a
    crash somewhere inside torch or safetensors."""
    from cofi.compact import load_model

    model_dir = Path(model_dir)
    _verify_files(model_dir, read_manifest(model_dir))
    return load_model(model_dir)


def _check_shape(manifest: Any, where: str | os.PathLike) -> None:
    if not isinstance(manifest, dict):
        raise LineageError(f"{where}: corrupt manifest, not a JSON object", path=where)
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise LineageError(f"{where}: corrupt manifest, missing {missing}", path=where)
    if not isinstance(manifest["weights"], dict) or (manifest["parent"] is not None and not isinstance(manifest["parent"], dict)):
        raise LineageError(f"{where}: corrupt manifest, bad 'weights' or 'parent'", path=where)


def _verify_files(model_dir: Path, manifest: Mapping[str, Any]) -> None:
    """Every listed file present with its hash, no unlisted file, the combined digest consistent."""
    listed: Mapping[str, str] = manifest["weights"]
    for name in sorted(listed):
        path = model_dir / name
        if not path.is_file():
            raise LineageError(
                f"{path}: listed in the manifest (sha256 {listed[name]}) but missing", path=path, expected=listed[name]
            )
        actual = sha256_file(path)
        if actual != listed[name]:
            raise LineageError(
                f"{path}: SHA-256 mismatch: expected {listed[name]}, actual {actual} (modified or corrupt)",
                path=path,
                expected=listed[name],
                actual=actual,
            )
    for name, actual in hash_files(model_dir).items():
        if name not in listed:
            path = model_dir / name
            raise LineageError(
                f"{path}: not in the manifest (sha256 {actual}); the directory was changed after it was recorded",
                path=path,
                actual=actual,
            )
    _verify_digest(manifest, model_dir / MANIFEST)


def _verify_digest(manifest: Mapping[str, Any], where: str | os.PathLike) -> None:
    actual = combined_digest(manifest["weights"])
    if actual != manifest["weights_sha256"]:
        raise LineageError(
            f"{where}: weights_sha256 mismatch: expected {manifest['weights_sha256']}, actual {actual} "
            "(the manifest was edited)",
            path=where,
            expected=manifest["weights_sha256"],
            actual=actual,
        )


def _entry(manifest: dict, directory: Path | None, on_disk: bool) -> dict:
    return {
        "kind": manifest.get("kind"),
        "dir": None if directory is None else str(directory),
        "on_disk": on_disk,
        "weights_sha256": manifest.get("weights_sha256"),
        "mlflow_run_id": manifest.get("mlflow_run_id"),
        "created": manifest.get("created"),
        "manifest": manifest,
    }


def verify(model_dir: str | os.PathLike) -> list[dict]:
    """Verify a model directory and its whole ancestry; returns the chain, model first, root last.

    Each entry: kind, dir, on_disk, weights_sha256, mlflow_run_id, created,
    manifest. The model's files must match its manifest. For each embedded
    parent: its recorded digest must be consistent, and if its directory
    still exists, its current manifest must equal the embedded one (else it
    changed after the child was made) and its files must match. A parent
    directory that no longer exists is reported with on_disk False. Raises
    LineageError naming the file, the expected and the actual hash.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    _verify_files(model_dir, manifest)
    chain = [_entry(manifest, model_dir, True)]
    child_dir, child = model_dir, manifest
    while child.get("parent") is not None:
        embedded = child["parent"]
        where = f"{child_dir / MANIFEST} (embedded parent)"
        _check_shape(embedded, where)
        _verify_digest(embedded, where)
        parent_dir = None
        if child.get("parent_dir"):
            parent_dir = Path(os.path.normpath(child_dir / child["parent_dir"]))
        on_disk = parent_dir is not None and (parent_dir / MANIFEST).is_file()
        if on_disk:
            current = read_manifest(parent_dir)
            if current != embedded:
                raise LineageError(
                    f"{parent_dir / MANIFEST}: parent changed after {child_dir} was made from it: "
                    f"expected weights_sha256 {embedded['weights_sha256']}, actual {current['weights_sha256']}"
                    + ("" if current["weights_sha256"] != embedded["weights_sha256"] else " (same weights, other manifest fields)"),
                    path=parent_dir / MANIFEST,
                    expected=embedded["weights_sha256"],
                    actual=current["weights_sha256"],
                )
            _verify_files(parent_dir, current)
        chain.append(_entry(embedded, parent_dir, on_disk))
        child_dir = parent_dir if parent_dir is not None else child_dir
        child = embedded
    return chain


def format_chain(chain: Sequence[Mapping[str, Any]]) -> str:
    """One line per link, model first: kind, directory, short hash, MLflow run, creation time."""
    lines = []
    width = max((len(str(e.get("kind"))) for e in chain), default=4)
    for i, entry in enumerate(chain):
        directory = entry.get("dir") or "?"
        if entry.get("dir") and not entry.get("on_disk", True):
            directory += " (gone; recorded copy)"
        run = entry.get("mlflow_run_id") or "-"
        arrow = "  " if i == 0 else "<-"
        lines.append(
            f"{arrow} {str(entry.get('kind')):<{width}}  {str(entry.get('weights_sha256'))[:12]}  "
            f"run {run}  {entry.get('created') or '-'}  {directory}"
        )
    root = chain[-1]["manifest"] if chain and "manifest" in chain[-1] else None
    if root and root.get("base_model"):
        base = root["base_model"]
        digest = base.get("weights_sha256") or base.get("digest")
        lines.append(f"<- base model {base.get('name', '?')}" + (f"  {str(digest)[:12]}" if digest else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# MLflow tags


def _chain_of(manifest: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    chain = [manifest]
    while chain[-1].get("parent") is not None:
        chain.append(chain[-1]["parent"])
    return chain


def teacher_of(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The teacher a manifest descends from: the nearest ancestor of kind "teacher", else the root.

    None for the teacher itself (or any root): it descends from no teacher.
    """
    ancestors = _chain_of(manifest)[1:]
    for ancestor in ancestors:
        if ancestor.get("kind") == TEACHER_KIND:
            return ancestor
    return ancestors[-1] if ancestors else None


def lineage_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Tags for the run (and model version) that produced ``manifest``: its kind and weights, its
    parent's and its teacher's weights and runs, its data digest. Missing values are left out."""
    tags = {TAG_KIND: manifest.get("kind"), TAG_WEIGHTS_SHA256: manifest.get("weights_sha256")}
    parent = manifest.get("parent")
    if parent:
        tags[TAG_PARENT_SHA256] = parent.get("weights_sha256")
        tags[TAG_PARENT_RUN_ID] = parent.get("mlflow_run_id")
    teacher = teacher_of(manifest)
    if teacher:
        tags[TAG_TEACHER_SHA256] = teacher.get("weights_sha256")
        tags[TAG_TEACHER_RUN_ID] = teacher.get("mlflow_run_id")
    data = manifest.get("data") or {}
    if isinstance(data, Mapping) and data.get("digest"):
        tags[TAG_DATA_DIGEST] = data["digest"]
    return {k: str(v) for k, v in tags.items() if v is not None}


def _version_key(name_version: str) -> tuple[str, int]:
    name, _, version = name_version.rpartition("/")
    return (name, int(version) if version.isdigit() else 0)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_descendants(teacher: str, project_dir: Path, experiment: str | None) -> list[dict]:
    """Every run (with its registered model versions) whose tags say it descends from ``teacher``.

    ``teacher``: the teacher's weights_sha256 or a unique prefix of at least 8
    hex characters, or the teacher's MLflow run id. ``experiment``: the
    experiment to search (None: all). Reads the store of
    :func:`pipeline.tracking.tracking_uri`. Returns dicts sorted by start
    time: run_id, run_name, experiment_id, status, start_time, kind, stage,
    weights_sha256, parent_sha256, teacher_sha256, teacher_run_id,
    model_versions (["name/version", ...]). Raises LineageError if a hash
    prefix names several teachers.
    """
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import check_tracking_server, retry_locked, store_client, tracking_uri

    teacher = teacher.strip()
    uri = tracking_uri(project_dir)
    check_tracking_server(uri)
    if uri.startswith("sqlite:") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []  # nothing tracked yet; do not create an empty store
    client = store_client(uri)
    if experiment is None:
        experiment_ids = [e.experiment_id for e in retry_locked(lambda: client.search_experiments(), "searching")]
    else:
        found = retry_locked(lambda: client.get_experiment_by_name(experiment), "searching")
        experiment_ids = [found.experiment_id] if found is not None else []
    if not experiment_ids:
        return []

    def search(filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = retry_locked(
                lambda: client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token),
                "searching runs",
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    runs = {}
    lowered = teacher.lower()
    if len(lowered) >= MIN_PREFIX and _HEX.match(lowered):
        for run in search(f"tags.`{TAG_TEACHER_SHA256}` LIKE {_quote(lowered + '%')}"):
            runs[run.info.run_id] = run
        teachers = {r.data.tags.get(TAG_TEACHER_SHA256) for r in runs.values()}
        if len(teachers) > 1:
            listed = ", ".join(sorted(t[:16] for t in teachers if t))
            raise LineageError(f"teacher prefix {teacher!r} is ambiguous: it matches {listed}; give more characters")
    for run in search(f"tags.`{TAG_TEACHER_RUN_ID}` = {_quote(teacher)}"):
        runs[run.info.run_id] = run

    # registered versions: of the runs found, and any version tagged with the teacher itself
    versions: dict[str, set[str]] = {}

    def add_versions(filter_string: str) -> list:
        try:
            found = retry_locked(lambda: client.search_model_versions(filter_string), "searching model versions")
        except MlflowException:  # a store without a model registry
            return []
        for mv in found:
            if mv.run_id:
                versions.setdefault(mv.run_id, set()).add(f"{mv.name}/{mv.version}")
        return found

    tagged = []
    if len(lowered) >= MIN_PREFIX and _HEX.match(lowered):
        tagged += add_versions(f"tags.`{TAG_TEACHER_SHA256}` LIKE {_quote(lowered + '%')}")
    tagged += add_versions(f"tags.`{TAG_TEACHER_RUN_ID}` = {_quote(teacher)}")
    for mv in tagged:
        if mv.run_id and mv.run_id not in runs:
            try:
                run = retry_locked(lambda: client.get_run(mv.run_id), "reading a run")
            except MlflowException:  # the run was deleted; the version remains
                continue
            if run.info.experiment_id in experiment_ids:
                runs[mv.run_id] = run
    ids = sorted(runs)
    for i in range(0, len(ids), 100):
        quoted = ", ".join(_quote(run_id) for run_id in ids[i : i + 100])
        add_versions(f"run_id IN ({quoted})")

    result = []
    for run in sorted(runs.values(), key=lambda r: (r.info.start_time or 0, r.info.run_id)):
        tags = run.data.tags
        result.append(
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "experiment_id": run.info.experiment_id,
                "status": run.info.status,
                "start_time": run.info.start_time,
                "kind": tags.get(TAG_KIND),
                "stage": tags.get("cofi.stage"),
                "weights_sha256": tags.get(TAG_WEIGHTS_SHA256),
                "parent_sha256": tags.get(TAG_PARENT_SHA256),
                "teacher_sha256": tags.get(TAG_TEACHER_SHA256),
                "teacher_run_id": tags.get(TAG_TEACHER_RUN_ID),
                "model_versions": sorted(versions.get(run.info.run_id, ()), key=_version_key),
            }
        )
    return result


def teacher_tags(teacher_dir: str | os.PathLike) -> dict[str, str]:
    """Tags for a run that uses a teacher (and its descendants) without producing a model."""
    tags = lineage_tags(read_manifest(teacher_dir))
    return {k: tags[k] for k in (TAG_TEACHER_SHA256, TAG_TEACHER_RUN_ID, TAG_DATA_DIGEST) if k in tags}
