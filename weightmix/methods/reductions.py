"""Dot products and norms of whole tensors in float64 without a float64 copy of them: summed
over slices of the engine's chunk size, so a method's extra memory stays one slice, and a
streamed method that sums chunk by chunk gets the very same numbers (see streaming.py)."""

from __future__ import annotations

import torch

from weightmix.methods.streaming import CHUNK

SLICE = CHUNK


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a_i·b_i over the flattened tensors, accumulated in float64."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, flat_a.numel(), SLICE):
        part_a = flat_a[start : start + SLICE].double()
        part_b = flat_b[start : start + SLICE].double()
        total += float(torch.dot(part_a, part_b))
    return total


def norm(a: torch.Tensor) -> float:
    """‖a‖₂ over the flattened tensor, accumulated in float64."""
    return dot(a, a) ** 0.5


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖₂, accumulated in float64 slice by slice."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for start in range(0, flat_a.numel(), SLICE):
        part = flat_a[start : start + SLICE].double() - flat_b[start : start + SLICE].double()
        total += float(torch.dot(part, part))
    return total**0.5


def gram(vectors: list[torch.Tensor]) -> list[list[float]]:
    """The matrix of dot products ⟨v_i, v_j⟩ (each summed as dot() sums it)."""
    count = len(vectors)
    sums = {(i, j): dot(vectors[i], vectors[j]) for i in range(count) for j in range(i, count)}
    return [[sums[min(i, j), max(i, j)] for j in range(count)] for i in range(count)]


def combination(tensors: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """Σ c_i·t_i accumulated in float64, in the dtype of the first tensor."""
    total = tensors[0].double() * coefficients[0]
    for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
        total.add_(tensor.double(), alpha=coefficient)
    return total.to(tensors[0].dtype)
