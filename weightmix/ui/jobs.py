"""Merges started in the UI: queued, run one at a time by one worker thread through the same
API as `weightmix merge`, with progress, cancellation and the error line kept for the page."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from weightmix import api
from weightmix.errors import WeightmixError, one_line
from weightmix.progress import Progress
from weightmix.provenance import KEY_INPUTS
from weightmix.recipe import Recipe
from weightmix.ui.history import History

log = logging.getLogger("weightmix.ui")


class Cancelled(Exception):
    """Raised in the merge's progress callback when the user cancelled: the engine then
    removes what it had written, as on any error."""


@dataclass
class Job:
    id: int
    recipe: Recipe
    output: Path
    overwrite: bool
    status: str = "queued"  # running, done, failed, cancelled
    message: str = ""
    total: int = 0
    done: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)

    def view(self) -> dict:
        return {
            "id": self.id,
            "status": self.status,
            "message": self.message,
            "output": str(self.output),
            "progress": self.done / self.total if self.total else 0.0,
        }


class JobProgress(Progress):
    """The engine's progress, kept on the job; raises Cancelled once the user cancels."""

    def __init__(self, job: Job) -> None:
        self.job = job

    def start(self, tensors: int, nbytes: int) -> None:
        self.job.total = nbytes
        self._check()

    def advance(self, nbytes: int, tensor_done: bool = True) -> None:
        self.job.done += nbytes
        self._check()

    def _check(self) -> None:
        if self.job.cancel.is_set():
            raise Cancelled


class Jobs:
    """The queue of merges and its one worker thread."""

    def __init__(self, history: History, threads: int | None = None) -> None:
        self.history, self.threads = history, threads
        self.jobs: dict[int, Job] = {}
        self.exclusive = threading.Lock()  # held by the running merge (and preview grids)
        self.lock = threading.Lock()  # around submissions
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="weightmix-ui-merges", daemon=True)
        self.worker.start()

    def submit(self, recipe: Recipe, output: Path, overwrite: bool) -> Job:
        """Queue a merge (it starts when the ones before it have finished)."""
        with self.lock:
            if any(j.output == output for j in self.pending()):
                raise WeightmixError(
                    f"output {output}: a merge queued or running writes it already; wait for"
                    " it or choose another name"
                )
            merge_id = self.history.add(recipe.to_yaml(), str(output))
            job = Job(merge_id, recipe, output, overwrite)
            self.jobs[merge_id] = job
        self.waiting.put(job)
        return job

    def pending(self) -> list[Job]:
        return [j for j in list(self.jobs.values()) if j.status in ("queued", "running")]

    def cancel(self, merge_id: int) -> Job | None:
        """Stop a running merge at its next step; a queued one is cancelled at once."""
        job = self.jobs.get(merge_id)
        if job is not None and job.status in ("queued", "running"):
            job.cancel.set()
            if job.status == "queued":
                self._finish(job, "cancelled", "cancelled before it started")
        return job

    def ahead_of(self, job: Job) -> int:
        """How many merges run or wait before `job`."""
        return sum(1 for j in self.pending() if j.id < job.id)

    def stop(self) -> None:
        for job in self.jobs.values():
            job.cancel.set()
        self.waiting.put(None)
        self.worker.join(timeout=30)

    def _work(self) -> None:
        while (job := self.waiting.get()) is not None:
            try:
                with self.exclusive:
                    self._run(job)
            except Exception:  # never the end of the queue
                log.exception("merge %s: the worker failed", job.id)
                if job.status in ("queued", "running"):
                    job.status, job.message = "failed", "internal error; see the server's log"

    def _record(self, job: Job, **fields: object) -> None:
        """Write to the history; a failure (the file locked by another program ...) is
        logged and the merge goes on."""
        try:
            self.history.update(job.id, **fields)
        except Exception:
            log.exception("merge %s: the history could not be written", job.id)

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():  # cancelled while queued (already recorded)
            if job.status == "queued":
                self._finish(job, "cancelled", "cancelled before it started")
            return
        job.status = "running"
        self._record(job, status="running", started=time.time())
        try:
            planned = api.make_plan(job.recipe, job.output, job.overwrite)
            result = api.execute(planned, threads=self.threads, progress=JobProgress(job))
        except Cancelled:
            self._finish(job, "cancelled", "cancelled; nothing was written at the output")
        except WeightmixError as error:  # in the page's words
            self._finish(job, "failed", str(error).replace("pass --overwrite", "tick 'overwrite'"))
        except Exception as error:  # the details go to the server's log, one line to the page
            log.exception("merge %s failed", job.id)
            self._finish(job, "failed", one_line(
                f"internal error ({type(error).__name__}); the details are in the server's log"
            ))  # fmt: skip
        else:
            recorded = json.loads(result.metadata.get(KEY_INPUTS, "[]"))
            inputs = [{"name": i.get("name"), "fingerprint": i.get("fingerprint")}
                      for i in recorded if isinstance(i, dict)]  # fmt: skip
            self._record(job, inputs=inputs)
            self._finish(job, "done", f"wrote {job.output} in {result.seconds:.1f} s")

    def _finish(self, job: Job, status: str, message: str) -> None:
        job.status, job.message = status, message
        self._record(job, status=status, message=message, finished=time.time())
