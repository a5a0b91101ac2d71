"""Two CPU processes (torchrun, gloo) run a tiny pruning job: they stay identical replicas,
and take the steps one process takes with the same global batch (and one process with
two micro-batches a step): the same weights, gates, λ and losses, up to float rounding.
Killed mid-run, the two resume from their checkpoint and end bit-identical to an
uninterrupted two-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, sys
import torch
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import synthetic_task, tiny_model
from cofi.batching import Collator
from cofi.distill import DistillationLoss, LayerDistillLoss, PredictionDistillLoss
from cofi.metrics import accuracy
from cofi.trainer import TrainConfig, Trainer
from cofi.pruning import PruneConfig

torch.set_num_threads(1)
no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout draws per process
trainer = Trainer(
    tiny_model(seed=0, **no_dropout), synthetic_task(128, seed=1), synthetic_task(37, seed=2),  # 37: shards of 19 and 18
    TrainConfig(epochs=4, batch_size=16, learning_rate=1e-3, eval_steps=8, progress=False, seed=3,
                accumulation_steps=int(sys.argv[2])),
    metric_fn=accuracy, primary_metric="accuracy", collate=Collator(0),
    teacher=tiny_model(seed=5, **no_dropout),
    distill=DistillationLoss(PredictionDistillLoss(2.0), LayerDistillLoss(16, [1, 2]), 0.5),
    prune=PruneConfig(target_sparsity=0.5, distill_epochs=0.5, sparsity_warmup_epochs=2, reg_learning_rate=0.1,
                      lambda_2_init=100.0),
)
result = trainer.fit()
rank = int(os.environ.get("RANK", "0"))
torch.save({{"model": trainer.model.state_dict(), "gates": trainer.pruning.gates.state_dict(),
            "lagrangian": trainer.pruning.lagrangian.state_dict(), "masks": result.masks}},
           os.path.join(sys.argv[1], f"rank{{rank}}.pt"))
with open(os.path.join(sys.argv[1], f"rank{{rank}}.json"), "w") as f:
    json.dump({{"history": result.history, "evaluations": result.evaluations, "prune_start": trainer.pruning.start,
               "world_size": trainer.processes.world_size}}, f)
'''


def torchrun_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def launch(tmp_path: Path, name: str, processes: int, accumulation: int) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    cmd = [sys.executable, str(script), str(out), str(accumulation)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *cmd[1:]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=torchrun_env())
    assert result.returncode == 0, result.stderr[-4000:]
    runs = []
    for r in range(processes):
        run = json.loads((out / f"rank{r}.json").read_text())
        run["state"] = torch.load(out / f"rank{r}.pt")
        runs.append(run)
    return runs


# Float rounding only: the same sums in another order (halves of a batch, added in an
# all-reduce) differ in the last bits, and 32 steps carry that to at most 1.4e-6 in a
# logged value (grad_norm, about 7) and 5e-7 in a weight. A wrong share of a process or
# micro-batch moves losses and weights by 1e-4 to 100% (tests' breaks in the report).
RTOL, ATOL = 1e-5, 1e-6


def assert_same_training(run: dict, reference: dict) -> None:
    """Every step's logged values (losses, λ, sparsities, gradient norm) and the final
    weights, gates, λ and masks agree within float rounding; the masks keep the same units."""
    assert [h["step"] for h in run["history"]] == [h["step"] for h in reference["history"]] == list(range(1, 33))
    for got, want in zip(run["history"], reference["history"]):
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=RTOL, abs=ATOL), (got["step"], key)
    for part in ("model", "gates", "lagrangian", "masks"):
        for name, want in reference["state"][part].items():
            torch.testing.assert_close(run["state"][part][name], want, rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{part}.{name}: {m}")
    for family, want in reference["state"]["masks"].items():
        assert torch.equal(run["state"]["masks"][family] != 0, want != 0), family


@pytest.mark.skipif(sys.platform == "win32", reason="gloo launch on Linux/macOS")
def test_two_processes_agree_and_match_one_process(tmp_path):
    (single,) = launch(tmp_path, "single", processes=1, accumulation=1)
    ranks = launch(tmp_path, "two", processes=2, accumulation=1)
    assert [r["world_size"] for r in ranks] == [2, 2]
    # identical replicas, bit for bit: weights, gates, λ, masks, every logged value, the gathered evaluations
    for part in ("model", "gates", "lagrangian", "masks"):
        for name, tensor in ranks[0]["state"][part].items():
            assert torch.equal(tensor, ranks[1]["state"][part][name]), (part, name)
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["evaluations"] == ranks[1]["evaluations"]
    # the job prunes (28 of its 32 steps sample masks) and its masks move off the initial ones
    assert single["prune_start"] == 4 and single["history"][-1]["mask_sparsity"] > 0.3
    assert_same_training(ranks[0], single)

    (accumulated,) = launch(tmp_path, "accumulated", processes=1, accumulation=2)
    assert_same_training(accumulated, single)


# A tiny pruning job with dropout and mask draws that differ per process, checkpointed
# every 4 of its 36 steps; each step sleeps a little so the test can kill it mid-run.
RESUMABLE = r"""
import hashlib, json, os, sys, time
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
        time.sleep(float(sys.argv[3]))

