"""The process's memory allocator, told to keep freed memory (training and timing).

glibc's malloc hands large freed blocks back to the kernel (a freed mmap, a trimmed
heap top), so every CPU forward pass faults its activations in again, zero-filled:
the unpruned MiniLM at batch 32 x 128 took 89,000 page faults (350 MB) per pass
here, and a small model faulted on some passes and not on others (a model of
embeddings alone timed 12 or 29 ms). Told to keep freed memory, much as jemalloc
and tcmalloc do (PyTorch's CPU performance guide recommends either), the process
faults nothing after its first passes, and that noise leaves the timings
(docs/experiments/allocator.md). Training gains less (pruning steps 10% here): blocks over
32 MiB, such as the vocabulary table's dense gradient, are still mapped afresh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest: blocks under 32 MiB come from the heap, and are reused
_TRIM_THRESHOLD = 2**31 - 1  # never give the heap top back (an int's largest)


@functools.cache
def keep_freed_memory() -> bool:
    """Make this process's allocator keep freed memory for reuse (glibc's ``mallopt``;
    once per process). False where the C library is not glibc: nothing changes there."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
