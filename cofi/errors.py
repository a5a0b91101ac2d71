"""The exceptions training raises for its caller to tell apart (the command line turns
them into one line and an exit code), and the range check of the training configs.
Kept apart from cofi.trainer so that the command line's error handling does not
import the trainer."""

from __future__ import annotations

import math
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


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """ValueError naming ``name`` unless ``value`` lies in the interval (a config's field check)."""
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above or (isinstance(value, float) and math.isnan(value)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"{name}={value!r} is out of range; allowed: {interval}")
