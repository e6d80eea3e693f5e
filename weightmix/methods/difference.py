"""supermerger's difference methods, as it defines them (hako-mikan/sd-webui-supermerger,
scripts/mergers/mergers.py)."""

from __future__ import annotations

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
