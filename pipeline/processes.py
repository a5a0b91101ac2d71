"""Process safety of a stage run: one run of a stage at a time, and no worker outliving
its launcher.

- :func:`stage_lock` takes a per-stage lock (``fcntl.flock`` on a file under
  ``checkpoints/.locks``) or raises :class:`StageRunning` naming the process that
  holds it. The kernel releases the lock when its holder exits, however it dies
  (``kill -9`` included), so there is nothing to clean up.
- :func:`die_with_launcher` makes a torchrun worker die when torchrun dies:
  torchrun starts its workers in a new session, so killing the process group of
  ``dvc repro`` would otherwise leave them running.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import psutil

LAUNCHER_PID = "COFI_LAUNCHER_PID"  # environment: the pid of the torchrun a worker belongs to
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class StageRunning(RuntimeError):
    """Another process runs the same stage in the same project."""


def lock_path(root: Path, command: list[str]) -> Path:
    """The lock file of one stage command (``prune --target 0.6``) in the project at ``root``."""
    name = re.sub(r"[^A-Za-z0-9@._-]+", "_", " ".join(command)).strip("_")
    return Path(root).resolve() / "checkpoints" / ".locks" / f"{name}.lock"


def stage_lock(path: Path, inheritable: bool = False) -> int:
    """Lock ``path`` for this process (and, ``inheritable``, a program it execs) until it exits;
    returns the file descriptor. Raises StageRunning naming the holder's pid and command."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "pid unknown"
        os.close(fd)
        raise StageRunning(
            f"this stage is already running in this project: {holder}; "
            f"wait for it to finish or stop it (lock {path})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} ({shlex.join(psutil.Process().cmdline())})\n".encode(), 0)
    os.set_inheritable(fd, inheritable)
    return fd


def die_with_launcher() -> None:
    """In a worker started by torchrun on behalf of :mod:`pipeline.launch`: ask the kernel to
    SIGKILL this process when its parent (torchrun) dies, and exit now if it already has."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(launcher):  # torchrun died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)
