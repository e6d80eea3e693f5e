"""Run a plan as a stream.

The output's layout is fixed by the plan, so every tensor has its place in the output file
before anything is computed. Worker threads take tasks (a key, or a range of a big key) in
plan order: read the inputs' bytes into small reused buffers, compute, and write the result
into its place. Elementwise merges run in chunks that stay in the CPU cache; nothing grows
with model size. Methods that need a whole tensor get it, within an in-flight memory budget.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightmix import kernels
from weightmix.allocator import keep_chunk_buffers
from weightmix.device_chunks import Lane, lane_bytes, run_device_chunks
from weightmix.expression import (
    Leaf,
    Op,
    evaluate,
    is_elementwise,
    ops,
    statistic_depth,
    statistic_id,
    streamed_ops,
)
from weightmix.finite import check_gained
from weightmix.io import open_output
from weightmix.io.direct import STAGE_BYTES as DIRECT_STAGE_BYTES
from weightmix.io.direct import wants_direct
from weightmix.io.folder_output import FolderOutput
from weightmix.io.interrupts import uninterrupted
from weightmix.io.memory_output import MemoryOutput
from weightmix.io.writer import SafetensorsOutput, tensor_bytes
from weightmix.methods.streaming import CHUNK, ModelStatistic, Streamer
from weightmix.plan import KeyPlan, Plan
from weightmix.progress import Progress
from weightmix.rounding import Draw, key_stream, stochastic_round, uniform
from weightmix.workers import Workers

Output = SafetensorsOutput | FolderOutput | MemoryOutput  # a file, a folder, or memory
DEFAULT_BUDGET = 512 * 2**20  # bytes of whole-tensor work in flight
# a streamed key whose stored inputs take at most this many bytes is read once and held for
# its statistics passes and its output pass (else each pass reads it again)
HOLD_BYTES = 256 * 2**20
CHUNK_ELEMENTS = CHUNK  # elements per compute step: a few MB, stays in cache
TASK_ELEMENTS = 1 << 24  # elements per task: big tensors are shared out between workers


@dataclass(frozen=True)
class RunStats:
    files: list[Path]
    tensors: int
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class Task:
    """Elements [start, stop) of one key; whole keys for methods that need them (in chunks
    after statistics passes when `streamed`, else as whole tensors)."""

    key: KeyPlan
    start: int
    stop: int
    chunked: bool
    streamed: bool = False


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def chunked(plan: Plan, key: KeyPlan) -> bool:
    """Copies always stream in chunks; merges do on the CPU when every method is elementwise
    or streams with statistics passes (see methods/streaming.py)."""
    return mode(plan, key) != WHOLE


CHUNKS, STREAMED, WHOLE = "chunks", "streamed", "whole"


def mode(plan: Plan, key: KeyPlan) -> str:
    """How the engine runs a key: elementwise chunks split between workers, one worker's
    chunks after statistics passes, or whole tensors."""
    if key.expr is None:
        return CHUNKS
    if is_elementwise(key.expr):
        return CHUNKS  # on a GPU too: see device_chunks.py
    if plan.device.type != "cpu":
        return WHOLE
    return STREAMED if streamed_ops(key.expr) is not None else WHOLE


def tasks(plan: Plan) -> Iterator[Task]:
    modes: dict[int, str] = {}  # keys share a handful of expression trees
    for key in plan.keys:
        tree = id(key.expr)
        if tree not in modes:
            modes[tree] = mode(plan, key)
        numel = key.numel
        if modes[tree] != CHUNKS:
            streamed = modes[tree] == STREAMED
            yield Task(key, 0, numel, streamed, streamed)
            continue
        for start in range(0, max(numel, 1), TASK_ELEMENTS):
            yield Task(key, start, min(start + TASK_ELEMENTS, numel), True)


def task_cost(plan: Plan, task: Task) -> int:
    """Memory a task holds while in flight: chunked tasks reuse their worker's buffers, but
    for the inputs a streamed task holds between its passes."""
    if task.chunked:
        return held_bytes(plan, task.key) + scratch_bytes(task.key) if task.streamed else 0
    return plan.working_set(task.key)


def held_bytes(plan: Plan, key: KeyPlan) -> int:
    """Bytes of stored inputs a streamed key holds for its passes (0: it reads them again).
    Only keys with an input that costs more to read again than a copy (a LoRA's products, a
    transpose, a strided tensor of a pickle: Checkpoint.reads_cheaply) are held: a file's
    bytes come again from the page cache for less than holding them costs (bench/RESULTS.md)."""
    if all(plan.checkpoints[m].reads_cheaply(info) for m, info in key.sources.items()):
        return 0
    stored = sum(info.nbytes for info in key.sources.values())
    return stored if stored <= HOLD_BYTES else 0


def scratch_bytes(key: KeyPlan) -> int:
    """Bytes a streamed key's calls hold beside the chunk buffers (Streamer.scratch_bytes)."""
    assert key.expr is not None
    calls = streamed_ops(key.expr) or []
    return sum(op.method.streamer.scratch_bytes(op.params, key.numel, len(op.inputs))
               for op in calls)  # fmt: skip


