"""Keep freed chunk-sized buffers in the process heap instead of returning them to the system.

glibc serves allocations above its mmap threshold (128 KiB at first) with fresh pages from the
kernel and returns them on free, so every temporary tensor of a chunk (1 MiB of float32) would
fault in its pages again: on this class of machine that costs more than the arithmetic (4 ns
an element against 0.2, see bench/RESULTS.md). Raising the threshold to its 32 MiB maximum and
the trim threshold with it keeps chunk temporaries in the heap, reused; whole tensors larger
than 32 MiB are still mapped and unmapped as before. Peak memory grows only by what the heap
keeps between uses (a review measured +7% for DELLA on 8 threads, whole-tensor work).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 128 * 2**20
_tuned = False


def keep_chunk_buffers() -> bool:
    """Set glibc's mmap and trim thresholds once per process; False where there is no glibc."""
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _tuned
