"""Write a model folder that mirrors the base input folder: one safetensors file (or sharded
set) per component, named as the base names its weights, plus every config, tokenizer and
scheduler file copied, so that diffusers' or transformers' from_pretrained loads it. A component
left without weights is left out, and model_index.json marks it absent. All of it is built in a
hidden folder beside the destination and renamed into place when complete."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import torch

from weightmix.errors import WeightmixError
from weightmix.io.direct import wants_direct
from weightmix.io.folders import WEIGHT_SUFFIXES, FolderCheckpoint
from weightmix.io.interrupts import closed, opened, placed, uninterrupted
from weightmix.io.locks import MARK, DestinationLock, Held, sweep_stale, temporary_folder
from weightmix.io.reader import INDEX_SUFFIX
from weightmix.io.writer import OutputTensor, SafetensorsOutput, out_of_space

MODEL_INDEX = "model_index.json"


class FolderOutput:
    """Routes each key to its component's output; same interface as SafetensorsOutput."""

    def __init__(
        self,
        dest: Path,
        base: FolderCheckpoint,
        tensors: list[OutputTensor],
        metadata: dict[str, str],
        max_shard_bytes: int | None = None,
        fsync: bool = False,
        overwrite: bool = True,
    ):
        self.dest, self.base = dest, base
        self._route: dict[str, tuple[str, str]] = {}
        self.outputs: dict[str, SafetensorsOutput] = {}
        groups: dict[str, list[OutputTensor]] = {c.name: [] for c in base.components}
        for tensor in tensors:
            component = base.component_of(tensor.key)
            inner = tensor.key[len(component) + 1 :] if base.pipeline else tensor.key
            groups[component].append(OutputTensor(inner, tensor.dtype, tensor.shape))
            self._route[tensor.key] = (component, inner)
        left_out = [c.name for c in base.components if c.name and not groups[c.name]]
        self.index = pipeline_index(base, left_out)  # the plan checked that it loads
        self.needed = sum(t.nbytes for t in tensors)
        self._destination: DestinationLock | None = None
        self.temp: Path | None = None
        self._held: Held | None = None
        try:
            with uninterrupted():  # a Ctrl-C comes once all made so far is known, to abort()
                opened(self)
                self._create(groups, metadata, max_shard_bytes, fsync, overwrite)
        except BaseException:
            self.abort()
            raise

    def _create(self, groups, metadata, max_shard_bytes, fsync, overwrite) -> None:
        """Take the destination's lock, then make the hidden folder and each component's
        output in it."""
        dest, base = self.dest, self.base
        self._destination = DestinationLock(dest)
        self.swept = sweep_stale(dest.parent)
        if not overwrite and dest.exists():
            raise WeightmixError(
                f"output {dest} exists (written since this merge was planned): pass"
                " --overwrite to replace it"
            )
        with out_of_space(dest, self.needed):  # no inode left for the folder
            self.temp, self._held = temporary_folder(dest.parent, f".{dest.name}{MARK}", ".partial")
        direct = wants_direct(self.needed)  # the whole folder's bytes pass the page cache
        with out_of_space(dest, self.needed):
            for component in base.components:
                folder = self.temp / component.name
                folder.mkdir(parents=True, exist_ok=True)
                if groups[component.name]:
                    self.outputs[component.name] = SafetensorsOutput(
                        folder / f"{component.stem}.safetensors",
                        groups[component.name],
                        metadata,
                        max_shard_bytes or component.shard_bytes,
                        fsync,
                        lock=False,  # inside this output's own hidden folder
                        direct=direct,
                    )
        left_out = {c.folder for c in base.components if c.name not in self.outputs}
        self.needed = (  # headers, data, index and copied files: what the disk must hold
            sum(output.needed for output in self.outputs.values())
            + len((self.index or "").encode())
            + _other_bytes(base.path, left_out - {base.path})
        )

    def write_range(self, key: str, start: int, data) -> None:
        component, inner = self._route[key]
        self.outputs[component].write_range(inner, start, data)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        component, inner = self._route[key]
        self.outputs[component].write(inner, tensor)

    def commit(self) -> list[Path]:
        with out_of_space(self.dest, self.needed):
            for output in self.outputs.values():
                output.commit()
            left_out = {c.folder for c in self.base.components if c.name not in self.outputs}
            for component in self.base.components:  # a component without weights is left out
                if component.name and component.name not in self.outputs:
                    shutil.rmtree(self.temp / component.name, ignore_errors=True)
            if self.index is not None:  # the entries of the components left out say so
                (self.temp / MODEL_INDEX).write_text(self.index, encoding="utf-8")
            _copy_other_files(self.base.path, self.temp, left_out - {self.base.path})
        with uninterrupted():  # a Ctrl-C waits until the folder is in place (interrupts.py)
            self._replace_destination()
            self._held.release()
            self._unlock()
            placed(self.dest)
            closed(self)
        return [self.dest]

    def _replace_destination(self) -> None:
        """Rename the finished folder to the destination. An earlier output there (--overwrite)
        waits in a hidden `.old` folder meanwhile, and is put back if the rename fails."""
        old, held = None, None
        if self.dest.exists():  # --overwrite was given (the plan checked it is a model folder)
            with out_of_space(self.dest, self.needed):  # no inode left for the folder
                old, held = temporary_folder(self.dest.parent, f".{self.dest.name}{MARK}", ".old")
            os.replace(self.dest, old / "previous")
        try:
            os.replace(self.temp, self.dest)
        except BaseException:
            if old is not None:  # put the previous output back where it was
                os.replace(old / "previous", self.dest)
                shutil.rmtree(old, ignore_errors=True)  # only once it is back
                held.release()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            held.release()

    def abort(self) -> None:
        with uninterrupted():  # a second Ctrl-C waits until it is done
            for output in self.outputs.values():
                output.abort()
            if self.temp is not None:
                shutil.rmtree(self.temp, ignore_errors=True)
            if self._held is not None:
                self._held.release()
            self._unlock()
            closed(self)

    def _unlock(self) -> None:
        if self._destination is not None:
            self._destination.release()
            self._destination = None


