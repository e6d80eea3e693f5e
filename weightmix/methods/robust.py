"""Averages that resist outliers and noise: model stock (how far to move from the base, from
the angle between the fine-tunes) and the geometric median (Weiszfeld)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from weightmix import kernels
from weightmix.methods.reductions import gram
from weightmix.methods.registry import (
    ANY,
    SAME,
    WEIGHT,
    Finite,
    Iterations,
    Positive,
    Tensor,
    merge_method,
)
from weightmix.methods.streaming import Gram, GramStreamer


def _mean_offset(tensors: list[Tensor], weights: list[float] | None = None) -> Tensor:
    """The (weighted) mean of `tensors` as first + Σ w_i·(t_i − first)/Σ w_i, so that equal
    tensors give the first one bit for bit."""
    first = tensors[0]
    weights = weights or [1.0] * len(tensors)
    total = sum(weights)
    offset = torch.zeros_like(first)
    for tensor, weight in zip(tensors[1:], weights[1:]):
        offset.add_(tensor - first, alpha=weight / total)
    return first + offset


def _check_stock(count: int, params: dict[str, Any]) -> str | None:
    if count < 3:
        return (
            "model_stock needs the base and at least two fine-tuned models (the angle between them)"
        )
    return None


class StockStreamer(GramStreamer):
    """model_stock over whole tensors in chunks: one pass sums the task vectors' Gram matrix
    (from the chunks as stored: the deltas are taken in the compute dtype), then the step."""

    takes_stored = True

    @classmethod
    def accepts(cls, params: dict[str, Any]) -> bool:
        return not params.get("filter_wise", False)

    def observe(self, inputs: Sequence[Tensor]) -> None:
        base, *models = inputs
        if self.gram is None:
            self.gram = Gram(len(models))
        self.gram.add_deltas(base, models, self.dtype)

    def apply_with(self, products: list[list[float]], inputs: Sequence[Tensor]) -> Tensor:
        base, *models = [x.to(self.dtype) for x in inputs]
        return _stock_step(base, models, _stock_factor(products))

    rounds = True

    def apply_rounded(self, inputs: Sequence[Tensor], out: Tensor) -> int | None:
        """_stock_step in one C pass, rounded into `out` (kernels.blend's 'stock' form: the
        same operations in the same order)."""
        if self.gram is None:
            return None
        factor = _stock_factor(self.gram.matrix())
        alpha = 1.0 / (len(inputs) - 1)  # _mean_offset's weight / total, equal weights
        coefficients = [alpha] if factor == 1 else [alpha, factor]
        return kernels.blend(inputs, coefficients, out, "stock")


def _stock_factor(products: list[list[float]]) -> float:
    """t = N·cos θ / (1 + (N−1)·cos θ) from the task vectors' Gram matrix, cos θ the mean
    pairwise cosine (each clamped to [−1, 1], norms below 1e-6 read as 1e-6); 0 where the
    denominator is 0."""
    count = len(products)
    norms = [products[i][i] ** 0.5 for i in range(count)]
    pairs = [
        max(-1.0, min(1.0, products[i][j] / max(norms[i] * norms[j], 1e-6)))
        for i in range(count)
        for j in range(i + 1, count)
    ]
    cos = sum(pairs) / len(pairs)
    denominator = 1 + (count - 1) * cos
    return 0.0 if denominator == 0 else count * cos / denominator


def _stock_step(base: Tensor, models: Sequence[Tensor], factor: float | Tensor) -> Tensor:
    """base + t·(mean − base), the mean taken as first + offsets (so equal models give it)."""
    mean = _mean_offset(list(models))
    if isinstance(factor, float):
        return mean if factor == 1 else base + (mean - base) * factor
    return base + (mean - base) * factor


@merge_method(
    inputs=WEIGHT, output=WEIGHT, min_inputs=3, check=_check_stock, streamer=StockStreamer
)
def model_stock(base: Tensor, *models: Tensor, filter_wise: bool = False) -> Tensor:
    """Model stock (Jang et al. 2024, arXiv:2403.19522): with cos θ the mean cosine over all
    pairs of task vectors M_i − base (the flattened tensor, or each row with filter_wise),
    t = N·cos θ / (1 + (N−1)·cos θ) and output t·mean(M_i) + (1−t)·base. t is not clamped (as
    mergekit); where 1 + (N−1)·cos θ is 0 the base is kept."""
    count = len(models)
    deltas = [m - base for m in models]
    if not filter_wise or base.dim() < 2:  # whole tensors, dot products in float64 by slices
        return _stock_step(base, models, _stock_factor(gram(deltas)))
    vectors = [d.reshape(d.shape[0], -1).double() for d in deltas]
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            norms = vectors[i].norm(dim=-1) * vectors[j].norm(dim=-1)
            products = (vectors[i] * vectors[j]).sum(-1)
            cosines.append((products / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0)  # one per row
    denominator = 1 + (count - 1) * cos
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    t = torch.where(denominator == 0, torch.zeros_like(cos), count * cos / safe)
    return _stock_step(base, models, t.reshape((-1,) + (1,) * (base.dim() - 1)).to(base.dtype))


def _check_median(count: int, params: dict[str, Any]) -> str | None:
    weights = params.get("weights")
    if weights is not None and len(weights) != count:
        return f"{len(weights)} weights given for {count} models: give one weight per model"
    if weights is not None and (min(weights) < 0 or sum(weights) == 0):
        return "weights must be at least 0 and not all 0 (they weigh each model's distance)"
    return None


class MedianStreamer(GramStreamer):
    """geometric_median in chunks: one pass sums the Gram matrix of the differences from the
    first model; Weiszfeld's iterations then run on N numbers, and the median is combined
    chunk by chunk."""

    def vectors(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        first, *others = inputs
        return [other - first for other in others]

    def apply_with(self, products: list[list[float]], inputs: Sequence[Tensor]) -> Tensor:
        p = self.params
        shares = weiszfeld(products, p["weights"], p["eps"], p["iterations"], p["tol"])
        return _mean_offset(list(inputs), shares)


def weiszfeld(
    products: list[list[float]],
    weights: list[float] | None,
    eps: float,
    iterations: int,
    tol: float,
) -> list[float]:
    """Weiszfeld's iteration on the points P_0 .. P_{N−1} given the Gram matrix H of
    D_j = P_j − P_0 (j ≥ 1): the median is P_0 + Σ b_j·D_j and ‖P_i − m‖² = (e_i − b)ᵀH(e_i − b),
    so each step is arithmetic on N numbers. Returns the median's weights β (normalised by
    _mean_offset)."""
    count = len(products) + 1
    w = torch.tensor(weights or [1.0] * count, dtype=torch.float64)
    h = torch.zeros(count, count, dtype=torch.float64)
    h[1:, 1:] = torch.tensor(products, dtype=torch.float64).reshape(count - 1, count - 1)
    eye = torch.eye(count, dtype=torch.float64)

    def distances(betas: torch.Tensor) -> torch.Tensor:
        offsets = eye - betas / betas.sum()  # row i: e_i − b over the D basis (D_0 = 0)
        return torch.einsum("ij,jk,ik->i", offsets, h, offsets).clamp(min=0).sqrt()

    betas = w
    objective = float((w * distances(betas)).sum())
    for _ in range(iterations):
        betas = w / distances(betas).clamp(min=eps)
        previous, objective = objective, float((w * distances(betas)).sum())
        if abs(previous - objective) <= tol * objective:
            break
    return betas.tolist()


@merge_method(inputs=ANY, output=SAME, min_inputs=2, check=_check_median, streamer=MedianStreamer)
def geometric_median(
    *models: Tensor,
    weights: list[Finite] | None = None,
    eps: Positive = 1e-6,
    iterations: Iterations = 100,
    tol: Positive = 1e-20,
) -> Tensor:
    """The geometric median of the models, each tensor one point (Weiszfeld 1937; as in
    sd-mecha): from the (weighted) mean m, repeat β_i = w_i / max(‖M_i − m‖, eps),
    m ← Σ β_i M_i / Σ β_i until the objective Σ w_i ‖M_i − m‖ changes by at most tol times
    itself, or `iterations` steps. Distances come from the Gram matrix of M_i − M_0 (float64),
    so the iterations cost no pass over the tensors. Identical models give that model bit for
    bit."""
    first = models[0]
    products = gram([m - first for m in models[1:]])
    return _mean_offset(list(models), weiszfeld(products, weights, eps, iterations, tol))
