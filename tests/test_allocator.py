"""Freed memory is kept (cofi/allocator.py): once a process's timing harness or
training setup has run, memory it frees stays with the process, and allocating it
again faults no page in, where glibc's defaults hand it back to the kernel.

The probe allocates, touches and frees 8 blocks of 16 MiB (the size of a large
activation) and reads glibc's own accounting (``mallinfo2``), so the outcome depends
on the allocator alone, not on the CPU's GEMM kernels or the kernel's huge pages.
"""

from __future__ import annotations

import ctypes
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS, BLOCK_MIB = 8, 16


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 (mallopt, mallinfo2)")

PROBE = f"""
import ctypes, json, resource, sys, torch
from pathlib import Path

class MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2

mode = sys.argv[1]
if mode == "timing":
    from cofi.benchmark import measure
    measure(lambda: None, torch.device("cpu"), warmup=0, repeats=1)
elif mode == "training":
    from pipeline.params import load_params
    from pipeline.runtime import setup
    setup(load_params(Path(sys.argv[2])))

kept_mib, faults = [], []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones({BLOCK_MIB} * 2**18) for _ in range({BLOCKS})]  # float32: 16 MiB each, touched
    del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    kept_mib.append(mallinfo2().fordblks / 2**20)  # freed bytes the process still holds
print(json.dumps({{"kept_mib": kept_mib, "faults": faults}}))
"""


@functools.cache
def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(ROOT / "params.yaml")], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_the_probe_sees_glibc_defaults_hand_freed_memory_back():
    # Without the setting, the first 128 MiB freed go back to the kernel (mapped blocks are
    # unmapped, a heap top is trimmed), so the probe can tell the two apart.
    assert probe("default")["kept_mib"][0] < BLOCKS * BLOCK_MIB


@pytest.mark.parametrize("mode", ["timing", "training"])
def test_timing_and_training_processes_keep_freed_memory(mode):
    result = probe(mode)
    assert min(result["kept_mib"]) >= BLOCKS * BLOCK_MIB  # every free keeps all 128 MiB
    # Allocating them again faults (almost) nothing in: 32,768 pages of 4 KiB if it did.
    assert result["faults"][-1] < 500, result
