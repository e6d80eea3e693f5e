"""weightmix: merge model checkpoints as a stream, validated before a byte is read.

The public names below are imported on first use (PEP 562), so that `import weightmix...`
of a module that needs no torch (weightmix.readahead, run before the command line's imports)
does not import it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "MergeResult": "weightmix.api",
    "dry_run": "weightmix.api",
    "execute": "weightmix.api",
    "make_plan": "weightmix.api",
    "merge": "weightmix.api",
    "merge_iter": "weightmix.api",
    "merge_to_state_dict": "weightmix.api",
    "WeightmixError": "weightmix.errors",
    "open_checkpoint": "weightmix.io",
    "METHODS": "weightmix.methods",
    "merge_method": "weightmix.methods",
    "MergeNode": "weightmix.recipe",
    "Recipe": "weightmix.recipe",
    "Rule": "weightmix.recipe",
    "load_recipe": "weightmix.recipe",
    "node": "weightmix.recipe",
    "parse_recipe": "weightmix.recipe",
}

__all__ = [
    "METHODS",
    "MergeNode",
    "MergeResult",
    "Recipe",
    "Rule",
    "WeightmixError",
    "__version__",
    "dry_run",
    "execute",
    "load_recipe",
    "make_plan",
    "merge",
    "merge_iter",
    "merge_method",
    "merge_to_state_dict",
    "node",
    "open_checkpoint",
    "parse_recipe",
]

if TYPE_CHECKING:
    from weightmix.api import (
        MergeResult,
        dry_run,
        execute,
        make_plan,
        merge,
        merge_iter,
        merge_to_state_dict,
    )
    from weightmix.errors import WeightmixError
    from weightmix.io import open_checkpoint
    from weightmix.methods import METHODS, merge_method
    from weightmix.recipe import MergeNode, Recipe, Rule, load_recipe, node, parse_recipe


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'weightmix' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
