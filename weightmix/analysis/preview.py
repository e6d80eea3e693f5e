"""`weightmix preview`: a recipe swept over one or two parameters, each merge made in memory,
loaded into a diffusers pipeline from a local folder, and one image per cell with the same
prompt, seed and steps, laid out as a labelled grid. One merged model is in memory at a time."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightmix import api
from weightmix.errors import WeightmixError, closest
from weightmix.methods import METHODS
from weightmix.recipe import Recipe

EXTRA = "preview needs diffusers, transformers and Pillow: pip install 'weightmix[preview]'"
LABEL = 28  # pixels of the label bands


@dataclass(frozen=True)
class Sweep:
    name: str  # 'alpha' (every node that has it) or 'node.alpha'
    values: list[Any]


def parse_sweep(text: str, parse_value: Callable[[str, str], Any]) -> Sweep:
    name, sep, values = text.partition("=")
    if not sep or not name.strip() or not values.strip():
        raise WeightmixError(f"--param {text!r}: write it as NAME=V1,V2,...")
    parsed = [parse_value(v.strip(), f"--param {name}") for v in values.split(",") if v.strip()]
    if not parsed:
        raise WeightmixError(f"--param {text!r}: give at least one value")
    return Sweep(name.strip(), parsed)


def _nodes(expression: Any) -> list[dict]:
    if not isinstance(expression, dict):
        return []
    found = [expression]
    for child in expression.get("inputs", []):
        found += _nodes(child)
    return found


def with_value(data: dict, sweep: Sweep, value: Any) -> dict:
    """The recipe data with `value` for the swept parameter on every node that takes it."""
    changed = copy.deepcopy(data)
    node_name, _, param = sweep.name.rpartition(".")
    hits = 0
    for node in _nodes(changed["merge"]):
        method = METHODS.get(node.get("method", ""))
        if method is None or param not in method.params:
            continue
        if node_name and node.get("name") != node_name:
            continue
        node[param] = value
        hits += 1
    if not hits:
        methods = [METHODS.get(n.get("method", "")) for n in _nodes(changed["merge"])]
        known = sorted({p for m in methods if m is not None for p in m.params})
        raise WeightmixError(
            f"--param {sweep.name}: no method of this recipe has it{closest(param, known)};"
            f" parameters: {', '.join(known) or 'none'}"
        )
    return changed


LAYOUTS = {
    "sd1": "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/",
    "sd2": "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/",
    "sdxl": "model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/,"
    " tokenizer_2/, scheduler/",
    "flux": "model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,"
    " tokenizer_2/, scheduler/",
}


def pipeline_folder(recipe: Recipe, given: Path | None, family: str | None) -> Path:
    """--pipeline, else the layout model when it is a diffusers pipeline folder."""
    expected = LAYOUTS.get(family or "", "model_index.json and its components' folders")
    if given is not None:
        folder = given
        if not folder.is_dir():
            raise WeightmixError(f"--pipeline {folder}: no such folder")
        if not (folder / "model_index.json").is_file():
            raise WeightmixError(
                f"--pipeline {folder}: not a diffusers pipeline folder; for this model it"
                f" needs {expected}"
            )
        return folder
    layout = recipe.layout if recipe.layout in recipe.models else next(iter(recipe.models))
    folder = recipe.model_path(layout)
    if not (folder / "model_index.json").is_file():
        raise WeightmixError(
            f"preview loads the merge into a diffusers pipeline, and the layout model {layout}"
            f" ({folder}) is not a pipeline folder: make it one (for this model: {expected})"
        )
    return folder


def check_sweeps(recipe_data: dict, sweeps: list[Sweep], base_dir: Path) -> str | None:
    """Before the pipeline loads: each sweep reaches its own parameters (two sweeps may not
    set the same one), and every variant plans (headers only) to a pipeline-named merge.
    The family of the layout model, for messages."""
    if len(sweeps) == 2 and _targets(recipe_data, sweeps[0]) & _targets(recipe_data, sweeps[1]):
        raise WeightmixError(
            f"--param {sweeps[0].name} and --param {sweeps[1].name} set the same parameter:"
            " sweep two different ones (name a node: NODE.param)"
        )
    family = None
    columns = sweeps[0]
    rows = sweeps[1] if len(sweeps) == 2 else Sweep("", [None])
    for row_value in rows.values:
        for column_value in columns.values:
            data = with_value(recipe_data, columns, column_value)
            if rows.name:
                data = with_value(data, rows, row_value)
            planned = api.make_plan(api.as_recipe(data).with_base_dir(base_dir))
            try:
                base = planned.base_folder
                family = getattr(planned.architecture, "family", None)
                family = getattr(family, "name", None)
                if base is None or not base.pipeline:
                    expected = LAYOUTS.get(family or "", "model_index.json and its components")
                    raise WeightmixError(
                        "preview loads the merge into a diffusers pipeline, and the recipe's"
                        " layout model is not a pipeline folder: make it one (for this model:"
                        f" {expected})"
                    )
            finally:
                planned.close()
    return family


def _targets(data: dict, sweep: Sweep) -> set[tuple[int, str]]:
    node_name, _, param = sweep.name.rpartition(".")
    found = set()
    for index, node in enumerate(_nodes(data["merge"])):
        method = METHODS.get(node.get("method", ""))
        reached = method is not None and param in method.params
        if reached and (not node_name or node.get("name") == node_name):
            found.add((index, param))
    return found


def load_merged(pipeline, state: dict[str, torch.Tensor]) -> None:
    """Put a merged pipeline state ('unet/...', 'text_encoder/...' keys) into the pipeline's
    components; every key must land and every weight of a component must be given."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        component, sep, inner = key.partition("/")
        if not sep:
            raise WeightmixError(
                f"preview: merged key {key} has no component folder: make the recipe's layout"
                " model a diffusers pipeline folder"
            )
        parts.setdefault(component, {})[inner] = tensor
    for component, weights in parts.items():
        module = getattr(pipeline, component, None)
        if not isinstance(module, torch.nn.Module):
            raise WeightmixError(f"preview: the pipeline has no component {component}")
        own = dict(module.named_parameters())
        own.update(module.named_buffers())  # non-persistent ones too (position_ids)
        if not set(weights) <= set(own):  # transformers 5 drops 'text_model.' from names
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise WeightmixError(f"preview: {component} has no weight {unknown[0]}")
        missing = sorted(set(dict(module.named_parameters())) - set(weights))
        if missing:
            raise WeightmixError(f"preview: the merge gives {component} no {missing[0]}")
        with torch.no_grad():
            for name, tensor in weights.items():
                if tuple(own[name].shape) != tuple(tensor.shape):
                    raise WeightmixError(
                        f"preview: {component}/{name} is {list(tensor.shape)} in the merge but"
                        f" {list(own[name].shape)} in the pipeline: give the pipeline folder of"
                        " this model (--pipeline)"
                    )
                own[name].copy_(tensor.to(own[name].device, own[name].dtype))


