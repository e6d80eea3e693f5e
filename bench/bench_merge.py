"""Full-size merge benchmark: weightmix against the I/O floor, measured in the same run.

    python bench/bench_merge.py --arch sd1     # SD1.5 layout, about 2.1 GB per fp16 file
    python bench/bench_merge.py --arch sdxl    # SDXL layout, about 6.9 GB per fp16 file
    python bench/bench_merge.py --arch flux    # Flux transformer, about 11.9 GB per fp8 file
    python bench/bench_merge.py --cold         # page cache dropped before each command (root)
    python bench/bench_merge.py --device cuda  # merges computed on a GPU (device_chunks.py)
    python bench/bench_merge.py --no-warm-memory  # leave free memory as the host left it

Random, seeded checkpoints with the real key names and shapes are generated once into a
scratch folder (not the repo). Each repeat runs, in the same conditions (previous outputs
removed, `sync` before every timed command): the I/O floor (read the inputs once with cat,
write one output of the same size with cat), then `weightmix merge` as its own process.
Reported: median wall time, its ratio to the floor, the same ratio with weightmix's start-up
(`weightmix --version`, timed alone: importing torch and weightmix, and the exit) taken off,
CPU time (user + system), and peak RSS (ru_maxrss of the process) against a bare
`python -c "import torch"`. This script imports neither torch nor weightmix, so its own
memory never shows in the children's ru_maxrss.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name: (architecture, stored float dtype, components; None: all)
ARCHES = {
    "sd1": ("sd1-ldm", "F16", None),
    "sdxl": ("sdxl-sgm", "F16", None),
    "flux": ("flux-flux", "F8_E4M3", ("diffuser",)),  # a Flux transformer as fp8 files ship
}
BIN = Path(sys.executable).parent
# the installed command; where weightmix is only on PYTHONPATH (as on a borrowed GPU machine,
# bench/gpu_check.sh), the same entry point through `python -m weightmix`
INSTALLED = BIN / "weightmix"
WEIGHTMIX = [str(INSTALLED)] if INSTALLED.exists() else [sys.executable, "-m", "weightmix"]


def size_text(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} TB"


COLD = False  # --cold: drop the page cache before every timed command
WARM_BYTES = 0  # --warm-memory: memory handed back by the host made ready before each command
# as installed for a user: bytecode cached (PYTHONDONTWRITEBYTECODE, set on some machines,
# would make every run compile weightmix's sources again: ~0.25 s of start-up here)
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def drop_caches() -> None:
    """Empty the page cache (root only): the next command reads its inputs from the disk."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        raise SystemExit(f"--cold needs root to write /proc/sys/vm/drop_caches: {error}") from None


