"""Pickled checkpoints (.ckpt, .pt, .pth, .bin), read safely.

Only torch's weights_only unpickler is used: it builds tensors and plain containers and
refuses any other global, so a file that would import or call code is rejected before any of
it runs. Files in torch's zip format are memory-mapped, so tensors are paged in as they are
read rather than loaded whole; the old (pre-zip) format has to be loaded into memory.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch

from weightmix.errors import WeightmixError
from weightmix.io.dtypes import SAFETENSORS_DTYPES, dtype_of
from weightmix.io.reader import Checkpoint, TensorInfo
from weightmix.io.writer import tensor_bytes


class PickleCheckpoint(Checkpoint):
    """A state dict loaded by torch's safe unpickler (memory-mapped when the format allows)."""

    def __init__(self, path: Path, state: dict[str, torch.Tensor], notes: list[str]):
        tensors = {
            key: TensorInfo(
                key, dtype_of(t), tuple(t.shape), path, -1, t.numel() * t.element_size()
            )
            for key, t in state.items()
        }
        super().__init__(path, tensors, [path])
        self.notes.extend(notes)
        self._state = state

    def read_range(self, info: TensorInfo, start: int, out) -> None:
        tensor = self._state[info.key]
        flat = tensor_bytes(tensor)  # a view when contiguous, else one copy
        view = memoryview(out).cast("B")
        view[:] = memoryview(flat)[start : start + len(view)]

    def reads_cheaply(self, info: TensorInfo) -> bool:
        return self._state[info.key].is_contiguous()  # else each read copies it whole

    def close(self) -> None:
        self._state = {}


WRAPPERS = ("state_dict", "model_state_dict", "model", "module")
"""Entries that training code wraps a state dict in (Lightning, DeepSpeed, plain scripts)."""

_MAX_NESTING = 3  # {"model": {"state_dict": ...}} is 2; a cap also stops a self-holding dict


def open_pickle(path: Path) -> PickleCheckpoint:
    """Load a pickled state dict safely, unwrapping it from the WRAPPERS entries it may sit in
    (also nested, e.g. {'model': {'state_dict': ...}}): a wrapper that holds tensors wins over
    tensors beside it (a `global_step` tensor next to `state_dict` is not the model)."""
    loaded, notes = _safe_load(path)
    if not isinstance(loaded, dict):
        raise WeightmixError(
            f"{path}: holds a {type(loaded).__name__}, not a state dict of named tensors"
        )
    chain = _find_weights(loaded, _MAX_NESTING)
    if chain is None:
        raise WeightmixError(_no_tensors_message(path, loaded))
    state, skipped = _read_state(path, loaded, chain)
    return PickleCheckpoint(path, state, [*_reading_notes(chain, skipped), *notes])


def _find_weights(entries: dict, depth: int) -> list[str] | None:
    """The wrapper keys leading from `entries` to the dict of tensors ([] when `entries` holds
    the tensors itself), or None when no tensors are found. Wrappers are looked into first."""
    for key in WRAPPERS if depth > 0 else ():
        inner = entries.get(key)
        if isinstance(inner, dict):
            chain = _find_weights(inner, depth - 1)
            if chain is not None:
                return [key, *chain]
    if any(isinstance(value, torch.Tensor) for value in entries.values()):
        return []
    return None


