"""Linear methods: weighted sums, add-difference and task-vector arithmetic."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from weightmix import kernels
from weightmix.methods.registry import (
    ANY,
    DELTA,
    SAME,
    WEIGHT,
    Finite,
    Fraction,
    Tensor,
    merge_method,
)


def linear_combination(
    tensors: Sequence[Tensor],
    coefficients: Sequence[float],
    dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Σ cᵢ·tᵢ. Terms with cᵢ = 0 are skipped, and a single term with c = 1 is returned
    as it is, so that e.g. alpha 0 reproduces the first model bit for bit.

    With `dtype` (wider than or equal to every tensor's) the tensors may be given as stored:
    each is widened inside the products, element by element, which gives exactly the result of
    widening them first (widening is exact) without a widened copy of each; `out` (of `dtype`
    and the tensors' size) then receives the sum, so that nothing is allocated per call."""
    terms = _terms(tensors, coefficients)
    if not terms:
        return (tensors[0] if dtype is None else tensors[0].to(dtype)) * 0.0
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    (first_c, first), *rest = terms
    if (dtype or first.dtype) == torch.float32:  # the same bits from one C loop, if built
        combined = kernels.combine([t for _, t in terms], [c for c, _ in terms], out)
        if combined is not None:
            return combined
    if dtype is None or first.dtype == dtype:
        result = torch.mul(first, first_c, out=out)
    else:  # a one-element tensor of `dtype` promotes (a 0-d one or a float would not)
        factor = torch.full((1,), first_c, dtype=dtype, device=first.device)
        result = torch.mul(first, factor, out=out)
    for c, tensor in rest:
        result.add_(tensor, alpha=c)
    return result


def _terms(tensors: Sequence[Tensor], coefficients: Sequence[float]) -> list[tuple[float, Tensor]]:
    """The (coefficient, tensor) pairs a linear combination adds: those with c ≠ 0."""
    return [(c, t) for c, t in zip(coefficients, tensors) if c != 0]


def weighted_sum_coefficients(
    count: int, alpha: float | None, weights: Sequence[float] | None, normalize: bool
) -> list[float]:
    """The coefficient of each model: [1−α, α] for two, else the (normalised) weights."""
    if alpha is not None:
        return [1.0 - alpha, alpha]
    chosen = list(weights) if weights is not None else [1.0] * count
    if normalize:
        total = sum(chosen)
        chosen = [w / total for w in chosen]
    return chosen


def _check_weighted_sum(count: int, params: dict[str, Any]) -> str | None:
    alpha, weights = params["alpha"], params["weights"]
    if alpha is not None and weights is not None:
        return "give alpha or weights, not both"
    if alpha is not None and count != 2:
        return f"alpha blends two models but {count} are given: use weights for N models"
    if weights is not None and len(weights) != count:
        return f"{len(weights)} weights given for {count} models: give one weight per model"
    if weights is not None and params["normalize"] and sum(weights) == 0:
        return "weights sum to 0 and cannot be normalised: set normalize: false or change them"
    if weights is not None and params["normalize"] and not math.isfinite(sum(weights)):
        return "weights are too large to add up (their sum overflows): scale them down"
    return None


def _weighted_sum_linear(count: int, params: dict[str, Any]) -> list[float]:
    return weighted_sum_coefficients(count, params["alpha"], params["weights"], params["normalize"])


def _fused_linear(linear):
    """The fused form of a method that is linear_combination(inputs, linear(count, params))."""

    def fused(tensors: Sequence[Tensor], params: dict[str, Any], dtype, out: Tensor) -> Tensor:
        return linear_combination(tensors, linear(len(tensors), params), dtype, out)

    return fused


def rounded_combination(
    tensors: Sequence[Tensor], coefficients: Sequence[float], out: Tensor
) -> int | None:
    """linear_combination(tensors, coefficients) in float32 rounded into `out` in one C loop
    (kernels.blend): how many inf/NaN values it wrote. None where linear_combination has
    nothing to add up (no term, or one with coefficient 1, returned as it is) or the loop
    does not take the tensors."""
    terms = _terms(tensors, coefficients)
    if not terms or (len(terms) == 1 and terms[0][0] == 1.0):
        return None
    return kernels.blend([t for _, t in terms], [c for c, _ in terms], out)


