"""Parameters that vary by block (supermerger's MBW): one value per block of the architecture.

Forms, the same in recipes, on the command line and in the API:
- a list with one value per block, in the architecture's order: [0.5, 1, 1, 0, ...] or the
  text "0.5,1,1,0,...";
- named values with ranges and a default: "IN00-IN05=0.2,M00=1,default=0.5", or in YAML the
  mapping {IN00-IN05: 0.2, M00: 1, default: 0.5}; a letters-only name (IN, OUT, D, S ...)
  stands for every block it begins (IN00 ... IN11), unless a block has that very name;
- a gradient: {gradient: [0, 1]}, points spread evenly over the blocks in order and the
  values between them interpolated linearly (as mergekit does over layers);
- a preset name (GRAD_V, FLAT_25, WRAP08 ...: `weightmix presets`).

A BlockValue is parsed without knowing the architecture; `per_block()` resolves it against one
(the plan does that, from the detected architecture, before anything is read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from weightmix.arch import read_data_yaml
from weightmix.errors import WeightmixError, closest

SD1_BLOCKS = 26  # supermerger's list: BASE, IN00-IN11, M00, OUT00-OUT11
SD1_TO_SDXL = [0, *range(1, 10), 13, *range(14, 23)]  # BASE, IN00-IN08, M00, OUT00-OUT08


@cache
def presets() -> dict[str, tuple[float, ...]]:
    """The shipped presets: name -> 26 values in supermerger's SD1 order."""
    return {
        name: tuple(float(v) for v in values)
        for name, values in read_data_yaml("presets.yaml")["presets"].items()
    }


@dataclass(frozen=True)
class BlockValue:
    """A parameter value given per block, as written (`written` is kept for messages and the
    recorded recipe); `form` is list, named, gradient or preset."""

    written: Any = field(compare=False)
    form: str
    values: tuple[float, ...] = ()  # list, gradient points, preset values
    named: tuple[tuple[str, float], ...] = ()  # (block or range, value), in order
    default: float | None = None
    preset: str | None = None

    def numbers(self) -> list[float]:
        """Every number written (checked against the parameter's type and range)."""
        numbers = [*self.values, *(v for _, v in self.named)]
        return numbers + ([self.default] if self.default is not None else [])

    def describe(self) -> str:
        if self.form == "preset":
            return f"preset {self.preset}"
        return {"list": "a block list", "named": "named blocks", "gradient": "a gradient"}[
            self.form
        ]


def parse_block_value(value: Any, name: str) -> BlockValue | None:
    """The BlockValue `value` stands for, or None when it is a plain value (a number)."""
    if isinstance(value, (list, tuple)):
        return BlockValue(value, "list", values=tuple(_number(v, name) for v in value))
    if isinstance(value, dict):
        if "gradient" in value:
            return _gradient(value, name)
        named = [(str(k), _number(v, name)) for k, v in value.items() if str(k) != "default"]
        default = _number(value["default"], name) if "default" in value else None
        return BlockValue(value, "named", named=tuple(named), default=default)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if _is_number(text):
        return None
    if "=" in text:
        pairs = [part.partition("=") for part in text.split(",") if part.strip()]
        bad = next((p for p, eq, v in pairs if not eq or not p.strip() or not v.strip()), None)
        if bad is not None:
            raise WeightmixError(
                f"{name}='{value}': write named blocks as BLOCK=VALUE or FIRST-LAST=VALUE,"
                " separated by commas (default=VALUE for the rest)"
            )
        named = [
            (p.strip(), _number(v.strip(), name)) for p, _, v in pairs if p.strip() != "default"
        ]
        defaults = [_number(v.strip(), name) for p, _, v in pairs if p.strip() == "default"]
        default = defaults[-1] if defaults else None  # later names win
        return BlockValue(value, "named", named=tuple(named), default=default)
    if "," in text:
        return BlockValue(value, "list", values=tuple(_number(v, name) for v in text.split(",")))
    found = {p.lower(): p for p in presets()}.get(text.lower())
    if found is None:
        raise WeightmixError(
            f"{name}='{value}' is not a number, a block list or a preset"
            f"{closest(text.upper(), presets())}; presets: {', '.join(presets())}"
        )
    return BlockValue(value, "preset", values=presets()[found], preset=found)


