"""How a tensor of one key dialect is made of tensors of another.

A Link ties a key of the single-file dialect (LDM/SGM/BFL names) to a key of the diffusers
dialect: the diffusers tensor is the concatenation, along dim 0 and in `position` order, of its
links' pieces; a piece is part `part` of the single-file tensor cut along dim 0 in the
proportions `parts` (fused q/k/v weights are one tensor cut in three, Flux's final modulation
is two halves swapped). `reshape` drops or restores trailing 1x1 dims (a 1x1 convolution
against a linear layer); `transpose` marks a matrix stored transposed on one side.

Either side can be rebuilt from the other with byte ranges alone (except transposes), so a
converted checkpoint still streams: see ConvertedCheckpoint.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from weightmix.errors import WeightmixError
from weightmix.io.reader import Checkpoint, TensorInfo
from weightmix.io.writer import tensor_bytes
from weightmix.units import count


@dataclass(frozen=True)
class Link:
    single: str
    diffusers: str
    part: int = 0
    parts: tuple[int, ...] = (1,)
    position: int = 0
    reshape: bool = False
    transpose: bool = False


@dataclass(frozen=True)
class Piece:
    """Bytes [start, start + length) of source tensor `key`."""

    key: str
    start: int
    length: int


@dataclass(frozen=True)
class Target:
    """A tensor of the other dialect: the concatenation of its pieces, or a transpose."""

    key: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    transpose_of: str | None = None


def _check_alike(key: str, parts: list[TensorInfo]) -> None:
    """Tensors joined into one must share dtype and row shape, or the bytes would not line up."""
    first = parts[0]
    for other in parts[1:]:
        if other.dtype != first.dtype or other.shape[1:] != first.shape[1:]:
            raise WeightmixError(
                f"'{key}' is made of '{first.key}' ({first.dtype}, {list(first.shape)}) and"
                f" '{other.key}' ({other.dtype}, {list(other.shape)}), which do not fit together"
            )


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def _row_bytes(info: TensorInfo) -> int:
    return info.nbytes // max(_rows(info.shape), 1)


def _part_rows(total: int, parts: tuple[int, ...], where: str) -> list[int]:
    weight = sum(parts)
    if total % weight:
        raise WeightmixError(f"{where}: {total} rows cannot be cut in proportions {parts}")
    return [total * p // weight for p in parts]


def to_diffusers(links: list[Link], source: dict[str, TensorInfo]) -> list[Target]:
    """Diffusers tensors made of single-file tensors `source` (links to absent keys skipped)."""
    grouped: dict[str, list[Link]] = defaultdict(list)
    for link in links:
        if link.single in source:
            grouped[link.diffusers].append(link)
    targets = []
    for key, group in grouped.items():
        group.sort(key=lambda link: link.position)
        first = source[group[0].single]
        if group[0].transpose:
            targets.append(Target(key, tuple(reversed(first.shape)), (), group[0].single))
            continue
        pieces, rows = [], 0
        for link in group:
            info = source[link.single]
            counts = _part_rows(_rows(info.shape), link.parts, info.key)
            size = _row_bytes(info)
            pieces.append(
                Piece(link.single, sum(counts[: link.part]) * size, counts[link.part] * size)
            )
            rows += counts[link.part]
        conv = group[0].reshape and len(first.shape) == 4
        tail = first.shape[1:-2] if conv else first.shape[1:]  # 1x1 conv -> linear
        targets.append(Target(key, (rows, *tail) if first.shape else (), tuple(pieces)))
    return targets


def to_single(links: list[Link], source: dict[str, TensorInfo]) -> list[Target]:
    """Single-file tensors made of diffusers tensors `source` (a single key is built only when
    every diffusers key it is made of is present)."""
    by_diffusers: dict[str, list[Link]] = defaultdict(list)
    by_single: dict[str, list[Link]] = defaultdict(list)
    for link in links:
        by_diffusers[link.diffusers].append(link)
        by_single[link.single].append(link)
    targets = []
    for key, group in by_single.items():
        if not all(link.diffusers in source for link in group):
            continue
        group.sort(key=lambda link: link.part)
        first = source[group[0].diffusers]
        if group[0].transpose:
            targets.append(Target(key, tuple(reversed(first.shape)), (), group[0].diffusers))
            continue
        _check_alike(key, [source[link.diffusers] for link in group])
        pieces, rows = [], 0
        for link in group:
            info = source[link.diffusers]
            siblings = sorted(by_diffusers[link.diffusers], key=lambda s: s.position)
            weights = tuple(s.parts[s.part] for s in siblings)
            counts = _part_rows(_rows(info.shape), weights, info.key)
            index = siblings.index(link)
            size = _row_bytes(info)
            pieces.append(Piece(link.diffusers, sum(counts[:index]) * size, counts[index] * size))
            rows += counts[index]
        tail = first.shape[1:]
        if group[0].reshape:
            tail = (*tail, 1, 1)
        targets.append(Target(key, (rows, *tail) if first.shape else (), tuple(pieces)))
    return targets


class ConvertedCheckpoint(Checkpoint):
    """A checkpoint seen in another key dialect; reads are byte ranges of the source's."""

    def __init__(self, source: Checkpoint, targets: list[Target], dropped: list[str]):
        self.source = source
        self.targets = {t.key: t for t in targets}
        tensors = {}
        for target in targets:
            origin = source.tensors[target.transpose_of or target.pieces[0].key]
            nbytes = math.prod(target.shape) * origin.dtype.itemsize
            tensors[target.key] = TensorInfo(
                target.key, origin.dtype, target.shape, origin.file, -1, nbytes
            )
        super().__init__(source.path, tensors, source.files)
        self.notes = list(source.notes)
        if dropped:
            shown = ", ".join(dropped[:3]) + (" ..." if len(dropped) > 3 else "")
            self.notes.append(
                f"{count(len(dropped), 'key')} without a counterpart in the other layout: {shown}"
            )

    @property
    def metadata(self) -> dict[str, str]:
        return self.source.metadata

    def read_range(self, info: TensorInfo, start: int, out) -> None:
        target = self.targets[info.key]
        view = memoryview(out).cast("B")
        if target.transpose_of is not None:
            whole = self.source.read(self.source.tensors[target.transpose_of]).t().contiguous()
            view[:] = memoryview(tensor_bytes(whole))[start : start + len(view)]
            return
        stop, offset = start + len(view), 0
        for piece in target.pieces:  # each piece fills its overlap with [start, stop)
            begin, end = max(start, offset), min(stop, offset + piece.length)
            if begin < end:
                source = self.source.tensors[piece.key]
                chunk = view[begin - start : end - start]
                self.source.read_range(source, piece.start + begin - offset, chunk)
            offset += piece.length
            if offset >= stop:
                break

    def reads_cheaply(self, info: TensorInfo) -> bool:
        target = self.targets[info.key]
        if target.transpose_of is not None:
            return False  # the source tensor is read and transposed whole for each range
        return all(self.source.reads_cheaply(self.source.tensors[p.key]) for p in target.pieces)

    def fingerprint_parts(self):
        return self.source.fingerprint_parts()

    def close(self) -> None:
        self.source.close()


def converted(source: Checkpoint, targets: list[Target]) -> ConvertedCheckpoint:
    used = {p.key for t in targets for p in t.pieces} | {t.transpose_of for t in targets}
    dropped = sorted(k for k in source.tensors if k not in used)
    return ConvertedCheckpoint(source, targets, dropped)
