"""Kill -9 a full-size merge at random points, repeatedly, and check what is left.

    python bench/kill_merge.py                 # SD1.5 size (2.1 GB fp16 inputs), 20 kills
    python bench/kill_merge.py --kills 50 --shard 500MB

Each round starts `weightmix merge A B --alpha 0.5 -o OUT` (a sharded output with --shard),
sends SIGKILL after a random delay drawn up to the time one full merge takes, and checks:
nothing visible at the destination (no output file, shard or index), or, when the kill came
after the rename, an output that `weightmix verify` passes; the inputs' size,
modification time and sampled fingerprint unchanged; and that the next run writing to the
folder (the following round, and a final complete merge) removes the killed runs' hidden
temporary files and says so. The figures print as a table for docs/reliability.md.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import BIN, generate

from weightmix.errors import WeightmixError
from weightmix.io import open_checkpoint
from weightmix.provenance import fingerprint
from weightmix.verify import verify


def state_of(path: Path) -> tuple[int, int, str]:
    stat = path.stat()
    with open_checkpoint(path) as checkpoint:
        return stat.st_size, stat.st_mtime_ns, fingerprint(checkpoint)


def visible_outputs(folder: Path, stem: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(stem))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/weightmix-bench"))
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--shard", default=None, help="e.g. 500MB: a sharded output")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = args.scratch / "sd1"
    folder.mkdir(parents=True, exist_ok=True)
    a, b, _ = generate(folder, "sd1-ldm")
    target = folder / "killed"
    target.mkdir(exist_ok=True)
    out = target / "out.safetensors"
    shard = ["--max-shard-size", args.shard] if args.shard else []
    command = [str(BIN / "weightmix"), "merge", str(a), str(b), "--alpha", "0.5", "-o", str(out),
               *shard, "--overwrite", "-q"]  # fmt: skip
    before = {p: state_of(p) for p in (a, b)}
    began = time.monotonic()
    subprocess.run(command, check=True)
    full = time.monotonic() - began
    for path in visible_outputs(target, "out"):
        (target / path).unlink()
    print(f"one full merge: {full:.1f} s; killing {args.kills} runs at random points", flush=True)
    chance = random.Random(args.seed)
    problems, removed_notes, temporaries_seen = [], 0, 0
    landed = 0
    for round_ in range(args.kills):
        for path in visible_outputs(target, "out"):  # each round starts with no output
            (target / path).unlink()
        delay = chance.uniform(0.0, full)
        started = subprocess.Popen(command[:-1], stderr=subprocess.PIPE, text=True)  # notes on
        time.sleep(delay)
        started.send_signal(signal.SIGKILL)
        _, err = started.communicate()
        if "removed" in err and "interrupted run" in err:
            removed_notes += 1
        if started.returncode != -signal.SIGKILL:  # it finished before the kill
            for path in visible_outputs(target, "out"):
                (target / path).unlink()
            continue
        if visible_outputs(target, "out"):  # killed after its rename: must be whole
            try:
                verify(out)
                landed += 1
            except WeightmixError as error:
                problems.append(f"round {round_}: a broken output after the kill: {error}")
        temporaries_seen += sum(1 for p in target.iterdir() if p.name.startswith(".out"))
    after = {p: state_of(p) for p in (a, b)}
    if after != before:
        problems.append("an input changed")
    final = subprocess.run(command[:-1], capture_output=True, text=True, check=True)
    left = sorted(p.name for p in target.iterdir() if p.name.startswith("."))
    if left:
        problems.append(f"hidden files left after the final run: {left}")
    print(f"kills: {args.kills}; hidden temporary entries seen after kills: {temporaries_seen};"
          f" killed after the output had landed whole (verified): {landed}")  # fmt: skip
    print(f"runs that said they removed a killed run's files: {removed_notes}"
          f" (+ final run: {'yes' if 'interrupted run' in final.stderr else 'no'})")  # fmt: skip
    print(f"inputs unchanged: {after == before}; hidden files after the final run: {left or 0}")
    print("problems: " + ("; ".join(problems) if problems else "none"))
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
