"""Task arithmetic with sparsified deltas: TIES, DARE, DELLA and breadcrumbs as compositions of
three parts, not copies: a sparsifier for each model's delta δ_m = M_m − base, a consensus
(none, or TIES's sign election), and the combination base + λ·Σ.

- sparsifiers: magnitude top-k (TIES), random drop with rescale (DARE), magnitude-ranked drop
  probabilities (DELLA), dropping the largest and the smallest magnitudes (breadcrumbs);
- consensus: none (a weighted sum of the deltas), or the sign elected by the sum of the
  (weighted, sparsified) deltas, or by their count; only deltas of the elected sign are kept
  and averaged over the weights of the models that agree.

References: TIES-Merging, Yadav et al. 2023 (arXiv:2306.01708); DARE, Yu et al. 2023
(arXiv:2311.03099); DELLA-Merging, Deep et al. 2024 (arXiv:2406.11617); Model Breadcrumbs,
Davari & Belilovsky 2023 (arXiv:2312.06795). Parameter names and defaults follow mergekit's
(normalize on for ties and della, off for the others); where mergekit departs from the papers
weightmix follows the papers, and says so: DARE and DELLA rescale each kept element by 1/p (the
papers; mergekit now matches the L1 norm instead), a sign vote summing to exactly 0 elects no
sign (the paper's sgn(0) = 0; mergekit elects +), and ties at a magnitude cut are broken by
lower index (mergekit: by argsort's order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from weightmix import kernels
from weightmix.methods import selection
from weightmix.methods.registry import WEIGHT, Density, Finite, Fraction, Tensor, merge_method
from weightmix.methods.selection import StreamedTopK, top_magnitude_mask
from weightmix.methods.streaming import CHUNK, Streamer
from weightmix.rounding import Draw

Sparsifier = Callable[[Tensor, int], Tensor]  # (delta, model index) -> sparsified delta
Consensus = Literal["sum", "count"]


def keep_count(numel: int, density: float) -> int:
    """How many elements of a tensor a density keeps: ⌊density·n⌋, at least one (mergekit)."""
    return max(1, math.floor(density * numel))


def magnitude_top_k(delta: Tensor, density: float) -> Tensor:
    """δ with all but its ⌊density·n⌋ largest-magnitude elements set to 0 (TIES's trim; ties
    at the cut broken by lower index)."""
    if density >= 1:
        return delta
    return delta * top_magnitude_mask(delta, keep_count(delta.numel(), density))


def random_drop(delta: Tensor, density: float, uniforms: Tensor) -> Tensor:
    """DARE: each element kept with probability `density` (uniform < density) and rescaled by
    1/density, so that the expected delta is unchanged."""
    if density >= 1:
        return delta
    keep = torch.sign(torch.relu(density - uniforms)).to(delta.dtype)  # 1 where u < density
    kept = delta * keep
    # a dropped ±inf or NaN must read 0, not inf·0 = NaN; a sum (one cheap pass) is finite
    # unless some value is not, and only then are the elements chosen exactly
    if not math.isfinite(float(kept.sum())):
        kept = torch.where(keep != 0, delta, torch.zeros_like(delta))
    return kept.div_(density)


RANKED_ROWS_ELEMENTS = 1 << 20  # elements ranked at a time: the int64 sort stays small


def magnitude_ranked_drop(
    delta: Tensor, density: float, epsilon: float, uniforms: Tensor
) -> Tensor:
    """DELLA's MAGPRUNE: within each row (dim 1; a 1-D tensor is one row) the element of rank
    r among L (ascending magnitude, ties by lower index) is kept with probability
    p = density − ε + 2ε·(r − 1)/(L − 1) (density alone when L = 1), and rescaled by 1/p.
    Rows are ranked a block at a time, so the sort's int64 temporaries stay ~40 MB."""
    if density >= 1:
        return delta
    moved = delta.reshape(1, -1) if delta.dim() < 2 else delta.movedim(1, -1)
    rows = moved.reshape(-1, moved.shape[-1])  # one row per index of the other dims
    draws = (uniforms.reshape(1, -1) if delta.dim() < 2 else uniforms.movedim(1, -1)).reshape(
        rows.shape
    )
    length = rows.shape[1]
    out = torch.empty_like(rows)
    step = max(1, RANKED_ROWS_ELEMENTS // max(length, 1))
    for first in range(0, rows.shape[0], step):
        block = rows[first : first + step]
        order = block.abs().argsort(dim=1, stable=True)
        ranks = torch.empty_like(order)
        positions = torch.arange(length, device=delta.device).expand_as(order)
        ranks.scatter_(1, order, positions)
        ends = length - 1  # rank 0 -> density - ε, rank L-1 -> density + ε
        position = ranks.to(delta.dtype) / ends if ends else torch.full_like(block, 0.5)
        keep = density - epsilon + 2 * epsilon * position
        chosen = draws[first : first + step] < keep
        out[first : first + step] = torch.where(chosen, block / keep, torch.zeros_like(block))
    shaped = out.reshape(moved.shape)
    return shaped.reshape(delta.shape) if delta.dim() < 2 else shaped.movedim(-1, 1)


def middle_band(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the ⌊γ·n⌋ largest magnitudes and then the smallest, keeping the
    ⌊density·n⌋ (at least 1) in between; when density + γ > 1 fewer large ones are dropped, so
    the density is met (cuts by magnitude, ties by lower index)."""
    if density >= 1:
        return delta
    n = delta.numel()
    kept = keep_count(n, density)
    top = min(math.floor(gamma * n), n - kept)
    below_top = top_magnitude_mask(delta, top + kept)
    band = below_top & ~top_magnitude_mask(delta, top) if top > 0 else below_top
    return delta * band


def combine(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    consensus: Consensus | None,
    normalize: bool,
) -> Tensor:
    """Σ_m w_m·t_m over the models, or with a consensus only over the models whose weighted
    delta has the elected sign s = sign(Σ_m w_m·t_m) (by 'sum') or s = sign(Σ_m sign(w_m·t_m))
    (by 'count'); s = 0 keeps nothing (the paper's sgn(0) = 0). With normalize, divided by the
    sum of the weights of the models counted (1 where that is 0)."""
    weighted = [delta * w if w != 1 else delta for delta, w in zip(deltas, weights)]
    if consensus is None:
        total = _sum(weighted)
        scale = sum(weights)
        return total / scale if normalize and scale not in (0, 1) else total
    if consensus == "sum":
        elected = torch.sign(_sum(weighted))
    else:
        elected = torch.sign(_sum([torch.sign(t) for t in weighted]))
    elected.nan_to_num_(nan=0.0)  # a NaN vote (inf − inf, NaN inputs) elects no sign
    # t agrees with s ∈ {−1, 0, 1} iff t·s > 0; then relu(t·s)·s = t, else 0 (float ops only:
    # on the CPU they run several times faster than masks and torch.where). NaN and ±inf·0
    # never agree: they read as 0.
    agreeing = [_finite_or_inf(torch.relu(t * elected)) for t in weighted]
    total = _sum([part * elected for part in agreeing])
    if not normalize:
        return total
    divisor = _sum([torch.sign(part) * w for part, w in zip(agreeing, weights)])
    # 1 where no weight agrees: the added term is exactly 0 or 1, so divisors stay exact
    return total / divisor.add_(1 - torch.sign(divisor).abs())


def _finite_or_inf(values: Tensor) -> Tensor:
    """NaN replaced by 0 in place; ±inf kept."""
    return values.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total


def task_arithmetic_(
    base: Tensor,
    models: Sequence[Tensor],
    sparsify: Sparsifier,
    consensus: Consensus | None,
    lambda_: float,
    weights: Sequence[float] | None,
    normalize: bool,
) -> Tensor:
    """base + λ·combine(sparsify(M_m − base)): every method of this module."""
    deltas = [sparsify(model - base, index) for index, model in enumerate(models)]
    merged = combine(deltas, weights or [1.0] * len(models), consensus, normalize)
    # base + (merged·λ), two roundings: torch.add(..., alpha=λ) fuses them on CPUs with FMA and
    # not on others, so its result would depend on the machine (and the C loop could not match)
    return base + merged * lambda_ if lambda_ != 1 else base + merged


class MagnitudeCutStreamer(Streamer):
    """TIES and breadcrumbs in chunks: statistics passes find each model's magnitude cuts of
    its delta exactly (selection.StreamedTopK), then every chunk is trimmed and combined as
    the whole-tensor function does it (fused in C where weightmix.kernels takes the chunks)."""

    takes_stored = True

    @classmethod
    def scratch_bytes(cls, params: dict[str, Any], numel: int, inputs: int) -> int:
        """Each model's cut keeps magnitude patterns aside in its first pass (int32)."""
        return (inputs - 1) * min(numel // 8, selection.KEPT_AT_MOST) * 4

    def __init__(
        self, params: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype, inputs: int
    ) -> None:
        super().__init__(params, shape, dtype, inputs)
        self.numel = math.prod(shape)
        # per model after the base: its top-k cut, or the two ends of its band
        self.cuts = [self._model_cuts() for _ in range(inputs - 1)]
        self.last_cuts: list[kernels.Cut] = []  # the cuts of the last chunk through C

    def _model_cuts(self) -> list[StreamedTopK]:
        density, n = self.params["density"], self.numel
        if density >= 1:
            return []
        kept = keep_count(n, density)
        if "gamma" not in self.params:  # top-k
            return [StreamedTopK(kept, n, self.dtype)]
        top = min(math.floor(self.params["gamma"] * n), n - kept)
        ends = [top + kept, top] if top > 0 else [top + kept]
        return [StreamedTopK(end, n, self.dtype) for end in ends]

    SAMPLE_PIECES = 16  # of SAMPLE_PIECE elements each, from tensors of SAMPLE_FROM or more
    SAMPLE_PIECE = 1 << 14
    SAMPLE_FROM = 8 * CHUNK

    def sample_ranges(self) -> list[tuple[int, int]]:
        """Evenly spread pieces of a big tensor: they place each top-k cut's window (see
        selection.StreamedTopK) so that its first pass needs no histogram."""
        single = [cuts for cuts in self.cuts if len(cuts) == 1]
        smallest = max(self.SAMPLE_FROM, self.SAMPLE_PIECES * self.SAMPLE_PIECE)
        if self.dtype != torch.float32 or not single or self.numel < smallest:
            return []
        last = self.numel - self.SAMPLE_PIECE
        starts = [i * last // (self.SAMPLE_PIECES - 1) for i in range(self.SAMPLE_PIECES)]
        return [(start, start + self.SAMPLE_PIECE) for start in starts]

    def observe_sample(self, inputs: Sequence[Tensor]) -> None:
        base, *models = inputs
        for model, cuts in zip(models, self.cuts):
            if len(cuts) == 1:
                cuts[0].sample_delta(base, model)

    def end_sample(self) -> None:
        for cuts in self.cuts:
            if len(cuts) == 1:
                cuts[0].end_sample()

    def wants_pass(self) -> bool:
        return any(cut.wants_pass() for cuts in self.cuts for cut in cuts)

    def observe(self, inputs: Sequence[Tensor]) -> None:
        base, *models = inputs  # as stored (takes_stored) or in the compute dtype
        for model, cuts in zip(models, self.cuts):
            wanting = [cut for cut in cuts if cut.wants_pass()]
            if len(wanting) == 1:
                wanting[0].observe_delta(base, model)
            elif wanting:
                delta = model.to(self.dtype) - base.to(self.dtype)
                for cut in wanting:
                    cut.observe(delta)

    def end_pass(self) -> None:
        for cuts in self.cuts:
            for cut in cuts:
                if cut.wants_pass():
                    cut.end_pass()

    def _in_c(
        self, inputs: Sequence[Tensor], out: Tensor | None = None
    ) -> tuple[Tensor, list[int], int] | None:
        """The chunk through kernels.ties_chunk (None: not taken), the cuts told what it
        kept at them."""
        if self.dtype != torch.float32 or any(len(cuts) > 1 for cuts in self.cuts):
            return None
        chunk_cuts = [cuts[0].chunk_cut() if cuts else (kernels.KEEP_ALL, 0.0, 0)
                      for cuts in self.cuts]  # fmt: skip
        fused = self._ties_chunk(inputs, chunk_cuts, out)
        if fused is not None:
            self.last_cuts = chunk_cuts
            for cuts, count in zip(self.cuts, fused[1]):
                if cuts:
                    cuts[0].took(count)
        return fused

    def _ties_chunk(
        self, inputs: Sequence[Tensor], chunk_cuts: list[kernels.Cut], out: Tensor | None
    ) -> tuple[Tensor, list[int], int] | None:
        p = self.params
        weights = p["weights"] or [1.0] * len(self.cuts)
        return kernels.ties_chunk(
            inputs[0], inputs[1:], chunk_cuts, weights, p.get("consensus"), p["normalize"],
            p["lambda"], out,
        )  # fmt: skip

    rounds = True

    def apply_rounded(self, inputs: Sequence[Tensor], out: Tensor) -> int | None:
        fused = self._in_c(inputs, out)
        return None if fused is None else fused[2]

    def rounded_result(self, inputs: Sequence[Tensor]) -> Tensor:
        """The last chunk's float32 output from the cuts it was computed with (the cuts have
        moved on since: apply() would keep fewer elements at them)."""
        fused = self._ties_chunk(inputs, self.last_cuts, None)
        assert fused is not None  # as for the call it repeats
        return fused[0]

    def apply(self, inputs: Sequence[Tensor], draw: Draw | None) -> Tensor:
        p = self.params
        fused = self._in_c(inputs)
        if fused is not None:
            return fused[0]
        base, *models = [x.to(self.dtype) for x in inputs]

        def trim(delta: Tensor, index: int) -> Tensor:
            masks = [cut.mask(delta) for cut in self.cuts[index]]  # None: every element
            if not masks:
                return delta
            if len(masks) == 1:
                return delta if masks[0] is None else delta * masks[0]
            upper, top = masks  # the band: below the top cut, within the upper one
            assert top is not None  # top < n - kept: never every element
            return delta * (1 - top if upper is None else upper - top)

        return task_arithmetic_(
            base, models, trim, p.get("consensus"),
            p["lambda"], p["weights"], p["normalize"],
        )  # fmt: skip


def check_weights(count: int, params: dict[str, Any]) -> str | None:
    """One weight per model after the base; DELLA's probabilities within (0, 1]."""
    weights = params.get("weights")
    if weights is not None and len(weights) != count - 1:
        return (
            f"{len(weights)} weights given for {count - 1} models after the base:"
            " give one weight per model (the base has none)"
        )
    density, epsilon = params.get("density"), params.get("epsilon")
    numbers = isinstance(density, float) and isinstance(epsilon, float)
    if numbers and density < 1 and (density - epsilon <= 0 or density + epsilon > 1):
        return (
            f"density {density:g} ± epsilon {epsilon:g} must stay within (0, 1]: keep"
            " probabilities run from density − epsilon to density + epsilon"
        )
    return None


@merge_method(
    inputs=WEIGHT, output=WEIGHT, min_inputs=2, check=check_weights, streamer=MagnitudeCutStreamer
)
def ties(
    base: Tensor,
    *models: Tensor,
    density: Density,
    lambda_: Finite = 1.0,
    weights: list[Finite] | None = None,
    normalize: bool = True,
    consensus: Consensus = "sum",
) -> Tensor:
    """TIES: base + λ·Σ_m [sign(t_m) = s ≠ 0]·w_m·t_m / Σ_agreeing w_m, t_m = δ_m trimmed to
    its ⌊density·n⌋ (at least 1) largest magnitudes, s = sign(Σ_m w_m·t_m) (Yadav et al. 2023,
    arXiv:2306.01708). An element whose trimmed deltas sum to exactly 0 keeps the base."""

    def trim(delta: Tensor, _: int) -> Tensor:
        return magnitude_top_k(delta, density)

    return task_arithmetic_(base, models, trim, consensus, lambda_, weights, normalize)


def _dare(
    base: Tensor,
    models: Sequence[Tensor],
    density: float,
    draw: Draw,
    consensus: Consensus | None,
    lambda_: float,
    weights: Sequence[float] | None,
    normalize: bool,
) -> Tensor:
    drawn: list[Tensor] | None = None  # each model's uniform numbers, once drawn
    if consensus is not None and _float32_on_cpu(base, models):  # one C loop, where it takes it
        dropping = density < 1
        if dropping:
            drawn = [draw.uniform(base.shape, index) for index in range(len(models))]
        cut = (kernels.DROP if dropping else kernels.KEEP_ALL, density, 0)
        fused = kernels.ties_chunk(
            base, models, [cut] * len(models), weights or [1.0] * len(models), consensus,
            normalize, lambda_, uniforms=[u.reshape(-1) for u in drawn] if drawn else None,
        )  # fmt: skip
        if fused is not None:
            return fused[0]

    def drop(delta: Tensor, index: int) -> Tensor:
        numbers = drawn[index] if drawn else draw.uniform(delta.shape, index, delta.device)
        return random_drop(delta, density, numbers)

    return task_arithmetic_(base, models, drop, consensus, lambda_, weights, normalize)


def _float32_on_cpu(base: Tensor, models: Sequence[Tensor]) -> bool:
    """Whether the C TIES loop may take these inputs for DARE: its arithmetic is float32, so
    only inputs already in float32 (the compute dtype: fp16 or bf16 compute stays in torch)."""
    if not kernels.enabled() or len(models) > kernels.MAX_MODELS:
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (base, *models))


@merge_method(inputs=WEIGHT, output=WEIGHT, min_inputs=2, check=check_weights, elementwise=True)
def dare_linear(
    base: Tensor,
    *models: Tensor,
    density: Density,
    lambda_: Finite = 1.0,
    weights: list[Finite] | None = None,
    normalize: bool = False,
    draw: Draw,
) -> Tensor:
    """DARE: base + λ·Σ_m w_m·(m_m ⊙ δ_m)/density (with normalize: divided by Σ_m w_m),
    m_m Bernoulli(density) per element from the seed, key and element index (Yu et al. 2023,
    arXiv:2311.03099)."""
    return _dare(base, models, density, draw, None, lambda_, weights, normalize)


@merge_method(inputs=WEIGHT, output=WEIGHT, min_inputs=2, check=check_weights, elementwise=True)
def dare_ties(
    base: Tensor,
    *models: Tensor,
    density: Density,
    lambda_: Finite = 1.0,
    weights: list[Finite] | None = None,
    normalize: bool = False,
    consensus: Consensus = "sum",
    draw: Draw,
) -> Tensor:
    """DARE's random drop and rescale, then TIES's sign election: base + λ·Σ_m [sign(t_m) =
    s ≠ 0]·w_m·t_m / Σ_agreeing w_m with t_m = (m_m ⊙ δ_m)/density (Yu et al. 2023)."""
    return _dare(base, models, density, draw, consensus, lambda_, weights, normalize)


@merge_method(inputs=WEIGHT, output=WEIGHT, min_inputs=2, check=check_weights, elementwise=True)
def task_arithmetic(
    base: Tensor,
    *models: Tensor,
    lambda_: Finite = 1.0,
    weights: list[Finite] | None = None,
    normalize: bool = False,
) -> Tensor:
    """Task arithmetic: base + λ·Σ_m w_m·(M_m − base), divided by Σ_m w_m with normalize
    (Ilharco et al. 2023, arXiv:2212.04089)."""
    return task_arithmetic_(base, models, _keep, None, lambda_, weights, normalize)


def _keep(delta: Tensor, _: int) -> Tensor:
    return delta


def _della(
    base: Tensor,
    models: Sequence[Tensor],
    density: float,
    epsilon: float,
    draw: Draw,
    consensus: Consensus | None,
    lambda_: float,
    weights: Sequence[float] | None,
    normalize: bool,
) -> Tensor:
    def drop(delta: Tensor, index: int) -> Tensor:
        uniforms = draw.uniform(delta.shape, index, delta.device)
        return magnitude_ranked_drop(delta, density, epsilon, uniforms)

    return task_arithmetic_(base, models, drop, consensus, lambda_, weights, normalize)


@merge_method(inputs=WEIGHT, output=WEIGHT, min_inputs=2, check=check_weights)
def della(
    base: Tensor,
    *models: Tensor,
    density: Density,
    epsilon: Fraction = 0.15,
    lambda_: Finite = 1.0,
    weights: list[Finite] | None = None,
    normalize: bool = True,
    consensus: Consensus = "sum",
    draw: Draw,
) -> Tensor:
    """DELLA: DARE with magnitude-ranked keep probabilities p = density − ε + 2ε·rank within
    each row, kept elements rescaled by 1/p, then TIES's sign election (Deep et al. 2024,
    arXiv:2406.11617)."""
    return _della(base, models, density, epsilon, draw, consensus, lambda_, weights, normalize)


@merge_method(inputs=WEIGHT, output=WEIGHT, min_inputs=2, check=check_weights)
def della_linear(
    base: Tensor,
    *models: Tensor,
    density: Density,
    epsilon: Fraction = 0.15,
    lambda_: Finite = 1.0,
    weights: list[Finite] | None = None,
    normalize: bool = False,
    draw: Draw,
) -> Tensor:
    """DELLA's magnitude-ranked drop and rescale, combined as a weighted sum without sign
    election: base + λ·Σ_m w_m·t_m (Deep et al. 2024, arXiv:2406.11617)."""
    return _della(base, models, density, epsilon, draw, None, lambda_, weights, normalize)


def _breadcrumbs(
    base: Tensor,
    models: Sequence[Tensor],
    density: float,
    gamma: float,
    consensus: Consensus | None,
    lambda_: float,
    weights: Sequence[float] | None,
    normalize: bool,
) -> Tensor:
    def band(delta: Tensor, _: int) -> Tensor:
        return middle_band(delta, density, gamma)

    return task_arithmetic_(base, models, band, consensus, lambda_, weights, normalize)


@merge_method(
    inputs=WEIGHT, output=WEIGHT, min_inputs=2, check=check_weights, streamer=MagnitudeCutStreamer
)
def breadcrumbs(
    base: Tensor,
    *models: Tensor,
    density: Density,
    gamma: Fraction = 0.01,
    lambda_: Finite = 1.0,
    weights: list[Finite] | None = None,
    normalize: bool = False,
) -> Tensor:
    """Model breadcrumbs: each delta loses its ⌊γ·n⌋ largest magnitudes (outliers) and its
    smallest, keeping ⌊density·n⌋; base + λ·Σ_m w_m·t_m (Davari & Belilovsky 2023,
    arXiv:2312.06795)."""
    return _breadcrumbs(base, models, density, gamma, None, lambda_, weights, normalize)


@merge_method(
    inputs=WEIGHT, output=WEIGHT, min_inputs=2, check=check_weights, streamer=MagnitudeCutStreamer
)
def breadcrumbs_ties(
    base: Tensor,
    *models: Tensor,
    density: Density,
    gamma: Fraction = 0.01,
    lambda_: Finite = 1.0,
    weights: list[Finite] | None = None,
    normalize: bool = False,
    consensus: Consensus = "sum",
) -> Tensor:
    """Breadcrumbs' middle band of each delta, then TIES's sign election (Davari &
    Belilovsky 2023; Yadav et al. 2023)."""
    return _breadcrumbs(base, models, density, gamma, consensus, lambda_, weights, normalize)
