"""Write safetensors as a stream: the header is computed from the plan, then tensors are
written into their places as they are ready, so the output never has to fit in memory.

Everything goes to hidden temporary files beside the destination; only a complete, flushed
output is renamed into place, so an error or Ctrl-C leaves nothing at the destination, and a
killed run's temporary files are removed by the next run writing there (see locks.py). A full
disk or quota is one line naming the folder and the bytes the output needs.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from weightmix.errors import WeightmixError
from weightmix.io.direct import DirectWrites, wants_direct
from weightmix.io.direct import enable as enable_direct
from weightmix.io.dtypes import DType
from weightmix.io.interrupts import closed, opened, placed, uninterrupted
from weightmix.io.locks import DestinationLock, replace_set, sweep_stale, temporary_file
from weightmix.io.reader import INDEX_SUFFIX
from weightmix.units import format_size

OUT_OF_SPACE = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "a file would exceed the largest file size allowed"}  # fmt: skip


@dataclass(frozen=True)
class OutputTensor:
    key: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header_bytes(tensors: list[OutputTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus the JSON header, tensors laid out back to back in list order."""
    document: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for tensor in tensors:
        end = offset + tensor.nbytes
        document[tensor.key] = {
            "dtype": tensor.dtype.name,
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def split_shards(
    tensors: list[OutputTensor], max_shard_bytes: int | None
) -> list[list[OutputTensor]]:
    """Cut the tensor list, in order, into shards of at most max_shard_bytes (one big tensor
    that alone exceeds the limit gets a shard of its own)."""
    if not max_shard_bytes:
        return [tensors]
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def output_paths(dest: Path, shard_count: int) -> tuple[list[Path], Path | None]:
    """The files a write to `dest` creates: the shards and, when sharded, the index."""
    if shard_count <= 1:
        return [dest], None
    stem = dest.name.removesuffix(".safetensors")
    shards = [
        dest.with_name(f"{stem}-{i:05d}-of-{shard_count:05d}.safetensors")
        for i in range(1, shard_count + 1)
    ]
    return shards, dest.with_name(stem + INDEX_SUFFIX)


def existing_outputs(dest: Path) -> list[Path]:
    """Files that are, or were, a write to `dest` in any shard layout: dest itself, its shards
    (stem-NNNNN-of-NNNNN.safetensors) and its index. A new output replaces all of them, so
    that no earlier result is left to be read by mistake."""
    stem = dest.name.removesuffix(".safetensors")
    shard = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors$")
    found = [dest, dest.with_name(stem + INDEX_SUFFIX)]
    if dest.parent.is_dir():
        found += sorted(p for p in dest.parent.iterdir() if shard.match(p.name))
    return [p for p in found if p.exists()]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _TempFile:
    """One output file being written under a hidden temporary name in the destination folder."""

    def __init__(self, dest: Path, size: int = 0, direct: bool = False):
        self.dest = dest
        fd, self.temp = temporary_file(dest)  # locked: a sweep knows it is in use
        self.fd: int | None = fd
        os.fchmod(fd, 0o666 & ~_umask())  # the mode a plain open() would give, not mkstemp's 0600
        # one pwrite at a time: the kernel serialises a file's writes anyway (its inode lock),
        # but a writer waiting there spins on a CPU; waiting here, it sleeps. A weighted sum of
        # two SD1.5 files on 2 threads took 12-38 % less CPU (bench/RESULTS.md)
        self._writing = threading.Lock()
        # a big output (`direct`, of `size` bytes) skips the page cache where it can: direct.py
        self._direct = DirectWrites(fd, size) if direct and enable_direct(fd) else None

    def write_at(self, data, offset: int) -> None:
        memory = memoryview(data).cast("B")
        with self._writing:
            if self._direct is not None:
                self._direct.write(memory, offset)
                return
            if self.fd is None:  # never onto a descriptor number reused by another file
                raise ValueError(f"{self.temp} was written after it was closed")
            while memory:
                written = os.pwrite(self.fd, memory, offset)
                memory = memory[written:]
                offset += written

    def finish(self) -> None:
        """Write what a direct file still holds back (runs being gathered, blocks shared by
        two writes, its last partial block): before the file is flushed or moved."""
        with self._writing:
            if self._direct is not None:
                self._direct.finish()

    def close(self, fsync: bool) -> None:
        """Close the file; a write in progress ends first, and a later one is refused."""
        with self._writing:
            direct, self._direct = self._direct, None
            fd, self.fd = self.fd, None
        if direct is not None:  # nothing of it is being written once this returns
            direct.close()
        if fd is not None:
            if fsync:
                os.fsync(fd)
            os.close(fd)

    def discard(self) -> None:
        self.close(fsync=False)
        self.temp.unlink(missing_ok=True)


def write_file(dest: Path, data: bytes) -> None:
    """Write a small file (e.g. a recipe) under a hidden temporary name and move it into place:
    the destination holds the old file or the whole new one, never part of it."""
    file = _TempFile(dest)
    try:
        with out_of_space(dest, len(data)):
            file.write_at(data, 0)
            file.close(fsync=False)
        with uninterrupted():
            os.replace(file.temp, dest)
            placed(dest)
    except BaseException:
        file.discard()
        raise


@contextmanager
def out_of_space(dest: Path, needed: int) -> Iterator[None]:
    """Turn ENOSPC, EDQUOT and EFBIG while writing `dest` into one WeightmixError line."""
    try:
        yield
    except OSError as error:
        if error.errno not in OUT_OF_SPACE:
            raise
        raise space_error(dest, needed, error) from None


def space_error(dest: Path, needed: int, error: OSError) -> WeightmixError:
    """The one line said when writing `dest` (an output of `needed` bytes) ran out of room."""
    folder = dest.parent
    try:
        free = f", {format_size(shutil.disk_usage(folder).free)} free now"
        counts = os.statvfs(folder)  # f_files 0: this file system does not count inodes
        no_inode = error.errno == errno.ENOSPC and counts.f_files > 0 and counts.f_favail == 0
    except OSError:
        free, no_inode = "", False
    if no_inode:  # the same ENOSPC: no more files, though bytes may be free
        return WeightmixError(
            f"output {dest}: the file system of {folder} has no inode left for a new file"
            f" ({error.strerror}){free}; delete files there or choose another folder;"
            " nothing was written at the output"
        )
    how = "free space there or choose another folder"
    if error.errno == errno.EFBIG:
        how = "raise the file size limit (ulimit -f) or cut the output into shards"
    return WeightmixError(
        f"output {dest}: {OUT_OF_SPACE[error.errno]} in {folder} ({error.strerror}): the output"
        f" needs {format_size(needed)} ({needed} bytes){free}; {how}; nothing was written at"
        " the output"
    )


def tensor_bytes(tensor: torch.Tensor):
    """A CPU tensor's bytes as a buffer (no copy when it is already contiguous on the CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


class SafetensorsOutput:
    """A single file or sharded set whose layout is fixed up front: every file gets its header
    and final size at once, and tensors (or byte ranges of them) may then be written in any
    order, from several threads. Only commit() moves the files into place."""

    def __init__(
        self,
        dest: Path,
        tensors: list[OutputTensor],
        metadata: dict[str, str],
        max_shard_bytes: int | None = None,
        fsync: bool = False,
        lock: bool = True,
        overwrite: bool = True,
        direct: bool | None = None,
    ):
        self.dest = dest
        self.fsync = fsync
        self.metadata = metadata
        self.shards = split_shards(tensors, max_shard_bytes)
        self.paths, self.index_path = output_paths(dest, len(self.shards))
        self._files: list[_TempFile] = []
        self._where: dict[str, tuple[_TempFile, int, OutputTensor]] = {}
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()
        self.needed = self.total_bytes()
        self._destination: DestinationLock | None = None
        try:
            with uninterrupted():  # a Ctrl-C comes once all made so far is known, to abort()
                opened(self)
                self._create(tensors, lock, overwrite, direct)
        except BaseException:
            self.abort()
            raise

    def _create(
        self, tensors: list[OutputTensor], lock: bool, overwrite: bool, direct: bool | None
    ) -> None:
        """Take the destination's lock, then create every file with its header and size."""
        dest, metadata = self.dest, self.metadata
        # one writer per destination; then what killed runs left in the folder goes
        self._destination = DestinationLock(dest) if lock else None
        self.swept = sweep_stale(dest.parent) if lock else []
        if not overwrite and (present := existing_outputs(dest)):
            raise WeightmixError(  # another run wrote it after this one was planned
                f"output {present[0]} exists (written since this merge was planned):"
                " pass --overwrite to replace it"
            )
        # past the page cache when the output is bigger than it lets sit dirty (direct.py)
        direct = wants_direct(self.needed) if direct is None else direct
        with out_of_space(dest, self.needed):
            for number, shard in enumerate(self.shards):
                header = header_bytes(shard, metadata)
                size = len(header) + sum(tensor.nbytes for tensor in shard)
                file = _TempFile(self.paths[number], size, direct)
                self._files.append(file)
                file.write_at(header, 0)
                offset = len(header)
                for tensor in shard:
                    self._where[tensor.key] = (file, offset, tensor)
                    offset += tensor.nbytes
                os.ftruncate(file.fd, offset)

    def write_range(self, key: str, start: int, data) -> None:
        """Write `data` (a buffer) at byte `start` of tensor `key`."""
        file, offset, tensor = self._place(key)
        length = memoryview(data).nbytes
        if start < 0 or start + length > tensor.nbytes:
            raise RuntimeError(f"{key}: write of {length} bytes at {start} exceeds {tensor.nbytes}")
        with out_of_space(self.dest, self.needed):
            file.write_at(data, offset + start)
        with self._lock:
            self._written[key] = self._written.get(key, 0) + length

    def total_bytes(self) -> int:
        """The bytes of every file of the output (headers and data)."""
        return sum(
            len(header_bytes(shard, self.metadata)) + sum(t.nbytes for t in shard)
            for shard in self.shards
        )

    def _place(self, key: str) -> tuple[_TempFile, int, OutputTensor]:
        place = self._where.get(key)
        if place is None:
            raise RuntimeError(f"{key} is not in the output layout")
        return place

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor, which must have the dtype and shape of the layout."""
        expected = self._place(key)[2]
        if tensor.dtype != expected.dtype.torch or tuple(tensor.shape) != expected.shape:
            raise RuntimeError(
                f"writer expected {key} {expected.dtype} {list(expected.shape)},"
                f" got {tensor.dtype} {list(tensor.shape)}"
            )
        if expected.nbytes:
            self.write_range(key, 0, tensor_bytes(tensor))

    def commit(self) -> list[Path]:
        """Check every byte was written, flush, and move the files into place (index last)."""
        for key, (_, _, tensor) in self._where.items():
            if self._written.get(key, 0) != tensor.nbytes:
                raise RuntimeError(
                    f"{key}: {self._written.get(key, 0)} of {tensor.nbytes} bytes were written"
                )
        with out_of_space(self.dest, self.needed):
            for file in self._files:
                file.finish()
            if self.index_path is not None:
                with uninterrupted():  # a Ctrl-C waits until abort() knows of the file
                    self._files.append(_TempFile(self.index_path))
                self._files[-1].write_at(
                    json.dumps(self._index_document(), indent=2).encode("utf-8"), 0
                )
            if self.fsync:
                for file in self._files:
                    os.fsync(file.fd)
        # the files stay open, so locked, while they move: no sweep takes them meanwhile. The
        # old index goes first (a kill never leaves a mixed set that loads), the new one last;
        # earlier outputs in another shard layout (the plan allowed them) go after. A Ctrl-C
        # waits until the set is in place and this output is done with (interrupts.py)
        with uninterrupted():
            with out_of_space(self.dest, self.needed):
                replace_set(
                    [(file.temp, file.dest) for file in self._files],
                    [path for path in existing_outputs(self.dest) if path.is_file()],
                    first=self.index_path,
                )
            written = [file.dest for file in self._files]
            for file in self._files:
                file.close(fsync=False)
            self._files = []
            self._unlock()
            placed(self.index_path or self.dest)
            closed(self)
        return written

    def _unlock(self) -> None:
        if self._destination is not None:
            self._destination.release()
            self._destination = None

    def _index_document(self) -> dict[str, object]:
        weight_map = {
            t.key: self.paths[s].name for s, shard in enumerate(self.shards) for t in shard
        }
        total = sum(t.nbytes for shard in self.shards for t in shard)
        return {"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}

    def abort(self) -> None:
        """Remove every temporary file; nothing appears at the destination. A second Ctrl-C
        waits until it is done."""
        with uninterrupted():
            for file in self._files:
                file.discard()
            self._files = []
            self._unlock()
            closed(self)


def open_output(
    dest: str | os.PathLike,
    tensors: list[OutputTensor],
    metadata: dict[str, str],
    max_shard_bytes: int | None = None,
    fsync: bool = False,
    overwrite: bool = True,
) -> SafetensorsOutput:
    return SafetensorsOutput(
        Path(dest), tensors, metadata, max_shard_bytes, fsync, overwrite=overwrite
    )
