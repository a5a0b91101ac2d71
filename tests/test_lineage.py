"""Provenance manifests (cofi/manifest.py, pipeline/lineage.py) and the `lineage` command."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from cofi.manifest import MANIFEST, ManifestError, combined_digest, hash_files, read_manifest, verify_files
from pipeline import codestate, lineage
from pipeline.lineage import (
    TAG_DATA_DIGEST,
    TAG_PARENT_SHA256,
    TAG_TEACHER_RUN_ID,
    TAG_TEACHER_SHA256,
    TAG_WEIGHTS_SHA256,
    format_chain,
    lineage_tags,
    verify,
    write_manifest,
)


def _model(directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"seed": seed}))
    (directory / "model.safetensors").write_bytes(bytes((seed + i) % 256 for i in range(4096)))
    (directory / "sub").mkdir()
    (directory / "sub" / "tokenizer.json").write_text("{}")
    return directory


CODE = {"git_commit": "0" * 40, "dirty": False, "package_version": "0.1.0"}


def _chain(root: Path, run_ids=("run-teacher", "run-pruned", "run-compact")) -> tuple[Path, Path, Path]:
    base = _model(root / "base", 0)
    teacher = _model(root / "teacher", 1)
    write_manifest(teacher, kind="teacher", parent_dir=None, base_model=("tiny-bert", base), data_digest="d" * 64,
                   mlflow_run_id=run_ids[0])
    pruned = _model(root / "pruned" / "0.6", 2)
    write_manifest(pruned, kind="pruned", parent_dir=teacher, data_digest="d" * 64, mlflow_run_id=run_ids[1], code=CODE)
    compact = _model(root / "compact" / "0.6", 3)
    write_manifest(compact, kind="compact", parent_dir=pruned, data_digest=None, mlflow_run_id=run_ids[2], code=CODE)
    return teacher, pruned, compact


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_contents(tmp_path):
    teacher, pruned, compact = _chain(tmp_path)
    m, p, t = (read_manifest(d) for d in (compact, pruned, teacher))
    assert m["kind"] == "compact"
    assert set(m["files"]) == {"config.json", "model.safetensors", "sub/tokenizer.json"}
    assert m["files"]["model.safetensors"] == hashlib.sha256((compact / "model.safetensors").read_bytes()).hexdigest()
    assert m["digest"] == combined_digest(m["files"])
    # small: the parent's and older ancestors' digests, runs and relative directories, not their manifests
    assert m["ancestors"] == [
        {"kind": "pruned", "digest": p["digest"], "mlflow_run_id": "run-pruned", "dir": "../../pruned/0.6"},
        {"kind": "teacher", "digest": t["digest"], "mlflow_run_id": "run-teacher", "dir": "../../teacher"},
    ]
    assert m["mlflow_run_id"] == "run-compact" and m["code"] == CODE and m["created"].endswith("Z")
    assert m["data_digest"] is None and p["data_digest"] == "d" * 64
    assert t["ancestors"] == []
    # the base model: its weight files only (not its config or tokenizer), recorded by every descendant
    assert t["base_model"] == {"name": "tiny-bert", "digest": combined_digest(hash_files(tmp_path / "base", ["model.safetensors"]))}
    assert m["base_model"] == p["base_model"] == t["base_model"]
    assert lineage.describe_base_model("some/hub-id", "some/hub-id") == {"name": "some/hub-id"}  # nothing local to hash
    assert set(t["code"]) == {"git_commit", "dirty", "package_version"}  # computed when not given
    assert not list(compact.glob(".manifest.json.*"))  # atomic write left nothing behind


def test_good_chain_verifies(tmp_path):
    teacher, pruned, compact = _chain(tmp_path)
    chain = verify(compact)
    assert [e["kind"] for e in chain] == ["compact", "pruned", "teacher"]
    assert [Path(e["dir"]).resolve() for e in chain] == [compact.resolve(), pruned.resolve(), teacher.resolve()]
    assert all(e["on_disk"] for e in chain)
    assert chain[2]["digest"] == read_manifest(teacher)["digest"]
    text = format_chain(chain)
    for entry in chain:
        assert entry["digest"][:12] in text and entry["mlflow_run_id"] in text
    assert "base model tiny-bert" in text
    # moving the whole tree keeps the relative parent links valid
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    assert len(verify(moved / "compact" / "0.6")) == 3


def test_corrupt_weight_byte_is_named(tmp_path):
    _, _, compact = _chain(tmp_path)
    before = read_manifest(compact)["files"]["model.safetensors"]
    _flip_byte(compact / "model.safetensors")
    with pytest.raises(ManifestError) as e:
        verify(compact)
    message = str(e.value)
    assert str(compact / "model.safetensors") in message
    assert before in message and e.value.expected == before
    assert e.value.actual and e.value.actual != before and e.value.actual in message


def test_a_check_hashes_each_file_once(tmp_path, monkeypatch):
    import cofi.manifest

    _, _, compact = _chain(tmp_path)
    hashed, sha256_file = [], cofi.manifest.sha256_file
    monkeypatch.setattr(cofi.manifest, "sha256_file", lambda path: hashed.append(Path(path)) or sha256_file(path))
    verify_files(compact, read_manifest(compact))
    assert sorted(hashed) == sorted(compact / name for name in read_manifest(compact)["files"])


def test_corrupt_ancestor_file_is_named(tmp_path):
    teacher, _, compact = _chain(tmp_path)
    _flip_byte(teacher / "sub" / "tokenizer.json", offset=0)
    with pytest.raises(ManifestError, match="tokenizer.json"):
        verify(compact)


def test_parent_modified_after_child_is_detected(tmp_path):
    teacher, pruned, compact = _chain(tmp_path)
    # the teacher is retrained in place and re-manifested: consistent with itself, not with its children
    (teacher / "model.safetensors").write_bytes(b"retrained weights")
    old = read_manifest(teacher)
    write_manifest(teacher, kind="teacher", parent_dir=None, data_digest=old["data_digest"],
                   mlflow_run_id="run-teacher-2", code=CODE)
    assert verify(teacher)  # the teacher alone is fine
    with pytest.raises(ManifestError, match="the teacher changed after") as e:
        verify(pruned)
    assert e.value.expected == old["digest"]
    assert e.value.actual == read_manifest(teacher)["digest"]
    assert str(teacher / MANIFEST) in str(e.value)
    with pytest.raises(ManifestError, match="the teacher changed after"):  # a grandparent too
        verify(compact)


def test_unlisted_and_missing_files(tmp_path):
    _, _, compact = _chain(tmp_path)
    (compact / "extra.bin").write_bytes(b"x")
    with pytest.raises(ManifestError, match="extra.bin.*not in the manifest"):
        verify(compact)
    (compact / "extra.bin").unlink()
    (compact / "config.json").unlink()
    with pytest.raises(ManifestError, match="config.json.*missing"):
        verify(compact)


def test_edited_manifest_is_detected(tmp_path):
    _, _, compact = _chain(tmp_path)
    m = read_manifest(compact)
    m["files"]["config.json"] = "0" * 64
    (compact / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="config.json"):
        verify(compact)
    m["files"]["config.json"] = hashlib.sha256((compact / "config.json").read_bytes()).hexdigest()
    m["digest"] = "0" * 64  # the files intact, their recorded identity edited
    (compact / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="digest mismatch"):
        verify(compact)


def test_missing_or_corrupt_manifest_names_the_path(tmp_path):
    d = _model(tmp_path / "m", 5)
    with pytest.raises(ManifestError, match=str(d / MANIFEST)):
        read_manifest(d)
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(ManifestError, match=f"{d / MANIFEST}.*corrupt"):
        verify(d)
    (d / MANIFEST).write_text("[]")
    with pytest.raises(ManifestError, match="corrupt"):
        read_manifest(d)


def test_deleted_ancestor_falls_back_to_the_embedded_copy(tmp_path):
    teacher, pruned, compact = _chain(tmp_path)
    shutil.rmtree(pruned)
    chain = verify(compact)
    assert [e["on_disk"] for e in chain] == [True, False, True]  # the teacher is still found and verified
    assert "gone" in format_chain(chain)
    _flip_byte(teacher / "model.safetensors")
    with pytest.raises(ManifestError, match="model.safetensors"):
        verify(compact)


def test_lineage_tags_walk_to_the_teacher(tmp_path):
    teacher, pruned, compact = _chain(tmp_path)
    t, p, c = (read_manifest(d) for d in (teacher, pruned, compact))
    tags = lineage_tags(c)
    assert tags[TAG_WEIGHTS_SHA256] == c["digest"]
    assert tags[TAG_PARENT_SHA256] == p["digest"]
    assert tags[TAG_TEACHER_SHA256] == t["digest"]
    assert tags[TAG_TEACHER_RUN_ID] == "run-teacher"
    assert tags[lineage.TAG_KIND] == "compact"
    assert lineage_tags(p)[TAG_TEACHER_SHA256] == t["digest"]
    assert TAG_TEACHER_SHA256 not in lineage_tags(t)  # a teacher descends from no teacher
    assert all(isinstance(v, str) for v in tags.values())
    # a run still making its model carries all of them but its own digest
    assert lineage.run_tags("compact", pruned, None) == {k: v for k, v in tags.items() if k != TAG_WEIGHTS_SHA256}
    assert lineage.data_tags(teacher) == {TAG_DATA_DIGEST: "d" * 64}


def test_git_state_without_git(tmp_path):
    assert codestate.git_state(tmp_path) == (None, None)


def test_git_state_dirty_means_code(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "stage.py").write_text("x = 1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "init")
    head = git("rev-parse", "HEAD")
    assert codestate.git_state(tmp_path) == (head, False)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # DVC rewrites it as stages finish
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "teacher.json").write_text("{}")
    assert codestate.git_state(tmp_path / "metrics") == (head, False)
    (tmp_path / "stage.py").write_text("x = 2\n")
    assert codestate.git_state(tmp_path) == (head, True)


# ----------------------------------------------------------------------------
# MLflow side: find_descendants and the command


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A project with an embedded store: teacher -> pruned -> compact tracked as stage runs, plus
    an unrelated teacher's child."""
    mlflow = pytest.importorskip("mlflow")
    from pipeline import tracking

    saved = dict(os.environ)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    tmp_path = tmp_path_factory.mktemp("tracked")
    project = tmp_path / "project"
    project.mkdir()
    models = tmp_path / "models"
    models.mkdir()

    def stage(name: str, directory: Path, kind: str, parent: Path | None, register: bool = False) -> dict:
        with tracking.stage_run(name, params={"kind": kind}, group="g", tags={}, project_dir=project,
                                experiment="lineage-test", system_metrics=False) as run:
            manifest = write_manifest(directory, kind=kind, parent_dir=parent, data_digest=None,
                                      mlflow_run_id=run.info.run_id, code=CODE)
            tags = lineage_tags(manifest)
            mlflow.set_tags(tags)
            if register:
                tracking.register_model(directory, "lineage-test-model", tags=tags)
        return manifest

    try:
        teacher = stage("teacher", _model(models / "teacher", 1), "teacher", None)
        pruned = stage("prune@0.6", _model(models / "pruned", 2), "pruned", models / "teacher")
        compact = stage("compact@0.6", _model(models / "compact", 3), "compact", models / "pruned", register=True)
        other = stage("teacher-b", _model(models / "other", 4), "teacher", None)
        stage("prune-b", _model(models / "other-pruned", 5), "pruned", models / "other")
        yield {"project": project, "models": models, "teacher": teacher, "pruned": pruned,
               "compact": compact, "other": other}
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_find_descendants_by_hash_prefix_and_run_id(tracked):
    teacher = tracked["teacher"]
    by_hash = lineage.find_descendants(teacher["digest"][:10], tracked["project"], "lineage-test")
    assert [d["run_name"] for d in by_hash] == ["prune@0.6", "compact@0.6"]
    assert [d["weights_sha256"] for d in by_hash] == [tracked["pruned"]["digest"], tracked["compact"]["digest"]]
    assert by_hash[1]["model_versions"] == ["lineage-test-model/1"] and by_hash[0]["model_versions"] == []
    assert all(d["teacher_run_id"] == teacher["mlflow_run_id"] for d in by_hash)
    by_run = lineage.find_descendants(teacher["mlflow_run_id"], tracked["project"], None)
    assert [d["run_id"] for d in by_run] == [d["run_id"] for d in by_hash]
    assert lineage.find_descendants(teacher["digest"], tracked["project"], "lineage-test") == by_hash
    assert lineage.find_descendants("f" * 12, tracked["project"], "lineage-test") == []
    assert lineage.find_descendants(teacher["digest"][:10], tracked["project"], "no-such-experiment") == []


