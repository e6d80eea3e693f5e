"""weightmix: merge model checkpoints as a stream, validated before a byte is read."""

__version__ = "0.1.0"

import gc

# Importing torch creates about a million objects and no garbage: the cyclic collector's
# passes over them during the import are a tenth of `weightmix merge`'s start-up. Paused for
# the imports below (they bring in torch), then left as the importer had it.
_collecting = gc.isenabled()
gc.disable()
try:
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
finally:  # a failed import too leaves the collector as it was
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
