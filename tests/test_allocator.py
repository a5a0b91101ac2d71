"""Freed memory is kept (cofi/allocator.py): once a process's timing harness or
training setup has run, a repeated forward pass faults (almost) no page in, where
glibc's defaults fault most of them in again on every forward pass."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import resource, sys, torch
from pathlib import Path
from cofi.benchmark import random_inputs, shape_config
from cofi.latency import full_structure, model_of

config = shape_config("minilm", vocab_size=1000)  # all-MiniLM-L6-v2's layers, a small vocabulary
model = model_of(config, full_structure(config))
inputs = random_inputs(1000, 4, 128, torch.device("cpu"))

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def forward():
    with torch.inference_mode():
        model(**inputs)

mode = sys.argv[1]
if mode == "timing":
    from cofi.benchmark import measure
    measure(forward, torch.device("cpu"), warmup=4, repeats=1)
else:
    if mode == "training":
        from pipeline.params import load_params
        from pipeline.runtime import setup
        setup(load_params(Path(sys.argv[2])))
    for _ in range(5):
        forward()
before = faults()
for _ in range(4):
    forward()
print(faults() - before)
"""


@functools.cache  # the default is measured once for both tests
def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(ROOT / "params.yaml")], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("mode", ["timing", "training"])
def test_timing_and_training_processes_keep_freed_memory(mode):
    by_default = page_faults("default")  # glibc's defaults: every pass faults its activations in again
    assert by_default > 4 * 4000  # about 11,000 pages a pass here (batch 4 x 128)
    assert page_faults(mode) < by_default / 20  # none, or a rare few hundred
