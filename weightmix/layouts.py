"""Bring every model of a merge to the key names of the layout model: a diffusers pipeline
and a single file of SD1.x, SDXL or Flux are read in each other's names (see dialects/)."""

from __future__ import annotations

from weightmix.dialects import as_pipeline, as_single_file, single_file_view
from weightmix.errors import WeightmixError
from weightmix.io import Checkpoint
from weightmix.io.folders import FolderCheckpoint

SINGLE_FILE = "single_file"  # the layout value for one file with single-file key names


def align_layouts(checkpoints: dict[str, Checkpoint], layout: str | None) -> None:
    """Give every model the key names of the layout model (default: the first): a diffusers
    pipeline folder and a single file of SD1.x, SDXL or Flux are converted into each other's
    names (see dialects/). With layout single_file, pipelines take single-file names."""
    if layout == SINGLE_FILE:
        if not any(_kind(c) == "pipeline" for c in checkpoints.values()):
            first = next(iter(checkpoints.values()))
            first.notes.append(
                "already has single-file key names (no model is a diffusers pipeline):"
                " --single-file (layout single_file) renames nothing"
            )
        for name, checkpoint in list(checkpoints.items()):
            if _kind(checkpoint) == "pipeline":
                view = single_file_view(checkpoint)
                if view is None:
                    raise WeightmixError(
                        f"model {name}: a pipeline whose names weightmix cannot convert to a"
                        " single file (it converts SD1.x, SDXL and Flux pipelines)"
                    )
                view.notes.insert(0, "read with single-file key names")
                checkpoints[name] = view
        return
    first = layout or next(iter(checkpoints))
    kind = _kind(checkpoints[first])
    base = checkpoints[first]
    for name, other in ((n, _kind(c)) for n, c in checkpoints.items() if n != first):
        if other == kind or "pipeline" not in (kind, other):
            continue
        source = checkpoints[name]
        if kind == "pipeline" and other == "file":
            view = as_pipeline(source, base.tensors)
        elif kind == "file" and other == "pipeline":
            view = as_single_file(source, base.tensors)
        else:
            view = None
        if view is None:
            raise WeightmixError(
                f"model {first} is a {_KIND_TEXT[kind]} but model {name} is a {_KIND_TEXT[other]}"
                " whose names weightmix cannot convert (it converts SD1.x, SDXL and Flux single"
                " files and pipelines); give models of the same kind"
            )
        view.notes.insert(0, f"read with the key names of model {first} ({_KIND_TEXT[kind]})")
        checkpoints[name] = view


def _kind(checkpoint: Checkpoint) -> str:
    if isinstance(checkpoint, FolderCheckpoint):
        return "pipeline" if checkpoint.pipeline else "component"
    return "file"


_KIND_TEXT = {"pipeline": "diffusers pipeline folder", "component": "model folder", "file": "file"}
