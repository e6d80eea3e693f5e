"""Checks of the output path, done with the plan before anything is written: a writable
folder, no overlap with any input, no silent overwrite, enough free space."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from weightmix.errors import WeightmixError
from weightmix.io.folders import is_model_folder
from weightmix.io.locks import sweep_stale
from weightmix.io.writer import existing_outputs, output_paths
from weightmix.units import format_size

if TYPE_CHECKING:
    from weightmix.plan import Plan

MAX_SHARDS = 1000  # every shard is an open file while it is written


def check_output(dest: Path, plan: Plan, overwrite: bool) -> Path:
    base = plan.base_folder
    if base is not None:
        return _check_folder_output(dest, plan, overwrite)
    if not dest.name.endswith(".safetensors"):
        raise WeightmixError(f"output {dest}: name it *.safetensors (the only format written)")
    if dest.is_dir():
        raise WeightmixError(f"output {dest}: is a folder; give a file path ending in .safetensors")
    folder = _check_writable(dest)
    if plan.shard_count > MAX_SHARDS:
        raise WeightmixError(
            f"output {dest}: max_shard_size {plan.recipe.max_shard_size} cuts the output into"
            f" {plan.shard_count} shards (at most {MAX_SHARDS}); give a larger size"
        )
    shards, index = output_paths(dest, plan.shard_count)
    targets = [*shards, *([index] if index else []), *existing_outputs(dest)]
    inputs = {
        os.path.realpath(path): f"model '{name}'"
        for name, ckpt in plan.checkpoints.items()
        for path in [ckpt.path, *ckpt.files]
    }
    inputs.update({os.path.realpath(p): "the text encoder" for p in _text_encoder_files(plan)})
    for target in targets:
        owner = inputs.get(os.path.realpath(target))
        if owner is not None:
            raise WeightmixError(
                f"output {target} is an input ({owner}): inputs are never overwritten;"
                " choose another output path"
            )
    existing = [t for t in targets if os.path.lexists(t)]  # a dangling link exists too
    if existing and not overwrite:
        raise WeightmixError(f"output {existing[0]} exists: pass --overwrite to replace it")
    for target in existing:
        _check_replaceable(target, folder)
    _check_space(dest, folder, plan)
    return dest


def _check_replaceable(target: Path, folder: Path) -> None:
    """In a folder with the sticky bit (like /tmp) only the owner of an entry (or of the
    folder, or root) may replace or remove it: say so now rather than fail at the rename."""
    try:
        where, entry = os.stat(folder), os.lstat(target)
    except OSError:
        return
    uid = os.geteuid()
    if where.st_mode & stat.S_ISVTX and uid not in (0, where.st_uid, entry.st_uid):
        raise WeightmixError(
            f"output {target} belongs to another user in {folder}, whose sticky bit lets only"
            " its owner replace it: choose another output path"
        )


RECIPE_SUFFIXES = (".yaml", ".yml")


def check_recipe_output(dest: Path, plan: Plan, overwrite: bool, protected: list[Path]) -> Path:
    """Where --save-recipe writes: checked like an output, before anything is written. Not an
    input (model files, folders, the recipe being run), not the merge's output, not an
    existing file unless overwrite is given, in a folder that exists and is writable."""
    if not dest.name.lower().endswith(RECIPE_SUFFIXES):
        raise WeightmixError(
            f"recipe output {dest}: name it *.yaml (weightmix reads recipes from .yaml files)"
        )
    if dest.is_dir():
        raise WeightmixError(f"recipe output {dest}: is a folder; give a file path ending in .yaml")
    _check_writable(dest, "recipe output")
    target = Path(os.path.realpath(dest))
    inputs = [
        (name, Path(path))
        for name, ckpt in plan.checkpoints.items()
        for path in [ckpt.path, *ckpt.files]
    ]
    inputs += [("the recipe being run", path) for path in protected]
    for name, path in inputs:
        source = Path(os.path.realpath(path))
        if target == source or source in target.parents:
            owner = name if name == "the recipe being run" else f"model '{name}'"
            raise WeightmixError(
                f"recipe output {dest} is an input ({owner}: {path}): inputs are never"
                " written; choose another path for --save-recipe"
            )
    if plan.output is not None:
        output = Path(os.path.realpath(plan.output))
        if target == output or output in target.parents:
            raise WeightmixError(
                f"recipe output {dest} is the merge's output ({plan.output}); choose another path"
            )
    if dest.exists() and not overwrite:
        raise WeightmixError(f"recipe output {dest} exists: pass --overwrite to replace it")
    return dest


def _check_writable(dest: Path, what: str = "output") -> Path:
    folder = dest.parent if str(dest.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise WeightmixError(f"{what} {dest}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise WeightmixError(f"{what} {dest}: folder {folder} does not exist; create it first")
    try:  # a real probe: permissions, read-only mounts and pseudo file systems all show here
        with tempfile.TemporaryFile(dir=folder, prefix=".weightmix-probe-"):
            pass
    except OSError as error:
        raise WeightmixError(
            f"{what} {dest}: folder {folder} is not writable ({error.strerror});"
            " choose another folder"
        ) from None
    return folder


def _check_folder_output(dest: Path, plan: Plan, overwrite: bool) -> Path:
    """A folder output: not a .safetensors name, not over or inside or around an input."""
    if dest.name.endswith(".safetensors"):
        first = next(iter(plan.checkpoints))
        raise WeightmixError(
            f"output {dest}: model {first} is a model folder, so the output is a folder that"
            " mirrors it: give a folder path"
        )
    folder = _check_writable(dest)
    target = Path(os.path.realpath(dest))
    for name, ckpt in plan.checkpoints.items():
        for path in [ckpt.path, *ckpt.files]:
            source = Path(os.path.realpath(path))
            if target == source or target in source.parents or source in target.parents:
                raise WeightmixError(
                    f"output {dest} overlaps input '{name}' ({path}): inputs are never written"
                    " or replaced; choose a folder outside the inputs"
                )
    if dest.exists() and not overwrite:
        raise WeightmixError(f"output {dest} exists: pass --overwrite to replace it")
    if dest.exists() and not dest.is_dir():
        raise WeightmixError(f"output {dest} is a file; a model folder output needs a folder path")
    if dest.exists() and (target in Path.cwd().resolve().parents or target == Path.cwd().resolve()):
        raise WeightmixError(f"output {dest} holds the current folder; it is never replaced")
    if dest.exists() and not is_model_folder(dest):
        raise WeightmixError(
            f"output {dest} exists and is not a model folder (no model_index.json or config.json);"
            " --overwrite only replaces model folders: choose another path"
        )
    components = {c.name for c in plan.base_folder.components}
    for key in plan.keys:
        if plan.base_folder.component_of(key.key) not in components:
            raise WeightmixError(
                f"key '{key.key}' belongs to a component that the layout model"
                f" ({plan.base_folder.path}) does not have: drop it (a drop rule or"
                " --on-missing skip) or give a layout model that has it"
            )
    _check_space(dest, folder, plan)
    return dest


def sweep_notes(folder: Path) -> list[str]:
    """Remove what killed runs left in the output folder (see io/locks.py); notes saying so.
    Called when a merge is about to write (never for a dry run)."""
    done = sweep_stale(folder)
    if not done:
        return []
    names = ", ".join(done[:3]) + (", ..." if len(done) > 3 else "")
    return [f"removed {len(done)} temporary file(s) an interrupted run left in {folder}: {names}"]


def _check_space(dest: Path, folder: Path, plan: Plan) -> None:
    free = shutil.disk_usage(folder).free
    if plan.output_bytes > free:
        raise WeightmixError(
            f"output {dest}: needs {format_size(plan.output_bytes)} but {folder} has"
            f" {format_size(free)} free"
        )


def _text_encoder_files(plan: Plan) -> list[Path]:
    """The files of a text encoder the recipe names apart from its models (text_encoder)."""
    recipe = plan.recipe
    if recipe.text_encoder is None or recipe.text_encoder in recipe.models:
        return []
    path = recipe.resolve(recipe.text_encoder)
    if path.is_dir():
        return [path, *(p for p in path.rglob("*") if p.is_file())]
    return checkpoint_files(path)


def checkpoint_files(path: Path) -> list[Path]:
    """The files a checkpoint file stands for: itself, and an index's shards (the names its
    weight_map gives, whether or not they open)."""
    if not path.name.endswith(".index.json"):
        return [path]
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {})
        shards = {str(v) for v in weight_map.values()} if isinstance(weight_map, dict) else set()
    except (OSError, ValueError, AttributeError):
        return [path]
    return [path, *(path.parent / shard for shard in sorted(shards))]