def _gradient(value: dict, name: str) -> BlockValue:
    points = value["gradient"]
    extra = set(value) - {"gradient"}
    if extra:
        raise WeightmixError(
            f"{name}: a gradient is {{gradient: [FIRST, ..., LAST]}} alone;"
            f" drop '{sorted(extra)[0]}'"
        )
    if not isinstance(points, (list, tuple)) or len(points) < 2:
        raise WeightmixError(
            f"{name}: a gradient needs at least two points, e.g. {{gradient: [0, 1]}};"
            f" got {points!r}"
        )
    return BlockValue(value, "gradient", values=tuple(_number(p, name) for p in points))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(value: Any, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, str))
        or (isinstance(value, str) and not _is_number(value.strip()))
    ):
        raise WeightmixError(f"{name}: block value {value!r} is not a number")
    return float(value)


def per_block(
    value: BlockValue, blocks: tuple[str, ...], architecture: str, name: str
) -> tuple[list[float], str | None]:
    """One value per block of `blocks`, and a note when the values were converted."""
    if value.form == "gradient":
        return _interpolate(value.values, len(blocks)), None
    if value.form == "named":
        return _named(value, blocks, architecture, name), None
    values = list(value.values)
    if len(values) == len(blocks):
        return values, None
    if len(values) == SD1_BLOCKS and architecture == "sdxl":
        kept = [values[i] for i in SD1_TO_SDXL]
        what = value.describe()
        return kept, (
            f"{name}: {what} has SD1's 26 values; for sdxl kept BASE, IN00-IN08, M00 and"
            " OUT00-OUT08 (as supermerger converts them)"
        )
    accepted = f"{len(blocks)} ({span(blocks)})"
    if architecture == "sdxl":
        accepted += " or 26 (an SD1 list, converted)"
    raise WeightmixError(
        f"{name}: {value.describe()} has {len(values)} values, but {architecture} takes {accepted}"
    )


def span(blocks: tuple[str, ...]) -> str:
    """BASE, IN00-IN11, M00, OUT00-OUT11: the block list written short."""
    groups: list[list[str]] = []
    for block in blocks:
        prefix = block.rstrip("0123456789")
        if groups and groups[-1][0].rstrip("0123456789") == prefix and prefix != block:
            groups[-1].append(block)
        else:
            groups.append([block])
    return ", ".join(g[0] if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in groups)


def _interpolate(points: tuple[float, ...], count: int) -> list[float]:
    """`count` values along the piecewise-linear curve through `points`, spread evenly."""
    if count == 1:
        return [points[0]]
    values = []
    for index in range(count):
        position = index / (count - 1) * (len(points) - 1)
        left = min(int(position), len(points) - 2)
        fraction = position - left
        values.append(points[left] * (1 - fraction) + points[left + 1] * fraction)
    return values


def _named(value: BlockValue, blocks: tuple[str, ...], architecture: str, name: str) -> list[float]:
    chosen: dict[str, float] = {}
    for label, number in value.named:
        for block in select_blocks(label, blocks, architecture, name):
            chosen[block] = number
    missing = [b for b in blocks if b not in chosen]
    if missing and value.default is None:
        raise WeightmixError(
            f"{name}: blocks {span(tuple(missing))} have no value: add default=VALUE (or name them)"
        )
    return [chosen.get(b, value.default) for b in blocks]  # type: ignore[misc]


def select_blocks(text: str, blocks: tuple[str, ...], architecture: str, where: str) -> list[str]:
    """The blocks `text` names: a block, FIRST-LAST, or a letters-only group (IN, OUT, D ...);
    comma-separated lists of those too."""
    chosen: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        upper = part.upper()
        if upper in blocks:
            chosen.append(upper)
            continue
        if "-" in upper:
            first, _, last = (p.strip() for p in upper.partition("-"))
            for end in (first, last):
                _known(end, blocks, architecture, where)
            start, stop = blocks.index(first), blocks.index(last)
            if stop < start:
                raise WeightmixError(
                    f"{where}: block range {part} runs backwards ({architecture} orders"
                    f" {last} before {first}): write {last}-{first}"
                )
            chosen += blocks[start : stop + 1]
            continue
        group = [b for b in blocks if re.fullmatch(rf"{re.escape(upper)}\d+", b)]
        if not group or not upper.isalpha():  # IN1 is no group: IN01 or IN10 was meant
            _known(upper, blocks, architecture, where)
        chosen += group
    return chosen


def _known(block: str, blocks: tuple[str, ...], architecture: str, where: str) -> None:
    if block not in blocks:
        raise WeightmixError(
            f"{where}: '{block}' is not a block of {architecture}{closest(block, blocks)};"
            f" its blocks: {span(blocks)}"
        )