torch.set_num_threads(1)
out, rank = sys.argv[2], int(os.environ["RANK"])
with open(os.path.join(out, f"pid{{rank}}"), "w") as f:
    f.write(str(os.getpid()))
trainer = Trainer(
    tiny_model(seed=0), synthetic_task(96, seed=1), synthetic_task(37, seed=2),
    TrainConfig(epochs=3, batch_size=8, learning_rate=1e-3, eval_steps=4, log_steps=2, progress=False, seed=3),
    metric_fn=accuracy, primary_metric="accuracy", collate=Collator(0),
    teacher=tiny_model(seed=0),
    distill=DistillationLoss(PredictionDistillLoss(2.0), LayerDistillLoss(16, [1, 2]), 0.5),
    prune=PruneConfig(target_sparsity=0.4, distill_epochs=0.5, sparsity_warmup_epochs=1, reg_learning_rate=0.1),
    checkpoint_dir=sys.argv[1], callbacks=[Slow()],
)
result = trainer.fit()
weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in trainer.model.state_dict().values())).hexdigest()
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"evaluations": result.evaluations, "history": result.history, "weights": weights,
               "masks": {{k: v.tolist() for k, v in result.masks.items()}},
               "random": torch.rand(4).tolist()}}, f)  # each process's random state at the end
"""


def start_resumable(tmp_path: Path, checkpoints: Path, name: str, sleep_s: float) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "resumable.py"
    script.write_text(RESUMABLE.format(root=str(ROOT), tests=str(ROOT / "tests")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(checkpoints), str(out), str(sleep_s)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=torchrun_env()), out


def finish_resumable(proc: subprocess.Popen, out: Path) -> list[dict]:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(signal, "SIGKILL"), reason="gloo launch and SIGKILL")
def test_two_processes_killed_mid_run_resume_bit_identical_to_an_uninterrupted_run(tmp_path):
    expected = finish_resumable(*start_resumable(tmp_path, tmp_path / "uninterrupted", "uninterrupted", 0.0))
    assert expected[0]["evaluations"] == expected[1]["evaluations"]
    assert expected[0]["random"] != expected[1]["random"]  # the processes draw different random numbers

    checkpoints = tmp_path / "killed"
    proc, out = start_resumable(tmp_path, checkpoints, "killed", 0.1)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # kill once a mid-run checkpoint exists
        manifest = checkpoints / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["step"] >= 12:
            break
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        time.sleep(0.02)
    for pid in [int((out / f"pid{r}").read_text()) for r in range(2)] + [proc.pid]:  # workers first, then torchrun
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    manifest = json.loads((checkpoints / "manifest.json").read_text())
    assert 12 <= manifest["step"] < 36 and manifest["processes"] == 2  # 36 steps in all: the kill came mid-run
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {Path(name).name for name in manifest["files"]}

    resumed = finish_resumable(*start_resumable(tmp_path, checkpoints, "resumed", 0.0))
    assert resumed == expected  # each process's evaluations, history, masks, weight hash and random state
