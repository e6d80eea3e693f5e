"""supermerger's difference methods, as it defines them (hako-mikan/sd-webui-supermerger,
scripts/mergers/mergers.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from weightmix.methods.reductions import gram
from weightmix.methods.registry import WEIGHT, Finite, Tensor, merge_method
from weightmix.methods.streaming import ModelStatistic


@merge_method(inputs=WEIGHT, output=WEIGHT, elementwise=True)
def train_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: Finite = 1.0) -> Tensor:
    """supermerger's Train Difference: A + 1.8·α·(B − C)·|B − A| / (|B − C| + |B − A|), the
    fraction 0 where both distances are 0: B − C is added where B moved away from A."""
    if alpha == 0:
        return a
    away = (b - a).abs()
    total = (b - c).abs() + away
    share = torch.where(total != 0, away / torch.where(total != 0, total, 1), 0)
    return a + (b - c) * share * (1.8 * alpha)


def _ndimage():
    """scipy.ndimage, or None when the 'methods' extra is not installed."""
    try:
        from scipy import ndimage
    except ImportError:
        return None
    return ndimage


def _check_scipy(count: int, params: dict[str, Any]) -> str | None:
    if _ndimage() is None:
        return "needs scipy: install the extra with pip install 'weightmix[methods]'"
    return None


@merge_method(inputs=WEIGHT, output=WEIGHT, check=_check_scipy)
def smooth_add_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: Finite = 1.0) -> Tensor:
    """supermerger's Smooth Add Difference: A + α·G(M(B − C)), M a 3-wide median filter and G
    a Gaussian filter with σ = 1 (radius 4), both over every axis of the tensor with reflected
    edges (scipy.ndimage, as supermerger calls it)."""
    if alpha == 0:
        return a
    ndimage = _ndimage()
    difference = (b - c).detach().to("cpu", torch.float32).numpy()
    smoothed = ndimage.gaussian_filter(ndimage.median_filter(difference, size=3), sigma=1)
    return a + torch.from_numpy(smoothed).to(a.device, a.dtype) * alpha


def column_similarity(a: Tensor, b: Tensor) -> Tensor:
    """The cosine of each column, along dim 0 (shape[1:]; a scalar for a vector), with
    torch's cosine_similarity (eps 1e-8), as supermerger computes it."""
    a, b = (t.reshape(1) if t.dim() == 0 else t for t in (a, b))
    return torch.nn.functional.cosine_similarity(a, b, dim=0)


def whole_similarity(a: Tensor, b: Tensor) -> float:
    """⟨A, B⟩/(‖A‖‖B‖) over the flattened tensors; 0 where a tensor is all zeros (the norm
    product taken as at least 1e-8, as cosine_similarity does; supermerger gives NaN). The
    products are summed in float64 in a fixed order (reductions.gram): the same bits on every
    run and thread, where BLAS's dot from the engine's worker threads was not."""
    (aa, ab), (_, bb) = gram([a, b])
    return ab / max(math.sqrt(max(aa, 0.0)) * math.sqrt(max(bb, 0.0)), 1e-8)


def _unit_columns(tensor: Tensor) -> Tensor:
    """Each column divided by its 2-norm (at least 1e-12), torch's normalize along dim 0."""
    tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor
    return torch.nn.functional.normalize(tensor, p=2.0, dim=0)


def _combined(a: Tensor, b: Tensor) -> Tensor:
    return (column_similarity(a, b) + whole_similarity(a, b)) / 2.0


