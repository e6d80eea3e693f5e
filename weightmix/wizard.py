"""`weightmix wizard`: the questions seed 000's interactive mode asked, answered into a recipe.

Asks for the base model, the other model(s), the output, the method and each of its
parameters (defaults shown; a bad answer is asked again with the reason), shows the dry-run
plan, asks to go ahead, merges, and saves the recipe beside the output, so the same merge
re-runs without questions: `weightmix merge OUT.yaml -o OUT.safetensors`. Prompts come from
click (already a dependency), which reads plain lines when standard input is not a terminal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from weightmix import api
from weightmix.errors import WeightmixError
from weightmix.io import open_checkpoint
from weightmix.methods import METHODS
from weightmix.methods.registry import MethodSpec, ParamSpec
from weightmix.prompts import prompt_params
from weightmix.recipe import Recipe, parse_recipe
from weightmix.report import describe_plan

BASE_FIRST = "weight"  # methods whose first input is a base model (ties, dare ..., model_stock)


class Answers:
    """One question at a time; the end of standard input is an error naming the question."""

    def ask(self, question: str, check: Any = None, default: Any = None) -> Any:
        return _answered(question, click.prompt, default=default, value_proc=check)

    def confirm(self, question: str) -> bool:
        return _answered(question, click.confirm, default=True)


def _answered(question: str, prompt: Any, **options: Any) -> Any:
    """click's answer; Ctrl-C stays an interrupt, the end of input is a one-line error."""
    try:
        return prompt(question, err=True, **options)
    except click.exceptions.Abort as error:
        click.echo(err=True)  # end the unanswered prompt's line
        if isinstance(error.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise WeightmixError(
            f"wizard: no answer to '{question}' (standard input ended): answer every"
            " question, or write a recipe and run weightmix merge"
        ) from None


def _model_path(text: str) -> str:
    """A model file or folder that opens (its header is read, no weights)."""
    path = Path(text.strip()).expanduser()
    try:
        open_checkpoint(path).close()
    except WeightmixError as error:
        raise click.BadParameter(str(error)) from None
    except OSError as error:
        raise click.BadParameter(f"{path}: {error.strerror or error}") from None
    return str(path)


def _optional_model(text: str) -> str:
    return "" if not text.strip() else _model_path(text)


def _output_path(text: str) -> str:
    path = Path(text.strip()).expanduser()
    if path.suffix != ".safetensors":
        raise click.BadParameter(f"{path}: give a .safetensors output path")
    recipe = path.with_suffix(".yaml")
    for taken in (path, recipe):
        if taken.exists() or taken.is_symlink():
            raise click.BadParameter(
                f"{taken} exists (the output and its recipe {recipe.name} must be new: the"
                " wizard never replaces): give another path"
            )
    if not path.parent.is_dir():
        raise click.BadParameter(f"{path.parent} is not a folder: create it or give another")
    return str(path)


def _method(text: str) -> MethodSpec:
    name = text.strip()
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise click.BadParameter(f"'{name}' is not a method; methods: {known}")
    return METHODS[name]


def _param_check(spec: ParamSpec, method: MethodSpec, count: int) -> Any:
    prompt = spec.name in prompt_params(method)

    def check(answer: Any) -> Any:
        if prompt and isinstance(answer, str):  # a prompt is text as typed: 'yes', '1.5' ...
            value = answer.strip() or None
        elif isinstance(answer, str):  # typed: YAML, so 0.3, [1, 2], true, GRAD_V all read
            try:
                value = yaml.safe_load(answer) if answer.strip() else None
            except yaml.YAMLError as error:
                problem = str(error).splitlines()[0]
                raise click.BadParameter(
                    f"'{answer}' does not read as a value: {problem}"
                ) from None
        else:  # the default, as it is
            value = answer
        try:  # this parameter alone: checks across parameters run once all are answered
            method.resolve_params({spec.name: value}, count, "answer", whole=False)
        except WeightmixError as error:
            raise click.BadParameter(str(error).removeprefix("answer: ")) from None
        return value  # as written: a preset name or block list stays one

    return check


def ask_params(answers: Answers, method: MethodSpec, count: int) -> dict[str, Any]:
    """Each parameter of the method, default shown; only those that differ are kept."""
    params: dict[str, Any] = {}
    for spec in method.params.values():
        shown = None if spec.required else ("" if spec.default is None else spec.default)
        value = answers.ask(f"  {spec.name}", _param_check(spec, method, count), default=shown)
        if value != spec.default:
            params[spec.name] = value
    return params


def ask_recipe(answers: Answers) -> tuple[Recipe, Path]:
    """Ask the questions; the recipe and the output path they describe."""
    models = {"A": answers.ask("Base model (file or folder)", _model_path)}
    while True:
        label = "Second model" if len(models) == 1 else "Another model (empty: no more)"
        extra = answers.ask(label, _model_path if len(models) == 1 else _optional_model,
                            default=None if len(models) == 1 else "")  # fmt: skip
        if not extra:
            break
        models[chr(ord("A") + len(models))] = extra
        if len(models) == 26:
            break
    output = Path(answers.ask("Output file (.safetensors)", _output_path))
    default = "weighted_sum" if len(models) == 2 else "add_difference"
    while True:
        method = answers.ask(f"Method ({len(METHODS)} known)", _method, default=default)
        count = len(models)
        fits = count >= method.min_inputs and (
            method.max_inputs is None or count <= method.max_inputs
        )
        if fits:
            break
        click.echo(f"{method.name} takes {method.arity_text()} inputs, {count} given: pick another",
                   err=True)  # fmt: skip
    while True:
        params = ask_params(answers, method, count)
        try:
            method.resolve_params(params, count, "wizard")
            break
        except WeightmixError as error:  # e.g. weights that sum to 0 while normalising
            click.echo(f"{error}: answer the parameters again", err=True)
    data = {"models": models, "merge": {"method": method.name, "inputs": list(models), **params}}
    if any(params.get(name) for name in prompt_params(method)):
        data.update(_ask_prompt_sources(answers))
    return parse_recipe(data, "wizard"), output


def _optional_path(text: str) -> str:
    text = text.strip()
    if text and not Path(text).expanduser().exists():
        raise click.BadParameter(f"{text}: no such file or folder")
    return str(Path(text).expanduser().resolve()) if text else ""


def _ask_prompt_sources(answers: Answers) -> dict[str, str]:
    """Where the prompt is read: a text encoder and a tokenizer, or the defaults."""
    found = {}
    encoder = answers.ask("Text encoder for the prompt (empty: model A's)", _optional_path, "")
    if encoder:
        found["text_encoder"] = encoder
    tokenizer = answers.ask(
        "CLIP tokenizer folder (empty: the text encoder's tokenizer/ or an installed package)",
        _optional_path,
        "",
    )
    if tokenizer:
        found["tokenizer"] = tokenizer
    return found


def run_wizard(threads: int | None = None) -> Path | None:
    """The whole conversation; the merged file, or None when the user stops at the plan."""
    answers = Answers()
    recipe, output = ask_recipe(answers)
    saved = output.with_suffix(".yaml")
    planned = api.make_plan(recipe, output, overwrite=False, save_recipe=saved)
    click.echo(describe_plan(planned, threads=threads), err=True)
    if not answers.confirm("Merge now?"):
        planned.close()
        click.echo("nothing written", err=True)
        return None
    result = api.execute(planned, threads=threads, progress=True)
    api.save_recipe(recipe, saved)
    click.echo(f"wrote {result.files[0] if result.files else output}; recipe: {saved}", err=True)
    again = f"weightmix merge {saved} -o {output} --overwrite"
    click.echo(f"re-run without questions: {again}", err=True)
    return output
