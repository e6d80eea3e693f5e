"""Where a merge's time goes: py-spy samples of `weightmix merge`, sorted into phases.

    python bench/profile_merge.py A.safetensors B.safetensors --alpha 0.5
    python bench/profile_merge.py A B C -m add_difference --rate 500 --keep prof.txt

Runs `py-spy record --threads --idle` on one merge (needs py-spy: `pip install py-spy`, in the
`bench` extra) and sorts every sample of every thread by what its innermost weightmix frame
(or the function it waits in) is doing: start-up (imports, planning), reading input bytes,
converting inputs to the compute dtype, the method's arithmetic, the non-finite screen, casting
to the output dtype, writing, and waiting (a worker with no task, the main thread waiting for
workers). Printed: the share of samples per phase, for the main thread and the workers, and
for the workers the seconds each phase took (samples / rate, summed over workers).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent

# (phase, pattern on "function (file:line)" frames), the first match from the innermost frame
PHASES = [
    ("start-up: imports", r"^_find_and_load |^<module> \(<frozen|_call_with_frames_removed"),
    ("start-up: plan", r"^(make_plan|build_plan|check_prompts|_plan_keys|_open_inputs) "),
    ("non-finite screen", r"^(count_nonfinite|check_gained|_screen\w*) "),
    ("read input bytes", r"^(_read_exact|read_range|readinto|preadv?) "),
    ("write output bytes", r"^(write_at|_TempFile\.write_at|pwritev?) "),
    ("arithmetic", r"\(weightmix/methods/"),
    ("convert inputs", r"^_read_chunks \(weightmix/engine\.py"),
    ("cast and store", r"^(run_task|_store\w*|_write_chunk\w*|tensor_bytes) \(weightmix/"),
    ("commit (rename, fsync)", r"^(commit|replace_set) "),
    ("waiting", r"^(wait|_wait\w*|get|acquire|Condition\.wait|_worker|result|join) "),
]


def classify(frames: list[str]) -> str:
    """The phase of one sample: frames outermost first, as py-spy writes them."""
    if any(re.search(PHASES[0][1], f) for f in frames):
        return PHASES[0][0]
    for frame in reversed(frames[1:]):
        for phase, pattern in PHASES[1:]:
            if re.search(pattern, frame):
                return phase
    return "other: " + (frames[-1] if len(frames) > 1 else "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("merge", nargs=argparse.REMAINDER, help="inputs and merge flags")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--keep", type=Path, help="keep py-spy's raw samples here")
    args, extra = parser.parse_known_args()
    args.merge = [a for a in args.merge if a != "--"]
    spy = BIN / "py-spy"
    if not spy.exists():
        raise SystemExit("needs py-spy: pip install py-spy (or pip install 'weightmix[bench]')")
    with tempfile.TemporaryDirectory() as scratch:
        raw = args.keep or Path(scratch) / "samples.txt"
        out = Path(scratch) / "out.safetensors"
        command = [str(BIN / "weightmix"), "merge", *args.merge, *extra, "-o", str(out), "-q"]
        record = [str(spy), "record", "-r", str(args.rate), "--threads", "--idle", "-f", "raw"]
        began = time.perf_counter()
        subprocess.run([*record, "-o", str(raw), "--", *command], check=True,
                       capture_output=True)  # fmt: skip
        wall = time.perf_counter() - began
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for line in raw.read_text().splitlines():
            stack, _, number = line.rpartition(" ")
            frames = stack.split(";")
            group = "workers" if "weightmix_" in frames[0] else "main"
            counts[group][classify(frames)] += int(number)
    print(f"`weightmix merge {' '.join([*args.merge, *extra])}`: {wall:.2f} s wall under py-spy")
    for group in ("main", "workers"):
        total = sum(counts[group].values()) or 1
        print(f"\n| {group} thread(s): phase | share of samples | seconds |")
        print("|---|---|---|")
        for phase, number in counts[group].most_common(14):
            print(f"| {phase} | {100 * number / total:.1f} % | {number / args.rate:.2f} |")


if __name__ == "__main__":
    main()
