"""A search file: a recipe in which some values are search variables, plus a `search:` section
(objective, budget, sampler, seed, where trials run).

    models: {A: a.safetensors, B: b.safetensors}
    merge:
      method: weighted_sum
      inputs: [A, B]
      alpha: {search: [0, 1], per: [IN, M00, OUT]}   # one variable per block group
    search:
      objective: {distance: target.safetensors}
      trials: 40

A variable is `{search: [low, high]}` (a float; `step: 0.05` for a grid, `log: true` for a
log scale), `{choice: [a, b, ...]}` (any values: methods, numbers, block values), and with
`per:` one variable per block (`per: block`) or per named block, range or group (`per: [IN,
M00, OUT, default]`), which becomes a block-value mapping. Each variable is named by where it
stands (`merge.alpha`, `merge.inputs[0].alpha.IN`, `rules[1].params.style.alpha`); the trial
recipe is the file with every variable replaced by a value and without `search:`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from weightmix.errors import WeightmixError
from weightmix.recipe import _first_problem, read_recipe_data

Sampler = Literal["tpe", "cmaes", "random"]


class Images(BaseModel):
    """A score of images the merged model draws (diffusion models; the `preview` extra): one
    image per prompt from a diffusers pipeline folder with the merge loaded into it, each from
    a generator seeded with `seed`; `score` ("package.module:function") gets the list of PIL
    images and returns a number."""

    model_config = ConfigDict(extra="forbid")

    score: str
    prompts: list[str] = Field(min_length=1)
    steps: int = Field(20, ge=1)
    size: int = Field(512, ge=8, multiple_of=8)
    seed: int = 0
    device: str = "cpu"
    pipeline: str | None = None  # default: the layout model, when it is a pipeline folder


class Objective(BaseModel):
    """What a trial's merge is scored by: exactly one of the fields."""

    model_config = ConfigDict(extra="forbid")

    distance: str | None = None  # a checkpoint: minimise the L2 distance to it
    cosine: str | None = None  # a checkpoint: maximise the cosine similarity to it
    balance: bool | None = None  # maximise how evenly each block resembles every input
    callable: str | None = None  # "package.module:function" of the merged {key: tensor}
    images: Images | None = None  # a score of images the merge draws
    # for callable and images (default maximize); the others set their own
    direction: Literal["maximize", "minimize"] | None = None

    @field_validator("distance", "cosine", "callable")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    def kind(self) -> str:
        given = [name for name in ("distance", "cosine", "balance", "callable", "images")
                 if getattr(self, name) not in (None, False)]  # fmt: skip
        if len(given) != 1:
            raise WeightmixError(
                "search.objective: give exactly one of distance, cosine, balance, callable,"
                f" images (got {', '.join(given) or 'none'})"
            )
        return given[0]

    def goal(self) -> str:
        """'maximize' or 'minimize'."""
        kind = self.kind()
        if kind in ("callable", "images"):
            return self.direction or "maximize"
        if self.direction is not None:
            raise WeightmixError(f"search.objective: {kind} sets its own direction; drop it")
        return "minimize" if kind == "distance" else "maximize"


class Settings(BaseModel):
    """The `search:` section."""

    model_config = ConfigDict(extra="forbid")

    objective: Objective
    trials: int = Field(50, ge=1, strict=True)
    timeout: float | None = Field(None, gt=0)  # seconds for the whole search
    sampler: Sampler = "tpe"
    seed: int = Field(0, strict=True)
    workers: int = Field(1, ge=1, strict=True)  # trials at once (bounded by memory per trial)
    storage: str | None = None  # an SQLAlchemy URL; default: sqlite file beside the search file
    study: str | None = None  # the study's name in the storage; default: the file's stem
    gpus: float = Field(0, ge=0)  # GPUs per trial (Ray)
    give_up_after: int = Field(5, ge=1, strict=True)  # stop when this many first trials all failed
    # with --ray: send the input files (and a distance/cosine target) through Ray's object
    # store once, for nodes that do not see the driver's paths
    ship_inputs: bool = False

    @field_validator("storage", "study")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value


