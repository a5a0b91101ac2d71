"""Process safety of a real stage run (`python -m pipeline.launch`, what dvc.yaml runs):
a single-process stage runs without torchrun; a second run of a stage that is running
stops at once, naming the first, and writes nothing; `kill -9` on the process group of a
two-process (torchrun) run leaves no worker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import tiny_project
from pipeline.processes import lock_path, stage_lock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

STAGE = ["prune", "--target", "0.5"]


def project(root: Path, processes: int) -> Path:
    def long_run(params: dict) -> None:  # trains far longer than the test waits
        params["prune"].update(targets=[0.5], epochs=500, batch_size=8, evals_per_epoch=1)
        params["compute"].update(processes=processes, bf16=False, threads=1)
        params["mlflow"]["register_models"] = False

    tiny_project(root, long_run)
    return root


def launch(root: Path) -> subprocess.Popen:
    """The stage in its own process group, as `dvc repro` (or a job scheduler) starts it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.Popen([sys.executable, "-m", "pipeline.launch", *STAGE], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(condition, what: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def training(root: Path) -> bool:
    """The run has written its first checkpoint: it is past start-up, inside training."""
    return any((root / "checkpoints").glob("prune@0.5/*/manifest.json"))


def files(root: Path) -> list[tuple[Path, int]]:
    """Every file of the project with its mtime, but for what the running first run writes
    (its checkpoints and the MLflow store)."""
    return sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")
                  if p.is_file() and "checkpoints" not in p.parts and not p.name.startswith("mlflow.db"))


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_second_run_is_refused_and_a_killed_group_leaves_no_worker(tmp_path):
    root = project(tmp_path, processes=2)
    first = launch(root)
    try:
        wait_for(lambda: training(root) or first.poll() is not None, "the first run to train")
        assert first.poll() is None, first.communicate()[1][-3000:]
        workers = psutil.Process(first.pid).children(recursive=True)
        assert len(workers) == 2  # torchrun (same pid as the launcher, which exec'ed it) and its 2 workers

        before = files(root)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "pipeline.launch", *STAGE], cwd=root,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        assert time.monotonic() - started < 60  # at once: no training, no waiting
        assert "already running" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "pipeline.launch prune --target 0.5" in second.stderr  # the first run's command
        after = files(root)
        assert before == after  # the refused run wrote nothing
        assert not (root / "outputs" / "pruned").exists()

        os.killpg(first.pid, signal.SIGKILL)  # the whole process group, as a closed terminal or a scheduler does
        first.wait(timeout=30)
        wait_for(lambda: not any(alive(w) for w in workers), "the workers to die", timeout_s=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    os.close(stage_lock(lock_path(root, STAGE)))  # the kernel released the dead run's lock


def test_a_single_process_stage_runs_without_torchrun(tmp_path):
    root = project(tmp_path, processes=1)
    run = launch(root)
    try:
        wait_for(lambda: training(root) or run.poll() is not None, "the run to train")
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert psutil.Process(run.pid).children(recursive=True) == []  # trains in the launcher's own process
        assert "torch.distributed.run" not in " ".join(psutil.Process(run.pid).cmdline())
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
