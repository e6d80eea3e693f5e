"""The optional C loops of weightmix/_kernels.c, for tensors they can take.

Dot products (slerp, multislerp, karcher, model stock): one loop widens each chunk and sums its
products in float64 into LANES partial sums in a fixed order (by index mod LANES, then the
lanes in order), ~0.85 ns an element for two vectors against ~6-13 for torch's widened copies
and three BLAS calls; the torch code (streaming.lane_dot) adds in the same order, and every
product of two float32 values is exact in float64, so both give the same bits.

Linear merges and add-difference (kernels.blend): the arithmetic and the rounding into the
output dtype in one pass over cache-sized blocks, counting inf and NaN as it goes. Widening
(float8 by a table of its 256 values) and rounding into every float dtype the engine writes,
float8 included, also run as C loops: torch's own float8 copies take ~4.4 ns an element.

Seeded uniform numbers (DARE, DELLA, stochastic rounding): numpy's SeedSequence and PCG64DXSM
per 65,536-number block written out in C, ~1.1 ns a number against ~7.4 through numpy and
torch, the same numbers.

TIES runs its statistics passes (a histogram of delta magnitudes per model and radix stage) and
its output chunks as one fused loop each instead of a dozen torch operations, each with its own
temporary: on a 2-core machine 0.8-1 ns an element per histogram instead of ~2.5 and 1.7 ns
for a two-model output chunk instead of ~13 (bench/RESULTS.md). The loops compute exactly
what the torch code of methods/selection.py and methods/sparsify.py computes, step by step in
float32 (tests/test_kernels.py compares the bytes), so an output never depends on whether the
extension was built, but for the payload of a NaN carried through from an input (torch's own
float16 widening gives NaNs different payloads in its vector and scalar loops). Each
function returns False or None when it cannot take its arguments (another dtype, a float64
or half computation, no extension, WEIGHTMIX_KERNELS=0): the caller then runs torch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch

try:
    from weightmix import _kernels
except ImportError:  # built without a C compiler: torch does the same arithmetic
    _kernels = None

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# every dtype the loops widen from and round into (cast, widen); the float8 types take no
# other part (torch promotes none of them: their inputs reach the methods widened)
STORED_CODES = {**CODES, torch.float8_e4m3fn: 3, torch.float8_e5m2: 4}
MAX_MODELS = 16
LANES = 8  # partial sums of a float64 dot product (as _kernels.c)
# masks of a magnitude cut c: every element, |d| > c, |d| >= c, and |d| > c with the first r
# elements at |d| = c (in index order: where the cut splits a run of equal magnitudes); and
# DARE's random drop, c the density: kept where its uniform number u < c, then divided by c
KEEP_ALL, ABOVE, AT_LEAST, FIRST_AT_CUT, DROP = 0, 1, 2, 3, 4
FORMS = {"sum": 0, "difference": 1, "stock": 2}  # what blend() computes (as _kernels.c)


def enabled() -> bool:
    """Whether the C loops are built and not switched off (WEIGHTMIX_KERNELS=0)."""
    return _kernels is not None and os.environ.get("WEIGHTMIX_KERNELS", "1") != "0"


@functools.cache
def torch_fuses() -> bool:
    """Whether torch's CPU kernels run their AVX2 or AVX-512 loops, where `add(x, alpha=c)`
    is a fused multiply-add (one rounding); its scalar loops (ATEN_CPU_CAPABILITY=default)
    round twice, so the loops that copy that (combine, blend) are then left to torch."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _takes(tensors: Sequence[torch.Tensor], numel: int, codes: dict = CODES) -> bool:
    for t in tensors:  # a loop, not all(...): this runs for every chunk
        if t.dtype not in codes or not t.is_cpu or not t.is_contiguous() or t.numel() != numel:
            return False
    return True


def magnitude_histogram(
    base: torch.Tensor, model: torch.Tensor, stage: int, prefix: int, counts: torch.Tensor
) -> bool:
    """Add to `counts` (int64) the radix-select counts of the float32 bit patterns of
    |model − base| into 65,536 bins: stage 0 by the top 16 bits (the sign bit is 0: the upper
    half stays empty), stage 1 by the low 16 bits of the elements whose top 16 bits are
    `prefix`."""
    if not enabled() or stage not in (0, 1) or not _takes([base, model], base.numel()):
        return False
    if counts.dtype != torch.int64 or counts.numel() != 1 << 16:
        return False
    if not counts.is_contiguous() or not counts.is_cpu:
        return False
    assert _kernels is not None
    codes = CODES[base.dtype], CODES[model.dtype]
    _kernels.histogram(base.data_ptr(), codes[0], model.data_ptr(), codes[1], base.numel(),
                       stage, prefix, counts.data_ptr())  # fmt: skip
    return True


