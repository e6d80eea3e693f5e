"""Whether `--device cuda` overlaps its copies with its arithmetic: one merge under torch's
profiler, its GPU activity sorted into host-to-device copies, kernels and device-to-host copies.

    python bench/profile_cuda.py A.safetensors B.safetensors            # weighted_sum 0.5
    python bench/profile_cuda.py A B C -m add_difference --alpha 1.0 --threads 8

Runs the merge in this process (weightmix.merge, the API the CLI calls) with the CUDA activity
of torch.profiler on, then reads the GPU's intervals from the trace: per kind, their count and
summed time; the streams that ran them; the time the GPU was busy with anything (the union of
all intervals); and how much of the copies' time ran while a kernel ran (on another stream:
one stream runs its own work in order). A pipeline that serialised copy, compute and copy
back would show nothing overlapped and a busy time equal to the sum of the parts.
Printed as a Markdown table; the trace is kept with --keep.

    python bench/profile_cuda.py A B --time-only --repeat 3 --threads 1 --slots 1

--time-only times merges in this process instead (CUDA started and the inputs read once
before): with --slots 1 each worker waits for a chunk's GPU work before reading the next
chunk, against the default 2 buffer sets where the reads overlap the GPU's work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

Interval = tuple[float, float]


def union(intervals: list[Interval]) -> list[Interval]:
    """Disjoint sorted intervals covering the same time."""
    merged: list[Interval] = []
    for start, stop in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def length(intervals: list[Interval]) -> float:
    return sum(stop - start for start, stop in union(intervals))


def covered(intervals: list[Interval], cover: list[Interval]) -> float:
    """Time of `intervals` (summed over each) that lies inside the union of `cover`."""
    cover = union(cover)
    total, index = 0.0, 0
    for start, stop in sorted(intervals):
        while index < len(cover) and cover[index][1] <= start:
            index += 1
        probe = index
        while probe < len(cover) and cover[probe][0] < stop:
            total += min(stop, cover[probe][1]) - max(start, cover[probe][0])
            probe += 1
    return total


def kind(event: dict) -> str | None:
    category, name = event.get("cat", ""), event.get("name", "")
    if category == "kernel":
        return "kernel"
    if category == "gpu_memcpy":
        return "copy to GPU" if "HtoD" in name else "copy to host" if "DtoH" in name else "copy"
    if category == "gpu_memset":
        return "memset"
    return None


def gpu_intervals(trace: Path) -> dict[str, list[tuple[float, float, object]]]:
    """kind: [(start µs, stop µs, stream)] of the trace's GPU activity."""
    found: dict[str, list[tuple[float, float, object]]] = {}
    for event in json.loads(trace.read_text())["traceEvents"]:
        what = kind(event)
        if what is not None and "dur" in event:
            start = float(event["ts"])
            found.setdefault(what, []).append((start, start + float(event["dur"]), event["tid"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("-m", "--method", default="weighted_sum")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--output", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep the chrome trace here")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for comparison")
    parser.add_argument("--slots", type=int, default=None, help="buffer sets per worker")
    parser.add_argument("--time-only", action="store_true", help="time merges, no profile")
    parser.add_argument("--repeat", type=int, default=3, help="merges timed (--time-only)")
    args = parser.parse_args()
    names = "ABCDEFGH"[: len(args.inputs)]
    recipe = {
        "models": {n: str(p) for n, p in zip(names, args.inputs, strict=True)},
        "merge": {"method": args.method, "inputs": list(names), "alpha": args.alpha},
        "device": args.device,
    }
    scratch = Path(tempfile.mkdtemp(prefix="weightmix-cuda-profile-"))
    output = args.output or scratch / "out.safetensors"
    try:
        run(args, recipe, output, scratch)
    finally:  # the merged file and the trace, unless -o and --keep put them elsewhere
        shutil.rmtree(scratch)


def run(args: argparse.Namespace, recipe: dict, output: Path, scratch: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import weightmix
    from weightmix import device_chunks

    if args.slots:
        device_chunks.SLOTS = args.slots
    if args.device != "cpu":
        torch.cuda.init()
    if args.time_only:
        weightmix.merge(recipe, output, threads=args.threads, overwrite=True)  # warm
        times = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            weightmix.merge(recipe, output, threads=args.threads, overwrite=True)
            times.append(time.perf_counter() - began)
        slots, median = device_chunks.SLOTS, sorted(times)[len(times) // 2]
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"{args.method} on {args.device}, threads {args.threads}, slots {slots}:"
              f" median {median:.2f} s of {runs}")  # fmt: skip
        return
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        weightmix.merge(recipe, output, threads=args.threads, overwrite=True)
        torch.cuda.synchronize()
    wall = time.perf_counter() - began
    trace = args.keep or scratch / "trace.json"
    profiler.export_chrome_trace(str(trace))
    found = gpu_intervals(trace)
    everything = [(s, e) for spans in found.values() for s, e, _ in spans]
    kernels = [(s, e) for s, e, _ in found.get("kernel", [])]
    first, last = min(s for s, _ in everything), max(e for _, e in everything)
    size = output.stat().st_size / 1e9
    print(f"\n{args.method}, {len(args.inputs)} inputs, {size:.2f} GB out, profiled wall"
          f" {wall:.2f} s, GPU active from first to last {(last - first) / 1e6:.2f} s")  # fmt: skip
    print("\n| GPU activity | count | summed s | streams | of it during a kernel |")
    print("|---|---|---|---|---|")
    for what, spans in sorted(found.items()):
        summed = sum(e - s for s, e, _ in spans)
        streams = len({stream for _, _, stream in spans})
        overlap = covered([(s, e) for s, e, _ in spans], kernels) / summed
        during = "" if what == "kernel" else f"{overlap:.0%}"
        print(f"| {what} | {len(spans)} | {summed / 1e6:.3f} | {streams} | {during} |")
    parts = sum(e - s for s, e in everything)
    busy = length(everything)
    print(f"| any (union) | | {busy / 1e6:.3f} | | parts sum to {parts / busy:.2f}x the union |")


if __name__ == "__main__":
    main()
