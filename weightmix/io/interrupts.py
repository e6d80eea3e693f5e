"""Ctrl-C and SIGTERM while outputs move into place, and what a run has put in place.

Moving a finished output into place takes several steps (a journal, one rename per shard, the
old files' removal). An interrupt between two of them left the journal or the old file behind
and made the command say that nothing was written when the new output was already there. So
those steps run `uninterrupted()`: SIGINT and SIGTERM that arrive meanwhile are held and
delivered again as soon as the steps are done. `placed()` records each output once it is
whole in place, so an interrupt that lands later is reported truthfully (see cli.py).

Python can raise a KeyboardInterrupt right after a call returns, so one can land between an
output's creation and the `try` that would abort it. Outputs therefore register themselves
(`opened`) until committed or aborted (`closed`), and the CLI aborts what is left
(`abort_unfinished`) before it reports an interrupt.
"""

from __future__ import annotations

import signal
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Abortable(Protocol):
    def abort(self) -> None: ...


_placed: deque[tuple[int, Path]] = deque(maxlen=64)  # the last outputs moved into place
_placed_total = 0  # how many were, ever (a long-lived process records without bound)
_unfinished: dict[int, Abortable] = {}  # outputs created and not yet committed or aborted


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM held back, each delivered again (once) when the
    block ends, to the handlers that were there before. Only the main thread receives signals
    in Python; elsewhere the block runs as it is. Blocks nest: an inner one hands what it
    held to the outer one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        held.append(signum)

    previous: dict[int, object] = {}
    try:
        for number in HELD_SIGNALS:
            if signal.getsignal(number) is not None:  # None: a handler set outside Python
                previous[number] = signal.signal(number, hold)
        yield
    finally:
        # blocked while the handlers come back: one arriving meanwhile would run a restored
        # handler, whose KeyboardInterrupt would leave the rest on `hold`. It is delivered
        # when unblocked (one taken in by another thread can still come: then the try)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        caught: BaseException | None = None
        for number, handler in previous.items():
            try:  # every handler comes back, even when a restored one raises meanwhile
                signal.signal(number, handler)  # type: ignore[arg-type]
            except BaseException as error:
                caught = caught or error
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if caught is not None:
            raise caught
        for number in dict.fromkeys(held):
            signal.raise_signal(number)


def placed(path: Path) -> None:
    """Record that `path` (a file, a shard set's name or a folder) is now whole in place."""
    global _placed_total
    _placed.append((_placed_total, path))
    _placed_total += 1


def placed_count() -> int:
    """How many outputs were recorded so far: a mark for placed_since()."""
    return _placed_total


def placed_since(mark: int) -> list[Path]:
    """The outputs recorded after `mark` (from placed_count()), of the last 64."""
    return [path for number, path in _placed if number >= mark]


def opened(output: Abortable) -> None:
    """Register an output being written (call it inside the creation's uninterrupted block)."""
    _unfinished[id(output)] = output


def closed(output: Abortable) -> None:
    """The output was committed or aborted: nothing of it is left to abort."""
    _unfinished.pop(id(output), None)


def abort_unfinished() -> None:
    """Abort every output still registered: for the CLI, whose process has no other user of
    them, once an interrupt has ended its command."""
    for output in list(_unfinished.values()):
        output.abort()
