"""The public Python API: plan, dry-run and run merges from a Recipe, a dict or a YAML file."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weightmix import engine
from weightmix.io.memory_output import Cancelled, MemoryOutput
from weightmix.io.writer import write_file
from weightmix.plan import Plan, build_plan
from weightmix.progress import Progress, make_progress
from weightmix.prompts import encode_prompts
from weightmix.provenance import build_metadata
from weightmix.recipe import Recipe, load_recipe, parse_recipe
from weightmix.report import describe_plan

RecipeLike = Recipe | dict | str | os.PathLike


@dataclass(frozen=True)
class MergeResult:
    files: list[Path]  # what was written (shards, then the index)
    tensors: int
    bytes_written: int
    seconds: float
    notes: list[str]
    metadata: dict[str, str] = field(default_factory=dict)  # what the output records


def as_recipe(source: RecipeLike) -> Recipe:
    """A Recipe from a Recipe, a dict in the recipe schema, or the path of a YAML file."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return parse_recipe(source)
    return load_recipe(Path(source))


def make_plan(
    recipe: RecipeLike,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    *,
    save_recipe: str | os.PathLike | None = None,
    protected: list[Path] | tuple[Path, ...] = (),
) -> Plan:
    """Validate a recipe against its inputs' headers and plan every key; reads no tensor data.
    `save_recipe` is a path the recipe will be saved to (see save_recipe()), checked now like
    an output; `protected` names more input files (a recipe file) that must not be written.
    Close the returned plan (plan.close()) when done with it."""
    return build_plan(as_recipe(recipe), output, overwrite, save_recipe, protected)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Write `recipe` as a YAML file that re-runs from where it is: relative model paths are
    rewritten relative to the file's folder. Written whole or not at all."""
    path = Path(path)
    write_file(path, recipe.to_yaml(relative_to=path.parent).encode("utf-8"))
    return path


def dry_run(
    recipe: RecipeLike, output: str | os.PathLike | None = None, overwrite: bool = False
) -> str:
    """The plan as text: keys per method, inputs read, output size, estimated peak memory."""
    planned = make_plan(recipe, output, overwrite)
    try:
        return describe_plan(planned)
    finally:
        planned.close()


def merge(
    recipe: RecipeLike,
    output: str | os.PathLike,
    *,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    fingerprint: str = "sampled",
    fsync: bool = False,
    budget: int = engine.DEFAULT_BUDGET,
) -> MergeResult:
    """Run a merge to `output` (.safetensors, sharded when the recipe sets max_shard_size)."""
    planned = make_plan(recipe, output, overwrite)
    return execute(
        planned, threads=threads, progress=progress, fingerprint=fingerprint, fsync=fsync,
        budget=budget,
    )  # fmt: skip


def merge_to_state_dict(
    recipe: RecipeLike,
    *,
    threads: int | None = None,
    budget: int = engine.DEFAULT_BUDGET,
) -> dict[str, torch.Tensor]:
    """Run a merge into memory: {key: tensor} in output order, the bytes a file merge writes
    (same plan, validation and engine; no file is written)."""
    planned = make_plan(recipe)
    output = MemoryOutput(planned.output_tensors())
    try:
        if planned.prompts is not None:
            encode_prompts(planned, planned.prompts)
        engine.run(planned, {}, threads, None, budget, writer=output)
    finally:
        planned.close()
    return {key.key: output.state[key.key] for key in planned.keys}


def merge_iter(
    recipe: RecipeLike,
    *,
    threads: int | None = None,
    budget: int = engine.DEFAULT_BUDGET,
    waiting: int = 4,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Run a merge and yield (key, tensor) as each key completes (not in output order); at
    most `waiting` finished keys wait for the consumer, so memory stays bounded. Stopping the
    iteration stops the merge."""
    planned = make_plan(recipe)
    output = MemoryOutput(planned.output_tensors(), keep=False, waiting=waiting)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            if planned.prompts is not None:
                encode_prompts(planned, planned.prompts)
            engine.run(planned, {}, threads, None, budget, writer=output)
        except BaseException as error:  # handed to the consumer
            failure.append(error)
        finally:
            output.finished.put(None)  # the end (room was made: see below)

    worker = threading.Thread(target=work, name="weightmix-merge", daemon=True)
    worker.start()
    try:
        while (item := output.finished.get()) is not None:
            yield item
        if failure and not isinstance(failure[0], Cancelled):
            raise failure[0]
    finally:
        output.cancelled = True
        while worker.is_alive():  # drain so a blocked writer sees the cancel
            with contextlib.suppress(queue.Empty):
                output.finished.get(timeout=0.1)
        planned.close()


def execute(
    planned: Plan,
    *,
    threads: int | None = None,
    progress: bool | Progress = False,
    fingerprint: str = "sampled",
    fsync: bool = False,
    budget: int = engine.DEFAULT_BUDGET,
) -> MergeResult:
    """Run a plan from make_plan() (with an output path); closes the plan. `progress`: a bar
    or lines on stderr (True), or a Progress that receives the engine's calls (an exception
    it raises stops the merge, leaving nothing at the output)."""
    try:
        if planned.prompts is not None:
            encode_prompts(planned, planned.prompts)
        metadata = build_metadata(planned, fingerprint)
        shown = make_progress(progress) if isinstance(progress, bool) else progress
        stats = engine.run(planned, metadata, threads, shown, budget, fsync)
    finally:
        planned.close()
    return MergeResult(
        stats.files, stats.tensors, stats.bytes_written, stats.seconds, planned.notes, metadata
    )
