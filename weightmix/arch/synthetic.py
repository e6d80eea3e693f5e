"""Random checkpoints with real key names and shapes, for demos, tests and benchmarks.

Written through the streaming writer, so even full-size (7 GB) files need little memory.
Values are seeded per key: the same (seed, key) always gives the same tensor.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from weightmix.arch import KeySpec, architecture_keys, scaled_shape
from weightmix.io import OutputTensor, open_output
from weightmix.io.dtypes import SAFETENSORS_DTYPES, DType


def key_seed(seed: int, key: str) -> int:
    """A stable 63-bit seed for one key, independent of Python's randomised hash()."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def synthetic_tensor(key: str, shape: tuple[int, ...], dtype: DType, seed: int) -> torch.Tensor:
    """Float keys: N(0, 0.02²) noise; integer keys: 0, 1, 2 ... (like position_ids)."""
    if not dtype.is_float:
        count = max(1, torch.Size(shape).numel())
        return torch.arange(count, dtype=torch.int64).reshape(shape).to(dtype.torch)
    generator = torch.Generator().manual_seed(key_seed(seed, key))
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype.torch)


def write_synthetic(
    path: str | Path,
    architecture: str,
    seed: int,
    float_dtype: str = "F16",
    divisor: int = 1,
    components: tuple[str, ...] | None = None,
) -> list[KeySpec]:
    """Write a random checkpoint of `architecture` to `path`, float keys in `float_dtype`,
    every dimension divided by `divisor`. Returns the keys written."""
    # optional integer keys (position_ids) are in most real files; optional float keys (EMA) not
    specs = [
        s
        for s in architecture_keys(architecture, components, optional=True)
        if not s.optional or not SAFETENSORS_DTYPES[s.dtype].is_float
    ]
    dtypes = {
        s.key: SAFETENSORS_DTYPES[float_dtype]
        if SAFETENSORS_DTYPES[s.dtype].is_float
        else SAFETENSORS_DTYPES[s.dtype]
        for s in specs
    }
    shapes = {s.key: scaled_shape(s.shape, divisor) for s in specs}
    layout = [OutputTensor(s.key, dtypes[s.key], shapes[s.key]) for s in specs]
    layout.sort(key=lambda t: (-t.dtype.itemsize, t.key))
    metadata = {"weightmix.synthetic": f"{architecture} seed={seed} divisor={divisor}"}
    output = open_output(Path(path), layout, metadata)
    try:
        for tensor in layout:
            output.write(tensor.key, synthetic_tensor(tensor.key, tensor.shape, tensor.dtype, seed))
        output.commit()
    except BaseException:
        output.abort()
        raise
    return specs