def estimate_peak(plan: Plan, budget: int = DEFAULT_BUDGET, threads: int | None = None) -> int:
    """Bytes the engine holds at most beyond the interpreter: per-worker chunk buffers, plus
    whole-tensor work up to the budget (a key bigger than the budget is admitted alone)."""
    workers = threads or default_threads()
    widest = max(len(k.sources) for k in plan.keys)
    buffers = workers * CHUNK_ELEMENTS * 8 * (2 * widest + 2)
    if on_device(plan):
        buffers += workers * lane_bytes(widest)
    if wants_direct(plan.output_bytes):  # staging buffers: one per writing thread, plus two
        buffers += (workers + 3) * DIRECT_STAGE_BYTES
    streamed = [k for k in plan.keys if mode(plan, k) == STREAMED]
    held = sorted((held_bytes(plan, k) + scratch_bytes(k) for k in streamed), reverse=True)
    buffers += sum(held[:workers])
    whole = [plan.working_set(k) for k in plan.keys if not chunked(plan, k)]
    if not whole:
        return buffers
    return buffers + min(sum(whole), max(budget, max(whole)) + max(whole))


def run(
    plan: Plan,
    metadata: dict[str, str],
    threads: int | None = None,
    progress: Progress | None = None,
    budget: int = DEFAULT_BUDGET,
    fsync: bool = False,
    writer: Output | None = None,
) -> RunStats:
    """Merge every key of `plan` into plan.output (or `writer`, e.g. a MemoryOutput); on any
    error nothing is left there."""
    if plan.output is None and writer is None:
        raise ValueError("plan has no output path")
    progress = progress or Progress()
    workers = threads or default_threads()
    keep_chunk_buffers()  # chunk temporaries reuse heap memory instead of faulting pages in
    began = time.monotonic()
    opened = [] if writer is None else [writer]  # what an error or Ctrl-C aborts
    try:
        if writer is None:
            with uninterrupted():  # a Ctrl-C waits until the new output is in `opened`
                opened.append(_open_output(plan, metadata, fsync))
        writer = opened[0]
        statistics = model_statistics(plan)
        progress.start(len(plan.keys), plan.output_bytes)
        # closing(): on any error the pool has stopped before the output is removed
        with (
            _torch_threads(1),
            closing(_run_tasks(plan, writer, workers, budget, statistics)) as done,
        ):
            for task in done:
                progress.advance((task.stop - task.start) * task.key.out_dtype.itemsize,
                                 tensor_done=task.stop >= task.key.numel)  # fmt: skip
        for checkpoint in plan.checkpoints.values():  # read from what was planned with
            checkpoint.check_unchanged()
        files = writer.commit()
    except BaseException:
        for output in opened:
            output.abort()
        raise
    finally:
        progress.close()
    return RunStats(files, len(plan.keys), plan.output_bytes, time.monotonic() - began)


