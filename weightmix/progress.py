"""Progress: a bar (tensors, bytes, rate, ETA) on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from weightmix.units import format_size


class Progress:
    """Silent progress; the base of the visible kinds."""

    def start(self, tensors: int, nbytes: int) -> None:
        pass

    def advance(self, nbytes: int, tensor_done: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class BarProgress(Progress):
    """A tqdm bar: bytes written with rate and ETA, tensors done as a postfix."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def start(self, tensors: int, nbytes: int) -> None:
        self.tensors, self.done = tensors, 0
        self.bar = tqdm(
            total=nbytes, unit="B", unit_scale=True, unit_divisor=1000, desc="merging",
            dynamic_ncols=True, leave=True, file=self.stream,
        )  # fmt: skip

    def advance(self, nbytes: int, tensor_done: bool = True) -> None:
        self.done += tensor_done
        self.bar.set_postfix_str(f"{self.done}/{self.tensors} tensors", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


class LineProgress(Progress):
    """One line every `every` seconds and at the end, for logs and pipes."""

    def __init__(self, stream: TextIO, every: float = 5.0):
        self.stream, self.every = stream, every

    def start(self, tensors: int, nbytes: int) -> None:
        self.tensors, self.total = tensors, nbytes
        self.done = self.written = 0
        self.began = self.last = time.monotonic()

    def advance(self, nbytes: int, tensor_done: bool = True) -> None:
        self.done += tensor_done
        self.written += nbytes
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.tensors:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = max(now - self.began, 1e-9)
        rate = self.written / elapsed
        eta = (self.total - self.written) / rate if rate > 0 else 0.0
        print(
            f"weightmix: {self.done}/{self.tensors} tensors, {format_size(self.written)}"
            f" of {format_size(self.total)}, {format_size(rate)}/s, ETA {eta:.0f}s",
            file=self.stream,
            flush=True,
        )


def make_progress(enabled: bool, stream: TextIO | None = None) -> Progress:
    stream = stream or sys.stderr
    if not enabled:
        return Progress()
    return BarProgress(stream) if stream.isatty() else LineProgress(stream)
