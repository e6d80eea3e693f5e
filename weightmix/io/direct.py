"""Writing big outputs past the page cache (O_DIRECT), in whole aligned blocks.

A buffered write copies every byte into a fresh page-cache page, and once the dirty pages pass
the kernel's threshold the writer is paced to the disk anyway, while the new pages push the
inputs out of the cache. Past that size weightmix writes the output with O_DIRECT: the disk
takes the bytes from a reused, aligned buffer. Writing 6.9 GB here took 11-20 s of system
time buffered and 4.7-6.3 s wall (1.0-1.6 s system) direct (bench/RESULTS.md). Smaller
outputs stay buffered: the command then returns before the disk has them, as `cp` would.

O_DIRECT takes only whole blocks at aligned offsets from aligned memory, while a tensor's
bytes start anywhere in the file. DirectWrites gathers each thread's contiguous writes in an
aligned staging buffer from its first aligned byte; the bytes of a block shared with a
neighbouring write wait in memory until the block is whole, then go out as one block. At most
one such block per tensor boundary waits at a time (4 KB each), whatever the model's size.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import threading
from pathlib import Path

BLOCK = 4096  # a multiple of every logical block size O_DIRECT asks for here (512 or 4096)
STAGE_BYTES = 4 << 20  # per direct write: a few MB keeps the disk busy
SWITCH = "WEIGHTMIX_DIRECT_WRITES"  # "1": always where the file system takes it; "0": never


def dirty_room() -> int | None:
    """Bytes of dirty page cache past which Linux paces a buffered writer to the disk: midway
    between the background and the hard dirty limits (vm.dirty_*_bytes, or their ratios of
    MemAvailable). None where /proc does not say (not Linux)."""
    try:
        vm = Path("/proc/sys/vm")
        limits = []
        for name in ("dirty_background", "dirty"):
            size = int((vm / f"{name}_bytes").read_text())
            if not size:
                size = int((vm / f"{name}_ratio").read_text()) * _available() // 100
            limits.append(size)
    except (OSError, ValueError):
        return None
    return sum(limits) // 2


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemAvailable in /proc/meminfo")


def wants_direct(output_bytes: int) -> bool:
    """Whether an output of this many bytes is written with O_DIRECT: when it is more than the
    kernel lets sit dirty before pacing the writer (dirty_room), or as WEIGHTMIX_DIRECT_WRITES
    says ("1"/"true"/"yes"/"on" or "0"/"false"/"no"/"off"; anything else: decided by size)."""
    switch = os.environ.get(SWITCH, "").strip().lower()
    if switch in ("1", "true", "yes", "on"):
        return True
    if switch in ("0", "false", "no", "off"):
        return False
    room = dirty_room()
    return room is not None and output_bytes > room


def enable(fd: int) -> bool:
    """Turn on O_DIRECT for an open file; False where its file system does not take it."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | direct)
    except OSError:
        return False
    return True


def disable(fd: int) -> None:
    direct = getattr(os, "O_DIRECT", 0)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~direct)


