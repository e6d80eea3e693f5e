"""What a search trial's merge is scored by. Each objective takes the trial recipe (data and
the folder its relative paths start from) and returns a float.

- distance: the L2 distance ‖merged − target‖ over every merged key, summed in float64
  (minimised); the merge streams key by key (api.merge_iter), so memory stays a few keys.
- cosine: ⟨merged, target⟩ / (‖merged‖·‖target‖) over the whole model (maximised).
- balance: for each block b and input model i, the cosine c_bi of the merged block to the
  input's; the score is −mean_b(max_i c_bi − min_i c_bi), 0 when every block is as close to
  each input as to the others (maximised).
- callable: "package.module:function", called with the merged {key: tensor} (in memory) and
  returning a number.
- images: the merge loaded into a diffusers pipeline (kept loaded between a worker's trials),
  one image per prompt, and "package.module:function" called with the list of PIL images.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weightmix.api import make_plan, merge_iter, merge_to_state_dict
from weightmix.errors import WeightmixError
from weightmix.io import open_checkpoint
from weightmix.methods.reductions import gram
from weightmix.recipe import parse_recipe
from weightmix.search.spec import Objective


class TrialFailed(Exception):
    """A trial that cannot be scored (the message says why); the search goes on."""


def score(objective: Objective, data: dict[str, Any], folder: Path, threads: int = 1) -> float:
    """The objective's value for the merge `data` describes."""
    recipe = parse_recipe(data, "trial recipe", folder)
    kind = objective.kind()
    if str(folder) not in sys.path:  # a scorer module beside the search file imports
        sys.path.append(str(folder))
    if kind == "callable":
        assert objective.callable is not None
        function = load_callable(objective.callable)
        state = merge_to_state_dict(recipe, threads=threads)
        value = function(state)
        return as_number(value, objective.callable)
    if kind == "balance":
        return as_number(_balance(recipe, threads), "balance")
    if kind == "images":
        assert objective.images is not None
        return _images(objective.images, recipe, threads)
    target = objective.distance if kind == "distance" else objective.cosine
    assert target is not None
    return as_number(_against_target(recipe, recipe.resolve(target), kind, threads), kind)


def load_callable(text: str) -> Callable[[dict[str, torch.Tensor]], Any]:
    """ "package.module:function" imported, or WeightmixError saying why not."""
    module_name, _, attribute = text.partition(":")
    if not module_name or not attribute:
        raise WeightmixError(f"objective {text!r}: write it as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module failing as it loads
        raise WeightmixError(
            f"objective {text!r}: cannot import {module_name}: {type(error).__name__}: {error}"
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise WeightmixError(f"objective {text!r}: {module_name} has no function {attribute}")
    return function


def as_number(value: Any, what: str) -> float:
    """A finite float from an objective's value, or TrialFailed (NaN from NaN weights ...)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrialFailed(f"objective {what} returned {type(value).__name__}, not a number")
    if not math.isfinite(value):
        raise TrialFailed(f"objective {what} returned {value}")
    return float(value)


def check_target(data: dict[str, Any], folder: Path, objective: Objective) -> None:
    """Before any merge: the target holds every merged key with the same shape."""
    target = objective.distance or objective.cosine
    if target is None:
        return
    recipe = parse_recipe(data, "search recipe", folder)
    path = recipe.resolve(target)
    plan = make_plan(recipe)
    try:
        with open_checkpoint(path) as checkpoint:
            for key in plan.keys:
                info = checkpoint.tensors.get(key.key)
                if info is None:
                    raise WeightmixError(
                        f"{path}: the target lacks {key.key!r}, which the merge writes:"
                        " compare against a checkpoint of the same model"
                    )
                if tuple(info.shape) != tuple(key.shape):
                    raise WeightmixError(
                        f"{path}: {key.key!r} is {list(info.shape)} in the target but"
                        f" {list(key.shape)} in the merge"
                    )
    finally:
        plan.close()


def _against_target(recipe: Any, path: Path, kind: str, threads: int) -> float:
    dot = merged_square = target_square = distance_square = 0.0
    with open_checkpoint(path) as checkpoint:
        for key, tensor in merge_iter(recipe, threads=threads):
            if not tensor.is_floating_point():
                continue
            target = checkpoint.read(checkpoint.tensors[key]).double().reshape(-1)
            merged = tensor.double().reshape(-1)
            if kind == "distance":
                distance_square += float(torch.sum((merged - target) ** 2))
            else:
                (mm, mt), (_, tt) = gram([merged, target])
                dot, merged_square, target_square = dot + mt, merged_square + mm, target_square + tt
    if kind == "distance":
        return math.sqrt(distance_square)
    norms = math.sqrt(merged_square) * math.sqrt(target_square)
    return dot / norms if norms else 0.0


def _balance(recipe: Any, threads: int) -> float:
    plan = make_plan(recipe)
    try:
        architecture = plan.architecture
        block_of = getattr(architecture, "block_of", None)
        if block_of is None:
            raise WeightmixError("objective balance: the models' architecture has no blocks")
        names = list(recipe.models)
        checkpoints = {name: plan.checkpoints[name] for name in names if name in plan.checkpoints}
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0] * (1 + 2 * len(names)))
        for key, tensor in merge_iter(recipe, threads=threads):
            block = block_of(key)
            if block is None or not tensor.is_floating_point():
                continue
            merged = tensor.reshape(-1)  # gram sums products in float64 (exact for fp32)
            row = sums[block]
            row[0] += gram([merged])[0][0]
            for index, name in enumerate(names):
                checkpoint = checkpoints.get(name)
                if checkpoint is None or key not in checkpoint:
                    continue
                other = checkpoint.read(checkpoint.tensors[key]).reshape(-1)
                if other.numel() != merged.numel():
                    continue
                (_, mo), (_, oo) = gram([merged, other])
                row[1 + 2 * index] += mo
                row[2 + 2 * index] += oo
    finally:
        plan.close()
    spreads = []
    for row in sums.values():
        cosines = [
            row[1 + 2 * i] / math.sqrt(row[0] * row[2 + 2 * i])
            for i in range(len(names))
            if row[0] > 0 and row[2 + 2 * i] > 0
        ]
        if len(cosines) >= 2:
            spreads.append(max(cosines) - min(cosines))
    if not spreads:
        raise TrialFailed("objective balance: no block holds two inputs to compare")
    return -sum(spreads) / len(spreads)


_PIPELINES: dict[tuple[str, str], Any] = {}  # a worker's pipeline, loaded once


def _images(images: Any, recipe: Any, threads: int) -> float:
    from weightmix.analysis.preview import generate, load_merged, load_pipeline, pipeline_folder

    given = recipe.resolve(images.pipeline) if images.pipeline else None
    folder = pipeline_folder(recipe, given, None)
    score_images = load_callable(images.score)
    key = (str(folder), images.device)
    if key not in _PIPELINES:
        _PIPELINES.clear()  # one pipeline in memory
        _PIPELINES[key] = load_pipeline(folder, images.device)
    pipeline = _PIPELINES[key]
    state = merge_to_state_dict(recipe, threads=threads)
    load_merged(pipeline, state)
    del state
    drawn = [generate(pipeline, folder, prompt, images.seed, images.steps, images.size,
                      images.device) for prompt in images.prompts]  # fmt: skip
    return as_number(score_images(drawn), images.score)
