"""Write a model folder that mirrors the base input folder: one safetensors file (or sharded
set) per component, named as the base names its weights, plus every config, tokenizer and
scheduler file copied, so that diffusers' or transformers' from_pretrained loads it. All of it
is built in a hidden folder beside the destination and renamed into place when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from weightmix.io.folders import WEIGHT_SUFFIXES, FolderCheckpoint
from weightmix.io.reader import INDEX_SUFFIX
from weightmix.io.writer import OutputTensor, SafetensorsOutput


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
    ):
        self.dest, self.base = dest, base
        self.temp = Path(
            tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        )
        self._route: dict[str, tuple[str, str]] = {}
        self.outputs: dict[str, SafetensorsOutput] = {}
        try:
            groups: dict[str, list[OutputTensor]] = {c.name: [] for c in base.components}
            for tensor in tensors:
                component = base.component_of(tensor.key)
                inner = tensor.key[len(component) + 1 :] if base.pipeline else tensor.key
                groups[component].append(OutputTensor(inner, tensor.dtype, tensor.shape))
                self._route[tensor.key] = (component, inner)
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
                    )
        except BaseException:
            self.abort()
            raise

    def write_range(self, key: str, start: int, data) -> None:
        component, inner = self._route[key]
        self.outputs[component].write_range(inner, start, data)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        component, inner = self._route[key]
        self.outputs[component].write(inner, tensor)

    def commit(self) -> list[Path]:
        for output in self.outputs.values():
            output.commit()
        left_out = {c.folder for c in self.base.components if c.name not in self.outputs}
        for component in self.base.components:  # a component left without weights is left out
            if component.name and component.name not in self.outputs:
                shutil.rmtree(self.temp / component.name, ignore_errors=True)
        _copy_other_files(self.base.path, self.temp, left_out - {self.base.path})
        old = None
        if self.dest.exists():  # --overwrite was given (the plan checked it is a model folder)
            parent = self.dest.parent
            old = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".old", dir=parent))
            os.replace(self.dest, old / "previous")
        try:
            os.replace(self.temp, self.dest)
        except BaseException:
            if old is not None:  # put the previous output back where it was
                os.replace(old / "previous", self.dest)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return [self.dest]

    def abort(self) -> None:
        for output in self.outputs.values():
            output.abort()
        shutil.rmtree(self.temp, ignore_errors=True)


def _copy_other_files(source: Path, target: Path, left_out: set[Path]) -> None:
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
        destination = target / relative
        if destination.exists():
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
