"""Lineage of the model directories the pipeline writes: in their manifest, and as MLflow tags.

The DAG and the hashes of every file DVC tracks are in dvc.lock. A model that
leaves the repository carries its own record instead: its manifest (the format of
cofi.manifest) adds to the SHA-256 of its files what it was made from::

    {"files": {"config.json": "<sha256>", ...}, "digest": "<sha256>",    # cofi.manifest
     "kind": "pruned",
     "ancestors": [{"kind": "teacher", "digest": ..., "mlflow_run_id": ..., "dir": "../../teacher"}],
     "base_model": {"name": "all-MiniLM-L6-v2", "digest": ...},
     "data_digest": ..., "mlflow_run_id": ..., "code": {"git_commit", "dirty", "package_version"},
     "created": "2026-01-01T00:00:00Z"}

``ancestors`` runs from the parent to the first model of the chain (the teacher),
each with the digest this model was made from and its directory relative to this
one. So :func:`verify` checks every ancestor still on disk, past one that is gone,
and :func:`lineage_tags` names the teacher without reading it. The MLflow side is a
set of run and model-version tags that :func:`find_descendants` searches; this
module imports MLflow only there.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from cofi.manifest import MANIFEST, ManifestError, combined_digest, hash_files, list_files, read_manifest, verify_files
from cofi.manifest import write_manifest as write_files_manifest
from pipeline.codestate import code_state

TEACHER_KIND = "teacher"

# Tags on MLflow runs and registered model versions (see lineage_tags).
TAG_KIND = "cofi.lineage.kind"
TAG_WEIGHTS_SHA256 = "cofi.lineage.weights_sha256"  # the model directory's digest
TAG_PARENT_SHA256 = "cofi.lineage.parent_sha256"
TAG_PARENT_RUN_ID = "cofi.lineage.parent_run_id"
TAG_TEACHER_SHA256 = "cofi.lineage.teacher_sha256"
TAG_TEACHER_RUN_ID = "cofi.lineage.teacher_run_id"
TAG_DATA_DIGEST = "cofi.lineage.data_digest"

_HEX = re.compile(r"^[0-9a-f]+$")
MIN_PREFIX = 8
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")


def describe_base_model(name: str, path: str | os.PathLike) -> dict[str, Any]:
    """The teacher's ``base_model``: its name and, when ``path`` is a local directory, the digest of
    its weight files only (its README, tokenizer or ONNX copies are not the weights, and not hashed)."""
    info: dict[str, Any] = {"name": name}
    if Path(path).is_dir():
        names = list_files(path)
        info["digest"] = combined_digest(hash_files(path, [n for n in names if n.endswith(WEIGHT_SUFFIXES)] or names))
    return info


def _relative(directory: str | os.PathLike, start: Path) -> str:
    return Path(os.path.relpath(Path(directory).absolute(), start.absolute())).as_posix()


def _ancestors(parent: Mapping[str, Any], parent_dir: Path, model_dir: Path) -> list[dict[str, Any]]:
    """The parent (its manifest ``parent``) and its own ancestors, directories relative to ``model_dir``."""
    link = {"kind": parent.get("kind"), "digest": parent["digest"], "mlflow_run_id": parent.get("mlflow_run_id"),
            "dir": _relative(parent_dir, model_dir)}
    older = [{**a, "dir": a["dir"] and _relative(parent_dir / a["dir"], model_dir)} for a in parent.get("ancestors") or ()]
    return [link, *older]


def write_manifest(
    model_dir: str | os.PathLike,
    *,
    kind: str,
    parent_dir: str | os.PathLike | None,
    data_digest: str | None,
    mlflow_run_id: str | None,
    base_model: tuple[str, str | os.PathLike] | None = None,
    code: dict[str, Any] | None = None,
) -> dict:
    """Hash every file of ``model_dir`` and write its manifest with its lineage; returns it.

    ``parent_dir``: the model it was made from (its manifest gives the digest, run and
    ancestry); None for the first model of a chain, the teacher, whose ``base_model``
    is (name, where it was loaded from). Directories are stored relative to
    ``model_dir``: a tree of models may move as a whole (a DVC experiment workspace,
    a copy of outputs/) and still verify. ``code``: default, this code's git state.
    """
    if parent_dir is None:
        ancestors, base = [], describe_base_model(*base_model) if base_model else None
    else:
        parent = read_manifest(parent_dir)
        ancestors, base = _ancestors(parent, Path(parent_dir), Path(model_dir)), parent.get("base_model")
    return write_files_manifest(
        model_dir, kind=kind, ancestors=ancestors, base_model=base,
        data_digest=data_digest, mlflow_run_id=mlflow_run_id, code=code if code is not None else code_state(),
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def _link(manifest: Mapping[str, Any], directory: Path | None, on_disk: bool = True) -> dict:
    return {"kind": manifest.get("kind"), "dir": None if directory is None else str(directory), "on_disk": on_disk,
            "digest": manifest.get("digest"), "mlflow_run_id": manifest.get("mlflow_run_id"),
            "created": manifest.get("created"), "manifest": manifest if on_disk else None}


def verify(model_dir: str | os.PathLike) -> list[dict]:
    """Verify a model directory and every ancestor still on disk; returns the chain, model first.

    Each link: kind, dir, on_disk, digest, mlflow_run_id, created and manifest (None
    for an ancestor whose directory is gone: what the model recorded of it is all
    there is). The model's files must match its manifest; an ancestor on disk must
    still have the digest the model was made from, and its files must match its own
    manifest. Raises ManifestError naming the file, the expected and the actual hash.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    verify_files(model_dir, manifest)
    chain = [_link(manifest, model_dir)]
    for recorded in manifest.get("ancestors") or ():
        directory = Path(os.path.normpath(model_dir / recorded["dir"])) if recorded.get("dir") else None
        if directory is None or not (directory / MANIFEST).is_file():
            chain.append(_link(recorded, directory, on_disk=False))
            continue
        current = read_manifest(directory)
        if current["digest"] != recorded["digest"]:
            raise ManifestError(
                f"{directory / MANIFEST}: the {recorded['kind']} changed after {model_dir} was made from it: "
                f"expected digest {recorded['digest']}, actual {current['digest']}",
                path=directory / MANIFEST, expected=recorded["digest"], actual=current["digest"],
            )
        verify_files(directory, current)
        chain.append(_link(current, directory))
    return chain


