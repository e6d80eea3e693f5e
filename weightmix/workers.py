"""Worker threads that a Ctrl-C cannot wedge.

concurrent.futures' pool makes the main thread take each future's lock (a Python-level
threading.Condition) to wait on it, ask whether it is done or read its result. A Ctrl-C is
raised between two bytecodes, so one landing after such a lock was taken and before the block
that releases it left the lock held: the worker finishing that future then waited for it
forever, and the pool's shutdown waited for the worker. Here the main thread hands tasks over
and waits for them through two C-implemented queues only (queue.SimpleQueue: each put or get is
one step that an interrupt cannot split), and starts and stops the threads with interrupts
held back (interrupts.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import Empty, SimpleQueue

from weightmix.io.interrupts import uninterrupted

Job = Callable[[], None]
IDLE_CHECK = 0.5  # seconds an idle worker waits before it looks whether it was stopped


class Workers:
    """`count` threads running jobs in the order submitted; each finished job's ticket and
    error (None when it succeeded) come back through done()."""

    def __init__(self, count: int, name: str = "weightmix"):
        self._todo: SimpleQueue[tuple[int, Job] | None] = SimpleQueue()
        self._done: SimpleQueue[tuple[int, BaseException | None]] = SimpleQueue()
        # set by the caller, first thing, when it stops (a plain store: no Ctrl-C can land
        # before it as one can at the start of a call): no further job starts
        self.stopping = False
        self._count, self._name = count, name
        self._threads: list[threading.Thread] = []

    def submit(self, ticket: int, job: Job) -> None:
        """Queue a job; the threads start with the first (so only a Workers that something
        was submitted to, inside a block that stops it, has any)."""
        if not self._threads:
            with uninterrupted():  # Thread.start waits on a Condition the new thread sets
                for number in range(self._count):
                    thread = threading.Thread(
                        target=self._work, name=f"{self._name}_{number}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)  # only a started thread is joined
        self._todo.put((ticket, job))

    def done(self, block: bool = True) -> tuple[int, BaseException | None] | None:
        """The next finished job's (ticket, error); waits for one when `block`, else None when
        none has finished."""
        if not block and self._done.empty():
            return None
        return self._done.get()

    def stop(self) -> None:
        """Skip the jobs not yet started, let the running ones finish, and end the threads:
        nothing runs once this returns. A Ctrl-C meanwhile waits until then."""
        self.stopping = True
        with uninterrupted():
            for _ in self._threads:
                self._todo.put(None)
            for thread in self._threads:
                thread.join()
            self._threads = []

    def _work(self) -> None:
        while True:
            try:
                item = self._todo.get(timeout=IDLE_CHECK)
            except Empty:  # the main thread may have stopped it without reaching stop()
                if self.stopping:
                    return
                continue
            if item is None:
                return
            if self.stopping:
                continue
            ticket, job = item
            try:
                job()
            except BaseException as error:  # handed to the main thread, raised there
                self._done.put((ticket, error))
            else:
                self._done.put((ticket, None))
            del job, item  # nothing of a finished job is held while waiting for the next
