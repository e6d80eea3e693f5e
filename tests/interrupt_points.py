"""Run `weightmix merge` through the executable's entry (command()) once for each point of its
main thread where a Ctrl-C can land, and report what each run left. test_interrupts.py runs
this in a child process, so that a hang fails as a timeout instead of stopping the session.

Python runs a signal's handler (here: SIGINT's, which raises KeyboardInterrupt) as a function
starts, right after a call returns, and from inside a C call that waits (a lock, a queue, a
read or write). A profile hook sees each of those events; the Nth time one of them happens in
the watched files, it raises SIGINT there. Usage:
python interrupt_points.py FOLDER [FIRST_OCCURRENCES [MAX_SHARD_SIZE]]; prints one JSON document
with a result per point: the first FIRST_OCCURRENCES times of each distinct event of a merge.
"""

from __future__ import annotations

import faulthandler
import hashlib
import inspect
import io
import json
import os
import signal
import sys
import threading
from collections import Counter
from contextlib import redirect_stderr
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from helpers import random_state, save

from weightmix import engine
from weightmix.cli import command
from weightmix.workers import IDLE_CHECK

# where the main thread waits for the workers and moves the output into place (and the pool
# of concurrent.futures, which the engine once waited on)
WATCHED = ("weightmix/engine.py", "weightmix/workers.py", "weightmix/io/", "weightmix/cli.py",
           "concurrent/futures/")  # fmt: skip
# C functions that wait and that a signal interrupts: they raise before they have done anything
WAITS = {"acquire", "get", "join", "sleep", "flock", "read", "readinto", "write", "pread",
         "pwrite", "fsync"}  # fmt: skip


def merge(inputs: list[Path], out: Path, shard: str | None, at: tuple | None) -> dict:
    """One merge, a SIGINT raised at event `at` ((kind, where, what), occurrence); what it
    did: its exit code, its last line on stderr, the events it passed."""
    seen: Counter = Counter()
    order: list[tuple] = []
    watched: dict[str, bool] = {}

    def profile(frame, event, arg):
        if event == "call":  # a function starts: Python checks for signals first thing
            site, what = frame.f_code.co_filename, frame.f_code.co_qualname
            where = f"{site}:{frame.f_lineno}"
        elif event == "return":  # after a call returns, in the caller
            caller = frame.f_back
            if caller is None or frame.f_code.co_flags & inspect.CO_GENERATOR:
                return  # a generator's yield returns to a loop: no check there
            site, what = caller.f_code.co_filename, frame.f_code.co_qualname
            where = f"{site}:{caller.f_lineno}"
        elif event == "c_return" or (event == "c_call" and getattr(arg, "__name__", "") in WAITS):
            site, what = frame.f_code.co_filename, getattr(arg, "__qualname__", "?")
            where = f"{site}:{frame.f_lineno}"
        else:
            return
        if not watched.setdefault(site, any(part in site for part in WATCHED)):
            return
        point = (event, where, what)
        seen[point] += 1
        order.append((point, seen[point]))
        if at is not None and (point, seen[point]) == at:
            signal.raise_signal(signal.SIGINT)

    sys.argv = ["weightmix", "merge", *map(str, inputs), "-o", str(out), "--threads", "2",
                "--quiet"] + (["--max-shard-size", shard] if shard else [])  # fmt: skip
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    err = io.StringIO()
    code = None
    planned = engine.run

    def run(*args, **kwargs):  # from the first byte read on: planning is not watched
        sys.setprofile(profile)
        return planned(*args, **kwargs)

    engine.run = run
    try:
        with redirect_stderr(err):
            command()
    except SystemExit as done:
        code = done.code
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped"
    finally:
        sys.setprofile(None)
        engine.run = planned
        for number, handler in handlers.items():  # as a new process would find them
            signal.signal(number, handler)
    lines = err.getvalue().strip().splitlines()
    return {"code": code, "said": lines[-1] if lines else "", "order": order}


def workers_left() -> list[str]:
    """The worker threads still running once those that were told to stop had time to."""
    for thread in threading.enumerate():
        if thread.name.startswith("weightmix"):
            thread.join(timeout=2 * IDLE_CHECK + 1)
    return [t.name for t in threading.enumerate() if t.name.startswith("weightmix")]


def digest(paths: list[Path]) -> str:
    """The tensors' names, dtypes, shapes and bytes (the metadata names the output)."""
    found = hashlib.sha256()
    for path in sorted(paths):
        if path.name.endswith(".safetensors"):
            for key, tensor in sorted(load_file(path).items()):
                found.update(f"{key} {tensor.dtype} {list(tensor.shape)}".encode())
                found.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return found.hexdigest()


def outputs(folder: Path, name: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(name))


def main() -> None:
    folder = Path(sys.argv[1])
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    shard = sys.argv[3] if len(sys.argv) > 3 else None
    inputs = [save(folder / f"{name}.safetensors", random_state(seed))
              for name, seed in (("A", 1), ("B", 2))]  # fmt: skip
    reference = merge(inputs, folder / "reference.safetensors", shard, None)
    expected = digest(outputs(folder, "reference"))
    points = [p for p in dict.fromkeys(reference["order"]) if p[1] <= first]
    results = []
    for number, point in enumerate(points):
        out = folder / f"run{number:04d}.safetensors"
        print(point, file=sys.__stderr__, flush=True)  # the last one shown names a hang
        faulthandler.dump_traceback_later(60, exit=True)  # and where it waits
        run = merge(inputs, out, shard, point)
        faulthandler.cancel_dump_traceback_later()
        made = outputs(folder, f"run{number:04d}")
        known = {p.name for p in inputs} | {p.name for p in outputs(folder, "reference")}
        known |= {p.name for p in folder.iterdir() if p.name.startswith("run")}
        results.append({
            "at": f"{point[0]} #{point[1]}",
            "code": run["code"],
            "said": run["said"],
            "out": str(out),
            "whole": bool(made) and digest(made) == expected,
            "made": [p.name for p in made],
            "left": sorted(p.name for p in folder.iterdir() if p.name not in known),
            "threads": workers_left(),
        })  # fmt: skip
        for path in made:
            os.unlink(path)
    print(json.dumps({"points": len(points), "results": results}))


if __name__ == "__main__":
    main()
