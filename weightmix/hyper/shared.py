"""Hyper-Merge (seed 001), as DESIGN.md states it. The hyper-model is the mean of M models.
Then, for each rank r_k in turn, one LoRA δ_k (rank r_k in every layer) shared by all models,
with one multiplier λ_{k,m} per model, fitting the residuals Δ_m = W_m − mean − Σ_{j<k} λ_{j,m}δ_j
by alternating least squares over all layers at once:

    δ^l = SVD_r( Σ_m λ_m Δ_m^l / Σ_m λ_m² )        (each layer l; Eckart–Young)
    λ_m = Σ_l ⟨Δ_m^l, δ^l⟩ / Σ_l ‖δ^l‖²            (least squares for fixed δ)

λ starts at the top eigenvector of the residuals' Gram matrix G_{mn} = Σ_l ⟨Δ_m^l, Δ_n^l⟩ (the
seed's start was degenerate: differences from the mean sum to zero), and is kept with its
largest-magnitude entry equal to +1 (δ takes the scale). Deflation is implicit: the next LoRA's
residuals subtract the LoRAs already written, read back from their files. Each pass reads one
layer of every model at a time."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from weightmix.io.reader import Checkpoint
from weightmix.lora.svd import truncated_factors


def top_eigenvector(gram: torch.Tensor) -> torch.Tensor:
    """The Gram matrix's eigenvector of the largest eigenvalue, normalised (see normalise)."""
    _, vectors = torch.linalg.eigh(gram.double())
    return normalise(vectors[:, -1])


def normalise(multipliers: torch.Tensor) -> torch.Tensor:
    """λ / λ_j with j the entry of largest magnitude (the first of equals): that entry is +1."""
    index = int(torch.argmax(multipliers.abs()))
    if multipliers[index] == 0:
        return multipliers
    return multipliers / multipliers[index]


def shared_update(deltas: torch.Tensor, multipliers: torch.Tensor, rank: int):
    """δ = SVD_r(Σ λ_m Δ_m / Σ λ_m²) of one layer (deltas: M × rows × cols), as (up, down)
    with up = U_r·√S_r, down = √S_r·V_rᵀ (see lora/svd.py)."""
    weights = multipliers.to(deltas.device, deltas.dtype)
    combined = (weights @ deltas.reshape(deltas.shape[0], -1)).reshape(deltas.shape[1:])
    combined /= weights.square().sum()
    return truncated_factors(combined, rank)


@dataclass(frozen=True)
class Unit:
    """One layer the LoRAs carry: rows [start, stop) of model key `key`, flattened."""

    key: str
    start: int
    stop: int
    name: str  # its kohya module name


class Residuals:
    """Δ_m for each unit: the models' rows minus the mean's, minus the LoRAs written so far
    (each with its multipliers), in the compute dtype, M × rows × cols."""

    def __init__(
        self,
        models: list[Checkpoint],
        average: Checkpoint,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.models, self.average = models, average
        self.dtype, self.device = dtype, device
        self.components: list[tuple[Checkpoint, torch.Tensor]] = []  # (LoRA file, λ_k)

    def of(self, unit: Unit) -> torch.Tensor:
        """M × rows × cols; besides it, the mean's and one model's rows as stored, then one
        LoRA update in the compute dtype."""
        info = self.average.tensors[unit.key]
        shape = (unit.stop - unit.start, math.prod(info.shape[1:]))
        mean = read_rows(self.average, info, unit.start, unit.stop).to(self.device)  # as stored
        deltas = torch.empty(len(self.models), *shape, dtype=self.dtype, device=self.device)
        for m, model in enumerate(self.models):  # filled in place: M layers, never 2M
            deltas[m].copy_(read_rows(model, model.tensors[unit.key], unit.start, unit.stop))
            deltas[m] -= mean  # each element widened exactly on the fly, no widened copy
        del mean
        for lora, multipliers in self.components:
            up = lora.read(lora.tensors[f"{unit.name}.lora_up.weight"])
            down = lora.read(lora.tensors[f"{unit.name}.lora_down.weight"])
            up = up.reshape(up.shape[0], -1).to(self.device, self.dtype)
            update = up @ down.reshape(down.shape[0], -1).to(self.device, self.dtype)
            for m, strength in enumerate(multipliers.tolist()):  # no M-layer temporary
                deltas[m].sub_(update, alpha=strength)
        return deltas


def read_rows(checkpoint: Checkpoint, info, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor of two or more dimensions, flattened to 2-d, as stored:
    only those rows' bytes are read."""
    cols = math.prod(info.shape[1:])
    row_bytes = cols * info.dtype.itemsize
    buffer = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
    if buffer.numel():
        checkpoint.read_range(info, start * row_bytes, buffer.numpy())
    return buffer.view(info.dtype.torch).reshape(stop - start, cols)


def fit_component(
    residuals: Residuals,
    units: list[Unit],
    rank: int,
    iterations: int,
    write: Callable[[Unit, torch.Tensor, torch.Tensor], None],
    advance: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """One shared LoRA: λ from the Gram matrix, `iterations` alternations, then a last pass
    that hands each layer's (up, down) to `write`. Returns λ."""
    count = len(residuals.models)
    gram = torch.zeros(count, count, dtype=torch.float64)
    # each layer's tensors are dropped (del) before the next layer's are read: a loop
    # variable would otherwise keep the last M deltas alive while the next M are built
    for deltas in _each(residuals, units, advance):
        gram += _gram(deltas.reshape(count, -1))
        del deltas
    multipliers = top_eigenvector(gram)
    for _ in range(iterations):
        fitted = torch.zeros(count, dtype=torch.float64)
        energy = 0.0
        for deltas in _each(residuals, units, advance):
            up, down = shared_update(deltas, multipliers, rank)
            update = up @ down
            del up, down
            fitted += (deltas.reshape(count, -1) @ update.reshape(-1)).double().cpu()
            energy += float(_gram(update.reshape(1, -1)))
            del deltas, update
        if energy == 0:
            break
        multipliers = normalise(fitted / energy)
    for unit, deltas in zip(units, _each(residuals, units, advance)):
        up, down = shared_update(deltas, multipliers, rank)
        del deltas
        write(unit, up, down)
        del up, down
    return multipliers


GRAM_COLUMNS = 1 << 20  # columns of a float64 copy at a time: M × 8 MB, not a layer's worth


def _gram(flat: torch.Tensor) -> torch.Tensor:
    """flat · flatᵀ (M × M) summed in float64 over column chunks, on the CPU."""
    gram = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64)
    for chunk in flat.split(GRAM_COLUMNS, dim=1):
        chunk = chunk.double()
        gram += (chunk @ chunk.T).cpu()
    return gram


def _each(residuals: Residuals, units: list[Unit], advance) -> Iterator[torch.Tensor]:
    for unit in units:
        yield residuals.of(unit)
        advance()
