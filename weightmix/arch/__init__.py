"""Architectures as data: every key of public model layouts with its shape and dtype.

The JSON files hold facts about the layouts (key names, shapes, dtypes, which keys are
optional). They drive test and benchmark checkpoints today, detection and block maps later.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

ARCHITECTURES = ("sd1-ldm", "sdxl-sgm", "sd3-comfyui", "flux-flux")


def read_data_yaml(name: str) -> dict:
    """A YAML file shipped in arch/data, parsed by libyaml where PyYAML was built with it
    (the pure-Python parser took 0.13 s of every merge's start-up for families.yaml; the C
    one takes 3 ms; both give the same document)."""
    import yaml

    text = resources.files(__package__).joinpath("data", name).read_text("utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@dataclass(frozen=True)
class KeySpec:
    key: str
    component: str
    dtype: str  # safetensors dtype name: F32, BF16, I64 ...
    shape: tuple[int, ...]
    optional: bool


@cache
def load_architecture(name: str) -> tuple[KeySpec, ...]:
    """Every key of architecture `name` (one of ARCHITECTURES)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    text = resources.files(__package__).joinpath("data", f"{name}.json").read_text("utf-8")
    data = json.loads(text)
    return tuple(
        KeySpec(key, component, row[0], tuple(row[1]), len(row) > 2 and bool(row[2]))
        for component, keys in data["components"].items()
        for key, row in keys.items()
    )


def architecture_keys(
    name: str, components: tuple[str, ...] | None = None, optional: bool = False
) -> list[KeySpec]:
    """The keys a typical file of this architecture holds (optional keys such as EMA copies
    left out unless asked for), limited to `components` when given."""
    return [
        spec
        for spec in load_architecture(name)
        if (optional or not spec.optional) and (components is None or spec.component in components)
    ]


def scaled_shape(shape: tuple[int, ...], divisor: int) -> tuple[int, ...]:
    """Shrink every dimension by `divisor` (at least 1 element each) for tiny test models."""
    return tuple(max(1, math.ceil(d / divisor)) for d in shape)


@cache
def _key_sets(name: str) -> tuple[frozenset[str], frozenset[str]]:
    specs = load_architecture(name)
    return frozenset(s.key for s in specs), frozenset(s.key for s in specs if not s.optional)


def detect_architecture(keys: Iterable[str], threshold: float = 0.95) -> str | None:
    """The architecture whose key names hold at least `threshold` of `keys` (the one that
    covers most of its own required keys when several do), or None for unknown layouts."""
    names = set(keys)
    if not names:
        return None
    best: tuple[float, str] | None = None
    for architecture in ARCHITECTURES:
        every, required = _key_sets(architecture)
        if len(names & every) / len(names) < threshold:
            continue
        coverage = len(names & required) / len(required)
        if best is None or coverage > best[0]:
            best = (coverage, architecture)
    return best[1] if best else None