def test_find_descendants_rejects_an_ambiguous_prefix(tracked):
    from mlflow import MlflowClient

    from pipeline.tracking import tracking_uri

    client = MlflowClient(tracking_uri(tracked["project"]))
    experiment = client.get_experiment_by_name("lineage-test")
    for suffix in ("a" * 56, "b" * 56):
        run = client.create_run(experiment.experiment_id)
        client.set_tag(run.info.run_id, TAG_TEACHER_SHA256, "abcdef12" + suffix)
    with pytest.raises(ValueError, match="ambiguous"):
        lineage.find_descendants("abcdef12", tracked["project"], "lineage-test")
    assert len(lineage.find_descendants("abcdef12" + "a" * 8, tracked["project"], "lineage-test")) == 1


def _app():
    import typer

    from pipeline.cli_lineage import lineage as command

    app = typer.Typer()
    app.command()(command)
    return app


def test_cli_good_and_corrupt_chain(tmp_path):
    from typer.testing import CliRunner

    _, _, compact = _chain(tmp_path)
    runner = CliRunner()
    good = runner.invoke(_app(), [str(compact)])
    assert good.exit_code == 0, good.output
    assert "OK: 3 link(s)" in good.output and "compact" in good.output and "teacher" in good.output
    _flip_byte(compact / "model.safetensors")
    bad = runner.invoke(_app(), [str(compact)])
    assert bad.exit_code == 1
    assert "model.safetensors" in bad.output and "FAILED" in bad.output
    assert runner.invoke(_app(), []).exit_code == 2  # neither a directory nor --teacher


def test_cli_teacher_lists_descendants(tracked):
    from typer.testing import CliRunner

    teacher = tracked["teacher"]
    result = CliRunner().invoke(
        _app(), ["--teacher", teacher["digest"][:12], "--project-dir", str(tracked["project"])]
    )
    assert result.exit_code == 0, result.output
    assert "2 run(s)" in result.output
    assert "prune@0.6" in result.output and "compact@0.6" in result.output and "lineage-test-model/1" in result.output
    assert "prune-b" not in result.output
