"""Parse and validate a safetensors header before any tensor byte is trusted.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data section.
Each JSON entry gives dtype, shape and [begin, end) offsets into the data section.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from weightmix.errors import WeightmixError
from weightmix.io import dtypes
from weightmix.io.dtypes import SAFETENSORS_DTYPES, DType

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the same cap the reference implementation uses
MAX_DIMENSION = 2**63 - 1  # torch's sizes are int64 (beside a 0, a dimension needs no bytes)


@dataclass(frozen=True)
class HeaderEntry:
    dtype: DType
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    header_bytes: int  # N: the JSON's length
    file_size: int
    metadata: dict[str, str]
    entries: dict[str, HeaderEntry]
    stamp: tuple[int, ...] = ()  # the file as it was read (see file_stamp)

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes


def read_header(path: Path) -> tuple[Header, bytes]:
    """Read and validate the header of one safetensors file; also return its raw bytes."""
    try:
        with open(path, "rb") as handle:
            stamp = file_stamp(os.fstat(handle.fileno()))
            file_size = handle.seek(0, 2)
            handle.seek(0)
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise WeightmixError(
                    f"{path}: not a safetensors file: only {file_size} bytes, too short to hold"
                    " the 8-byte header length (truncated download?)"
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, file_size - 8):
                raise WeightmixError(
                    f"{path}: header claims {length} bytes but the file has {file_size - 8}"
                    " after the length field: the file is truncated or not safetensors"
                )
            raw = handle.read(length)
    except OSError as error:
        raise WeightmixError(f"{path}: cannot read: {error.strerror or error}") from None
    header = dataclasses.replace(parse_header(path, raw, file_size), stamp=stamp)
    return header, prefix + raw


def file_stamp(stat: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced, truncated or rewritten: device, inode, size and
    modification time (ns)."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def check_stamp(path: Path, stamp: tuple[int, ...], now: os.stat_result | None = None) -> None:
    """Refuse a file that changed since `stamp` was taken (another program wrote it)."""
    if not stamp:
        return
    try:
        current = file_stamp(now or os.stat(path))
    except OSError as error:
        raise WeightmixError(
            f"{path}: disappeared while it was being read ({error.strerror}); nothing was"
            " written: run again once nothing else writes it"
        ) from None
    if current == stamp:
        return
    if current[:2] != stamp[:2]:
        what = "was replaced by another file"
    elif current[2] != stamp[2]:
        what = f"changed size ({stamp[2]} → {current[2]} bytes)"
    else:
        what = "was rewritten (its modification time changed)"
    raise WeightmixError(
        f"{path}: {what} while it was being read; nothing was written: run again once"
        " nothing else writes it"
    )


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    """Validate the JSON header `raw` of a file of `file_size` bytes."""
    document = load_json(raw, f"{path}: header", ": the file is corrupt or not safetensors")
    if not isinstance(document, dict):
        raise WeightmixError(f"{path}: header is JSON but not an object: not a safetensors file")
    metadata = document.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise WeightmixError(f"{path}: __metadata__ must map strings to strings")
    for text in (*document, *metadata, *metadata.values()):
        if not is_text(text):
            raise WeightmixError(
                f"{path}: header holds the name or value {text!r}, whose \\u escape is a lone"
                " surrogate, not a character: the file is corrupt or not safetensors"
            )
    data_size = file_size - 8 - len(raw)
    entries = {key: _entry(path, key, value, data_size) for key, value in document.items()}
    _check_no_overlap(path, entries)
    return Header(path, len(raw), file_size, metadata, entries)


def _entry(path: Path, key: str, value: object, data_size: int) -> HeaderEntry:
    where = f"{path}: tensor '{key}'"
    if not isinstance(value, dict):
        raise WeightmixError(f"{where}: header entry is not an object: the file is corrupt")
    dtype_name = value.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        if isinstance(dtype_name, str) and dtype_name in dtypes.UNSUPPORTED_HERE:
            raise WeightmixError(
                f"{where}: dtype {dtype_name} needs a newer torch than {torch.__version__}"
                " to read; upgrade torch"
            )
        known = ", ".join(SAFETENSORS_DTYPES)
        raise WeightmixError(f"{where}: unknown dtype {dtype_name!r} (known: {known})")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise WeightmixError(
            f"{where}: shape {_shown(shape)} is not a list of non-negative integers"
        )
    if any(n > MAX_DIMENSION for n in shape):
        raise WeightmixError(
            f"{where}: shape {_shown(shape)} has a dimension past {MAX_DIMENSION}, more than any"
            " tensor"
            " can hold: the header is corrupt"
        )
    offsets = value.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(n) for n in offsets)
        or offsets[0] > offsets[1]
    ):
        raise WeightmixError(
            f"{where}: data_offsets {_shown(offsets)} is not [begin, end] with begin<=end"
        )
    begin, end = offsets
    if end > data_size:
        raise WeightmixError(
            f"{where}: data ends at byte {end} but the data section has only {data_size} bytes:"
            " the file is truncated (re-download or re-save it)"
        )
    needed = _nbytes(shape, dtype.itemsize, data_size)
    if needed is None:
        raise WeightmixError(
            f"{where}: shape {_shown(shape)} of {dtype.name} needs more bytes than the whole data"
            f" section ({data_size}): the header is corrupt"
        )
    if end - begin != needed:
        raise WeightmixError(
            f"{where}: shape {_shown(shape)} of {dtype.name} needs {needed} bytes but data_offsets"
            f" span {end - begin}: the header is corrupt"
        )
    return HeaderEntry(dtype, tuple(shape), begin, end)


def _shown(value: object, limit: int = 120) -> str:
    """repr(value) cut to about `limit` characters: a header can hold a shape of a million
    dimensions or numbers of 4,000 digits, which a one-line message should not repeat."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _nbytes(shape: list[int], itemsize: int, limit: int) -> int | None:
    """The bytes a tensor of `shape` takes, or None when that is more than `limit`. Stops
    multiplying once past `limit`: a header of many huge dimensions is refused at once, not
    after multiplying numbers of millions of digits."""
    if 0 in shape:
        return 0
    size = itemsize
    for dimension in shape:
        size *= dimension
        if size > limit:
            return None
    return size


def is_text(text: str) -> bool:
    """Whether `text` encodes as UTF-8 (JSON's \\ud800 escapes decode to lone surrogates,
    which no file name, terminal or safetensors writer accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_json(raw: bytes, lead: str, hint: str = "") -> object:
    """Parse JSON from a stranger's file. Anything that is not JSON, nests deeper than Python
    recurses, or holds an integer of more digits than Python converts, is one WeightmixError:
    '{lead} is not valid JSON ({problem}){hint}'."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        problem = "nested too deeply"
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = str(error)
    except ValueError:  # int('9' * 5000): Python converts at most 4300 digits
        problem = "a number has more digits than Python reads"
    raise WeightmixError(f"{lead} is not valid JSON ({problem}){hint}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: Path, entries: dict[str, HeaderEntry]) -> None:
    spans = sorted((e.begin, e.end, key) for key, e in entries.items() if e.end > e.begin)
    for (_, prev_end, prev_key), (begin, _, key) in itertools.pairwise(spans):
        if begin < prev_end:
            raise WeightmixError(
                f"{path}: tensors '{prev_key}' and '{key}' overlap in the data section"
                f" (one ends at byte {prev_end}, the other starts at {begin}): the file is corrupt"
            )