class SimilarityRange(ModelStatistic):
    """supermerger's range of similarities for Add Cosine A/B: every similarity of every key
    the call merges except VAE keys, NaNs dropped, values below the 1st percentile removed,
    then values above the 99th percentile of the rest (numpy, method 'midpoint'); (smallest,
    largest) of what remains. Cosine A lists the column cosines of the column-normalised
    tensors, cosine B the combined similarity (column + whole) / 2. VAE keys get None: the
    method keeps A there, as supermerger does."""

    combined = False

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        self.values: list[np.ndarray] = []
        self.span = (0.0, 0.0)

    @staticmethod
    def is_vae(key: str, component: str | None) -> bool:
        return component == "vae" or key.startswith("first_stage_model.")

    def add(self, key: str, component: str | None, inputs: Sequence[Tensor]) -> None:
        if self.is_vae(key, component):
            return
        a, b = (t.float() for t in inputs)
        if self.combined:
            similarity = _combined(a, b)
        else:
            similarity = column_similarity(_unit_columns(a), _unit_columns(b))
        self.values.append(similarity.reshape(-1).double().cpu().numpy())

    def finish(self) -> None:
        sims = np.concatenate(self.values) if self.values else np.zeros(0)
        self.values = []
        sims = sims[~np.isnan(sims)]
        if sims.size == 0:
            return
        sims = np.delete(sims, np.where(sims < np.percentile(sims, 1, method="midpoint")))
        sims = np.delete(sims, np.where(sims > np.percentile(sims, 99, method="midpoint")))
        self.span = (float(sims.min()), float(sims.max()))

    def for_key(self, key: str, component: str | None) -> tuple[float, float] | None:
        return None if self.is_vae(key, component) else self.span


class CombinedSimilarityRange(SimilarityRange):
    combined = True


def _cosine_blend(
    a: Tensor, b: Tensor, similarity: Tensor, shift: float, span: tuple[float, float]
) -> Tensor:
    """k = clip((s − S_min)/(S_max − S_min) − shift, 0, 1) per column; k·A + (1 − k)·B. A
    range of width 0 (every similarity equal) reads as similarity 1."""
    low, high = span
    flat = high <= low
    normalised = torch.ones_like(similarity) if flat else (similarity - low) / (high - low)
    k = (normalised - shift).clip(min=0, max=1.0).to(a.dtype)
    return torch.lerp(b, a, k) if a.dim() > 0 else torch.lerp(b, a, k.reshape(()))


@merge_method(inputs=WEIGHT, output=WEIGHT, model_statistic=SimilarityRange)
def add_cosine_a(
    a: Tensor, b: Tensor, *, alpha: Finite = 0.0, statistic: tuple[float, float] | None
) -> Tensor:
    """supermerger's Add Cosine A (weight-sum mode): per column (dim 0) s = (cos_col(Â, B̂) +
    ⟨Â, B̂⟩/(‖Â‖‖B̂‖))/2 with Â, B̂ the tensors with unit columns; k = clip((s − S_min)/
    (S_max − S_min) − |α|, 0, 1); result k·A + (1 − k)·B. S_min, S_max: the range of the
    column cosines of every key merged (1st-99th percentile, VAE left out): the more alike a
    column is, the more of A it keeps. VAE keys stay A."""
    if statistic is None:  # a VAE key: kept as A
        return a
    unit_a, unit_b = _unit_columns(a.float()), _unit_columns(b.float())
    similarity = _combined(unit_a, unit_b)
    return _cosine_blend(a, b, similarity, abs(alpha), statistic)


@merge_method(inputs=WEIGHT, output=WEIGHT, model_statistic=CombinedSimilarityRange)
def add_cosine_b(
    a: Tensor, b: Tensor, *, alpha: Finite = 0.0, statistic: tuple[float, float] | None
) -> Tensor:
    """supermerger's Add Cosine B (weight-sum mode): per column (dim 0) s = (cos_col(A, B) +
    ⟨A, B⟩/(‖A‖‖B‖))/2; k = clip((s − S_min)/(S_max − S_min) − α, 0, 1); result k·A +
    (1 − k)·B. S_min, S_max: the range of s over every key merged (1st-99th percentile, VAE
    left out). VAE keys stay A."""
    if statistic is None:  # a VAE key: kept as A
        return a
    similarity = _combined(a.float(), b.float())
    return _cosine_blend(a, b, similarity, alpha, statistic)
