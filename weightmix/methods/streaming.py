"""Methods that need a statistic of a whole tensor (a magnitude cut, dot products) run in
chunks too, so their memory stays a chunk buffer whatever the tensor's size.

The engine feeds such a method a key's chunks in element order: first through as many
statistics passes as the method asks for (`wants_pass`, `observe`, `end_pass`), then once more
to compute each output chunk (`apply`). A method registers a Streamer class next to its
whole-tensor function; the function stays the reference and the path for GPUs and row-wise
variants, and both give the same numbers: dot products are summed over the same slices
(CHUNK elements, the engine's chunk) and cuts are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from weightmix import kernels
from weightmix.rounding import Draw

Tensor = torch.Tensor
CHUNK = 1 << 18  # elements per compute step of the engine, and per slice of a float64 sum


class Streamer:
    """One streamed method call on one key: statistics passes, then chunk-by-chunk output.
    `accepts(params)` says whether a call with these parameters streams at all."""

    takes_draw: ClassVar[bool] = False
    # whether `observe` and `apply` take the models' chunks as stored (float16, bfloat16 or
    # the compute dtype, widened by the method itself) when the call's inputs are the models
    takes_stored: ClassVar[bool] = False

    def __init__(
        self, params: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype, inputs: int
    ) -> None:
        self.params, self.shape, self.dtype, self.inputs = params, shape, dtype, inputs

    @classmethod
    def accepts(cls, params: dict[str, Any]) -> bool:
        return True

    @classmethod
    def scratch_bytes(cls, params: dict[str, Any], numel: int, inputs: int) -> int:
        """Bytes a call on a tensor of `numel` elements holds at most beside the engine's
        chunk buffers while it runs (for the engine's memory estimate)."""
        return 0

    def sample_ranges(self) -> list[tuple[int, int]]:
        """Element ranges [start, stop) of the tensor the engine shows `observe_sample` before
        the first pass (a few pieces spread over it); none by default."""
        return []

    def observe_sample(self, inputs: Sequence[Tensor]) -> None:
        """Take in a piece of the sample (as `observe` takes chunks)."""

    def end_sample(self) -> None:
        """The sample has been seen, before the first pass."""

    def wants_pass(self) -> bool:
        """Whether another statistics pass over the tensor is needed before `apply`."""
        return False

    def observe(self, inputs: Sequence[Tensor]) -> None:
        """Take in the next chunk of the inputs (chunks come in element order)."""

    def end_pass(self) -> None:
        """The pass has seen every element: settle what it measured."""

    def apply(self, inputs: Sequence[Tensor], draw: Draw | None) -> Tensor:
        """The output for the next chunk of the inputs (chunks come in element order)."""
        raise NotImplementedError

    # whether apply_rounded may take chunks (float32 compute, rounded to nearest); the engine
    # may mix it with apply chunk by chunk, so both must leave any state alike
    rounds: ClassVar[bool] = False

    def apply_rounded(self, inputs: Sequence[Tensor], out: Tensor) -> int | None:
        """apply()'s float32 output for the chunks as stored, rounded to nearest into `out`
        (the output dtype) in the same pass; how many inf/NaN values it wrote, or None to
        leave the chunk to apply()."""
        return None

    def rounded_result(self, inputs: Sequence[Tensor]) -> Tensor:
        """The float32 output of the chunk apply_rounded took last, again (to report an
        overflow): apply() by default, right where apply keeps no state between chunks."""
        return self.apply(inputs, None)


def lane_dot(x: Tensor, y: Tensor) -> float:
    """Σ x_e·y_e of two float64 vectors in the C loop's order (weightmix/kernels.py): the
    products added into kernels.LANES partial sums by e mod LANES, each in index order (a
    cumulative sum runs in order), then the partial sums added in lane order. Products of
    widened float32 values are exact, so the C loop and this give the same bits (on the CPU;
    on a GPU each lane is summed in the GPU's order)."""
    products = x * y
    if products.numel() == 0:
        return 0.0
    padding = -products.numel() % kernels.LANES
    if padding:
        products = torch.cat([products, products.new_zeros(padding)])
    rows = products.view(-1, kernels.LANES)
    # a GPU's scan down 8 columns runs nearly serially: its lanes are summed as it likes
    lanes = (rows.cumsum(0)[-1] if rows.is_cpu else rows.sum(0)).tolist()
    total = lanes[0]
    for partial in lanes[1:]:
        total += partial
    return total


class Gram:
    """Dot products ⟨v_i, v_j⟩ (i ≤ j) of a few vectors seen chunk by chunk, in float64, each
    chunk's products added to a Python float (reductions.gram feeds it whole tensors). A
    chunk's products are summed by the C loop where it takes them (weightmix/kernels.py),
    else by torch."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.sums = [[0.0] * count for _ in range(count)]

    def add(self, vectors: Sequence[Tensor]) -> None:
        flat = [v if v.dim() == 1 else v.reshape(-1) for v in vectors]  # chunks come flat
        products = kernels.gram(flat)
        if products is None:
            wide = [v.double() for v in flat]
            products = [
                lane_dot(wide[i], wide[j]) for i in range(self.count) for j in range(i, self.count)
            ]
        self._add(products)

    def add_deltas(self, base: Tensor, models: Sequence[Tensor], dtype: torch.dtype) -> None:
        """Add the products of the deltas M_i − base, computed in `dtype` from chunks given as
        stored or widened (in float32 by the C loop where it takes them)."""
        flat = [m.reshape(-1) for m in models]
        products = kernels.gram(flat, base.reshape(-1)) if dtype == torch.float32 else None
        if products is None:
            wide = base.to(dtype)
            self.add([m.to(dtype) - wide for m in models])
        else:
            self._add(products)

    def _add(self, products: Sequence[float]) -> None:
        pair = 0
        for i in range(self.count):
            for j in range(i, self.count):
                self.sums[i][j] += products[pair]
                pair += 1

    def matrix(self) -> list[list[float]]:
        """The symmetric matrix of sums."""
        return [[self.sums[min(i, j)][max(i, j)] for j in range(self.count)]
                for i in range(self.count)]  # fmt: skip


class GramStreamer(Streamer):
    """A method whose statistic is the Gram matrix of some vectors built from its inputs
    (`vectors`), computed in one pass; `apply_with(gram, inputs)` then runs elementwise."""

    def __init__(
        self, params: dict[str, Any], shape: tuple[int, ...], dtype: torch.dtype, inputs: int
    ) -> None:
        super().__init__(params, shape, dtype, inputs)
        self.gram: Gram | None = None
        self.done = not self.needs_statistics()

    def needs_statistics(self) -> bool:
        return True

    def vectors(self, inputs: Sequence[Tensor]) -> list[Tensor]:
        return list(inputs)

    def wants_pass(self) -> bool:
        return not self.done

    def observe(self, inputs: Sequence[Tensor]) -> None:
        vectors = self.vectors(inputs)
        if self.gram is None:
            self.gram = Gram(len(vectors))
        self.gram.add(vectors)

    def end_pass(self) -> None:
        self.done = True

    def apply(self, inputs: Sequence[Tensor], draw: Draw | None) -> Tensor:
        matrix = self.gram.matrix() if self.gram is not None else []
        return self.apply_with(matrix, inputs)

    def apply_with(self, gram: list[list[float]], inputs: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError


class ModelStatistic:
    """A statistic over every key one call of a method merges (supermerger's similarity
    range for cosine merges), gathered by the engine in a pass over those keys before the
    merge; the method receives `for_key(...)` as its `statistic` keyword. One that
    `reads_tensors = False` depends on key names only: no pass reads anything for it."""

    reads_tensors = True

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params

    def add(self, key: str, component: str | None, inputs: Sequence[Tensor]) -> None:
        """Take in one key's whole input tensors (component: its part of the model, if known)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Every key has been added: settle the statistic."""

    def for_key(self, key: str, component: str | None) -> Any:
        """What the method receives when it merges `key`."""
        raise NotImplementedError
