"""The public Python API: plan, dry-run and run merges from a Recipe, a dict or a YAML file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from weightmix import engine
from weightmix.io.writer import write_file
from weightmix.plan import Plan, build_plan
from weightmix.progress import make_progress
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


def execute(
    planned: Plan,
    *,
    threads: int | None = None,
    progress: bool = False,
    fingerprint: str = "sampled",
    fsync: bool = False,
    budget: int = engine.DEFAULT_BUDGET,
) -> MergeResult:
    """Run a plan from make_plan() (with an output path); closes the plan."""
    try:
        if planned.prompts is not None:
            encode_prompts(planned, planned.prompts)
        metadata = build_metadata(planned, fingerprint)
        stats = engine.run(planned, metadata, threads, make_progress(progress), budget, fsync)
    finally:
        planned.close()
    return MergeResult(
        stats.files, stats.tensors, stats.bytes_written, stats.seconds, planned.notes
    )
