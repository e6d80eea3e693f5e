"""Open checkpoints lazily: headers are validated up front, tensor bytes read only on demand."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from weightmix.errors import WeightmixError
from weightmix.io.dtypes import DType
from weightmix.io.header import Header, check_stamp, load_json, read_header
from weightmix.units import count

INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to plan with, and to read it later."""

    key: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return self.nbytes // self.dtype.itemsize


class Checkpoint:
    """An opened checkpoint: every tensor's dtype, shape and size known, no tensor data read.
    Subclasses say how bytes are read (read_range); everything else is shared."""

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], files: list[Path]):
        self.path = path
        self.tensors = tensors
        self.files = files
        self.notes: list[str] = []  # what the user should know about how it was read

    @property
    def size(self) -> int:
        return sum(file.stat().st_size for file in self.files)

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def read(self, info: TensorInfo) -> torch.Tensor:
        """One whole tensor, as a new CPU tensor of its dtype and shape."""
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self.read_range(info, 0, buffer.numpy())
        return buffer.view(info.dtype.torch).reshape(info.shape)

    def read_range(self, info: TensorInfo, start: int, out) -> None:
        """Fill the buffer `out` with the tensor's bytes from byte `start` on."""
        raise NotImplementedError

    def reads_cheaply(self, info: TensorInfo) -> bool:
        """Whether reading a range of the tensor again costs about a copy of those bytes (from
        a file's page cache, or from memory), so that the engine reads a streamed key again
        for each pass rather than holding a copy of it. False where read_range computes or
        copies more than the range (a LoRA's products, a transpose, a strided tensor)."""
        return True

    def check_unchanged(self) -> None:
        """Raise WeightmixError when a file changed since it was opened (checked once every
        read is done, before an output is moved into place)."""

    def fingerprint_parts(self) -> list[tuple[Path, bytes, int]]:
        """For fingerprints: (file, bytes hashed whole, where sampling of the file starts).
        By default every file is sampled from its start."""
        return [(Path(file), b"", 0) for file in self.files]

    def close(self) -> None:
        pass

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsCheckpoint(Checkpoint):
    """A single safetensors file or a sharded set, opened by header only."""

    def __init__(
        self, path: Path, headers: list[tuple[Header, bytes]], tensors: dict[str, TensorInfo]
    ):
        super().__init__(path, tensors, [header.path for header, _ in headers])
        self.headers = headers
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return sum(header.file_size for header, _ in self.headers)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.headers[0][0].metadata) if self.headers else {}

    def read_range(self, info: TensorInfo, start: int, out) -> None:
        _read_exact(self._fd(info.file), out, info.offset + start, info.file)

    def check_unchanged(self) -> None:
        for header, _ in self.headers:
            check_stamp(header.path, header.stamp)

    def fingerprint_parts(self) -> list[tuple[Path, bytes, int]]:
        """Headers are hashed whole; data sections are sampled."""
        return [(header.path, raw, header.data_start) for header, raw in self.headers]

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(file)
            if fd is None:
                try:
                    fd = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                except OSError as error:
                    raise WeightmixError(f"{file}: cannot open: {error.strerror}") from None
                try:  # the file read now must be the one whose header was read
                    stamp = next(h.stamp for h, _ in self.headers if h.path == file)
                    check_stamp(file, stamp, os.fstat(fd))
                except BaseException:
                    os.close(fd)
                    raise
                self._fds[file] = fd
            return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _read_exact(fd: int, view, offset: int, file: Path) -> None:
    """Fill `view` from `fd` at `offset`; a short file is a user error, not a crash."""
    memory = memoryview(view).cast("B")
    if os.preadv(fd, [memory], offset) == len(memory):
        return  # the usual case: one call
    done = 0
    while done < len(memory):
        count = os.preadv(fd, [memory[done:]], offset + done)
        if count == 0:
            raise WeightmixError(f"{file}: ended early while reading: the file changed or shrank")
        done += count


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a .safetensors file, a *.safetensors.index.json, a folder holding one index, or a
    pickled checkpoint (.ckpt, .pt, .pth, .bin; read safely, see io/pickled.py)."""
    path = Path(path)
    if not _exists(path):
        index = path.with_name(path.name.removesuffix(".safetensors") + INDEX_SUFFIX)
        if index.is_file():  # a sharded output named as it was written: -o model.safetensors
            raise WeightmixError(f"{path}: no such file; it was written sharded: give {index}")
        raise WeightmixError(f"{path}: no such file or folder")
    if path.is_dir():
        from weightmix.io.folders import is_model_folder, open_folder

        if is_model_folder(path):
            return open_folder(path, open_checkpoint)
        return _open_index(_find_index(path))
    if path.name.endswith(INDEX_SUFFIX):
        return _open_index(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        from weightmix.io.pickled import open_pickle  # torch.load only when a pickle is given

        return open_pickle(path)
    header, raw = read_header(path)
    return SafetensorsCheckpoint(path, [(header, raw)], _tensors_of(header))


def _exists(path: Path) -> bool:
    """Path.exists, with a name the file system refuses (too long ...) a WeightmixError."""
    try:
        return path.exists()
    except OSError as error:
        raise WeightmixError(f"{path}: cannot be opened: {error.strerror or error}") from None


def _is_file(path: Path) -> bool:
    """Path.is_file, with a name the file system refuses (too long ...) a WeightmixError."""
    return _exists(path) and path.is_file()


def _tensors_of(header: Header, keys: set[str] | None = None) -> dict[str, TensorInfo]:
    return {
        key: TensorInfo(
            key, e.dtype, e.shape, header.path, header.data_start + e.begin, e.end - e.begin
        )
        for key, e in header.entries.items()
        if keys is None or key in keys
    }


def _find_index(folder: Path) -> Path:
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) == 1:
        return indexes[0]
    if not indexes:
        raise WeightmixError(
            f"{folder}: folder is neither a diffusers pipeline (model_index.json), nor a model"
            f" folder (config.json), nor a sharded set (*{INDEX_SUFFIX}): give a file instead"
        )
    names = ", ".join(p.name for p in indexes)
    raise WeightmixError(f"{folder}: folder has several indexes ({names}): give one of them")


def _open_index(index: Path) -> Checkpoint:
    try:
        raw = index.read_bytes()
    except OSError as error:
        raise WeightmixError(f"{index}: cannot read the shard index: {error}") from None
    document = load_json(raw, f"{index}: the shard index", ": fix or re-download it")
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise WeightmixError(f"{index}: shard index has no 'weight_map' of key -> file name")
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        parts = shard.replace("\\", "/").split("/")
        if shard.startswith(("/", "\\")) or ".." in parts or not shard.strip("./\\"):
            raise WeightmixError(
                f"{index}: names shard {shard!r} for '{key}', which is not a file name inside"
                " the index's folder: shards must lie in the index's own folder"
            )
        by_shard.setdefault(shard, set()).add(key)
    headers, tensors = [], {}
    for shard, keys in by_shard.items():
        shard_path = index.parent / shard
        if not _is_file(shard_path):
            raise WeightmixError(f"{index}: names shard '{shard}', which is missing")
        header, raw = read_header(shard_path)
        headers.append((header, raw))
        unknown = sorted(keys - header.entries.keys())
        if unknown:
            raise WeightmixError(
                f"{index}: says '{unknown[0]}' is in {shard}, but that shard has no such tensor"
                f" ({count(len(unknown), 'such key')}): the index does not match its shards"
            )
        unlisted = sorted(header.entries.keys() - keys)
        if unlisted:
            raise WeightmixError(
                f"{shard_path}: holds '{unlisted[0]}', which the index does not list"
                f" ({count(len(unlisted), 'such key')}): the index does not match its shards"
            )
        tensors.update(_tensors_of(header, keys))
    return SafetensorsCheckpoint(index, headers, tensors)