def load_pipeline(folder: Path, device: str) -> Any:
    """The diffusers pipeline in `folder` (local files only), quiet, on `device`."""
    try:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:
        raise WeightmixError(EXTRA) from None
    for library in (diffusers_logging, transformers_logging):  # their chatter is not ours
        library.disable_progress_bar()
        library.set_verbosity_error()
    try:
        pipeline = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:
        problem = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise WeightmixError(
            f"preview: {folder} does not load as a diffusers pipeline ({type(error).__name__}:"
            f" {problem})"
        ) from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def generate(pipeline: Any, folder: Path, prompt: str, seed: int, steps: int, size: int,
             device: str) -> Any:  # fmt: skip
    """One image (PIL) of `prompt` from a generator seeded with `seed`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    try:
        return pipeline(prompt, num_inference_steps=steps, generator=generator,
                        height=size, width=size, output_type="pil").images[0]  # fmt: skip
    except Exception as error:  # the pipeline's own errors, as one line
        problem = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise WeightmixError(
            f"preview: the pipeline of {folder} failed ({type(error).__name__}:"
            f" {problem}); try other --steps or --size"
        ) from None


@dataclass
class Grid:
    image: Any  # PIL.Image
    cells: list[list[Any]]  # rows (second sweep) × columns (first sweep)


def run_preview(
    recipe_data: dict,
    recipe: Recipe,
    sweeps: list[Sweep],
    prompt: str,
    seed: int,
    steps: int,
    folder: Path,
    device: str,
    size: int,
) -> Grid:
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise WeightmixError(EXTRA) from None
    columns = sweeps[0]
    rows = sweeps[1] if len(sweeps) == 2 else Sweep("", [None])
    pipeline = load_pipeline(folder, device)
    cells: list[list[Any]] = []
    for row_value in rows.values:
        line = []
        for column_value in columns.values:
            data = with_value(recipe_data, columns, column_value)
            if rows.name:
                data = with_value(data, rows, row_value)
            variant = api.as_recipe(data).with_base_dir(recipe.base_dir)
            state = api.merge_to_state_dict(variant)
            load_merged(pipeline, state)
            del state
            line.append(generate(pipeline, folder, prompt, seed, steps, size, device))
        cells.append(line)
    left = LABEL * 3 if rows.name else 0
    grid = Image.new("RGB", (left + size * len(columns.values), LABEL + size * len(cells)), "white")
    draw = ImageDraw.Draw(grid)
    for j, value in enumerate(columns.values):
        draw.text((left + j * size + 2, 4), f"{columns.name}={value}", fill="black")
    for i, value in enumerate(rows.values):
        if rows.name:
            draw.text((2, LABEL + i * size + size // 2), f"{rows.name}={value}", fill="black")
        for j, image in enumerate(cells[i]):
            grid.paste(image.resize((size, size)), (left + j * size, LABEL + i * size))
    return Grid(grid, cells)