def _read_state(
    path: Path, loaded: dict, chain: list[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors found by following `chain`, and the names of the entries that are not."""
    skipped: list[str] = []
    entries = loaded
    for wrapper in chain:
        skipped += [str(key) for key in entries if key != wrapper]  # global_step, epoch ...
        entries = entries[wrapper]
    state: dict[str, torch.Tensor] = {}
    written: dict[str, object] = {}  # each name as the pickle wrote it (1 or '1')
    for key, value in entries.items():
        if isinstance(value, torch.Tensor):
            _check_storable(path, key, value)
            if str(key) in state:
                raise WeightmixError(
                    f"{path}: two tensors are named '{key}' once read as text (keys"
                    f" {written[str(key)]!r} and {key!r}); rename one with torch first"
                )
            state[str(key)] = value
            written[str(key)] = key
        else:
            skipped.append(str(key))
    return state, skipped


def _check_storable(path: Path, key: object, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _STORABLE:
        raise WeightmixError(
            f"{path}: tensor '{key}' has dtype {tensor.dtype}, which safetensors cannot hold;"
            " convert or drop it with torch first"
        )
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise WeightmixError(f"{path}: tensor '{key}' is sparse or quantized; not supported")


def _reading_notes(chain: list[str], skipped: list[str]) -> list[str]:
    """One note saying where the weights were found and which entries were left out."""
    parts = []
    if chain:
        where = " -> ".join(f"'{key}'" for key in chain)
        parts.append(f"weights read from the pickle's {where} entry")
    if skipped:
        count = len(skipped)
        entries = "1 entry of the pickle is" if count == 1 else f"{count} entries of the pickle are"
        parts.append(f"{entries} not weights: {_shortlist(skipped)}")
    return ["; ".join(parts)] if parts else []


def _no_tensors_message(path: Path, loaded: dict) -> str:
    """One line naming what the pickle holds instead, with each entry's kind."""
    listing = _shortlist([f"{key} ({_kind(value)})" for key, value in loaded.items()])
    wrappers = ", ".join(f"'{key}'" for key in WRAPPERS[:-1]) + f" or '{WRAPPERS[-1]}'"
    return (
        f"{path}: holds no tensors; its entries: {listing or 'none'}; weightmix reads a state"
        f" dict of named tensors (at the top of the pickle or under {wrappers})"
    )


def _kind(value: object) -> str:
    """'dict, 3 tensors' for a dict, else the type's name ('int', 'list' ...)."""
    if isinstance(value, dict):
        count = sum(isinstance(v, torch.Tensor) for v in value.values())
        return f"dict, {count} tensor" + ("" if count == 1 else "s")
    return type(value).__name__


def _shortlist(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _safe_load(path: Path) -> tuple[object, list[str]]:
    """torch.load with weights_only, and a note for each warning torch raised that matters."""
    try:
        mmap = zipfile.is_zipfile(path)  # the zip format can be memory-mapped, the old one not
        with warnings.catch_warnings(record=True) as caught:  # those that would be shown
            if mmap:
                _check_global_names(path)
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            else:
                loaded = _load_old_format(path)
    except WeightmixError:
        raise
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
        raise WeightmixError(
            f"{path}: cannot read the pickled checkpoint: {_first_line(error)}"
        ) from None
    except (AttributeError, TypeError, KeyError) as error:  # torch's legacy loader, e.g. fp8
        raise WeightmixError(
            f"{path}: torch cannot read this pickle in its old (pre-zip) format"
            f" ({type(error).__name__}: {_first_line(error)}); re-save it with a current"
            " torch.save, or convert it where it was made"
        ) from None
    except MemoryError:
        raise
    except Exception as error:  # IndexError, struct.error ... from a corrupt pickle's opcodes
        raise WeightmixError(
            f"{path}: cannot read the pickled checkpoint ({type(error).__name__}:"
            f" {_first_line(error)}): it is corrupt, truncated or not a torch checkpoint"
        ) from None
    return loaded, _warning_notes(caught)


class _Bounded(io.BufferedReader):
    """A file whose read(n) asks for no more than the bytes left in it: a pickle writes the
    length of each string it holds, and a length of 2**40 in a 10-byte file must not become
    an allocation of 2**40 bytes (Python's read(n) allocates n bytes first)."""

    def __init__(self, path: Path):
        super().__init__(io.FileIO(path, "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
        return super().read(size)

    def readline(self, size: int | None = -1) -> bytes:
        """A line of at most MAX_LINE bytes (pickles read global names by line)."""
        line = super().readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise ValueError(f"a global name longer than {MAX_LINE} bytes: not a checkpoint")
        return line


MAX_LINE = 4096
"""The longest global name (module or class) a pickle may give. torch's weights-only loader
quotes an unknown global in its error and searches that text with regular expressions that
take time quadratic in its length: a 100 kB name took minutes."""


def _check_global_names(path: Path) -> None:
    """Refuse a zip-format checkpoint whose data.pkl names a global longer than MAX_LINE
    (torch reads it from memory, past the reach of _Bounded). Anything else wrong is left for
    torch to report."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith("data.pkl") or info.file_size > path.stat().st_size:
                continue
            names: list[str] = []
            try:
                for operation, argument, _ in pickletools.genops(archive.read(info)):
                    if operation.name == "GLOBAL":
                        names.append(str(argument))
            except Exception:  # a corrupt pickle: torch says what is wrong
                pass
            if any(len(name) > MAX_LINE for name in names):
                raise ValueError(f"a global name longer than {MAX_LINE} bytes: not a checkpoint")


def _load_old_format(path: Path) -> object:
    """torch.load of the old (pre-zip) format, which allocates each storage at the size the
    pickle gives before reading its bytes. Loaded first with fake tensors (no storage is
    allocated, no data read), to check that the storages fit in the file; then for real."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # it logs each failing op
    with _Bounded(path) as handle:
        was, quiet.disabled = quiet.disabled, True
        try:
            with FakeTensorMode():
                fake = torch.load(handle, map_location="cpu", weights_only=True)
        finally:
            quiet.disabled = was
        claimed = sum(_storage_sizes(fake).values())
        if claimed > handle._size:
            raise WeightmixError(
                f"{path}: the pickle's tensors claim {claimed} bytes but the file holds only"
                f" {handle._size}: it is corrupt or truncated (re-download or re-save it)"
            )
        handle.seek(0)
        return torch.load(handle, map_location="cpu", weights_only=True)


def _storage_sizes(loaded: object) -> dict[int, int]:
    """The bytes of each distinct storage under `loaded` (walked iteratively, each container
    once: a pickle can nest deeply or hold one list many times)."""
    sizes: dict[int, int] = {}
    seen: set[int] = set()
    stack = [loaded]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            sizes[storage._cdata] = storage.nbytes()
        elif isinstance(item, (dict, list, tuple, set)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return sizes


def _warning_notes(caught: list[warnings.WarningMessage]) -> list[str]:
    """torch's warnings as one note line each, minus those that say nothing about the file:
    torch < 2.2 warns that TypedStorage is deprecated when it reads the old (pre-zip) format."""
    notes = []
    for warning in caught:
        text = _first_line(warning.message)
        if not text.startswith(_NOISE) and f"torch: {text}" not in notes:
            notes.append(f"torch: {text}")
    return notes


def _first_line(error: BaseException | Warning | str) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


_NOISE = ("TypedStorage is deprecated",)


_STORABLE = {d.torch for d in SAFETENSORS_DTYPES.values()}
