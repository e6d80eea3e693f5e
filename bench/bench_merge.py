"""Full-size merge benchmark: weightmix against the I/O floor, measured in the same run.

    python bench/bench_merge.py --arch sd1     # SD1.5 layout, about 2.1 GB per fp16 file
    python bench/bench_merge.py --arch sdxl    # SDXL layout, about 6.9 GB per fp16 file

Random, seeded checkpoints with the real key names and shapes are generated once into a
scratch folder (not the repo). Each repeat, in the same page-cache conditions (outputs removed
and `sync` before every timed command): the I/O floor (read the inputs once with cat, write one
output of the same size with cat), then `weightmix merge` as a separate process. Reported:
median wall time, the ratio to the floor, and peak RSS (ru_maxrss of the process) next to a bare
`python -c "import torch"`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from weightmix.arch.synthetic import write_synthetic
from weightmix.units import format_size

ARCHES = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm"}
BIN = Path(sys.executable).parent


def measure(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command, after a sync outside the timing.
    posix_spawn (not fork) keeps this process's own memory out of the child's ru_maxrss."""
    subprocess.run(["sync"], check=True)
    began = time.perf_counter()
    with open(os.devnull, "wb") as null:
        actions = [(os.POSIX_SPAWN_DUP2, null.fileno(), 1)]
        pid = os.posix_spawnp(command[0], command, os.environ, file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({status}): {' '.join(command)}")
    return elapsed, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=ARCHES, default="sd1")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path(os.environ.get("WEIGHTMIX_BENCH_DIR", "/tmp/weightmix-bench")),
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    folder = args.scratch / args.arch
    folder.mkdir(parents=True, exist_ok=True)
    inputs = []
    for name, seed in (("A", 1), ("B", 2), ("C", 3)):
        path = folder / f"{name}.safetensors"
        if not path.exists():
            print(f"generating {path} ...", flush=True)
            write_synthetic(path, ARCHES[args.arch], seed=seed)
        inputs.append(path)
    size = inputs[0].stat().st_size
    print(f"inputs: 3 x {format_size(size)} ({ARCHES[args.arch]}, fp16) in {folder}")
    out = folder / "out.safetensors"
    floor_out = folder / "floor.safetensors"
    threads = ["--threads", str(args.threads)] if args.threads else []
    merges = {
        "weighted_sum": (inputs[:2], ["--alpha", "0.5"]),
        "add_difference": (inputs, ["-m", "add_difference", "--alpha", "1.0"]),
    }
    rows: dict[str, list[tuple[float, int]]] = {}
    for _ in range(args.repeat):
        rows.setdefault("import torch", []).append(measure([sys.executable, "-c", "import torch"]))
        for method, (files, flags) in merges.items():
            names = " ".join(str(f) for f in files)
            floor = f"cat {names} > /dev/null && cat {files[0]} > {floor_out}"
            rows.setdefault(f"floor {method}", []).append(measure(["sh", "-c", floor]))
            floor_out.unlink()
            command = [str(BIN / "weightmix"), "merge", *map(str, files), *flags, *threads]
            rows.setdefault(method, []).append(
                measure([*command, "-o", str(out), "-q", "--overwrite"])
            )
            out.unlink()
    torch_rss = statistics.median(r for _, r in rows["import torch"])
    title = f"{args.arch} ({format_size(size)} per input), median of {args.repeat}"
    print(f"\n| {title} | wall s | vs floor | peak RSS | RSS above import torch |")
    print("|---|---|---|---|---|")
    for name, samples in rows.items():
        wall = statistics.median(s for s, _ in samples)
        rss = statistics.median(r for _, r in samples)
        floor_name = f"floor {name}"
        ratio = (
            f"{wall / statistics.median(s for s, _ in rows[floor_name]):.2f}x"
            if floor_name in rows
            else ""
        )
        extra = format_size(rss - torch_rss) if not name.startswith("floor") else ""
        print(f"| {name} | {wall:.2f} | {ratio} | {format_size(rss)} | {extra} |")


if __name__ == "__main__":
    main()