def magnitude_collect(
    base: torch.Tensor,
    model: torch.Tensor,
    counts: torch.Tensor | None,
    window: tuple[int, int],
    into: torch.Tensor,
) -> tuple[int, int] | None:
    """The float32 bit patterns of |model − base| (as magnitude_histogram makes them) whose
    top 16 bits lie in window = (low, high), written in index order into `into` (int32, flat),
    with stage 0's counts added to `counts` (unless None). Returns how many lay in the window
    (all are in `into` when that is less than its size) and how many above it. None: not
    taken."""
    if not enabled() or not hasattr(_kernels, "collect") or into.numel() < 1:
        return None
    if not _takes([base, model], base.numel()) or into.dtype != torch.int32:
        return None
    if not into.is_contiguous() or not into.is_cpu:
        return None
    if counts is not None and (
        counts.dtype != torch.int64
        or counts.numel() != 1 << 16
        or not counts.is_contiguous()
        or not counts.is_cpu
    ):
        return None
    if not 0 <= window[0] <= window[1] < 1 << 16:
        return None
    assert _kernels is not None
    found = _kernels.collect(
        base.data_ptr(), CODES[base.dtype], model.data_ptr(), CODES[model.dtype], base.numel(),
        0 if counts is None else counts.data_ptr(), window[0], window[1], into.data_ptr(),
        into.numel(),
    )  # fmt: skip
    return found if isinstance(found, tuple) else None  # (an older build returns hits only)


Cut = tuple[int, float, int]  # (mask kind, cut magnitude, elements at the cut still to keep)


def ties_chunk(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    cuts: Sequence[Cut],
    weights: Sequence[float],
    consensus: str | None,
    normalize: bool,
    lambda_: float,
    out: torch.Tensor | None = None,
    uniforms: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, list[int], int] | None:
    """TIES's output for one chunk computed in float32, the elements each model kept at its
    cut and how many outputs are inf or NaN (None: not taken): each model's delta masked by
    its cut (see KEEP_ALL ... FIRST_AT_CUT), weighted, the sign elected by the sum ('sum') or
    by the signs ('count'), the agreeing deltas summed (and divided by the agreeing weights
    with `normalize`), base + λ·that; into a new float32 tensor of base's shape, or rounded to
    nearest into `out` (flat, any STORED_CODES dtype) as cast() rounds it. A DROP cut takes
    its model's uniform numbers from `uniforms` (float32, one tensor or None per model); None
    too where a dropped delta is not finite or too large to sum (the torch code decides)."""
    count = base.numel()
    if not enabled() or not 1 <= len(models) <= MAX_MODELS or consensus not in ("sum", "count"):
        return None
    if not _takes([base, *models], count):
        return None
    if out is not None and not _takes([out], count, STORED_CODES):
        return None
    drawn = list(uniforms) if uniforms is not None else [None] * len(models)
    for (mode, _, _), numbers in zip(cuts, drawn):
        if (mode == DROP) != (numbers is not None):
            return None
    if not _takes([u for u in drawn if u is not None], count, {torch.float32: 0}):
        return None
    assert _kernels is not None
    into = torch.empty(count, dtype=torch.float32) if out is None else out
    done = _kernels.ties(
        into.data_ptr(), STORED_CODES[into.dtype], base.data_ptr(), CODES[base.dtype], count,
        [m.data_ptr() for m in models], [CODES[m.dtype] for m in models],
        [float(cut) for _, cut, _ in cuts], [mode for mode, _, _ in cuts],
        [left for _, _, left in cuts],
        [None if w == 1 else float(w) for w in weights],  # the torch code skips w = 1
        consensus == "count", normalize, float(lambda_),
        [0 if u is None else u.data_ptr() for u in drawn],
    )  # fmt: skip
    if done is None:
        return None
    taken, nonfinite = done
    return (into.reshape(base.shape) if out is None else out), taken, nonfinite


def gram(vectors: Sequence[torch.Tensor], base: torch.Tensor | None = None) -> list[float] | None:
    """The dot products ⟨v_i, v_j⟩ (i ≤ j, row by row) of the vectors as float32, or with
    `base` of the float32 differences v_i − base, summed in float64 (see above); None when the
    loop cannot take them (then the caller runs torch)."""
    count = vectors[0].numel() if vectors else 0
    if not enabled() or not 1 <= len(vectors) <= MAX_MODELS:
        return None
    if not _takes([*vectors] + ([] if base is None else [base]), count):
        return None
    assert _kernels is not None
    return _kernels.gram(
        [v.data_ptr() for v in vectors], [CODES[v.dtype] for v in vectors],
        None if base is None else base.data_ptr(), 0 if base is None else CODES[base.dtype],
        count,
    )  # fmt: skip


