"""How alike models are, per block and component (or per key), each against the first: cosine
similarity cos = ⟨A, M⟩ / (‖A‖·‖M‖), relative distance ‖M − A‖ / ‖A‖, and the least-squares
scale s = ⟨A, M⟩ / ‖M‖² that brings M closest to A (min_s ‖A − s·M‖: the α or β to try in
lossless/maxdiff). For three models, the share of elements each would supply to `lossless` and
`maxdiff` (seed 002). Streams like a merge: each key read in the engine's chunks, each input
read once, float64 sums."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from weightmix import api
from weightmix.arch.families import Architecture
from weightmix.engine import key_chunks
from weightmix.errors import WeightmixError
from weightmix.plan import Plan


@dataclass
class Sums:
    """Running float64 sums of one group, for models 1 .. M−1 against model 0."""

    count: int = 0  # elements
    first: float = 0.0  # ‖A‖²
    dots: list[float] = field(default_factory=list)  # ⟨A, M⟩
    norms: list[float] = field(default_factory=list)  # ‖M‖²
    distances: list[float] = field(default_factory=list)  # ‖M − A‖²
    from_c: int = 0  # elements lossless takes from c (three models)
    ties: int = 0  # elements where the two distances are equal (lossless: b, maxdiff: c)

    def add(self, tensors: list[torch.Tensor], alpha: float, beta: float) -> None:
        first = tensors[0]
        others = tensors[1:]
        if not self.dots:
            self.dots = [0.0] * len(others)
            self.norms = [0.0] * len(others)
            self.distances = [0.0] * len(others)
        self.count += first.numel()
        self.first += float(first.square().sum())
        for index, other in enumerate(others):
            self.dots[index] += float((first * other).sum())
            self.norms[index] += float(other.square().sum())
            self.distances[index] += float((other - first).square().sum())
        if len(tensors) == 3:
            near_b = (first - alpha * others[0]).abs()
            near_c = (first - beta * others[1]).abs()
            self.from_c += int((near_b > near_c).sum())
            self.ties += int((near_b == near_c).sum())

    def row(self) -> dict[str, object]:
        figures = []
        for dot, norm, distance in zip(self.dots, self.norms, self.distances):
            product = (self.first * norm) ** 0.5
            values = {
                "cosine": dot / product if product else None,
                "relative_l2": (distance / self.first) ** 0.5 if self.first else None,
                "scale": dot / norm if norm else None,
            }  # non-finite (inf or NaN weights): None, valid JSON
            figures.append({k: v if v is None or math.isfinite(v) else None
                            for k, v in values.items()})  # fmt: skip
        row: dict[str, object] = {"elements": self.count, "models": figures}
        if len(self.dots) == 2 and self.count:
            from_b = self.count - self.from_c
            row["lossless"] = {"b": from_b / self.count, "c": self.from_c / self.count}
            maxdiff_b = self.from_c  # maxdiff takes b where d_b > d_c, c otherwise
            row["maxdiff"] = {"b": maxdiff_b / self.count, "c": 1 - maxdiff_b / self.count}
        return row


@dataclass
class Similarity:
    models: dict[str, str]  # name -> path, the first is the reference
    groups: dict[str, dict[str, object]]  # 'component/block' (or the key) -> its row
    total: dict[str, object]


def similarity_plan(paths: dict[str, str]) -> Plan:
    """A plan over the models: checked against each other and aligned, like a merge's."""
    names = list(paths)
    recipe = {
        "models": paths,
        "merge": {"method": "weighted_sum", "inputs": names},
        "on_missing": "skip",  # the keys the models share are compared
        "compute_dtype": "fp64",  # chunks read as float64
    }
    try:
        return api.make_plan(recipe)
    except WeightmixError as error:  # the merge's hints name flags similarity has not
        if "writes no tensor" in str(error):
            raise WeightmixError("the models share no key: nothing to compare") from None
        raise WeightmixError(str(error).split(". Pass --")[0].split("; take it from")[0]) from None


def group_of(plan: Plan, key: str, per_key: bool) -> str:
    if per_key:
        return key
    architecture = plan.architecture
    if isinstance(architecture, Architecture):
        component = architecture.component_of(key) or "other"
        block = architecture.block_of(key)
        return f"{component}/{block}" if block else component
    return "model"


def measure_similarity(
    paths: dict[str, str],
    per_key: bool = False,
    alpha: float = 1.0,
    beta: float = 1.0,
    advance: Callable[[int], None] = lambda nbytes: None,
) -> Similarity:
    plan = similarity_plan(paths)
    try:
        names = list(plan.checkpoints)
        groups: dict[str, Sums] = {}
        total = Sums()
        for key in plan.keys:
            if not key.out_dtype.is_float:
                continue
            sums = groups.setdefault(group_of(plan, key.key, per_key), Sums())
            for chunk in key_chunks(plan, key):
                tensors = [chunk[name] for name in names]
                sums.add(tensors, alpha, beta)
                total.add(tensors, alpha, beta)
            advance(sum(info.nbytes for info in key.sources.values()))
        if not groups:
            raise WeightmixError("the models share no float key: nothing to compare")
        order = _order(plan, list(groups))
    finally:
        plan.close()
    return Similarity(dict(paths), {name: groups[name].row() for name in order}, total.row())


def _order(plan: Plan, names: list[str]) -> list[str]:
    """Groups by component (as first met), then in the architecture's block order."""
    architecture = plan.architecture
    if not isinstance(architecture, Architecture):
        return names
    components = list(dict.fromkeys(name.split("/")[0] for name in names))
    blocks = {block: index for index, block in enumerate(architecture.blocks)}

    def place(name: str) -> tuple[int, int]:
        component, _, block = name.partition("/")
        return components.index(component), blocks.get(block, -1)

    return sorted(names, key=place)