def _open_output(plan: Plan, metadata: dict[str, str], fsync: bool) -> Output:
    """The output file or set at plan.output, or a model folder mirroring the base's."""
    tensors, base = plan.output_tensors(), plan.base_folder
    if base is not None:  # the output mirrors the base model folder
        return FolderOutput(plan.output, base, tensors, metadata, plan.max_shard_bytes, fsync,
                            overwrite=plan.overwrite)  # fmt: skip
    return open_output(plan.output, tensors, metadata, plan.max_shard_bytes, fsync=fsync,
                       overwrite=plan.overwrite)  # fmt: skip


def model_statistics(plan: Plan) -> dict[str, ModelStatistic]:
    """The model-wide statistics of calls that need one (see streaming.ModelStatistic), by
    statistic_id: a pass over the keys those calls merge, a whole key at a time; one pass per
    level of nesting, innermost first (an outer call's inputs need the inner statistics)."""
    gathered: dict[str, ModelStatistic] = {}
    done: dict[str, ModelStatistic] = {}
    calls = {id(k): [op for op in ops(k.expr) if op.method.model_statistic] for k in plan.keys
             if k.expr is not None}  # fmt: skip
    for found in calls.values():  # statistics of key names only: nothing to read
        for op in found:
            statistic = op.method.model_statistic
            if (
                statistic is not None
                and not statistic.reads_tensors
                and statistic_id(op) not in done
            ):
                done[statistic_id(op)] = statistic(op.params)
                done[statistic_id(op)].finish()
    calls = {k: [op for op in found if statistic_id(op) not in done] for k, found in calls.items()}
    levels = sorted({statistic_depth(op) for found in calls.values() for op in found})
    for level in levels:
        for key in plan.keys:
            here = [op for op in calls.get(id(key), []) if statistic_depth(op) == level]
            if not here:
                continue
            tensors = {
                m: plan.checkpoints[m].read(info).to(plan.device, plan.compute_dtype.torch)
                for m, info in key.sources.items()
            }
            draw = Draw(key.stream) if key.stream is not None else None
            known = statistics_for(plan, key, done)
            for op in here:
                statistic = op.method.model_statistic
                assert statistic is not None
                if statistic_id(op) not in gathered:
                    gathered[statistic_id(op)] = statistic(op.params)
                inputs = [evaluate(child, tensors, draw, statistics=known) for child in op.inputs]
                gathered[statistic_id(op)].add(key.key, component(plan, key), inputs)
        for name, statistic in gathered.items():
            if name not in done:
                statistic.finish()
                done[name] = statistic
    return done


def component(plan: Plan, key: KeyPlan) -> str | None:
    """The key's component (unet, vae, clip_l ...) where the architecture is known."""
    component_of = getattr(plan.architecture, "component_of", None)
    return component_of(key.key) if component_of else None


def statistics_for(
    plan: Plan, key: KeyPlan, statistics: dict[str, ModelStatistic] | None
) -> dict[str, Any] | None:
    """What each gathered statistic gives the calls merging this key."""
    if not statistics:
        return None
    part = component(plan, key)
    return {name: statistic.for_key(key.key, part) for name, statistic in statistics.items()}


@dataclass
class Census:
    """How many elements each input of one choice call supplies, per component."""

    call: str  # the call as text, e.g. lossless(a, b, c)
    label: str  # where it sits in the recipe
    inputs: list[str]
    counts: dict[str, list[int]]  # component ('all keys' when unknown) -> per input
    skipped: int = 0  # keys whose inputs need whole tensors: not counted


def census(plan: Plan) -> list[Census]:
    """Stream the keys merged by calls with a census (lossless, maxdiff) as a merge would,
    computing nothing but the choices; the counts per call and component."""
    found: dict[str, Census] = {}
    buffers = _Buffers()
    for key in plan.keys:
        calls = [op for op in ops(key.expr) if op.method.census] if key.expr else []
        for op in calls:
            if statistic_id(op) not in found:
                texts = [child.text() for child in op.inputs]
                found[statistic_id(op)] = Census(op.text(), op.label, texts, {})
        countable = [op for op in calls if all(is_elementwise(child) for child in op.inputs)]
        for op in calls:
            if all(op is not other for other in countable):
                found[statistic_id(op)].skipped += 1
        if not countable:
            continue
        part = component(plan, key) or "all keys"
        with _torch_threads(1):
            for start, _, inputs in _read_chunks(plan, key, 0, key.numel, buffers):
                draw = _draw(key, start)
                for op in countable:
                    values = [evaluate(child, inputs, draw) for child in op.inputs]
                    assert op.method.census is not None
                    counts = op.method.census(values, op.params)
                    entry = found[statistic_id(op)].counts.setdefault(part, [0] * len(counts))
                    for index, number in enumerate(counts):
                        entry[index] += number
    return list(found.values())


