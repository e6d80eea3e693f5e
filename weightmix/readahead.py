"""Start reading a merge's input files into the page cache while Python imports torch.

`weightmix merge A.safetensors B.safetensors ...` spends its first 1.5-2.5 s importing torch
before it reads a byte of the models. Where the inputs are not in the page cache (a fresh
boot, files just downloaded or copied), that time can go to the disk instead: before the first
heavy import, the model files named on the command line are handed to the kernel as about to
be read (posix_fadvise WILLNEED), from a thread, so that the hint never delays the start. The
files are hinted a slice at a time in turn (a merge reads them side by side from their
starts), and only up to half of the memory available in all: what is hinted should still be
cached when the merge gets to it. Nothing here imports torch, and nothing depends on it: where
the call is missing (not POSIX) or fails, the merge reads as it always does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SLICE = 64 * 2**20  # bytes hinted per file in turn
OUTPUT_FLAGS = ("-o", "--output")


def input_files(argv: Sequence[str]) -> list[str]:
    """The model files a `weightmix merge` command line names as inputs (PATH or NAME=PATH),
    not the output; [] for any other command."""
    if len(argv) < 2 or argv[1] != "merge":
        return []
    files, previous = [], ""
    for arg in argv[2:]:
        is_output = previous in OUTPUT_FLAGS
        previous = arg
        if is_output or arg.startswith("-"):
            continue
        path = arg.split("=", 1)[1] if "=" in arg and not os.path.exists(arg) else arg
        if path.lower().endswith(MODEL_SUFFIXES) and os.path.isfile(path):
            files.append(path)
    return files


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def plan_hints(sizes: Sequence[int], budget: int) -> list[tuple[int, int, int]]:
    """(file index, offset, length) hints: SLICE bytes of each file in turn from their
    starts, at most `budget` bytes in all."""
    hints, offset = [], 0
    while budget > 0 and any(offset < size for size in sizes):
        for index, size in enumerate(sizes):
            length = min(SLICE, size - offset, budget)
            if length > 0:
                hints.append((index, offset, length))
                budget -= length
        offset += SLICE
    return hints


def start(argv: Sequence[str]) -> threading.Thread | None:
    """Hint the command line's input files on a daemon thread; None when there is nothing to
    hint, no way to, or WEIGHTMIX_READAHEAD=0 says not to."""
    if os.environ.get("WEIGHTMIX_READAHEAD", "1") == "0":
        return None
    files = input_files(argv)
    if not files or not hasattr(os, "posix_fadvise"):
        return None
    thread = threading.Thread(
        target=_hint, args=(files, available_memory() // 2), name="weightmix-readahead", daemon=True
    )
    thread.start()
    return thread


def _hint(files: list[str], budget: int) -> None:
    descriptors: list[int] = []
    try:
        for path in files:
            descriptors.append(os.open(path, os.O_RDONLY))
        sizes = [os.fstat(fd).st_size for fd in descriptors]
        for index, offset, length in plan_hints(sizes, budget):
            os.posix_fadvise(descriptors[index], offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass  # only a hint: the merge reads (and reports) the files itself
    finally:
        for fd in descriptors:
            os.close(fd)
