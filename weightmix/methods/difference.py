"""supermerger's difference methods, as it defines them (hako-mikan/sd-webui-supermerger,
scripts/mergers/mergers.py)."""

from __future__ import annotations

from typing import Any

import torch

from weightmix.methods.registry import WEIGHT, Finite, Tensor, merge_method


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