def _run_tasks(
    plan: Plan, writer: Output, workers: int, budget: int, statistics: dict[str, ModelStatistic]
) -> Iterator[Task]:
    """Run tasks on a pool, at most `budget` bytes of whole-tensor work in flight and at most
    4 tasks per worker unfinished; yield each task once it and every task before it are done,
    in plan order (so errors surface in order too). Tasks finished behind a long one (a whole
    streamed key) do not hold the workers back: new ones start as they finish."""
    pool = Workers(workers)  # no lock a worker needs is ever taken here (workers.py)
    buffers = _Buffers()
    queue: deque[tuple[Task, int]] = deque()  # tickets not yet yielded, in plan order
    active: dict[int, int] = {}  # unfinished tickets and the memory each task holds
    errors: dict[int, BaseException | None] = {}  # finished tickets not yet yielded
    failed = False
    tickets = itertools.count()
    upcoming = tasks(plan)
    following = next(upcoming, None)
    try:
        while following is not None or queue:
            while following is not None and not failed and len(active) < 4 * workers:
                cost = task_cost(plan, following)
                if active and sum(active.values()) + cost > budget:
                    break
                ticket = next(tickets)
                pool.submit(ticket, functools.partial(run_task, plan, writer, following, buffers,
                                                      statistics))  # fmt: skip
                queue.append((following, ticket))
                active[ticket] = cost
                following = next(upcoming, None)
            finished = pool.done(block=queue[0][1] not in errors)
            while finished is not None:
                ticket, error = finished
                del active[ticket]
                errors[ticket] = error
                failed = failed or error is not None  # start nothing more
                finished = pool.done(block=False)
            while queue and queue[0][1] in errors:
                task, ticket = queue.popleft()
                error = errors.pop(ticket)
                if error is not None:
                    raise error
                yield task
    finally:
        pool.stopping = True  # before any call, where a second Ctrl-C could land
        pool.stop()  # and one that lands inside waits: no worker writes after this


