"""Where a merge's worker threads spend their time: busy in tasks, on the CPU, writing, and
waiting for the output file's write lock. In-process, one merge, after planning.

    python bench/worker_time.py slerp A.safetensors,B.safetensors t=0.5
    python bench/worker_time.py add_difference A.safetensors,B.safetensors,C.safetensors alpha=1

The output goes to /tmp/worker_time.safetensors (removed first). Busy minus CPU is time a
worker was off the CPU: the write lock, or other threads (the kernel's writeback) on its core.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time

began = time.perf_counter()
from weightmix import api, engine  # noqa: E402 - timed
from weightmix.io import writer  # noqa: E402

OUTPUT = "/tmp/worker_time.safetensors"


def number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def main() -> None:
    imported = time.perf_counter()
    method, files, *assignments = sys.argv[1:]
    names = [chr(ord("A") + n) for n in range(len(files.split(",")))]
    params = {k: number_or_text(v) for k, v in (a.split("=", 1) for a in assignments)}
    recipe = {
        "models": dict(zip(names, files.split(","), strict=True)),
        "merge": {"method": method, "inputs": names, **params},
    }
    if os.path.exists(OUTPUT):
        os.unlink(OUTPUT)
    planned = time.perf_counter()
    plan = api.make_plan(recipe, OUTPUT)
    planned = time.perf_counter() - planned

    busy: dict[int, float] = collections.defaultdict(float)
    cpu: dict[int, float] = collections.defaultdict(float)
    writing: dict[int, float] = collections.defaultdict(float)
    lock_wait: dict[int, float] = collections.defaultdict(float)
    run_task = engine.run_task

    def timed_task(*args, **kwargs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        run_task(*args, **kwargs)
        busy[threading.get_ident()] += time.perf_counter() - start
        cpu[threading.get_ident()] += time.thread_time() - start_cpu

    write_at = writer._TempFile.write_at

    def timed_write(self, data, offset):
        start = time.perf_counter()
        with self._writing:
            lock_wait[threading.get_ident()] += time.perf_counter() - start
        write_at(self, data, offset)
        writing[threading.get_ident()] += time.perf_counter() - start

    engine.run_task = timed_task
    writer._TempFile.write_at = timed_write
    start = time.perf_counter()
    engine.run(plan, {})
    print(
        f"import {imported - began:.2f} s, plan {planned:.2f} s,"
        f" run {time.perf_counter() - start:.2f} s"
    )
    for thread in busy:
        print(
            f"worker: busy {busy[thread]:.2f} s, on the CPU {cpu[thread]:.2f} s,"
            f" writing {writing[thread]:.2f} s (waiting for the lock {lock_wait[thread]:.2f} s)"
        )


if __name__ == "__main__":
    main()
