"""Casting results to the output dtype: round to nearest (torch's cast), or stochastic
rounding that is unbiased (E[round(x)] = x) and reproducible.

The random numbers are counter-based: element i of key k always gets the same uniform number
for a given seed, however the engine splits the work into chunks or threads (a seeded
generator per block of 65,536 elements: the block's index is part of the seed).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from weightmix import kernels

ROUNDINGS = ("nearest", "stochastic")
_PATTERN = {1: torch.uint8, 2: torch.int16}
_GOLDEN_INT = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1  # integer views of 8- and 16-bit floats


def key_stream(seed: int, key: str) -> int:
    """A stable signed 64-bit stream id for one key (sha256, not Python's randomised hash)."""
    digest = hashlib.sha256(f"weightmix:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


BLOCK = 1 << 16  # elements per seeded block of random numbers


def uniform(
    stream: int, start: int, count: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """count uniform float32 numbers in [0, 1) for elements start..start+count of a stream.
    Element i takes number i mod 2^16 of block i // 2^16: a block's numbers are the 32-bit
    halves (low half first) of the 64-bit outputs of numpy's PCG64DXSM seeded with
    SeedSequence([stream mod 2^64, block]), each keeping its top 24 bits (exact in float32).
    Counter-based by block, so any split of the work draws the same numbers."""
    numbers = torch.empty(count, dtype=torch.float32)
    if kernels.stream_uniform(numbers, stream & _MASK, start):
        return _to(numbers, device)
    position, end = start, start + count
    while position < end:
        block, offset = divmod(position, BLOCK)
        stop = min(end, (block + 1) * BLOCK)
        used = stop - block * BLOCK  # numbers of the block up to `stop`
        seed = np.random.SeedSequence([stream & _MASK, block])
        raw = np.random.PCG64DXSM(seed).random_raw((used + 1) // 2)
        halves = torch.from_numpy(raw.view(np.int32))[offset:used]
        numbers[position - start : stop - start].copy_((halves >> 8) & 0xFFFFFF)
        position = stop
    numbers.mul_(1.0 / (1 << 24))
    return _to(numbers, device)


def _to(numbers: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The numbers on `device`; to a GPU through page-locked memory and without waiting, so
    a worker's CUDA stream keeps its queued work (device_chunks.py) while they travel."""
    if torch.device(device).type != "cuda":
        return numbers.to(device)
    return numbers.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Draw:
    """Seeded uniform numbers for elements [start, start + n) of one key: the same numbers
    for the same (seed, key, salt, element index), however the engine splits the work."""

    stream: int  # key_stream(seed, key)
    start: int = 0  # index of the first element at hand in the whole tensor

    def salted(self, label: str) -> Draw:
        """The draw of one method call in the merge tree (its label), independent of others."""
        salt = int.from_bytes(hashlib.sha256(label.encode()).digest()[:8], "little", signed=True)
        return Draw(_mix(self.stream, salt), self.start)

    def uniform(self, shape: torch.Size | tuple[int, ...], salt: int, device=None) -> torch.Tensor:
        """Uniform numbers in [0, 1) shaped `shape`, element by flat index; `salt` tells apart
        the draws of one call (one per model)."""
        count = math.prod(shape)
        return uniform(_mix(self.stream, salt + 1), self.start, count, device or "cpu").reshape(
            shape
        )


def _mix(stream: int, salt: int) -> int:
    """A new stream from two (splitmix64's finaliser over their sum), as a signed int64."""
    z = (stream + salt * _GOLDEN_INT) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


def stochastic_round(values: torch.Tensor, dtype: torch.dtype, noise: torch.Tensor) -> torch.Tensor:
    """Round `values` to `dtype` (8 or 16 bits): to one of its two neighbours in `dtype`, the
    upper one with probability proportional to closeness. Values beyond the dtype's largest
    finite value, ±inf and NaN are cast as round-to-nearest casts them (torch's cast: inf for
    fp16, bf16 and fp8_e5m2; ±448 for fp8_e4m3fn, which has no infinity), so the two roundings
    differ only between representable values."""
    limit = torch.finfo(dtype).max
    values = values.float()
    pattern_dtype = _PATTERN[torch.finfo(dtype).bits // 8]
    inside = values.abs() <= limit  # False for NaN and out-of-range values
    clamped = values.clamp(-limit, limit)
    nearest = clamped.to(dtype)
    pattern = nearest.view(pattern_dtype).to(torch.int32)
    near = nearest.float()
    # the other neighbour: one step of the bit pattern away from or toward zero (sign-magnitude)
    away = clamped.abs() > near.abs()
    other_pattern = torch.where(away, pattern + 1, pattern - 1)
    other_pattern = torch.where(clamped == near, pattern, other_pattern)
    other = other_pattern.to(pattern_dtype).view(dtype).float()
    gap = other - near
    chance = torch.where(gap != 0, (clamped - near) / gap, torch.zeros_like(clamped))
    chosen = torch.where(noise < chance, other_pattern, pattern)
    as_nearest = values.to(dtype).view(pattern_dtype).to(torch.int32)
    return torch.where(inside, chosen, as_nearest).to(pattern_dtype).view(dtype)