def cast(result: torch.Tensor, out: torch.Tensor) -> int | None:
    """Round a float32 result to nearest into `out` (float32, float16, bfloat16 or a float8
    type, the same size) and count the inf and NaN values written, in one pass (None: not
    taken, the caller casts with torch). The values equal torch's cast (float8 e4m3fn, which
    has no inf, saturates at ±448 as torch does; e5m2 overflows to inf); NaN payloads may
    differ, as they do between torch's own vector and scalar loops."""
    count = out.numel()
    if not enabled() or result.dtype != torch.float32 or not _takes([result], count):
        return None
    if not _takes([out], count, STORED_CODES):
        return None
    assert _kernels is not None
    return _kernels.cast(out.data_ptr(), STORED_CODES[out.dtype], result.data_ptr(), count)


def widen(stored: torch.Tensor, out: torch.Tensor) -> bool:
    """Widen `stored` (float32, float16, bfloat16 or a float8 type) into float32 `out` of the
    same size, exactly (float8 through float16 with F16C, or a table of its 256 values: 0.3
    ns an element against 4.4 for torch's copy); False: not taken, the caller copies with
    torch."""
    count = out.numel()
    if not enabled() or out.dtype != torch.float32 or not _takes([out], count):
        return False
    if not _takes([stored], count, STORED_CODES):
        return False
    assert _kernels is not None
    _kernels.widen(out.data_ptr(), stored.data_ptr(), STORED_CODES[stored.dtype], count)
    return True


def combine(
    tensors: Sequence[torch.Tensor], coefficients: Sequence[float], out: torch.Tensor | None
) -> torch.Tensor | None:
    """Σ c_k·x_k in float32 as torch computes `torch.mul(x_0, c_0)` then `.add_(x_k,
    alpha=c_k)` on machines with AVX2 (the first product rounded, each further term added by a
    fused multiply-add), the x_k as stored (float32, float16, bfloat16) and widened inside the
    loop: blend()'s 'sum' into `out` (float32, the same size) or a new tensor of x_0's shape.
    None: not taken (no extension, another dtype, no FMA), the caller runs torch."""
    first = tensors[0]
    if not _takes(tensors, first.numel()):
        return None
    into = torch.empty(first.shape, dtype=torch.float32) if out is None else out
    if into.dtype != torch.float32 or blend(tensors, coefficients, into) is None:
        return None
    return into.view(first.shape)


def blend(
    tensors: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    out: torch.Tensor,
    form: str = "sum",
) -> int | None:
    """A float32 result rounded to nearest into `out` as cast() rounds it, a cache-sized block
    at a time, so that no float32 result is written or read back: the same bits as the torch
    arithmetic then cast(). Inputs and `out` of any STORED_CODES dtype, float8 too. Forms:
    'sum', combine()'s Σ c_k·x_k; 'difference', torch.add(a, b − c, alpha=c_0) of three
    tensors (the difference rounded, then one fused multiply-add); 'stock', model stock's
    step from tensors [base, m_1 … m_N] and coefficients [α] (the mean m_1 + Σ α·(m_k − m_1)
    alone) or [α, t] (base + (mean − base)·t), as methods/robust.py computes it. Returns how
    many inf and NaN values it wrote; None: not taken."""
    count = out.numel()
    if not enabled() or not hasattr(_kernels, "blend") or not 1 <= len(tensors) <= MAX_MODELS:
        return None
    if not torch_fuses():
        return None
    if not _takes([*tensors, out], count, STORED_CODES):
        return None
    if (form == "difference" and len(tensors) != 3) or (form == "stock" and len(tensors) < 2):
        return None
    assert _kernels is not None
    return _kernels.blend(out.data_ptr(), STORED_CODES[out.dtype],
                          [t.data_ptr() for t in tensors],
                          [STORED_CODES[t.dtype] for t in tensors],
                          [float(c) for c in coefficients], FORMS[form], count)  # fmt: skip


def stream_uniform(out: torch.Tensor, stream: int, start: int) -> bool:
    """rounding.uniform()'s numbers for elements start.. of a stream (an unsigned 64-bit
    value) into float32 `out`: numpy's SeedSequence and PCG64DXSM for each 65,536-number
    block, in C (the same numbers; tests/test_kernels.py). False: not taken."""
    if not enabled() or not hasattr(_kernels, "stream_uniform"):
        return False
    if out.dtype != torch.float32 or not _takes([out], out.numel()):
        return False
    _kernels.stream_uniform(out.data_ptr(), stream, start, out.numel())
    return True
