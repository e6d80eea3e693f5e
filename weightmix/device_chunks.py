"""Elementwise merges on a GPU, streamed in chunks through pinned host buffers.

Each worker thread owns a CUDA stream and two sets of page-locked (pinned) host buffers. For
every chunk of a task it reads the inputs' stored bytes into one set, queues on its stream the
copy to the GPU, the widening to the compute dtype, the merge, the rounding into the output
dtype and the copy back into the set's output buffer, and marks the end with an event. It
waits for a chunk's event only after queueing the next one, so the disk reads and the file
writes of one chunk overlap the copies and arithmetic of the other; the workers' streams
overlap each other too. Nothing grows with the tensor: a chunk is DEVICE_CHUNK_ELEMENTS.

Results are the GPU's arithmetic (the same formula as the CPU path; a GPU may contract
a·x + b·y into fused multiply-adds, so values can differ from the CPU path in the last bit).
The same code runs on the CPU with plain buffers and synchronous copies, which is how the
chunk bookkeeping is tested on machines without a GPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import nullcontext, suppress
from dataclasses import dataclass

import torch

from weightmix.expression import evaluate
from weightmix.finite import check_gained
from weightmix.io.writer import tensor_bytes
from weightmix.plan import KeyPlan, Plan
from weightmix.rounding import Draw

DEVICE_CHUNK_ELEMENTS = 1 << 20  # per copy: big enough that kernel launches do not dominate
SLOTS = 2  # buffer sets per worker: one being filled from disk, one on the GPU


class Lane:
    """One worker thread's CUDA stream and host buffers (pinned on a GPU), made on first use."""

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None
        self.host: dict[tuple[str, torch.dtype, int], tuple[torch.Tensor, memoryview]] = {}

    def open(self, device: torch.device) -> None:
        if device.type == "cuda" and self.stream is None:
            self.stream = torch.cuda.Stream(device)

    def buffer(
        self,
        name: str,
        dtype: torch.dtype,
        slot: int,
        count: int,
        device: torch.device,
        size: int | None = None,
    ) -> tuple[torch.Tensor, memoryview]:
        """A reused host buffer (typed, and its bytes) of `count` elements, at most `size`
        (DEVICE_CHUNK_ELEMENTS by default)."""
        entry = self.host.get((name, dtype, slot))
        if entry is None:
            size = size or DEVICE_CHUNK_ELEMENTS
            typed = torch.empty(size, dtype=dtype, pin_memory=device.type == "cuda")
            entry = self.host[(name, dtype, slot)] = (typed, memoryview(tensor_bytes(typed)))
        typed, raw = entry
        return typed[:count], raw[: count * typed.element_size()]


@dataclass
class Queued:
    """A chunk whose work is queued on the device: what finishing it needs."""

    offset: int  # of the chunk's first byte in the output tensor
    out: memoryview  # host bytes the result is copied into
    done: torch.cuda.Event | None  # None on the CPU: the work is already done
    nonfinite: torch.Tensor | None  # inf/NaN values in the output (host; None: not screened)
    output: torch.Tensor  # on the device, for a report
    result: torch.Tensor
    inputs: dict[str, torch.Tensor]


Rounder = Callable[[torch.Tensor, torch.dtype, int | None, int], torch.Tensor]


def lane_bytes(widest: int) -> int:
    """Host bytes one worker's buffers take at most: SLOTS sets of `widest` inputs and an
    output, 8 bytes an element at most."""
    return SLOTS * DEVICE_CHUNK_ELEMENTS * 8 * (widest + 1)


def run_device_chunks(
    plan: Plan,
    key: KeyPlan,
    first: int,
    stop: int,
    lane: Lane,
    write: Callable[[str, int, memoryview], None],
    rounded: Rounder,
    rounding_stream: int | None,
) -> None:
    """Merge elements [first, stop) of the key on plan.device and write them with
    write(key, byte offset, bytes), in order; `rounded` casts a result into the output dtype
    (with the key's stochastic rounding stream, or None for round to nearest)."""
    lane.open(plan.device)
    in_flight: deque[Queued] = deque()
    with torch.cuda.stream(lane.stream) if lane.stream is not None else nullcontext():
        try:
            for number, start in enumerate(range(first, stop, DEVICE_CHUNK_ELEMENTS)):
                count = min(DEVICE_CHUNK_ELEMENTS, stop - start)
                slot = number % SLOTS  # the slot's last chunk is finished: its buffers are free
                queued = _queue(plan, key, lane, slot, start, count, rounded, rounding_stream)
                in_flight.append(queued)
                if len(in_flight) == SLOTS:  # the chunk before this one: wait, check, write
                    _finish(key, in_flight.popleft(), write)
            while in_flight:
                _finish(key, in_flight.popleft(), write)
        except BaseException:
            if lane.stream is not None:  # queued copies end before the buffers serve again
                with suppress(RuntimeError):  # (a CUDA fault raises again: keep the first)
                    lane.stream.synchronize()
            raise


def _queue(
    plan: Plan,
    key: KeyPlan,
    lane: Lane,
    slot: int,
    start: int,
    count: int,
    rounded: Rounder,
    rounding_stream: int | None,
) -> Queued:
    """Read a chunk into the slot's host buffers and queue its work on the lane's stream."""
    assert key.expr is not None
    device, compute, out_dtype = plan.device, plan.compute_dtype.torch, key.out_dtype.torch
    inputs = {}
    for n, (model, info) in enumerate(key.sources.items()):
        typed, data = lane.buffer(f"raw{n}", info.dtype.torch, slot, count, device)
        plan.checkpoints[model].read_range(info, start * info.dtype.itemsize, data)
        inputs[model] = typed.to(device, non_blocking=True).to(compute)
    draw = Draw(key.stream, start) if key.stream is not None else None
    result = evaluate(key.expr, inputs, draw)
    if result.numel() != count:
        raise RuntimeError(f"{key.key}: merge produced {result.numel()} of {count} elements")
    output = rounded(result.reshape(-1), out_dtype, rounding_stream, start)
    host, out = lane.buffer("out", out_dtype, slot, count, device)
    host.copy_(output, non_blocking=True)
    nonfinite = None
    if not plan.recipe.allow_nonfinite and out_dtype.is_floating_point:
        nonfinite = lane.buffer("nonfinite", torch.int64, slot, 1, device, size=1)[0]
        wide = output if output.element_size() > 1 else output.float()  # fp8: no isfinite
        nonfinite.copy_((~torch.isfinite(wide)).sum().reshape(1), non_blocking=True)
    done = None
    if lane.stream is not None:
        done = torch.cuda.Event(blocking=True)  # waiting for it sleeps instead of spinning
        done.record(lane.stream)
    return Queued(start * key.out_dtype.itemsize, out, done, nonfinite, output, result, inputs)


def _finish(key: KeyPlan, chunk: Queued, write: Callable[[str, int, memoryview], None]) -> None:
    """Wait for a queued chunk, refuse non-finite values it gained, and write it."""
    if chunk.done is not None:
        chunk.done.synchronize()
    if chunk.nonfinite is not None and int(chunk.nonfinite[0]):
        check_gained(key.key, chunk.output, chunk.result, chunk.inputs)
    write(key.key, chunk.offset, chunk.out)