class _Stages:
    """The staging buffers of every direct-written file in the process (anonymous memory:
    page-aligned, STAGE_BYTES each). A thread holds at most one, for its open run, so as
    many as the threads that write, plus two, keep every thread going (the rest are being
    written); memory grows with the threads, never with the model or its shards."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._free: list[mmap.mmap] = []
        self._made = 0
        self._writers: set[int] = set()
        self._files = 0  # direct-written files open: when none is, the buffers are let go
        self.most = 0  # the most buffers that existed at once

    def opened(self) -> None:
        with self._ready:
            self._files += 1

    def closed(self) -> None:
        with self._ready:
            self._files -= 1
            if not self._files:
                self._made -= len(self._free)
                self._free.clear()
                self._writers.clear()

    def drop(self) -> None:
        """A buffer that will not come back (a closed file's run, which its thread may still
        be filling): the next take() may make another."""
        with self._ready:
            self._made -= 1
            self._ready.notify()

    def take(self) -> mmap.mmap:
        with self._ready:
            self._writers.add(threading.get_ident())
            while True:
                while self._free:
                    stage = self._free.pop()
                    if len(stage) == STAGE_BYTES:
                        return stage
                    self._made -= 1  # of another size (a test's): let it go
                if self._made < len(self._writers) + 2:
                    self._made += 1
                    self.most = max(self.most, self._made)
                    return mmap.mmap(-1, STAGE_BYTES)
                self._ready.wait()

    def give_back(self, stage: mmap.mmap) -> None:
        with self._ready:
            self._free.append(stage)
            self._ready.notify()


class _Writer:
    """The process's one thread for direct writes: it writes what the files queue, in order
    (one disk: more threads would not make it faster), and is started with the first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[DirectWrites, mmap.mmap, int, int]] = queue.Queue()
        self._thread: threading.Thread | None = None

    def put(self, owner: DirectWrites, stage: mmap.mmap, offset: int, count: int) -> None:
        """Queue a write; raises (queuing nothing) if the thread cannot be started."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._loop, daemon=True, name="weightmix-direct")
                thread.start()
                self._thread = thread
        self._queue.put((owner, stage, offset, count))

    def _loop(self) -> None:
        while True:
            owner, stage, offset, count = self._queue.get()
            owner._write_queued(stage, offset, count)


_STAGES = _Stages()
_WRITER = _Writer()
_OPEN = threading.local()  # .run: (DirectWrites, _Run), the calling thread's one open run


class _Run:
    """Contiguous bytes one thread is writing, gathered in a staging buffer: file bytes
    [start, start + filled), `start` aligned."""

    def __init__(self, stage: mmap.mmap, start: int) -> None:
        self.stage, self.start, self.filled = stage, start, 0

    @property
    def end(self) -> int:
        return self.start + self.filled


class DirectWrites:
    """The writes of one file of `size` bytes opened with O_DIRECT (see enable()), given in
    any order, never overlapping, by any threads. Each thread's contiguous writes gather in a
    staging buffer of STAGE_BYTES (a chunk is 0.5-1 MB: direct writes that small left the
    disk idle between them); the writer thread (_Writer) writes the full ones while the
    callers go on. A thread that writes elsewhere (another place or file) hands its run over
    first. finish() waits for every write and raises the first error; close() drops what is
    not written yet and returns once nothing of this file is being written (the file may be
    closed then). Should the file system refuse a write (EINVAL), O_DIRECT is turned off and
    the bytes go through the page cache: the same bytes land."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.direct = True
        self._lock = threading.RLock()  # the state below; never held while waiting for a stage
        self._waiting: dict[int, tuple[bytearray, int]] = {}  # block -> (its bytes, given)
        self._runs: dict[int, _Run] = {}  # open runs, by thread
        self._pending = 0  # writes queued and not done
        self._settled = threading.Condition(self._lock)  # _pending fell
        self._error: BaseException | None = None
        self._closed = False
        _STAGES.opened()

    def write(self, memory: memoryview, offset: int) -> None:
        """Write `memory` (bytes) at `offset`; it may reach the disk later (finish())."""
        if self._closed:
            raise RuntimeError("write to a direct-written file after close()")
        self._raise()
        thread = threading.get_ident()
        held = getattr(_OPEN, "run", None)
        run = held[1] if held is not None and held[0] is self else None
        if held is not None and (run is None or run.end != offset):  # not contiguous
            held[0]._hand_over(thread)
            run = None
        while memory:
            if run is None:
                first = -(-offset // BLOCK) * BLOCK
                head = min(len(memory), first - offset)
                if head:  # the part of a block shared with what comes before
                    with self._lock:
                        self._share(memory[:head], offset)
                    memory, offset = memory[head:], offset + head
                    continue
                if len(memory) < BLOCK:  # too short to start a run: shared with what follows
                    with self._lock:
                        self._share(memory, offset)
                    return
                run = _Run(_STAGES.take(), offset)
                with self._lock:
                    if self._closed:  # closed meanwhile (an interrupted run's abort)
                        _STAGES.give_back(run.stage)
                        raise RuntimeError("write to a direct-written file after close()")
                    self._runs[thread] = run
                _OPEN.run = (self, run)
            count = min(len(memory), len(run.stage) - run.filled)
            run.stage[run.filled : run.filled + count] = memory[:count]
            run.filled += count
            memory, offset = memory[count:], offset + count
            if run.filled == len(run.stage):
                self._hand_over(thread)
                run = None

    def finish(self) -> None:
        """Write everything still held: every run, then (through the page cache, so the file
        keeps its exact size) the file's last, partial block and any block a write left
        short (its missing bytes are zeros, as the unwritten file's are). Raises the first
        error any write met. Call it once no thread writes any more."""
        for thread in list(self._runs):
            self._hand_over(thread)
        with self._settled:
            self._settled.wait_for(lambda: not self._pending)
        self._raise()
        if self.direct:
            disable(self.fd)
            self.direct = False
        for block in sorted(self._waiting):
            data, _ = self._waiting.pop(block)
            start = block * BLOCK
            self._put(memoryview(data)[: min(BLOCK, self.size - start)], start)

    def close(self) -> None:
        """Drop what is not written yet and wait until nothing of this file is being
        written: the file may be closed after this."""
        with self._settled:
            if self._closed:
                return
            self._closed = True  # the writer thread skips what is queued
            for _ in self._runs:  # a thread may still be filling its run: not reused
                _STAGES.drop()
            self._runs.clear()
            self._waiting.clear()
            self._settled.wait_for(lambda: not self._pending)
        held = getattr(_OPEN, "run", None)
        if held is not None and held[0] is self:
            _OPEN.run = None
        _STAGES.closed()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _hand_over(self, thread: int) -> None:
        """Hand `thread`'s run to the writer thread: its whole blocks; its last, partial
        block (if any) waits for the rest of that block."""
        with self._lock:
            run = self._runs.pop(thread, None)
            if thread == threading.get_ident():
                _OPEN.run = None
            if run is None:  # (close() drops every run: none is left to hand over)
                return
            whole = run.filled // BLOCK * BLOCK
            if whole < run.filled:
                tail = memoryview(run.stage)[whole : run.filled]
                self._share(tail, run.start + whole)
                tail.release()
            self._enqueue(run.stage, run.start, whole)

    def _share(self, memory: memoryview, offset: int) -> None:
        """Keep bytes of blocks no run holds whole; hand each block over once complete
        (under self._lock)."""
        while memory:
            block, within = divmod(offset, BLOCK)
            count = min(len(memory), BLOCK - within)
            data, given = self._waiting.get(block) or (bytearray(BLOCK), 0)
            data[within : within + count] = memory[:count]
            given += count
            if given >= BLOCK:
                self._waiting.pop(block, None)
                aligned = mmap.mmap(-1, BLOCK)  # its own page: the writer thread takes it
                aligned[:] = data
                self._enqueue(aligned, block * BLOCK, BLOCK, recycle=False)
            else:
                self._waiting[block] = (data, given)
            memory, offset = memory[count:], offset + count

    def _enqueue(self, stage: mmap.mmap, offset: int, count: int, recycle: bool = True) -> None:
        """Queue a write of stage[:count] at `offset` (under self._lock); a staging buffer
        (`recycle`) goes back to the set once written."""
        self._pending += 1
        try:
            _WRITER.put(self, stage, offset, count if recycle else -count)
        except RuntimeError:  # no thread can be started (a process or pids limit): write here
            self._write_queued(stage, offset, count if recycle else -count)

    def _write_queued(self, stage: mmap.mmap, offset: int, count: int) -> None:
        """In the writer thread: write a queued buffer, unless this file is closed or a write
        of it failed (write() and finish() raise that error)."""
        try:
            if self._error is None and not self._closed:
                data = memoryview(stage)
                try:
                    self._put(data[: abs(count)], offset)
                finally:
                    data.release()
        except BaseException as error:
            self._error = error
        finally:
            if count >= 0:
                _STAGES.give_back(stage)
            with self._settled:
                self._pending -= 1
                self._settled.notify_all()

    def _put(self, memory: memoryview, offset: int) -> None:
        """pwrite all of `memory` at `offset`."""
        while memory:
            try:
                written = os.pwrite(self.fd, memory, offset)
            except OSError as error:
                if error.errno != errno.EINVAL or not self.direct:
                    raise
                disable(self.fd)  # the file system takes O_DIRECT opens but not these writes
                self.direct = False
                continue
            if self.direct and written % BLOCK:  # a short direct write: finish it buffered
                disable(self.fd)
                self.direct = False
            memory, offset = memory[written:], offset + written
