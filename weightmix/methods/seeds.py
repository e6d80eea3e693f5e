"""The community scripts' methods (../shared/seeds), as their code computes them, with stable
seeds: LosslessMix and MaxDiff (seed 002) and the "quantum" spectral blend (seed 000)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator, Field

from weightmix.methods.prompted import EncodedPrompt, PromptText
from weightmix.methods.registry import WEIGHT, Finite, Fraction, Tensor, merge_method
from weightmix.methods.streaming import ModelStatistic
from weightmix.recipe import not_a_bool
from weightmix.rounding import Draw

Rows = Annotated[int, BeforeValidator(not_a_bool), Field(ge=1)]


def _distances(a: Tensor, b: Tensor, c: Tensor, alpha: float, beta: float) -> tuple[Tensor, Tensor]:
    return (a - b * alpha).abs(), (a - c * beta).abs()


def _nearer_census(inputs: Sequence[Tensor], params: dict[str, Any]) -> list[int]:
    """Elements lossless takes from a, b, c: c where d_b > d_c, else b."""
    d_b, d_c = _distances(*inputs, params["alpha"], params["beta"])
    from_c = int((d_b > d_c).sum())
    return [0, d_b.numel() - from_c, from_c]


def _farther_census(inputs: Sequence[Tensor], params: dict[str, Any]) -> list[int]:
    """Elements maxdiff takes from a, b, c: b where d_b > d_c, else c."""
    _, from_b, from_c = _nearer_census(inputs, params)
    return [0, from_c, from_b]


@merge_method(inputs=WEIGHT, output=WEIGHT, elementwise=True, census=_nearer_census)
def lossless(a: Tensor, b: Tensor, c: Tensor, *, alpha: Finite = 1.0, beta: Finite = 1.0) -> Tensor:
    """LosslessMix (seed 002): per element, d_b = |a − α·b| and d_c = |a − β·c|; c where
    d_b > d_c, else b (ties to b): the element of b or c nearer to a. α and β only steer the
    choice: the value written is b's or c's, unscaled."""
    d_b, d_c = _distances(a, b, c, alpha, beta)
    return torch.where(d_b > d_c, c, b)


@merge_method(inputs=WEIGHT, output=WEIGHT, elementwise=True, census=_farther_census)
def maxdiff(a: Tensor, b: Tensor, c: Tensor, *, alpha: Finite = 1.0, beta: Finite = 1.0) -> Tensor:
    """MaxDiff (seed 002): the reverse of lossless: b where d_b > d_c, else c (ties to c),
    with d_b = |a − α·b|, d_c = |a − β·c|: the element of b or c farther from a."""
    d_b, d_c = _distances(a, b, c, alpha, beta)
    return torch.where(d_b > d_c, b, c)


class WeightKeys(ModelStatistic):
    """The spectral blend's routing, from key names (read from no tensor): keys whose name
    contains 'weight' go through the filter (when they have two or more dimensions)."""

    reads_tensors = False

    def add(self, key: str, component: str | None, inputs: Sequence[Tensor]) -> None:
        raise RuntimeError("WeightKeys reads no tensors")

    def for_key(self, key: str, component: str | None) -> bool:
        return "weight" in key


def frequency_coefficients(coefficients: float | list[float], count: int) -> Tensor:
    """c per frequency (rfft bin): a number for all, or a list resampled linearly over the
    bins (its first value at the lowest frequency, its last at the highest)."""
    if isinstance(coefficients, (int, float)):
        return torch.full((count,), float(coefficients), dtype=torch.float64)
    values = torch.tensor(coefficients, dtype=torch.float64)
    if len(values) == 1 or count == 1:
        return values[:1].expand(count).clone()
    where = torch.linspace(0, len(values) - 1, count, dtype=torch.float64)
    low = where.floor().long().clamp(max=len(values) - 2)
    return torch.lerp(values[low], values[low + 1], where - low)


def spectral_filter(
    difference: Tensor, coefficients: Tensor, variant: Literal["gumgum", "class"]
) -> Tensor:
    """irfft(K ⊙ rfft(D)) along the last axis: gumgum scales the real part by σ(5c) − ½ and
    the imaginary part by σ(3c − 1) − ½; class multiplies the spectrum by c − ½."""
    spectrum = torch.fft.rfft(difference.double(), dim=-1)
    if variant == "gumgum":
        real = spectrum.real * (torch.sigmoid(5 * coefficients) - 0.5)
        imaginary = spectrum.imag * (torch.sigmoid(3 * coefficients - 1) - 0.5)
        spectrum = torch.complex(real, imaginary)
    else:
        spectrum = spectrum * (coefficients - 0.5)
    return torch.fft.irfft(spectrum, n=difference.shape[-1], dim=-1)


def _check_coefficients(count: int, params: dict[str, Any]) -> str | None:
    coefficients = params.get("coefficients")
    if isinstance(coefficients, list) and not coefficients:
        return "coefficients is an empty list: give a number or at least one value"
    return None


@merge_method(inputs=WEIGHT, output=WEIGHT, model_statistic=WeightKeys, check=_check_coefficients)
def spectral(
    a: Tensor,
    b: Tensor,
    *,
    entanglement: Fraction = 0.75,
    decoherence: Fraction = 0.15,
    coefficients: Finite | list[Finite] = 0.0,
    prompt_coefficients: PromptText | None = None,
    variant: Literal["gumgum", "class"] = "gumgum",
    chunk_size: Rows = 1024,
    draw: Draw,
    statistic: bool | None,
) -> Tensor:
    """The "quantum" spectral blend (seed 000), as its code computes it: out = avg +
    e·(1 − M) ⊙ irfft(K ⊙ rfft(A − B)) along the last axis, avg = (A + B)/2, e =
    entanglement, M Bernoulli(decoherence) per element from the recipe seed, key and element
    (the original used Python's randomised hash()), K from the coefficients c (see
    spectral_filter), or from a prompt (`prompt_coefficients`: the text encoder's pooled
    embedding through a fixed seeded projection, see prompted.py). Tensors whose name holds
    'weight' and that have two or more dimensions are filtered, `chunk_size` rows at a time;
    the others get avg. Nothing quantum happens: it
    is an average plus a masked, frequency-filtered share of the difference."""
    if prompt_coefficients is not None and not isinstance(prompt_coefficients, EncodedPrompt):
        raise RuntimeError("spectral: prompt_coefficients was not encoded before the merge")
    average = (a + b) / 2
    if not statistic or a.dim() < 2 or a.numel() == 0 or entanglement == 0 or decoherence == 1:
        return average
    width = a.shape[-1]
    rows_a, rows_b = a.reshape(-1, width), b.reshape(-1, width)
    out = average.reshape(-1, width).clone()
    coefficients_k = frequency_coefficients(coefficients, width // 2 + 1).to(a.device)
    keep = (draw.uniform(a.shape, 0, a.device) >= decoherence).reshape(-1, width)
    for start in range(0, rows_a.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        filtered = spectral_filter(rows_a[rows] - rows_b[rows], coefficients_k, variant)
        out[rows] += (entanglement * filtered * keep[rows]).to(out.dtype)
    return out.reshape(a.shape)