def format_chain(chain: Sequence[Mapping[str, Any]]) -> str:
    """One line per link, model first: kind, short digest, MLflow run, creation time, directory."""
    lines = []
    width = max((len(str(link["kind"])) for link in chain), default=4)
    for i, link in enumerate(chain):
        directory = (link["dir"] or "?") + ("" if link["on_disk"] else " (gone; recorded digest)")
        lines.append(f"{'  ' if i == 0 else '<-'} {str(link['kind']):<{width}}  {str(link['digest'])[:12]}  "
                     f"run {link['mlflow_run_id'] or '-'}  {link['created'] or '-'}  {directory}")
    base = chain[0]["manifest"].get("base_model") if chain else None
    if base:
        lines.append(f"<- base model {base['name']}" + (f"  {base['digest'][:12]}" if base.get("digest") else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# MLflow tags


def lineage_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Tags for the run (and model version) that produced ``manifest``: its kind and digest, its
    parent's and its teacher's digests and runs (the teacher: the nearest ancestor of that kind,
    else the first of the chain), its data digest. Missing values are left out."""
    tags = {TAG_KIND: manifest.get("kind"), TAG_WEIGHTS_SHA256: manifest.get("digest"),
            TAG_DATA_DIGEST: manifest.get("data_digest")}
    ancestors = manifest.get("ancestors") or []
    if ancestors:
        teacher = next((a for a in ancestors if a.get("kind") == TEACHER_KIND), ancestors[-1])
        tags.update({TAG_PARENT_SHA256: ancestors[0]["digest"], TAG_PARENT_RUN_ID: ancestors[0].get("mlflow_run_id"),
                     TAG_TEACHER_SHA256: teacher["digest"], TAG_TEACHER_RUN_ID: teacher.get("mlflow_run_id")})
    return {k: str(v) for k, v in tags.items() if v is not None}


def run_tags(kind: str, parent_dir: str | os.PathLike | None, data_digest: str | None) -> dict[str, str]:
    """The lineage tags of a run still making a model of ``kind`` from ``parent_dir``: all but the
    model's own digest, so that a run in progress (or failed) is found among its teacher's descendants."""
    parent = read_manifest(parent_dir) if parent_dir is not None else None
    ancestors = [parent, *(parent.get("ancestors") or ())] if parent else []
    return lineage_tags({"kind": kind, "ancestors": ancestors, "data_digest": data_digest})


def data_tags(teacher_dir: str | os.PathLike) -> dict[str, str]:
    """The data digest of the teacher's manifest, for a run that reads the teacher's data and makes no model."""
    return lineage_tags({"data_digest": read_manifest(teacher_dir).get("data_digest")})


def _version_key(name_version: str) -> tuple[str, int]:
    name, _, version = name_version.rpartition("/")
    return (name, int(version) if version.isdigit() else 0)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_descendants(teacher: str, project_dir: Path, experiment: str | None) -> list[dict]:
    """Every run (with its registered model versions) whose tags say it descends from ``teacher``.

    ``teacher``: the teacher's digest or a unique prefix of at least 8
    hex characters, or the teacher's MLflow run id. ``experiment``: the
    experiment to search (None: all). Reads the store of
    :func:`pipeline.tracking.tracking_uri`. Returns dicts sorted by start
    time: run_id, run_name, experiment_id, status, start_time, kind, stage,
    weights_sha256, parent_sha256, teacher_sha256, teacher_run_id,
    model_versions (["name/version", ...]). Raises ValueError if a hash
    prefix names several teachers.
    """
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import check_tracking_server, sqlite_path, store_client, tracking_uri

    teacher = teacher.strip()
    uri = tracking_uri(project_dir)
    check_tracking_server(uri)
    if sqlite_path(uri) is not None and not sqlite_path(uri).exists():
        return []  # nothing tracked yet; do not create an empty store
    client = store_client(uri)
    if experiment is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    else:
        found = client.get_experiment_by_name(experiment)
        experiment_ids = [found.experiment_id] if found is not None else []
    if not experiment_ids:
        return []

    def search(filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
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
            raise ValueError(f"teacher prefix {teacher!r} is ambiguous: it matches {listed}; give more characters")
    for run in search(f"tags.`{TAG_TEACHER_RUN_ID}` = {_quote(teacher)}"):
        runs[run.info.run_id] = run

    # registered versions: of the runs found, and any version tagged with the teacher itself
    versions: dict[str, set[str]] = {}

    def add_versions(filter_string: str) -> list:
        try:
            found = client.search_model_versions(filter_string)
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
                run = client.get_run(mv.run_id)
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
