"""Long fuzzing run over every parser a stranger's file or a user's typed value reaches.

    python bench/fuzz.py                          # 100,000 inputs per parser (make fuzz)
    python bench/fuzz.py --examples 2000 --parsers safetensors,pickle
    python bench/fuzz.py --replay pickle fuzz-failures/pickle/TypeError-1a2b3c4d.bin

The targets and mutators are in tests/fuzzing.py (the property tests in tests/test_fuzz.py
use the same ones with few examples). Hypothesis draws the inputs: a real-shaped seed and a
list of mutations, generated only (no shrinking: every failing input is saved as it was), with
the example database off and a fixed seed, so a run is reproducible.

Each input must end in success or a one-line WeightmixError. Also failures here:
- an input running longer than --timeout seconds (a SIGALRM timer; a hang inside C code that
  ignores it is caught by faulthandler, which dumps the stack and ends the run; the input is in
  FOLDER/PARSER/current.bin);
- an allocation proportional to a number in the file: the address space is capped at
  --memory-mb over what the process holds at the start (RLIMIT_AS), so such an allocation fails
  with MemoryError, and a peak RSS growing by more than half of that is reported too.

Per parser it prints inputs run, seconds, successes, WeightmixErrors and failures (grouped by
exception and place); failing inputs go to FOLDER/PARSER/ (.bin input, .txt traceback), and the
figures to FOLDER/summary.json.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import resource
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import hypothesis.internal.conjecture.engine as conjecture
from fuzzing import Target, Workspace, run_one
from hypothesis import HealthCheck, Phase, given, seed, settings

# Hypothesis caches its last 10,000 test cases with the values drawn; inputs of up to 1 MB
# made that gigabytes. A small cache only costs replays it does not do here (no shrinking).
conjecture.CACHE_SIZE = 100


class Timeout(BaseException):
    """An input ran past --timeout (BaseException: no `except Exception` swallows it)."""


def _alarm(signum: int, frame: object) -> None:
    raise Timeout


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def signature(error: BaseException) -> str:
    """Exception type and the innermost frame: one failure, however many inputs reach it."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return f"{type(error).__name__}@{where}"


class Run:
    """One parser's run: counts outcomes and saves failing inputs."""

    def __init__(self, target: Target, folder: Path, timeout: float, rss_limit: int):
        self.target = target
        self.folder = folder / target.name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.current = self.folder / "current.bin"
        self.timeout = timeout
        self.rss_limit = rss_limit
        self.outcomes: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.saved: dict[str, str] = {}

    def one(self, data: bytes) -> None:
        self.current.write_bytes(data)  # what a hang in C code leaves for --replay
        faulthandler.dump_traceback_later(self.timeout * 3, exit=True)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            self.outcomes[run_one(self.target, data)] += 1
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # Timeout, MemoryError, RecursionError, FuzzFailure ...
            self.fail(signature(error), data, "".join(traceback.format_exception(error)))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            faulthandler.cancel_dump_traceback_later()
        if _rss_bytes() > self.rss_limit:
            self.fail("peak RSS", data, f"peak RSS reached {_rss_bytes() >> 20} MiB")
            self.rss_limit = _rss_bytes() + (64 << 20)  # report each further growth once

    def fail(self, kind: str, data: bytes, text: str) -> None:
        self.outcomes["failure"] += 1
        self.failures[kind] += 1
        if self.failures[kind] <= 3:  # a few inputs per kind of failure are enough to replay
            tag = kind.replace("@", "-").replace(":", "-").replace(" ", "-")
            name = f"{tag}-{hashlib.sha256(data).hexdigest()[:8]}"
            (self.folder / f"{name}.bin").write_bytes(data)
            (self.folder / f"{name}.txt").write_text(text)
            self.saved.setdefault(kind, str(self.folder / f"{name}.bin"))


def fuzz(target: Target, examples: int, folder: Path, args: argparse.Namespace) -> dict:
    """Run `examples` hypothesis-drawn inputs through `target`; return its figures."""
    run = Run(target, folder, args.timeout, _rss_bytes() + (args.memory_mb << 19))
    for data in target.seeds:  # the seeds as they are first
        run.one(bytes([0]) + data if target.name == "config" else data)

    @seed(args.seed)
    @settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy)
    def inputs(data: bytes) -> None:
        run.one(data)
        done = sum(run.outcomes.values())
        if done % 10_000 == 0:
            print(f"  {target.name}: {done} inputs, {dict(run.outcomes)}", flush=True)

    start = time.perf_counter()
    inputs()
    seconds = time.perf_counter() - start
    run.current.unlink(missing_ok=True)
    return {
        "parser": target.name,
        "inputs": sum(run.outcomes.values()),
        "seconds": round(seconds, 1),
        "success": run.outcomes["ok"],
        "weightmix_error": run.outcomes["error"],
        "failures": dict(run.failures),
        "saved": run.saved,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100_000, help="inputs per parser")
    parser.add_argument("--parsers", help="comma-separated subset (default: all)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-failures"), help="FOLDER")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per input")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space cap")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--replay", nargs=2, metavar=("PARSER", "FILE"), help="run one input")
    args = parser.parse_args()

    workspace = Workspace()
    try:
        targets = workspace.targets()
        if args.replay:
            name, file = args.replay
            print(run_one(targets[name], Path(file).read_bytes()))
            return 0
        names = args.parsers.split(",") if args.parsers else list(targets)
        unknown = [n for n in names if n not in targets]
        if unknown:
            parser.error(f"unknown parser {unknown[0]}; known: {', '.join(targets)}")
        signal.signal(signal.SIGALRM, _alarm)
        cap = _address_space() + (args.memory_mb << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
        args.out.mkdir(parents=True, exist_ok=True)
        summary = []
        print(f"{'parser':<12} {'inputs':>8} {'seconds':>8} {'success':>8} {'error':>8} failures")
        for name in names:
            figures = fuzz(targets[name], args.examples, args.out, args)
            summary.append(figures)
            failures = ", ".join(f"{k} x{v}" for k, v in figures["failures"].items()) or "0"
            print(
                f"{name:<12} {figures['inputs']:>8} {figures['seconds']:>8} "
                f"{figures['success']:>8} {figures['weightmix_error']:>8} {failures}",
                flush=True,
            )
            (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    finally:
        workspace.close()
    return 1 if any(figures["failures"] for figures in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