def _rounded_linear(linear):
    """The rounded form of such a method: rounded_combination of its coefficients."""

    def rounded(tensors: Sequence[Tensor], params: dict[str, Any], out: Tensor) -> int | None:
        return rounded_combination(tensors, linear(len(tensors), params), out)

    return rounded


def _add_linear(count: int, params: dict[str, Any]) -> list[float]:
    return [1.0] + [params["alpha"]] * (count - 1)


@merge_method(
    inputs=ANY,
    output=SAME,
    min_inputs=2,
    check=_check_weighted_sum,
    elementwise=True,
    linear=_weighted_sum_linear,
    fused=_fused_linear(_weighted_sum_linear),
    rounded=_rounded_linear(_weighted_sum_linear),
)
def weighted_sum(
    *models: Tensor,
    alpha: Fraction | None = None,
    weights: list[Finite] | None = None,
    normalize: bool = True,
) -> Tensor:
    """Blend models: (1−α)·A + α·B for two; Σ wᵢ·Mᵢ for N (weights normalised to sum 1 by
    default; equal weights when none are given)."""
    return linear_combination(
        models, weighted_sum_coefficients(len(models), alpha, weights, normalize)
    )


def _fused_add_difference(
    tensors: Sequence[Tensor], params: dict[str, Any], dtype: torch.dtype, out: Tensor
) -> Tensor:
    """add_difference on inputs as stored: out = B widened, out −= C (C widened on the fly),
    out = A + α·out (A widened on the fly): the operations of torch.add(A, B − C, alpha=α) on
    widened inputs, so the same bits, with one widening copy instead of three."""
    a, b, c = tensors
    if params["alpha"] == 0:
        return a
    out.copy_(b)
    out.sub_(c)
    return torch.add(a, out, alpha=params["alpha"], out=out)


def _rounded_add_difference(tensors: Sequence[Tensor], params: dict[str, Any], out: Tensor):
    """add_difference and its rounding into the output buffer in one C loop (kernels.blend:
    B − C, then A + α·that as one fused multiply-add, as torch.add computes it)."""
    if params["alpha"] == 0:
        return None  # A itself, as it is
    return kernels.blend(tensors, [params["alpha"]], out, "difference")


@merge_method(
    inputs=WEIGHT,
    output=WEIGHT,
    elementwise=True,
    fused=_fused_add_difference,
    rounded=_rounded_add_difference,
)
def add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: Finite = 1.0) -> Tensor:
    """A + α·(B − C): add what B learned relative to C onto A."""
    if alpha == 0:
        return a
    return torch.add(a, b - c, alpha=alpha)


@merge_method(inputs=WEIGHT, output=DELTA, elementwise=True)
def subtract(a: Tensor, b: Tensor) -> Tensor:
    """A − B: the task vector that turns B into A (a delta, not a model)."""
    return a - b


@merge_method(
    inputs=(WEIGHT, DELTA),
    output=WEIGHT,
    min_inputs=2,
    elementwise=True,
    linear=_add_linear,
    fused=_fused_linear(_add_linear),
    rounded=_rounded_linear(_add_linear),
)
def add(base: Tensor, *deltas: Tensor, alpha: Finite = 1.0) -> Tensor:
    """base + α·Σ deltas: apply task vectors (from subtract) to a model."""
    return linear_combination([base, *deltas], [1.0] + [alpha] * len(deltas))


@merge_method(inputs=ANY, output=SAME, elementwise=True)
def scale(x: Tensor, *, factor: Finite = 1.0) -> Tensor:
    """factor·X: a task vector (or a LoRA) at another strength; `factor` may vary by block
    (supermerger's LoRA block weights)."""
    return x * factor


@merge_method(inputs=ANY, output=SAME, elementwise=True)
def take(model: Tensor) -> Tensor:
    """One model's tensor, unchanged."""
    return model