class _Buffers(threading.local):
    """Per-thread chunk buffers, allocated once and reused for every chunk (no allocation or
    page faults per chunk), each with a typed view and a byte view for reads and writes."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, torch.dtype], tuple[torch.Tensor, memoryview]] = {}
        self.lane = Lane()  # for chunks on a GPU

    def get(self, name: str, dtype: torch.dtype, count: int) -> tuple[torch.Tensor, memoryview]:
        entry = self.store.get((name, dtype))
        if entry is None:
            typed = torch.empty(CHUNK_ELEMENTS, dtype=dtype)
            entry = self.store[(name, dtype)] = (typed, memoryview(tensor_bytes(typed)))
        typed, raw = entry
        if count == CHUNK_ELEMENTS:
            return typed, raw
        return typed[:count], raw[: count * typed.element_size()]


def run_task(
    plan: Plan,
    writer: Output,
    task: Task,
    buffers: _Buffers,
    statistics: dict[str, ModelStatistic] | None = None,
) -> None:
    """Compute one task and write its result into the output."""
    key = task.key
    if not task.chunked:
        writer.write(key.key, compute_key(plan, key, statistics))
        return
    if key.expr is not None and on_device(plan):
        stream = _rounding_stream(plan, key)
        run_device_chunks(plan, key, task.start, task.stop, buffers.lane, writer.write_range,
                          _rounded, stream)  # fmt: skip
        return
    stored = task.streamed and stored_streamed_call(plan, key)
    streamers, held = (
        _gather_statistics(plan, key, buffers, stored) if task.streamed else (None, None)
    )
    known = statistics_for(plan, key, statistics)
    out_dtype = key.out_dtype.torch
    out_size = key.out_dtype.itemsize
    stream = _rounding_stream(plan, key)
    fused = fused_call(plan, key) if streamers is None else None
    screen = key.expr is not None and not plan.recipe.allow_nonfinite
    if fused is not None and gains_no_nonfinite(plan, key, fused):
        screen = False  # a convex blend into a dtype as wide as its inputs: nothing to find
    plain_widens = fused is None and not stored  # the plain path takes widened chunks
    # the arithmetic and the rounding into the output dtype in one pass, where it can
    one_pass = _one_pass(plan, key, streamers, stored)
    widen = plain_widens and one_pass is None
    chunks = _read_chunks(plan, key, task.start, task.stop, buffers, widen, held)
    for start, raw, inputs in chunks:
        count = min(CHUNK_ELEMENTS, task.stop - start)
        if one_pass is not None:
            node, compute, report = one_pass
            same = buffers.get("out", out_dtype, count)
            terms = [inputs[leaf.model] for leaf in node.inputs]
            found = compute(terms, same[0])
            to_check = screen and bool(found)  # non-finite values written: gained ones?
            if plain_widens and (found is None or to_check):  # the plain path's chunks
                inputs = _widened(inputs, plan.compute_dtype.torch, buffers, count)
            if found is not None:
                if to_check:
                    # the float32 result, computed again only to say how it overflowed
                    again = functools.partial(
                        _chunk_result, plan, key, fused, inputs, buffers, count, start,
                        streamers, known,
                    )  # fmt: skip
                    if report is not None:
                        again = functools.partial(report, terms)
                    check_gained(key.key, same[0], again, inputs)
                writer.write_range(key.key, start * out_size, same[1])
                continue
        result = _chunk_result(plan, key, fused, inputs, buffers, count, start, streamers, known)
        # an input returned unchanged is written from the bytes read, exactly
        same = next((raw[m] for m, t in inputs.items() if t is result), None)
        if same is None or same[0].dtype != out_dtype:
            same = buffers.get("out", out_dtype, count)
            # cast and count non-finite values in one C loop where it takes them
            found = kernels.cast(result.reshape(-1), same[0]) if stream is None else None
            if found is None:
                same[0].copy_(
                    result if stream is None else _rounded(result, out_dtype, stream, start)
                )
            if screen and found != 0:
                check_gained(key.key, same[0], result, inputs)
        writer.write_range(key.key, start * out_size, same[1])


def _chunk_result(
    plan: Plan,
    key: KeyPlan,
    fused: Op | None,
    inputs: dict[str, torch.Tensor],
    buffers: _Buffers,
    count: int,
    start: int = 0,
    streamers: dict | None = None,
    known: dict | None = None,
) -> torch.Tensor:
    """One chunk's merge before the cast: a copied input, the fused form on the chunks as
    stored, or the expression (on the chunks as _read_chunks gave them)."""
    if key.expr is None:
        return inputs[key.copy_from]
    if fused is not None:  # inputs as stored, widened inside the arithmetic
        terms = [inputs[leaf.model] for leaf in fused.inputs]
        into = buffers.get("fused", plan.compute_dtype.torch, count)[0]
        result = fused.method.fused(terms, fused.params, plan.compute_dtype.torch, into)
        if result.dtype not in (plan.compute_dtype.torch, key.out_dtype.torch):
            result = result.to(plan.compute_dtype.torch)  # an input returned as it is
        return result
    result = evaluate(key.expr, inputs, _draw(key, start), streamers, known)
    if result.numel() != count:
        raise RuntimeError(f"{key.key}: merge produced {result.numel()} of {count} elements")
    return result


def on_device(plan: Plan) -> bool:
    """Whether merged chunks are computed on a GPU (device_chunks.py) rather than here."""
    return plan.device.type != "cpu"


def _draw(key: KeyPlan, start: int) -> Draw | None:
    return Draw(key.stream, start) if key.stream is not None else None


# stored dtypes that torch's mixed-dtype arithmetic widens to each compute dtype, exactly
WIDENS_EXACTLY = {
    torch.float32: (torch.float16, torch.bfloat16, torch.float32),
    torch.float64: (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def _call_on_stored_models(plan: Plan, key: KeyPlan) -> Op | None:
    """The key's merge when it is one call on the models themselves, each stored in a dtype
    the compute dtype holds exactly (torch promotes no float8 type: those are widened by
    copies); None otherwise."""
    node = key.expr
    if not isinstance(node, Op) or not all(isinstance(c, Leaf) for c in node.inputs):
        return None
    exact = WIDENS_EXACTLY.get(plan.compute_dtype.torch, ())
    if any(info.dtype.torch not in exact for info in key.sources.values()):
        return None
    return node


def fused_call(plan: Plan, key: KeyPlan) -> Op | None:
    """The key's merge when it is such a call of a method with a fused form (MethodSpec.fused):
    the engine then feeds it the chunks as read (no widened copies), with the same result to
    the bit. None otherwise."""
    node = _call_on_stored_models(plan, key)
    return node if node is not None and node.method.fused is not None else None


OnePass = Callable[[list[torch.Tensor], torch.Tensor], "int | None"]
Report = Callable[[list[torch.Tensor]], torch.Tensor]


def _one_pass(
    plan: Plan, key: KeyPlan, streamers: dict[int, Streamer] | None, stored: bool
) -> tuple[Op, OnePass, Report | None] | None:
    """The call that computes the key's chunks and rounds them into the output buffer in one
    pass (returning how many inf/NaN values it wrote, or None to leave the chunk to the plain
    path), with the node whose inputs it takes and, for a streamed call, how to compute the
    last chunk's float32 result again (for an overflow report; None: the plain path's): a
    method's rounded form, or the rounded apply of a streamed call on the models as stored.
    None: the plain path for every chunk."""
    if streamers is None:
        node = rounded_call(plan, key)
        if node is None:
            return None
        method, params = node.method, node.params
        assert method.rounded is not None
        return node, lambda terms, out: method.rounded(terms, params, out), None
    node = key.expr
    if not stored or not isinstance(node, Op) or _rounding_stream(plan, key) is not None:
        return None
    streamer = streamers[id(node)]
    if plan.compute_dtype.torch != torch.float32 or not streamer.rounds:
        return None
    return node, streamer.apply_rounded, streamer.rounded_result


def rounded_call(plan: Plan, key: KeyPlan) -> Op | None:
    """The key's merge when it is one call, on the models themselves, of a method with a
    rounded form (MethodSpec.rounded) in float32 compute, rounded to nearest, its inputs
    stored in dtypes the C loops widen (float8 too): the engine then offers it the chunks as
    stored and the output buffer, and runs the plain path for a chunk it does not take."""
    node = key.expr
    if not isinstance(node, Op) or node.method.rounded is None:
        return None
    if not all(isinstance(c, Leaf) for c in node.inputs):
        return None
    if plan.compute_dtype.torch != torch.float32 or _rounding_stream(plan, key) is not None:
        return None
    if any(info.dtype.torch not in kernels.STORED_CODES for info in key.sources.values()):
        return None
    return node


def stored_streamed_call(plan: Plan, key: KeyPlan) -> bool:
    """Whether the key's merge is such a call of a streamed method whose streamer takes
    chunks as stored (Streamer.takes_stored): the engine then reads them without widened
    copies, for the statistics passes and the output."""
    node = _call_on_stored_models(plan, key)
    if node is None or not node.method.streams(node.params):
        return False
    return node.method.streamer is not None and node.method.streamer.takes_stored


def gains_no_nonfinite(plan: Plan, key: KeyPlan, node: Op) -> bool:
    """Whether a call's output can be non-finite only where an input is: true for a linear
    method (MethodSpec.linear) on the models themselves whose coefficients are ≥ 0 and sum
    to at most 1 (|Σ cᵢ·xᵢ| ≤ max |xᵢ|; rounding adds a few
    float32 ulps, far from the half ulp of the output dtype that would round its largest value
    to inf), the output is rounded to nearest, and the output dtype holds every stored dtype's
    largest value. Then the engine skips the non-finite screen of the output."""
    if node.method.linear is None or not all(isinstance(c, Leaf) for c in node.inputs):
        return False
    coefficients = node.method.linear(len(node.inputs), node.params)
    if any(c < 0 for c in coefficients) or sum(coefficients) > 1.0 + 1e-9:
        return False
    if _rounding_stream(plan, key) is not None:  # stochastic rounding may round up past max
        return False
    out = torch.finfo(key.out_dtype.torch).max
    return all(torch.finfo(info.dtype.torch).max <= out for info in key.sources.values())


class Held:
    """A streamed key's stored inputs, whole, for all its passes: the first pass reads each
    chunk from the files into them (and its statistics see the chunk while it is in cache),
    later passes slice them."""

    def __init__(self, key: KeyPlan) -> None:
        self.filled = False
        self.inputs: dict[str, tuple[torch.Tensor, memoryview]] = {}
        for model, info in key.sources.items():
            typed = torch.empty(key.numel, dtype=info.dtype.torch)
            self.inputs[model] = (typed, memoryview(tensor_bytes(typed)))

    def chunk(self, model: str, start: int, count: int) -> tuple[torch.Tensor, memoryview]:
        typed, data = self.inputs[model]
        size = typed.element_size()
        return typed[start : start + count], data[start * size :][: count * size]


def _hold(plan: Plan, key: KeyPlan) -> Held | None:
    """Room for a streamed key's stored inputs, read once for all its passes (None: not
    held, see held_bytes; each pass reads them again)."""
    return Held(key) if held_bytes(plan, key) else None


def _read_chunks(
    plan: Plan,
    key: KeyPlan,
    first: int,
    stop: int,
    buffers: _Buffers,
    widen: bool = True,
    held: Held | None = None,
) -> Iterator[tuple[int, dict[str, tuple[torch.Tensor, memoryview]], dict[str, torch.Tensor]]]:
    """Each chunk of elements [first, stop) of the key's inputs, in order: its start, the raw
    buffers (typed and bytes) and the tensors in compute dtype (raw ones for copies, or when
    `widen` is False). Read from the files (into `held`, if given and not yet filled), or
    sliced from `held`. The buffers are reused: a chunk is valid until the next is read."""
    sources = [
        (plan.checkpoints[m], m, info, f"raw{n}") for n, (m, info) in enumerate(key.sources.items())
    ]
    compute_dtype = plan.compute_dtype.torch
    for start in range(first, stop, CHUNK_ELEMENTS):
        count = min(CHUNK_ELEMENTS, stop - start)
        raw: dict[str, tuple[torch.Tensor, memoryview]] = {}
        for checkpoint, model, info, name in sources:
            if held is not None:
                raw[model] = held.chunk(model, start, count)
                if held.filled:
                    continue
            else:
                raw[model] = buffers.get(name, info.dtype.torch, count)
            checkpoint.read_range(info, start * info.dtype.itemsize, raw[model][1])
        inputs = {model: tensor for model, (tensor, _) in raw.items()}
        if key.expr is not None and widen:
            inputs = _widened(inputs, compute_dtype, buffers, count)
        yield start, raw, inputs
    if held is not None and first == 0 and stop == key.numel:
        held.filled = True  # (a pass broken off early leaves it to be read again)


def _widened(
    inputs: dict[str, torch.Tensor], compute_dtype: torch.dtype, buffers: _Buffers, count: int
) -> dict[str, torch.Tensor]:
    """The chunk's inputs in the compute dtype: widened copies in per-thread buffers."""
    widened = dict(inputs)
    for model, tensor in inputs.items():
        if tensor.dtype != compute_dtype:
            into = buffers.get(f"in{model}", compute_dtype, count)[0]
            if not kernels.widen(tensor, into):  # a C loop where it takes them
                into.copy_(tensor)
            widened[model] = into
    return widened


