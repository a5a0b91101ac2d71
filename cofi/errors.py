"""The exceptions training raises for its caller to tell apart (the command line turns
them into one line and an exit code). Kept apart from cofi.trainer so that the
command line's error handling does not import the trainer."""

from __future__ import annotations

import signal


class NonFiniteLossError(RuntimeError):
    """Training produced NaN or infinity; the last good checkpoint is left untouched."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint of the last finished step was saved first."""

    def __init__(self, signum: int, step: int, saved: bool):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        where = f"checkpoint saved at step {step}; rerun to resume" if saved else "no checkpoint directory: not saved"
        super().__init__(f"{name} received: {where}")
