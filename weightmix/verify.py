"""`weightmix verify OUT`: check an output end to end, and say the first problem.

Checked in order: every header parses and fits its file (io/header.py), no file holds bytes
past its last tensor, every tensor reads in full and holds only finite values, and the
fingerprints recorded for the inputs (provenance.py) match the input files where they are
present. With `recompute`, the recorded recipe is run again from the inputs (streamed, a key at
a time) and every output tensor must be byte-identical to the recomputed one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy
import yaml

from weightmix.errors import WeightmixError
from weightmix.finite import count_nonfinite, tensor_chunks
from weightmix.io import open_checkpoint
from weightmix.io.reader import Checkpoint, SafetensorsCheckpoint, TensorInfo
from weightmix.io.writer import tensor_bytes
from weightmix.provenance import FINGERPRINTS, KEY_FINGERPRINT, KEY_INPUTS, KEY_RECIPE, fingerprint


class VerifyFailed(WeightmixError):
    """The output has a problem: the CLI prints it and exits 1."""

    exit_code = 1


@dataclass
class Verified:
    tensors: int = 0
    nbytes: int = 0
    inputs_checked: list[str] = field(default_factory=list)
    inputs_absent: list[str] = field(default_factory=list)
    recomputed: bool = False


def verify(path: str | Path, recompute: bool = False) -> Verified:
    """Check the output at `path`; raise VerifyFailed with the first problem."""
    try:
        checkpoint = open_checkpoint(path)
    except WeightmixError as error:
        raise VerifyFailed(str(error)) from None
    found = Verified()
    with checkpoint:
        _check_file_ends(checkpoint)
        for info in checkpoint.tensors.values():
            _check_tensor(checkpoint, info)
            found.tensors += 1
            found.nbytes += info.nbytes
        recipe, inputs = _provenance(checkpoint)
        for name, recorded in inputs.items():
            model = recipe.get(name)
            where = Path(path).parent / model if model is not None else None
            if where is None or not where.exists():
                found.inputs_absent.append(name)
                continue
            _check_input(name, where, recorded, checkpoint.metadata.get(KEY_FINGERPRINT))
            found.inputs_checked.append(name)
        if recompute:
            if found.inputs_absent:
                absent = ", ".join(found.inputs_absent)
                raise VerifyFailed(
                    f"{path}: --inputs needs every input; not found: {absent} (paths are as"
                    " recorded, relative to the output's folder)"
                )
            _recompute(checkpoint, Path(path))
            found.recomputed = True
    return found


def _check_file_ends(checkpoint: Checkpoint) -> None:
    if not isinstance(checkpoint, SafetensorsCheckpoint):
        return
    for header, _ in checkpoint.headers:
        end = header.data_start + max((e.end for e in header.entries.values()), default=0)
        if header.file_size != end:
            raise VerifyFailed(
                f"{header.path}: holds {header.file_size - end} bytes after its last tensor"
                f" ({header.file_size} bytes, tensors end at {end}): not a file weightmix wrote"
            )


def _check_tensor(checkpoint: Checkpoint, info: TensorInfo) -> None:
    """Read every byte of the tensor; a float one must hold only finite values."""
    bad = 0
    try:
        for chunk in tensor_chunks(checkpoint, info):
            if chunk.is_floating_point():
                bad += count_nonfinite(chunk)
    except WeightmixError as error:
        raise VerifyFailed(str(error)) from None
    if bad:
        raise VerifyFailed(
            f"{checkpoint.path}: tensor '{info.key}' holds {bad} NaN or infinite value(s)"
        )


def _provenance(checkpoint: Checkpoint) -> tuple[dict[str, str], dict[str, dict]]:
    """The recorded recipe's model paths and the recorded inputs, by model name."""
    metadata = checkpoint.metadata
    if KEY_INPUTS not in metadata:
        return {}, {}
    try:
        inputs = {entry["name"]: entry for entry in json.loads(metadata[KEY_INPUTS])}
        document = yaml.safe_load(metadata.get(KEY_RECIPE, "")) or {}
        models = document.get("models", {}) if isinstance(document, dict) else {}
        paths = {str(k): str(v) for k, v in models.items()} if isinstance(models, dict) else {}
    except (ValueError, TypeError, KeyError, yaml.YAMLError) as error:
        raise VerifyFailed(
            f"{checkpoint.path}: the recorded inputs or recipe cannot be read ({error})"
        ) from None
    return paths, inputs


def _check_input(name: str, where: Path, recorded: dict, how_text: str | None) -> None:
    how = next((h for h, text in FINGERPRINTS.items() if text == how_text), "sampled")
    try:
        with open_checkpoint(where) as model:
            size, now = model.size, fingerprint(model, how)
    except WeightmixError as error:
        raise VerifyFailed(f"input '{name}' ({where}): {error}") from None
    if recorded.get("size") != size or recorded.get("fingerprint") != now:
        raise VerifyFailed(
            f"input '{name}' ({where}) is not the file this output was made from: its"
            f" {how} fingerprint or size differs from the recorded one"
        )


def _recompute(checkpoint: Checkpoint, path: Path) -> None:
    from weightmix import api
    from weightmix.recipe import parse_recipe

    text = checkpoint.metadata.get(KEY_RECIPE)
    if text is None:
        raise VerifyFailed(f"{path}: records no recipe, so --inputs has nothing to run")
    try:
        recipe = parse_recipe(yaml.safe_load(text), f"{path} (recorded recipe)", path.parent)
        seen = 0
        for key, tensor in api.merge_iter(recipe):
            info = checkpoint.tensors.get(key)
            if info is None:
                raise VerifyFailed(f"{path}: the recipe makes '{key}', which the output lacks")
            stored = checkpoint.read(info)
            same = numpy.array_equal(tensor_bytes(stored), tensor_bytes(tensor))
            if stored.dtype != tensor.dtype or not same:
                raise VerifyFailed(
                    f"{path}: tensor '{key}' differs from what its recorded recipe makes from"
                    " the inputs"
                )
            seen += 1
    except VerifyFailed:
        raise
    except WeightmixError as error:
        raise VerifyFailed(f"{path}: the recorded recipe does not run: {error}") from None
    if seen != len(checkpoint.tensors):
        raise VerifyFailed(
            f"{path}: holds {len(checkpoint.tensors)} tensors; its recipe makes {seen}"
        )
