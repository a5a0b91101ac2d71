"""Fault injection: a training process killed with SIGKILL resumes from its last
checkpoint and ends exactly where an uninterrupted run ends (CPU, same seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A tiny pruning run; each step sleeps a little so the test can kill it mid-run.
SCRIPT = r'''
import hashlib, json, sys, time
import torch
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import synthetic_task, tiny_model
from cofi.batching import Collator
from cofi.distill import DistillationLoss, LayerDistillLoss, PredictionDistillLoss
from cofi.metrics import accuracy
from cofi.trainer import TrainConfig, Trainer, TrainerCallback
from cofi.pruning import PruneConfig

class Slow(TrainerCallback):
    def on_step(self, step, logs):
        time.sleep(float(sys.argv[2]))

torch.set_num_threads(1)
trainer = Trainer(
    tiny_model(seed=0), synthetic_task(96, seed=1), synthetic_task(48, seed=2),
    TrainConfig(epochs=3, batch_size=8, learning_rate=1e-3, eval_steps=4, progress=False, seed=3),
    metric_fn=accuracy, primary_metric="accuracy", collate=Collator(0),
    teacher=tiny_model(seed=0),
    distill=DistillationLoss(PredictionDistillLoss(2.0), LayerDistillLoss(16, [1, 2]), 0.5),
    prune=PruneConfig(target_sparsity=0.4, distill_epochs=0.5, sparsity_warmup_epochs=1, reg_learning_rate=0.1),
    checkpoint_dir=sys.argv[1], callbacks=[Slow()],
)
result = trainer.fit()
weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in trainer.model.state_dict().values())).hexdigest()
print(json.dumps({{"evaluations": result.evaluations, "weights": weights,
                   "masks": {{k: v.tolist() for k, v in result.masks.items()}}}}))
'''


def run_script(tmp_path: Path, checkpoint_dir: Path, sleep_s: float) -> subprocess.Popen:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    return subprocess.Popen([sys.executable, str(script), str(checkpoint_dir), str(sleep_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_rerun_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    expected = finish(run_script(tmp_path, tmp_path / "uninterrupted", 0.0))

    checkpoints = tmp_path / "killed"
    proc = run_script(tmp_path, checkpoints, 0.05)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once a mid-run checkpoint exists
        manifest = checkpoints / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["step"] >= 12:
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads((checkpoints / "manifest.json").read_text())["step"]
    assert 12 <= killed_at < 36  # 36 steps in all: the kill came mid-run

    resumed = finish(run_script(tmp_path, checkpoints, 0.0))
    assert resumed == expected  # evaluations, masks and a hash of every weight


def test_two_runs_with_the_same_seed_are_bit_identical(tmp_path):
    """CPU determinism: same params and seed → the same evaluations, masks and weight hash."""
    first = finish(run_script(tmp_path, tmp_path / "first", 0.0))
    second = finish(run_script(tmp_path, tmp_path / "second", 0.0))
    assert first == second
