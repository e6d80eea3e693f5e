"""Interpolation on the sphere: slerp of two models, nuslerp (slerp with weights), multislerp
(N models, one tangent-space step) and the Karcher mean (N models, iterated). Each treats a
whole tensor as one vector (nuslerp can go row by row). With a base, merge task vectors:
add(base, multislerp(subtract(A, base), subtract(B, base))) — the merge spaces allow it.

References: Shoemake 1985 (slerp); Buss & Fillmore 2001 (spherical averages); Karcher 1977
(Riemannian centre of mass). Parameter names follow mergekit's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from weightmix.methods.arithmetic import linear_combination, rounded_combination
from weightmix.methods.reductions import combination, gram
from weightmix.methods.registry import (
    ANY,
    SAME,
    Finite,
    Fraction,
    Iterations,
    Positive,
    Tensor,
    merge_method,
)
from weightmix.methods.streaming import GramStreamer

COLINEAR = 0.9995  # |cos| above this: the vectors are (anti)parallel, slerp is lerp


def _lerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    return torch.lerp(a, b, t) if a.dtype == b.dtype else a * (1 - t) + b * t


def slerp_vectors(a: Tensor, b: Tensor, t: float, threshold: float = COLINEAR) -> Tensor:
    """sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b with cos Ω = ⟨a, b⟩/(‖a‖‖b‖) over the whole
    tensors (the raw vectors, not their unit versions); linear when |cos Ω| > threshold or a
    vector is 0. Endpoints exact: t = 0 gives a, t = 1 gives b."""
    if t in (0, 1):
        return a if t == 0 else b
    products = gram([a, b])
    scales = slerp_scales(products[0][1], products[0][0], products[1][1], t, threshold)
    return _slerp_with(a, b, t, scales)


def slerp_scales(
    ab: float, aa: float, bb: float, t: float, threshold: float = COLINEAR
) -> tuple[float, float] | None:
    """slerp's two factors from the dot products ⟨a, b⟩, ⟨a, a⟩, ⟨b, b⟩; None for lerp."""
    norms = aa**0.5 * bb**0.5
    if norms == 0:
        return None
    cos = ab / norms
    if not math.isfinite(cos) or abs(cos) > threshold:  # non-finite inputs: lerp's result
        return None
    omega = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def _slerp_with(
    a: Tensor,
    b: Tensor,
    t: float,
    scales: tuple[float, float] | None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """s₀·a + s₁·b (lerp without scales), in `dtype` when a and b come as stored (each
    widened inside the products: the same bits as widening them first)."""
    if scales is None:
        return _lerp(a, b, t) if dtype is None else _lerp(a.to(dtype), b.to(dtype), t)
    return linear_combination([a, b], list(scales), dtype)


class SlerpStreamer(GramStreamer):
    """slerp and nuslerp over flattened tensors in chunks: one pass sums the dot products
    (float64 products of the chunks as stored), then a linear combination of them."""

    takes_stored = True

    @classmethod
    def accepts(cls, params: dict[str, Any]) -> bool:
        return params.get("nuslerp_flatten", True)

    def needs_statistics(self) -> bool:
        return self.t() not in (0, 1)

    def t(self) -> float:
        if "t" in self.params:
            return self.params["t"]
        return _nuslerp_t(self.params["weights"])

    def apply_with(self, gram: list[list[float]], inputs: Sequence[Tensor]) -> Tensor:
        a, b = inputs
        t = self.t()
        if t in (0, 1):
            return a if t == 0 else b
        scales = slerp_scales(gram[0][1], gram[0][0], gram[1][1], t)
        return _slerp_with(a, b, t, scales, self.dtype)

    rounds = True

    def apply_rounded(self, inputs: Sequence[Tensor], out: Tensor) -> int | None:
        """The slerp sum rounded into `out` in one C pass; endpoints and lerp are left to
        apply()."""
        t = self.t()
        if t in (0, 1) or self.gram is None:
            return None
        gram = self.gram.matrix()
        scales = slerp_scales(gram[0][1], gram[0][0], gram[1][1], t)
        return None if scales is None else rounded_combination(inputs, list(scales), out)


def _check_two(count: int, params: dict[str, Any]) -> str | None:
    if count != 2:
        return f"it blends two models but {count} are given: use multislerp for N models"
    return _check_nuslerp(count, params) if "weights" in params else None


@merge_method(inputs=ANY, output=SAME, min_inputs=2, check=_check_two, streamer=SlerpStreamer)
def slerp(*models: Tensor, t: Fraction = 0.5) -> Tensor:
    """Spherical linear interpolation of two models (Shoemake 1985), each tensor flattened:
    sin((1−t)Ω)/sin Ω·A + sin(tΩ)/sin Ω·B, cos Ω = ⟨A, B⟩/(‖A‖‖B‖); lerp when |cos Ω| >
    0.9995. t = 0 gives A and t = 1 gives B bit for bit."""
    a, b = models
    return slerp_vectors(a, b, t)


def _nuslerp_t(weights: list[float] | None) -> float:
    w_a, w_b = weights or (1.0, 1.0)
    return 0.5 if abs(w_a + w_b) < 1e-6 else w_b / (w_a + w_b)


def _check_nuslerp(count: int, params: dict[str, Any]) -> str | None:
    weights = params["weights"]
    if weights is not None and len(weights) != 2:
        return f"{len(weights)} weights given for 2 models: give two"
    t = _nuslerp_t(weights)
    if not 0 <= t <= 1:
        return (
            f"weights {weights} give t = w_B/(w_A + w_B) = {t:g}, outside 0..1 (slerp does not"
            " extrapolate): give weights of the same sign"
        )
    return None


@merge_method(inputs=ANY, output=SAME, min_inputs=2, check=_check_two, streamer=SlerpStreamer)
def nuslerp(
    *models: Tensor,
    weights: list[Finite] | None = None,
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> Tensor:
    """Slerp with t = w_B/(w_A + w_B) (0.5 when the weights sum to 0), over the flattened
    tensors, or (nuslerp_flatten: false) vector by vector along the last dim, or along dim 0
    with nuslerp_row_wise; per-vector colinear pairs are interpolated linearly."""
    a, b = models
    t = _nuslerp_t(weights)
    if nuslerp_flatten or a.dim() < 2:
        return slerp_vectors(a, b, t)
    if t in (0, 1):
        return a if t == 0 else b
    dim = 0 if nuslerp_row_wise else -1
    va, vb = a.movedim(dim, -1).double(), b.movedim(dim, -1).double()
    norms = va.norm(dim=-1, keepdim=True) * vb.norm(dim=-1, keepdim=True)
    cos = ((va * vb).sum(-1, keepdim=True) / norms.clamp(min=1e-300)).clamp(-1, 1)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    spherical = (torch.sin((1 - t) * omega) * va + torch.sin(t * omega) * vb) / sin.clamp(
        min=1e-300
    )
    linear = va * (1 - t) + vb * t
    flat = (cos.abs() > COLINEAR) | (norms == 0)
    return torch.where(flat, linear, spherical).movedim(-1, dim).to(a.dtype)


def _check_weights(count: int, params: dict[str, Any]) -> str | None:
    weights = params.get("weights")
    if weights is not None and len(weights) != count:
        return f"{len(weights)} weights given for {count} models: give one weight per model"
    if weights is not None and sum(weights) == 0 and params.get("normalize_weights", True):
        return "weights sum to 0 and cannot be normalised: change them"
    return None


def _matrix(products: list[list[float]]) -> Tensor:
    return torch.tensor(products, dtype=torch.float64).reshape(len(products), len(products))


def _length(coefficients: Tensor, g: Tensor) -> float:
    """‖Σ c_i·M_i‖ from the Gram matrix g of the M_i."""
    return float((coefficients @ g @ coefficients).clamp(min=0).sqrt())


def multislerp_coefficients(
    products: list[list[float]], weights: list[float] | None, normalize: bool, eps: float
) -> list[float]:
    """multislerp's result as Σ γ_i·M_i: every vector involved lies in the span of the
    models, so the steps run on N coefficients with the Gram matrix g of the models (float64):
    u_i = M_i/(‖M_i‖ + eps), μ = Σ w_i u_i normalised, τ = Σ w_i (u_i − ⟨u_i, μ⟩μ), result
    (Σ w_i ‖M_i‖)·(cos‖τ‖·μ + sin‖τ‖·τ/‖τ‖); the plain weighted sum when ‖Σ w_i u_i‖ < eps."""
    g = _matrix(products)
    count = g.shape[0]
    w = torch.tensor(weights or [1.0] * count, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = g.diagonal().clamp(min=0).sqrt()
    inverse = 1 / (norms + eps)
    mean = w * inverse
    mean_norm = _length(mean, g)
    if mean_norm < eps:  # opposite vectors: no direction to average
        return w.tolist()
    mean = mean / mean_norm
    projections = inverse * (g @ mean)  # ⟨u_i, μ⟩
    step = w * inverse - (w * projections).sum() * mean
    length = _length(step, g)
    direction = (
        mean if length < eps else mean * math.cos(length) + step * (math.sin(length) / length)
    )
    return (direction * (norms * w).sum()).tolist()


class GramOfInputs(GramStreamer):
    """A method whose statistic is the Gram matrix of its inputs and whose result is a
    combination of them: `coefficients(products)` says which."""

    def coefficients(self, products: list[list[float]]) -> list[float]:
        raise NotImplementedError

    def apply_with(self, products: list[list[float]], inputs: Sequence[Tensor]) -> Tensor:
        return combination(list(inputs), self.coefficients(products))


class MultislerpStreamer(GramOfInputs):
    def coefficients(self, products: list[list[float]]) -> list[float]:
        p = self.params
        return multislerp_coefficients(products, p["weights"], p["normalize_weights"], p["eps"])


@merge_method(
    inputs=ANY, output=SAME, min_inputs=2, check=_check_weights, streamer=MultislerpStreamer
)
def multislerp(
    *models: Tensor,
    weights: list[Finite] | None = None,
    normalize_weights: bool = True,
    eps: Positive = 1e-8,
) -> Tensor:
    """Barycentric interpolation on the sphere in one tangent-space step (Buss & Fillmore
    2001): u_i = M_i/‖M_i‖, μ = normalised Σ w_i u_i, τ = Σ w_i (u_i − ⟨u_i, μ⟩μ), result =
    (Σ w_i ‖M_i‖)·(cos‖τ‖·μ + sin‖τ‖·τ/‖τ‖); weights normalised to sum 1 by default."""
    products = gram(list(models))
    return combination(
        list(models), multislerp_coefficients(products, weights, normalize_weights, eps)
    )


def karcher_coefficients(
    products: list[list[float]], weights: list[float] | None, max_iter: int, tol: float
) -> list[float]:
    """The Karcher mean as Σ γ_i·M_i, iterated on N coefficients with the Gram matrix of the
    models (float64): u stays in the span of the unit vectors u_i = M_i/‖M_i‖."""
    g = _matrix(products)
    count = g.shape[0]
    w = torch.tensor(weights or [1.0] * count, dtype=torch.float64)
    w = w / w.sum()
    norms = g.diagonal().clamp(min=0).sqrt()
    scale = float((norms * w).sum())
    valid = norms > tol
    if not bool(valid.any()):
        return [0.0] * count
    inverse = torch.where(valid, 1 / torch.where(valid, norms, 1), 0)  # u_i = M_i·inverse_i
    alphas = torch.where(valid, w, 0) / w[valid].sum()
    u = alphas * inverse
    length = _length(u, g)
    if length > tol:
        u = u / length
    else:
        u = torch.zeros_like(u)
        first = int(valid.nonzero()[0])
        u[first] = inverse[first]
    for _ in range(max_iter):
        cos = (inverse * (g @ u)).clamp(-1, 1)  # ⟨u_i, u⟩
        theta = torch.acos(cos)
        factor = torch.where((theta > tol) & valid, theta / torch.sin(theta).clamp(min=1e-300), 0)
        weighted = alphas * factor
        step = weighted * inverse - (weighted * cos).sum() * u
        length = _length(step, g)
        if length < tol:
            break
        u = math.cos(length) * u + math.sin(length) * step / length
        u = u / _length(u, g)
    return (u * scale).tolist()


class KarcherStreamer(GramOfInputs):
    def coefficients(self, products: list[list[float]]) -> list[float]:
        p = self.params
        return karcher_coefficients(products, p["weights"], p["max_iter"], p["tol"])


@merge_method(inputs=ANY, output=SAME, min_inputs=2, check=_check_weights, streamer=KarcherStreamer)
def karcher(
    *models: Tensor,
    weights: list[Finite] | None = None,
    max_iter: Iterations = 10,
    tol: Positive = 1e-5,
) -> Tensor:
    """Karcher (Riemannian) mean on the unit sphere (Karcher 1977), each tensor one vector:
    from the normalised weighted mean of the unit vectors u_i, repeat u ← exp_u(Σ w_i log_u(u_i))
    (log_u(v) = θ/sin θ·(v − cos θ·u), θ = arccos⟨u, v⟩) until the step is below tol or max_iter
    steps; the result is u scaled by Σ w_i ‖M_i‖. Weights equal by default (mergekit has none).
    The iterations run on N coefficients with the models' Gram matrix (float64)."""
    products = gram(list(models))
    return combination(list(models), karcher_coefficients(products, weights, max_iter, tol))
