"""Casting results to the output dtype: round to nearest (torch's cast), or stochastic
rounding that is unbiased (E[round(x)] = x) and reproducible.

The random numbers are counter-based: element i of key k always gets the same uniform number
for a given seed, however the engine splits the work into chunks or threads.
"""

from __future__ import annotations

import hashlib

import torch

ROUNDINGS = ("nearest", "stochastic")
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
_PATTERN = {1: torch.uint8, 2: torch.int16}  # integer views of 8- and 16-bit floats


def key_stream(seed: int, key: str) -> int:
    """A stable signed 64-bit stream id for one key (sha256, not Python's randomised hash)."""
    digest = hashlib.sha256(f"weightmix:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def _shift_right(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def uniform(
    stream: int, start: int, count: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """count uniform float32 numbers in [0, 1) for elements start..start+count of a stream:
    splitmix64 of (stream + index * golden ratio), top 24 bits (exact in float32)."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    z = index * _GOLDEN + stream  # int64 arithmetic wraps, as splitmix64 needs
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).to(torch.float32) * (1.0 / (1 << 24))


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
