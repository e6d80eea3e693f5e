"""Merge methods: one small module per family, each method registered by @merge_method."""

from weightmix.methods import (
    arithmetic,
    difference,
    prompted,
    robust,
    seeds,
    sparsify,
    spherical,
)
from weightmix.methods.registry import (
    METHODS,
    MethodSpec,
    describe_method,
    get_method,
    merge_method,
)

__all__ = [
    "METHODS",
    "MethodSpec",
    "arithmetic",
    "describe_method",
    "difference",
    "get_method",
    "merge_method",
    "prompted",
    "robust",
    "seeds",
    "sparsify",
    "spherical",
]
