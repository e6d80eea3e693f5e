"""Merge methods: one small module per family, each method registered by @merge_method."""

from weightmix.methods import arithmetic
from weightmix.methods.registry import METHODS, MethodSpec, get_method, merge_method

__all__ = ["METHODS", "MethodSpec", "arithmetic", "get_method", "merge_method"]
