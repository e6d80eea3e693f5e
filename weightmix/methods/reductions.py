"""Dot products of whole tensors in float64 without a float64 copy of them, and combinations
of tensors: summed over slices of the engine's chunk size, so a method's extra memory stays
one slice, and a streamed method that sums chunk by chunk gets the very same numbers."""

from __future__ import annotations

import torch

from weightmix.methods.streaming import CHUNK, Gram


def gram(vectors: list[torch.Tensor]) -> list[list[float]]:
    """The matrix of dot products ⟨v_i, v_j⟩ of whole tensors: streaming.Gram fed one slice
    of every vector at a time, as the engine feeds a streamed method its chunks."""
    flat = [v.reshape(-1) for v in vectors]
    sums = Gram(len(flat))
    for start in range(0, flat[0].numel(), CHUNK):
        sums.add([v[start : start + CHUNK] for v in flat])
    return sums.matrix()


def combination(tensors: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """Σ c_i·t_i accumulated in float64, in the dtype of the first tensor."""
    total = tensors[0].double() * coefficients[0]
    for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
        total.add_(tensor.double(), alpha=coefficient)
    return total.to(tensors[0].dtype)