def free_bytes() -> int:
    """MemFree of /proc/meminfo: memory no page cache holds."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) * 1024
    return 0


def warm_memory(size: int) -> None:
    """Touch and free `size` bytes of free memory (at most what is free, less 1 GB, so no
    cached input is evicted), in a child process: this one's peak RSS would pass on to the
    commands it starts (Linux keeps the high-water mark across the exec of a spawned child).
    On a virtual machine whose guest reports free pages to the host (virtio-balloon free
    page reporting), memory freed a few seconds ago is handed back, and the first write to
    it faults it in again on the host: writing 2.1 GB into fresh page-cache pages took
    3-5.4 s here against 1.0-1.1 s into pages just freed, at random. Done right before every
    timed command, the floor and weightmix find the same memory."""
    size = min(size, free_bytes() - (1 << 30))
    if size > 0:
        touch = f"block = bytearray({size}); block[::4096] = bytes(len(block[::4096]))"
        subprocess.run([sys.executable, "-c", touch], check=True)


def measure(command: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (bytes) and CPU seconds (user + system) of one command, after a
    sync (and with --cold, dropping the page cache; with --warm-memory, warming memory)
    outside the timing."""
    subprocess.run(["sync"], check=True)
    if COLD:
        drop_caches()
    warm_memory(WARM_BYTES)
    began = time.perf_counter()
    with open(os.devnull, "wb") as null:
        actions = [(os.POSIX_SPAWN_DUP2, null.fileno(), 1)]
        pid = os.posix_spawnp(command[0], command, CHILD_ENV, file_actions=actions)
        _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({status}): {' '.join(command)}")
    return elapsed, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def generate(folder: Path, arch: str) -> list[Path]:
    architecture, dtype, components = ARCHES[arch]
    paths = []
    for name, seed in (("A", 1), ("B", 2), ("C", 3)):
        path = folder / f"{name}.safetensors"
        if not path.exists():
            print(f"generating {path} ...", flush=True)
            code = (
                "from weightmix.arch.synthetic import write_synthetic;"
                f"write_synthetic({str(path)!r}, {architecture!r}, seed={seed},"
                f" float_dtype={dtype!r}, components={components!r})"
            )
            subprocess.run([sys.executable, "-c", code], check=True)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=ARCHES, default="sd1")
    default_scratch = Path(os.environ.get("WEIGHTMIX_BENCH_DIR", "/tmp/weightmix-bench"))
    parser.add_argument("--scratch", type=Path, default=default_scratch)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--research", action="store_true", help="ties, dare_ties, slerp, model_stock instead"
    )
    parser.add_argument(
        "--cold", action="store_true", help="drop the page cache before each timed command"
    )
    parser.add_argument(
        "--no-warm-memory",
        dest="warm",
        action="store_false",
        help="do not touch free memory before each command (see warm_memory)",
    )
    parser.add_argument("--device", default=None, help="weightmix merge --device (e.g. cuda)")
    parser.add_argument(
        "--drop-inputs", action="store_true", help="delete the generated inputs afterwards"
    )
    args = parser.parse_args()
    global COLD, WARM_BYTES
    COLD = args.cold

    folder = args.scratch / args.arch
    folder.mkdir(parents=True, exist_ok=True)
    inputs = generate(folder, args.arch)
    size = inputs[0].stat().st_size
    architecture, dtype, _ = ARCHES[args.arch]
    WARM_BYTES = size + (1 << 30) if args.warm else 0  # an output's pages and a process's
    print(f"inputs: 3 x {size_text(size)} ({architecture}, {dtype}) in {folder}")
    out, floor_out = folder / "out.safetensors", folder / "floor.safetensors"
    threads = ["--threads", str(args.threads)] if args.threads else []
    if args.device:
        threads += ["--device", args.device]
    merges = {
        "weighted_sum": (inputs[:2], ["--alpha", "0.5"]),
        # a value per block (supermerger's preset; Flux has its own blocks: a gradient)
        "weighted_sum GRAD_V": (inputs[:2], ["--alpha", "GRAD_V"]),
        "add_difference": (inputs, ["-m", "add_difference", "--alpha", "1.0"]),
    }
    if args.arch == "flux":
        del merges["weighted_sum GRAD_V"]
        merges["weighted_sum gradient"] = (inputs[:2], ["--alpha", "{gradient: [0, 1]}"])
    if args.research:  # base A and two fine-tunes B, C (random: far apart, the worst case)
        merges = {
            "ties": (inputs, ["-m", "ties", "-p", "density=0.5"]),
            "dare_ties": (inputs, ["-m", "dare_ties", "-p", "density=0.5"]),
            "slerp": (inputs[:2], ["-m", "slerp", "-p", "t=0.5"]),
            "model_stock": (inputs, ["-m", "model_stock"]),
        }
    rows: dict[str, list[tuple[float, int, float]]] = {}
    measure([sys.executable, "-c", "import weightmix.cli"])  # writes the bytecode caches once
    for _ in range(args.repeat):
        rows.setdefault("import torch", []).append(measure([sys.executable, "-c", "import torch"]))
        rows.setdefault("startup", []).append(measure([*WEIGHTMIX, "--version"]))
        for method, (files, flags) in merges.items():
            names = " ".join(str(f) for f in files)
            floor = f"cat {names} > /dev/null && cat {files[0]} > {floor_out}"
            rows.setdefault(f"floor {method}", []).append(measure(["sh", "-c", floor]))
            floor_out.unlink()
            command = [*WEIGHTMIX, "merge", *map(str, files), *flags, *threads]
            command += ["-o", str(out), "-q", "--overwrite"]
            rows.setdefault(method, []).append(measure(command))
            out.unlink()

    if args.drop_inputs:
        for path in inputs:
            path.unlink()

    def median(name: str, index: int) -> float:
        return statistics.median(sample[index] for sample in rows[name])

    torch_rss, startup = median("import torch", 1), median("startup", 0)
    cache = ", cold page cache" if args.cold else ""
    on = f", --device {args.device}" if args.device else ""
    title = f"{args.arch}, {size_text(size)} per input, median of {args.repeat}{cache}{on}"
    print(
        f"\n| {title} | wall s | vs floor | vs floor, start-up off | CPU s | peak RSS"
        " | RSS above import torch |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in rows:
        wall, rss, cpu = median(name, 0), median(name, 1), median(name, 2)
        ratio = ratio_off = above = ""
        if f"floor {name}" in rows:
            floor = median(f"floor {name}", 0)
            ratio, ratio_off = f"{wall / floor:.2f}x", f"{(wall - startup) / floor:.2f}x"
        if not name.startswith("floor"):
            above = size_text(rss - torch_rss)
        print(
            f"| {name} | {wall:.2f} | {ratio} | {ratio_off} | {cpu:.2f} | {size_text(rss)}"
            f" | {above} |"
        )


if __name__ == "__main__":
    main()