def key_chunks(plan: Plan, key: KeyPlan) -> Iterator[dict[str, torch.Tensor]]:
    """A merged key's inputs, CHUNK_ELEMENTS at a time, flat and in the compute dtype (for
    analyses that sum over keys; each chunk is valid until the next is read)."""
    buffers = _Buffers()
    for _, _, inputs in _read_chunks(plan, key, 0, key.numel, buffers):
        yield inputs


def _gather_statistics(
    plan: Plan, key: KeyPlan, buffers: _Buffers, stored: bool = False
) -> tuple[dict[int, Streamer], Held | None]:
    """Run the statistics passes of the key's streamed calls over its chunks, in element
    order (as stored when `stored`); return the streamers, ready to compute the output chunk
    by chunk, and the inputs the passes read and hold (None: no pass, or too big to hold)."""
    assert key.expr is not None
    calls = streamed_ops(key.expr) or []
    dtype = plan.compute_dtype.torch
    streamers = {
        id(op): op.method.streamer(op.params, key.shape, dtype, len(op.inputs)) for op in calls
    }
    held = None
    if key.numel == 0:  # no chunk to look at, none to compute
        return streamers, held
    for op in calls:  # samples first, for streamers that ask for them
        streamer = streamers[id(op)]
        ranges = streamer.sample_ranges()
        for first, stop in ranges:
            for start, _, inputs in _read_chunks(plan, key, first, stop, buffers, not stored):
                draw = _draw(key, start)
                streamer.observe_sample([evaluate(child, inputs, draw) for child in op.inputs])
        if ranges:
            streamer.end_sample()
    while pending := [op for op in calls if streamers[id(op)].wants_pass()]:
        if held is None:
            held = _hold(plan, key)
        chunks = _read_chunks(plan, key, 0, key.numel, buffers, not stored, held)
        for start, _, inputs in chunks:
            draw = _draw(key, start)
            for op in pending:
                streamers[id(op)].observe([evaluate(child, inputs, draw) for child in op.inputs])
        for op in pending:
            streamers[id(op)].end_pass()
    return streamers, held