@dataclass(frozen=True)
class Variable:
    """One searched value: a float range or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return f"{self.name}: one of {list(self.choices)}"
        scale = ", log scale" if self.log else f", step {self.step:g}" if self.step else ""
        return f"{self.name}: {self.low:g} to {self.high:g}{scale}"


@dataclass
class Slot:
    """Where variables go in the recipe data: `path` (keys and indexes) and how the values
    fill it: one variable, or a block mapping of several."""

    path: tuple[str | int, ...]
    variables: list[Variable]
    blocks: list[str] | None = None  # the mapping's block names, or None for one value


@dataclass
class SearchSpec:
    """A parsed search file."""

    source: Path
    recipe_data: dict[str, Any]  # with the variables still in (see trial_data)
    settings: Settings
    slots: list[Slot] = field(default_factory=list)

    @property
    def variables(self) -> list[Variable]:
        return [v for slot in self.slots for v in slot.variables]

    @property
    def folder(self) -> Path:
        return self.source.parent

    @property
    def stem(self) -> str:
        return self.source.name.removesuffix(".yaml").removesuffix(".yml")

    def storage_url(self) -> str:
        """search.storage (a relative SQLite path taken from the search file's folder), or
        NAME.db beside the search file."""
        url = self.settings.storage
        if not url:
            return f"sqlite:///{(self.folder / (self.stem + '.db')).resolve()}"
        prefix = "sqlite:///"
        if url.startswith(prefix) and url != prefix and not Path(url[len(prefix) :]).is_absolute():
            return prefix + str((self.folder / url[len(prefix) :]).resolve())
        return url

    def sqlite_file(self) -> Path | None:
        url = self.storage_url()
        return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None

    def fingerprint(self) -> str:
        """The variables and their ranges or choices, as stored with the study: a resumed
        search must search the same space (Optuna's records would not fit another)."""
        return json.dumps([[v.name, v.low, v.high, v.step, v.log, v.choices]
                           for v in self.variables], default=repr)  # fmt: skip

    def study_name(self) -> str:
        return self.settings.study or self.stem

    def trial_data(self, values: dict[str, Any]) -> dict[str, Any]:
        """The recipe data with each variable replaced by its value in `values`."""
        data = copy.deepcopy(self.recipe_data)
        for slot in self.slots:
            if slot.blocks is None or slot.blocks == [PER_BLOCK]:  # (one value for all)
                value = values[slot.variables[0].name]
            else:
                value = {block: values[v.name] for block, v in zip(slot.blocks, slot.variables)}
            _put(data, slot.path, value)
        return data

    def first_values(self) -> dict[str, Any]:
        """A value for every variable (the middle of a range, the first choice): the trial the
        file is validated with before the search starts."""
        values: dict[str, Any] = {}
        for v in self.variables:
            if v.choices is not None:
                values[v.name] = v.choices[0]
            elif v.log:
                assert v.low is not None and v.high is not None
                values[v.name] = math.sqrt(v.low * v.high)
            else:
                assert v.low is not None and v.high is not None
                middle = (v.low + v.high) / 2
                if v.step:
                    middle = v.low + round((middle - v.low) / v.step) * v.step
                values[v.name] = middle
        return values


def load_search(path: Path) -> SearchSpec:
    """Read a search file. Variables with `per: block` wait for the architecture's blocks
    (expand_blocks). Raises WeightmixError, one line, for any problem."""
    data = read_recipe_data(path)
    section = data.pop("search", None)
    if not isinstance(section, dict):
        raise WeightmixError(
            f"{path}: a search file is a recipe with a 'search:' section (objective, trials ...)"
        )
    try:
        settings = Settings.model_validate(section)
    except ValidationError as error:
        raise WeightmixError(f"{path}: search.{_first_problem(error)}") from None
    try:
        settings.objective.goal()  # one objective, a direction that fits it
    except WeightmixError as error:
        raise WeightmixError(f"{path}: {error}") from None
    data = _unshared(data)  # a YAML alias repeats a node: each place gets its own variables
    spec = SearchSpec(path, data, settings)
    for where, value in list(_walk(data, ())):
        if isinstance(value, dict) and ("search" in value or "choice" in value):
            spec.slots.append(_slot(where, value, path))
    if not spec.slots:
        raise WeightmixError(
            f"{path}: no search variable: write a value as {{search: [low, high]}} or"
            " {choice: [a, b]}"
        )
    return spec


def expand_blocks(spec: SearchSpec, blocks: tuple[str, ...] | None) -> None:
    """Give each `per: block` variable one variable per block of the architecture."""
    for slot in spec.slots:
        if slot.blocks == [PER_BLOCK]:
            name, template = slot.variables[0].name, slot.variables[0]
            if not blocks:
                raise WeightmixError(
                    f"{spec.source}: {name}: per: block needs an architecture with blocks;"
                    " the models' is not known: name the blocks (per: [IN, M00, OUT])"
                )
            slot.blocks = list(blocks)
            slot.variables = [_renamed(template, f"{name}.{b}") for b in blocks]


def pending_blocks(spec: SearchSpec) -> bool:
    return any(slot.blocks == [PER_BLOCK] for slot in spec.slots)


def _renamed(variable: Variable, name: str) -> Variable:
    return Variable(name, variable.low, variable.high, variable.step, variable.log,
                    variable.choices)  # fmt: skip


def _unshared(value: Any) -> Any:
    """A copy in which no dict or list appears twice (YAML aliases share them)."""
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value


def _walk(value: Any, where: tuple[str | int, ...]) -> Iterator[tuple[tuple, Any]]:
    yield where, value
    if isinstance(value, dict) and not ("search" in value or "choice" in value):
        for key, item in value.items():
            yield from _walk(item, (*where, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*where, index))


def _name(where: tuple[str | int, ...]) -> str:
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _put(data: Any, where: tuple[str | int, ...], value: Any) -> None:
    for part in where[:-1]:
        data = data[part]
    data[where[-1]] = value


PER_BLOCK = "*"  # a slot's blocks until expand_blocks names them


def _slot(where: tuple, value: dict, path: Path) -> Slot:
    name = _name(where)
    if where and where[0] in ("models",):
        raise WeightmixError(f"{path}: {name}: search variables go on parameters, not model paths")
    allowed = {"search", "choice", "step", "log", "per"}
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown or ("search" in value) == ("choice" in value):
        raise WeightmixError(
            f"{path}: {name}: a search variable is {{search: [low, high]}} (with step, log, per)"
            f" or {{choice: [a, b, ...]}} (with per){f'; unknown {unknown}' if unknown else ''}"
        )
    per = value.get("per")
    if per is None:
        return Slot(where, [_variable(name, value, path)])
    if per == "block":  # one variable until the blocks are known
        return Slot(where, [_variable(name, value, path)], [PER_BLOCK])
    if not (isinstance(per, list) and per and all(isinstance(b, str) and b.strip() for b in per)):
        raise WeightmixError(
            f"{path}: {name}: per is 'block' or a list of blocks, ranges or groups"
            " (e.g. [IN, M00, OUT])"
        )
    blocks = [b.strip() for b in per]
    if len(set(blocks)) != len(blocks) or PER_BLOCK in blocks:
        raise WeightmixError(f"{path}: {name}: per names a block twice")
    variables = [_variable(f"{name}.{block}", value, path) for block in blocks]
    return Slot(where, variables, blocks)


def _finite(value: Any) -> float | None:
    """A YAML number as a finite float, or None (not a number, a bool, inf, NaN, or an
    integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _variable(name: str, value: dict, path: Path) -> Variable:
    if "choice" in value:
        choices = value["choice"]
        if not isinstance(choices, list) or not choices:
            raise WeightmixError(f"{path}: {name}: choice is a non-empty list of values")
        if "step" in value or "log" in value:
            raise WeightmixError(f"{path}: {name}: step and log go with search ranges, not choice")
        return Variable(name, choices=tuple(choices))
    bounds = value["search"]
    if not isinstance(bounds, list) or len(bounds) != 2 or None in map(_finite, bounds):
        raise WeightmixError(f"{path}: {name}: search is [low, high], two finite numbers")
    low, high = _finite(bounds[0]), _finite(bounds[1])
    assert low is not None and high is not None
    if not low < high:
        raise WeightmixError(
            f"{path}: {name}: the range [{bounds[0]}, {bounds[1]}] is empty or reversed:"
            " give [low, high] with low < high"
        )
    step, log = value.get("step"), value.get("log", False)
    if step is not None:
        step = _finite(step)
        if step is None or not 0 < step <= high - low:
            raise WeightmixError(f"{path}: {name}: step must be a number in (0, high - low]")
    if not isinstance(log, bool):
        raise WeightmixError(f"{path}: {name}: log is true or false")
    if log and (low <= 0 or step is not None):
        raise WeightmixError(f"{path}: {name}: a log scale needs low > 0 and no step")
    if step is not None and abs((high - low) / step - round((high - low) / step)) > 1e-9:
        raise WeightmixError(
            f"{path}: {name}: step {step:g} does not divide [{low:g}, {high:g}] into equal"
            " steps: change the step or the range"
        )
    return Variable(name, low, high, float(step) if step is not None else None, log)