def left_out_components(base: FolderCheckpoint, keys: list[str]) -> list[str]:
    """The pipeline components of `base` that none of the output's `keys` belongs to."""
    if not base.pipeline:
        return []
    written = {base.component_of(key) for key in keys}
    return [c.name for c in base.components if c.name and c.name not in written]


def check_left_out(base: FolderCheckpoint, left_out: list[str], keep: str) -> str | None:
    """Refuse an output whose pipeline class does not load without the components left out
    (StableDiffusionPipeline needs its vae and text_encoder), `keep` saying how to keep them
    ({} is where their names go); say so in a note (returned) when diffusers cannot tell."""
    if not base.pipeline or not left_out:
        return None
    class_name = _read_index(base).get("_class_name")
    optional, reason = _optional_components(class_name)
    if optional is None:
        return (
            f"model_index.json marks {', '.join(left_out)} absent ([null, null]); whether"
            f" {class_name or 'the pipeline'} loads without them could not be checked ({reason})"
        )
    required = [name for name in left_out if name not in optional]
    if not required:
        return None
    them = "it" if len(required) == 1 else "them"
    kept = [c.name for c in base.components if c.name not in left_out] or left_out
    example = next((n for n in ("unet", "transformer") if n in kept), kept[0])
    absent = ", ".join(sorted(optional)) or "none of its components"
    raise WeightmixError(
        f"the merge leaves {', '.join(required)} of {base.path} without weights, and"
        f" {class_name} does not load without {them} (diffusers lets {absent} be absent):"
        f" {keep.format(','.join(required))}; or merge the kept components' own folders"
        f" (e.g. {base.path / example}) one at a time"
    )


def pipeline_index(base: FolderCheckpoint, left_out: list[str]) -> str | None:
    """The model_index.json of an output whose `left_out` components were left without
    weights: their entries become [null, null], as diffusers' save_pretrained writes a component
    that is None; every other field and the key order stay the base's. None when nothing is
    left out: the base's file is copied as it is."""
    if not base.pipeline or not left_out:
        return None
    index = _read_index(base)
    for name in left_out:
        index[name] = [None, None]
    return json.dumps(index, indent=2) + "\n"


def _read_index(base: FolderCheckpoint) -> dict:
    path = base.path / MODEL_INDEX
    try:  # read once already, when the folder was opened
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightmixError(f"{path}: cannot read: {error}") from None
    if not isinstance(index, dict):
        raise WeightmixError(f"{path}: is not a JSON object")
    return index


def _optional_components(class_name: object) -> tuple[set[str] | None, str]:
    """The components diffusers loads a pipeline class without (it refuses any other that
    model_index.json marks absent), or None and why they are unknown."""
    if not isinstance(class_name, str) or not class_name.isidentifier():
        return None, "model_index.json names no pipeline class"
    # importing pipelines logs warnings about optional backends: keep them off the terminal
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                import diffusers
            except Exception:
                return None, "diffusers is not installed"
            try:
                cls = getattr(diffusers, class_name)
            except Exception:
                cls = None
    finally:
        logging.disable(previous)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        return None, f"diffusers {diffusers.__version__} has no pipeline class {class_name}"
    return set(cls._optional_components), ""


def _other_files(source: Path, left_out: set[Path]) -> Iterator[Path]:
    """Every file of the base folder except weights: configs, tokenizers, schedulers, indexes
    of the pipeline (model_index.json), README ... (symlinks, as in the hub cache, followed)."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(INDEX_SUFFIX):
            continue
        if any(folder in path.parents for folder in left_out):
            continue
        yield path


def _other_bytes(source: Path, left_out: set[Path]) -> int:
    """What _copy_other_files will copy, in bytes."""
    total = 0
    for path in _other_files(source, left_out):
        with suppress(OSError):
            total += path.stat().st_size
    return total


def _copy_other_files(source: Path, target: Path, left_out: set[Path]) -> None:
    """Copy the base folder's other files (_other_files) into target."""
    for path in _other_files(source, left_out):
        relative = path.relative_to(source)
        destination = target / relative
        if destination.exists():
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