def compute_key(
    plan: Plan, key: KeyPlan, statistics: dict[str, ModelStatistic] | None = None
) -> torch.Tensor:
    """A merged key's whole output tensor, for methods that need whole tensors or on a GPU
    (copies always stream in chunks: see chunked())."""
    out_dtype = key.out_dtype.torch
    stream = _rounding_stream(plan, key)
    raw = {m: plan.checkpoints[m].read(info) for m, info in key.sources.items()}
    inputs = {m: t.to(plan.device, plan.compute_dtype.torch) for m, t in raw.items()}
    draw = Draw(key.stream) if key.stream is not None else None
    result = evaluate(key.expr, inputs, draw, statistics=statistics_for(plan, key, statistics))
    for model, tensor in inputs.items():
        if result is tensor and raw[model].dtype == out_dtype:
            return raw[model]  # the merge returned an input unchanged: keep its exact bytes
    if tuple(result.shape) != key.shape:
        raise RuntimeError(f"{key.key}: merge produced shape {list(result.shape)}, not {key.shape}")
    output = _rounded(result, out_dtype, stream, 0)
    if not plan.recipe.allow_nonfinite:
        check_gained(key.key, output, result, inputs)
    return output.to("cpu")


def _rounding_stream(plan: Plan, key: KeyPlan) -> int | None:
    """The key's random stream when its output is stochastically rounded, else None."""
    if plan.recipe.rounding == "stochastic" and plan.rounds(key):
        return key_stream(plan.recipe.seed, key.key)
    return None


def _rounded(
    values: torch.Tensor, dtype: torch.dtype, stream: int | None, start: int
) -> torch.Tensor:
    """values cast to dtype: round to nearest, or stochastically with the key's stream, the
    random number of each element fixed by its index in the tensor (`start` = first index)."""
    if stream is None:
        return values.to(dtype)
    noise = uniform(stream, start, values.numel(), values.device).reshape(values.shape)
    return stochastic_round(values, dtype, noise)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Workers run one task each; torch's own intra-op threads would only oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
