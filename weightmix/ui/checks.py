"""What the browser sends, checked before anything opens: JSON of the right types, recipes
whose every path (models, text encoder, tokenizer, and the files a plan will read) lies inside
the models directories, and outputs that are new files there and none of the inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from weightmix import api
from weightmix.errors import WeightmixError
from weightmix.output_checks import checkpoint_files
from weightmix.plan import Plan
from weightmix.recipe import Recipe, parse_recipe, recipe_data_from_bytes
from weightmix.ui.library import ModelDirs

MAX_JSON = 4 << 20  # a form is a few kB (a recipe with rules: a few hundred)
MAX_UPLOAD = 1 << 20
# recipe fields that name files: the models (checked one by one) and these
PATH_SETTINGS = ("text_encoder", "tokenizer")


def json_object(body: bytes) -> dict:
    """The request body as a JSON object, or one line."""
    if len(body) > MAX_JSON:
        raise WeightmixError("the request is too large for a form")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise WeightmixError("the request is not JSON (or nests too deeply)") from None
    if not isinstance(data, dict):
        raise WeightmixError("the request is not a JSON object")
    return data


def text(form: dict, name: str, default: str = "") -> str:
    value = form.get(name, default)
    if not isinstance(value, str):
        raise WeightmixError(f"{name}: give a text")
    return value


def flag(form: dict, name: str) -> bool:
    value = form.get(name, False)
    if not isinstance(value, bool):
        raise WeightmixError(f"{name}: give true or false")
    return value


def checked_recipe(dirs: ModelDirs, data: Any) -> Recipe:
    """A recipe from the page or an upload, every path in it checked to lie inside the
    directories (relative ones read from the first), as absolute paths."""
    if not isinstance(data, dict):
        raise WeightmixError("recipe: give a mapping with 'models' and 'merge'")
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise WeightmixError("recipe: pick at least one model")
    checked = dict(data)
    paths = {}
    for name, written in models.items():
        if not isinstance(written, str):
            raise WeightmixError(f"recipe: model {name}: give its path as a text")
        paths[str(name)] = str(dirs.model(written))
    checked["models"] = paths
    for setting in PATH_SETTINGS:
        written = checked.get(setting)
        if written is None:
            continue
        if not isinstance(written, str):
            raise WeightmixError(f"recipe: {setting}: give a path as a text")
        if setting == "text_encoder" and written in paths:
            continue  # the text encoder of one of the models
        path = dirs.resolve(written, setting)
        if path.is_dir():
            dirs.check_tree(path, setting)
        elif path.is_file() and setting == "text_encoder":
            _check_files(dirs, path, setting)
        checked[setting] = str(path)
    return parse_recipe(checked, "recipe", dirs.first)


def _check_files(dirs: ModelDirs, path: Path, what: str) -> None:
    """A checkpoint file's parts (an index's shards) lie inside the directories: the shard
    names read from the index, and nothing else opened."""
    for file in checkpoint_files(path):
        if not dirs.inside(Path(os.path.realpath(file))):
            raise WeightmixError(
                f"{what} {path}: it reads {file}, outside the models directories"
                f" ({dirs.listing()}): the UI reads only there"
            )


def check_plan_files(dirs: ModelDirs, plan: Plan) -> None:
    """Every file the plan will read (shards of an index, a pipeline's components) lies
    inside the directories."""
    for name, checkpoint in plan.checkpoints.items():
        for file in [checkpoint.path, *checkpoint.files]:
            if not dirs.inside(Path(file).resolve()):
                raise WeightmixError(
                    f"model {name}: it reads {file}, outside the models directories"
                    f" ({dirs.listing()}): the UI reads only there"
                )


def planned(dirs: ModelDirs, recipe: Recipe, output: Path | None, overwrite: bool) -> Plan:
    """api.make_plan() with the files it opened checked (the caller closes the plan)."""
    plan = api.make_plan(recipe, output, overwrite)
    try:
        check_plan_files(dirs, plan)
    except BaseException:
        plan.close()
        raise
    return plan


def inputs_of(recipe: Recipe) -> list[Path]:
    """The files and folders a recipe reads: its models and a text encoder of its own (an
    index with its shards)."""
    found = [recipe.model_path(name).resolve() for name in recipe.models]
    encoder = recipe.text_encoder
    if encoder is not None and encoder not in recipe.models:
        found += [p.resolve() for p in checkpoint_files(recipe.resolve(encoder))]
    return found


def merge_request(dirs: ModelDirs, form: dict) -> tuple[Recipe, Path, bool]:
    """The recipe, output path and overwrite flag of a merge or dry-run request."""
    recipe = checked_recipe(dirs, form.get("recipe"))
    overwrite = flag(form, "overwrite")
    output = dirs.output(text(form, "output"), inputs_of(recipe), overwrite)
    return recipe, output, overwrite


def uploaded_recipe(dirs: ModelDirs, body: bytes) -> Recipe:
    """An uploaded YAML file as a recipe: read with the CLI's reader (its limits and
    messages), in memory; relative paths are read from the first models directory."""
    if len(body) > MAX_UPLOAD:
        raise WeightmixError(f"the upload is {len(body):,} bytes: a recipe is a few kB")
    data = recipe_data_from_bytes(body, "the uploaded file")
    recipe = checked_recipe(dirs, data)
    _check_page_numbers(yaml.safe_load(recipe.to_yaml()))
    return recipe


PAGE_INTEGERS = 2**53  # a browser's numbers hold whole numbers exactly up to here


def _check_page_numbers(value: Any, where: str = "recipe") -> None:
    """Whole numbers the page would round (a seed of 19 digits) are refused, not changed."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_page_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_page_numbers(item, f"{where}[{index}]")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > PAGE_INTEGERS:
        raise WeightmixError(
            f"the uploaded file: {where} = {value}: the page holds whole numbers up to 2^53;"
            " run this recipe with `weightmix merge`, or give a smaller number"
        )
