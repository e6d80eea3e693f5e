"""An output in memory: the engine writes tensors (or byte ranges of them) as it does to a file,
and each key is handed on as a CPU tensor once all its bytes are in. With `keep=False` the
output holds no finished key: a consumer takes them from `finished` as they complete."""

from __future__ import annotations

import queue
import threading

import torch

from weightmix.io.writer import OutputTensor, tensor_bytes


class Cancelled(Exception):
    """Raised into the engine when the consumer of a streamed merge stops early."""


class MemoryOutput:
    """Tensors with the layout's dtypes and shapes; same bytes as the file output."""

    def __init__(self, tensors: list[OutputTensor], keep: bool = True, waiting: int = 0):
        """`keep`: hold every finished key in `state`; else put each on `finished`, at most
        `waiting` there at once (0: no limit), so a slow consumer holds the merge back."""
        self.layout = {t.key: t for t in tensors}
        self.keep = keep
        self.cancelled = False  # set by a consumer that stops early: the merge stops too
        self.state: dict[str, torch.Tensor] = {}
        self.finished: queue.Queue = queue.Queue(maxsize=waiting)
        self._open: dict[str, tuple[torch.Tensor, int]] = {}  # key -> (bytes, written so far)
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def write_range(self, key: str, start: int, data) -> None:
        """Write `data` (a buffer) at byte `start` of tensor `key`."""
        if self.cancelled:
            raise Cancelled("the consumer of the merge stopped")
        expected = self.layout.get(key)
        if expected is None:
            raise RuntimeError(f"{key} is not in the output layout")
        view = memoryview(data).cast("B")
        if start < 0 or start + view.nbytes > expected.nbytes:
            raise RuntimeError(f"{key}: write of {view.nbytes} bytes at {start} exceeds the tensor")
        with self._lock:
            if key not in self._open:
                self._open[key] = (torch.empty(expected.nbytes, dtype=torch.uint8), 0)
            raw = self._open[key][0]
        if view.nbytes:
            raw[start : start + view.nbytes] = torch.frombuffer(view, dtype=torch.uint8)
        with self._lock:
            raw, written = self._open[key]
            written += view.nbytes
            if written < expected.nbytes:
                self._open[key] = (raw, written)
                return
            del self._open[key]
        self._finish(key, raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected = self.layout.get(key)
        if expected is None:
            raise RuntimeError(f"{key} is not in the output layout")
        if tensor.dtype != expected.dtype.torch or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(
                f"memory output expected {key} {expected.dtype} {list(expected.shape)}"
            )
        if expected.nbytes == 0:
            self._finish(key, torch.empty(0, dtype=torch.uint8))
            return
        self.write_range(key, 0, tensor_bytes(tensor))

    def _finish(self, key: str, raw: torch.Tensor) -> None:
        expected = self.layout[key]
        tensor = raw.view(expected.dtype.torch).reshape(expected.shape)
        with self._lock:
            self._done.add(key)
        if self.keep:
            with self._lock:
                self.state[key] = tensor
            return
        while True:  # wait for room, unless the consumer has gone
            if self.cancelled:
                raise Cancelled("the consumer of the merge stopped")
            try:
                self.finished.put((key, tensor), timeout=0.1)
                return
            except queue.Full:
                continue

    def commit(self) -> list:
        """Every key complete (empty tensors need no write); nothing is written anywhere."""
        if self._open:
            key = next(iter(self._open))
            raise RuntimeError(f"{key}: not every byte was written")
        for key, expected in self.layout.items():
            if key not in self._done:
                if expected.nbytes:
                    raise RuntimeError(f"{key}: no byte was written")
                self._finish(key, torch.empty(0, dtype=torch.uint8))
        return []

    def abort(self) -> None:
        with self._lock:
            self._open.clear()
            self.state.clear()
