"""``python -m pipeline.launch <stage> [args]`` (what dvc.yaml runs, and the ``cofi``
console script for a stage command): a stage command takes its per-stage lock (a second
run of the same stage stops at once, naming the first, and writes nothing), then runs

- in this process when it trains with one process (compute.processes: 1) or does not
  train at all;
- under ``torchrun`` with compute.processes workers otherwise: this process becomes
  torchrun (exec, same pid, the lock held on), and each worker dies with it.

It imports only the stage commands (:mod:`pipeline.stage_cli`); the tools (``lineage``,
``structure``, ``ui``) are the console script's (:mod:`pipeline.cli`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline import stage_cli
from pipeline.params import ParamsError, load_params
from pipeline.processes import LAUNCHER_PID, StageRunning, lock_path, stage_lock

STAGES = {"data", "teacher", "prune", "finetune", "compact", "baseline", "profile", "benchmark", "report"}
TRAINING_STAGES = {"teacher", "prune", "finetune", "baseline"}


def params_file(args: list[str]) -> Path:
    """The ``--params`` a command line names (params.yaml by default)."""
    for i, arg in enumerate(args):
        if arg == "--params" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--params="):
            return Path(arg.split("=", 1)[1])
    return Path("params.yaml")


def processes(args: list[str]) -> int:
    """compute.processes of the params file; 1 when it is invalid (the command then reports why)."""
    try:
        return load_params(params_file(args)).compute.processes
    except ParamsError:
        return 1


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["cofi", *args]
    if not args or args[0] not in STAGES:
        stage_cli.main()
        return
    try:
        stage_lock(lock_path(params_file(args).parent, args), inheritable=True)
    except StageRunning as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    n = processes(args) if args[0] in TRAINING_STAGES else 1
    if n == 1:
        stage_cli.main()
        return
    os.environ[LAUNCHER_PID] = str(os.getpid())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    os.execv(sys.executable, [*torchrun, "-m", "pipeline.stage_cli", *args])


if __name__ == "__main__":
    main()
