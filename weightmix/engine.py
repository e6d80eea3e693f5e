"""Run a plan as a stream: workers read and compute keys ahead, the caller's thread writes
them behind, in order. Memory stays bounded by the in-flight budget, not the model size."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from weightmix.expression import evaluate
from weightmix.io import open_output
from weightmix.plan import KeyPlan, Plan
from weightmix.progress import Progress

DEFAULT_BUDGET = 512 * 2**20  # bytes of work in flight (read ahead + not yet written)


@dataclass(frozen=True)
class RunStats:
    files: list[Path]
    tensors: int
    bytes_written: int
    seconds: float


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def estimate_peak(plan: Plan, budget: int = DEFAULT_BUDGET) -> int:
    """Bytes the engine holds at most beyond the interpreter: the in-flight budget, or the
    largest single key when that is bigger (a key is always admitted alone)."""
    largest = max(plan.working_set(key) for key in plan.keys)
    total = sum(plan.working_set(key) for key in plan.keys)
    return min(total, max(budget, largest) + largest)


def run(
    plan: Plan,
    metadata: dict[str, str],
    threads: int | None = None,
    progress: Progress | None = None,
    budget: int = DEFAULT_BUDGET,
    fsync: bool = False,
) -> RunStats:
    """Merge every key of `plan` into plan.output; on any error nothing is left there."""
    if plan.output is None:
        raise ValueError("plan has no output path")
    progress = progress or Progress()
    workers = threads or default_threads()
    began = time.monotonic()
    writer = open_output(
        plan.output, plan.output_tensors(), metadata, plan.max_shard_bytes, fsync=fsync
    )
    try:
        progress.start(len(plan.keys), plan.output_bytes)
        with _torch_threads(1):
            for key, tensor in _results(plan, workers, budget):
                writer.write(key.key, tensor)
                progress.advance(key.out_nbytes)
        files = writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.close()
    return RunStats(files, len(plan.keys), plan.output_bytes, time.monotonic() - began)


def _results(plan: Plan, workers: int, budget: int) -> Iterator[tuple[KeyPlan, torch.Tensor]]:
    """Yield (key, output tensor) in plan order while workers compute the keys ahead."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weightmix")
    queue: deque[tuple[KeyPlan, int, Future[torch.Tensor]]] = deque()
    in_flight = 0
    upcoming = iter(plan.keys)
    next_key = next(upcoming, None)
    try:
        while next_key is not None or queue:
            while next_key is not None and len(queue) < 4 * workers:
                cost = plan.working_set(next_key)
                if queue and in_flight + cost > budget:
                    break
                queue.append((next_key, cost, pool.submit(compute_key, plan, next_key)))
                in_flight += cost
                next_key = next(upcoming, None)
            key, cost, future = queue.popleft()
            yield key, future.result()
            in_flight -= cost
    finally:
        for _, _, future in queue:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def compute_key(plan: Plan, key: KeyPlan) -> torch.Tensor:
    """Read a key's inputs and compute its output tensor (on the CPU, in the output dtype)."""
    out_dtype = key.out_dtype.torch
    raw = {m: plan.checkpoints[m].read(info) for m, info in key.sources.items()}
    if key.expr is None:
        tensor = raw[key.copy_from]
        return tensor if tensor.dtype == out_dtype else tensor.to(out_dtype)
    inputs = {m: t.to(plan.device, plan.compute_dtype.torch) for m, t in raw.items()}
    result = evaluate(key.expr, inputs)
    for model, tensor in inputs.items():
        if result is tensor and raw[model].dtype == out_dtype:
            return raw[model]  # the merge returned an input unchanged: keep its exact bytes
    if tuple(result.shape) != key.shape:
        raise RuntimeError(f"{key.key}: merge produced shape {list(result.shape)}, not {key.shape}")
    return result.to("cpu", out_dtype)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Workers run one key each; torch's own intra-op threads would only oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
