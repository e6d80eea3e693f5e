"""Pickled checkpoints (.ckpt, .pt, .pth, .bin), read safely.

Only torch's weights_only unpickler is used: it builds tensors and plain containers and
refuses any other global, so a file that would import or call code is rejected before any of
it runs. Files in torch's zip format are memory-mapped, so tensors are paged in as they are
read rather than loaded whole; the old (pre-zip) format has to be loaded into memory.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from weightmix.errors import WeightmixError
from weightmix.io.dtypes import SAFETENSORS_DTYPES, dtype_of
from weightmix.io.reader import Checkpoint, TensorInfo
from weightmix.io.writer import tensor_bytes


class PickleCheckpoint(Checkpoint):
    """A state dict loaded by torch's safe unpickler (memory-mapped when the format allows)."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor], skipped: list[str]):
        tensors = {
            key: TensorInfo(
                key, dtype_of(t), tuple(t.shape), path, -1, t.numel() * t.element_size()
            )
            for key, t in state.items()
        }
        super().__init__(path, tensors, [path])
        if skipped:
            shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
            self.notes.append(f"{len(skipped)} entries of the pickle are not weights: {shown}")
        self._state = state

    def read_range(self, info: TensorInfo, start: int, out) -> None:
        tensor = self._state[info.key]
        flat = tensor_bytes(tensor)  # a view when contiguous, else one copy
        view = memoryview(out).cast("B")
        view[:] = memoryview(flat)[start : start + len(view)]

    def close(self) -> None:
        self._state = {}


def open_pickle(path: Path) -> PickleCheckpoint:
    """Load a pickled state dict safely, unwrapping {'state_dict': ...} when present."""
    loaded = _safe_load(path)
    state, skipped = {}, []
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        skipped = [str(k) for k in loaded if k != "state_dict"]  # global_step, epoch ...
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise WeightmixError(
            f"{path}: holds a {type(loaded).__name__}, not a state dict of named tensors"
        )
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            skipped.append(str(key))
            continue
        if value.dtype not in _STORABLE:
            raise WeightmixError(
                f"{path}: tensor '{key}' has dtype {value.dtype}, which safetensors cannot hold;"
                " convert or drop it with torch first"
            )
        if value.layout != torch.strided or value.is_quantized:
            raise WeightmixError(f"{path}: tensor '{key}' is sparse or quantized; not supported")
        state[str(key)] = value
    return PickleCheckpoint(path, state, skipped)


def _safe_load(path: Path) -> object:
    mmap = zipfile.is_zipfile(path)  # torch's zip format can be memory-mapped, the old one not
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(error))
        if culprit is None:
            raise WeightmixError(
                f"{path}: cannot read the pickled checkpoint: it is corrupt, truncated or not"
                " a torch checkpoint"
            ) from None
        raise WeightmixError(
            f"{path}: refused: the pickle would import or call {culprit.group(1)}, which a"
            " checkpoint never needs; only tensors and plain containers are loaded."
            " Do not use this file"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[0] if lines else type(error).__name__
        raise WeightmixError(f"{path}: cannot read the pickled checkpoint: {detail}") from None


_STORABLE = {d.torch for d in SAFETENSORS_DTYPES.values()}
