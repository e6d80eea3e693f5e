"""weightmix: merge model checkpoints as a stream, validated before a byte is read."""

__version__ = "0.1.0"

import gc

# Importing torch creates about a million objects and no garbage: the cyclic collector's
# passes over them during the import are a tenth of `weightmix merge`'s start-up. Paused for
# the imports below (they bring in torch), then left as the importer had it.
_collecting = gc.isenabled()
gc.disable()

from weightmix.api import (  # noqa: E402
    MergeResult,
    dry_run,
    execute,
    make_plan,
    merge,
    merge_iter,
    merge_to_state_dict,
)
from weightmix.errors import WeightmixError  # noqa: E402
from weightmix.io import open_checkpoint  # noqa: E402
from weightmix.methods import METHODS, merge_method  # noqa: E402
from weightmix.recipe import MergeNode, Recipe, Rule, load_recipe, node, parse_recipe  # noqa: E402

if _collecting:
    gc.enable()

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
