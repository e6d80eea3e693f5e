"""The CPU work of one merge chunk, plain against fused, in one process and interleaved.

    python bench/bench_chunk.py                 # fp16 inputs, fp32 compute, fp16 output
    python bench/bench_chunk.py --dtype bf16

What a worker does per chunk of a two-model weighted sum once the bytes are read, timed on one
thread (`torch.set_num_threads(1)`) over CHUNK_ELEMENTS elements, with glibc tuned as the
engine tunes it (allocator.keep_chunk_buffers):
- plain: widen both inputs into compute-dtype buffers, (1−α)·A + α·B, cast into the output
  buffer, the non-finite screen (float32 sum of the output);
- fused (engine.linear_call): (1−α)·A + α·B on the stored chunks, widened inside the products,
  into a reused buffer, then the cast; no screen for a convex blend (engine.gains_no_nonfinite);
- one pass (kernels.blend, where the C extension is built): the sum rounded into the output
  buffer block by block, counting inf and NaN (fp8 e4m3fn inputs too: `--dtype fp8`).
The results are checked equal to the bit. Reported: nanoseconds per element, median of the
rounds, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from weightmix.allocator import keep_chunk_buffers
from weightmix.engine import CHUNK_ELEMENTS
from weightmix.finite import count_nonfinite
from weightmix.methods.arithmetic import linear_combination, rounded_combination

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=200, help="chunks per round")
    args = parser.parse_args()
    keep_chunk_buffers()  # as the engine does: temporaries reuse heap pages
    torch.set_num_threads(1)
    stored, compute, n = DTYPES[args.dtype], torch.float32, CHUNK_ELEMENTS
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, generator=generator).to(stored) for _ in range(2))
    wide_a, wide_b = torch.empty(n, dtype=compute), torch.empty(n, dtype=compute)
    total, out = torch.empty(n, dtype=compute), torch.empty(n, dtype=stored)
    coefficients = [0.7, 0.3]

    def plain() -> torch.Tensor:
        wide_a.copy_(a)
        wide_b.copy_(b)
        result = linear_combination([wide_a, wide_b], coefficients)
        out.copy_(result)
        count_nonfinite(out)
        return out

    def fused() -> torch.Tensor:
        result = linear_combination([a, b], coefficients, compute, total)
        out.copy_(result)
        return out

    def one_pass() -> torch.Tensor:
        if rounded_combination([a, b], coefficients, out) is None:
            raise SystemExit("the one-pass loop did not take these (no C extension?)")
        return out

    variants = {"plain": plain, "fused": fused, "one pass": one_pass}
    if stored == torch.float8_e4m3fn:  # torch promotes no float8 type: no fused form
        del variants["fused"]
    expected = plain().clone()
    for name, work in variants.items():
        assert torch.equal(work().view(torch.uint8), expected.view(torch.uint8)), name
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, work in variants.items():
            began = time.perf_counter()
            for _ in range(args.repeat):
                work()
            times[name].append((time.perf_counter() - began) / args.repeat / n * 1e9)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.dtype} inputs, fp32 compute, {n} elements per chunk, one thread")
    for name, value in median.items():
        print(f"{name}: {value:.3f} ns/element ({value / median['plain']:.2f} of plain)")


if __name__ == "__main__":
    main()
