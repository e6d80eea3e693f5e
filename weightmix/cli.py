"""The `weightmix` command: a thin layer that turns flags into a Recipe and calls the API."""

from __future__ import annotations

import signal
import string
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from weightmix import __version__, api
from weightmix.errors import WeightmixError
from weightmix.io import open_checkpoint
from weightmix.methods import METHODS
from weightmix.recipe import Recipe, load_recipe, parse_recipe
from weightmix.report import describe_checkpoint, describe_plan
from weightmix.units import format_size

RECIPE_SUFFIXES = (".yaml", ".yml")
BUILDING_FLAGS = ("method", "alpha", "weights", "param")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="weightmix")
def cli() -> None:
    """Merge model checkpoints as a stream, validated before a byte is read."""


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output .safetensors path; a folder when the first model is a model folder.",
)
@click.option(
    "-m", "--method", help="Merge method for model files given directly (default weighted_sum)."
)
@click.option("--alpha", type=float, help="The method's alpha parameter.")
@click.option(
    "--weights", help="Comma-separated weights, one per model (weighted_sum of N models)."
)
@click.option(
    "-p", "--param", multiple=True, metavar="NAME=VALUE", help="Any other method parameter."
)
@click.option(
    "--take",
    multiple=True,
    metavar="PATTERN=MODEL",
    help="Keys matching the glob come from MODEL unchanged.",
)
@click.option(
    "--drop",
    multiple=True,
    metavar="PATTERN",
    help="Leave keys matching the glob out of the output.",
)
@click.option(
    "--rule",
    "param_rules",
    multiple=True,
    metavar="PATTERN:NAME=VALUE[,NAME=VALUE]",
    help="Parameters for keys matching the glob.",
)
@click.option(
    "--dtype",
    help="Output dtype of float tensors: fp32, fp16, bf16, fp8_e4m3fn or fp8_e5m2"
    " (default: as the first input).",
)
@click.option(
    "--rounding",
    type=click.Choice(["nearest", "stochastic"]),
    help="How results are cast to a narrower output dtype (default nearest; stochastic is seeded).",
)
@click.option(
    "--components",
    help="Keep only these components of a single-file model, e.g. unet,text_encoder (also vae,"
    " text_encoder_2, clip_l ...).",
)
@click.option(
    "--layout",
    help="Whose layout the output takes: a model name (default: the first model), or"
    " single_file for one file with single-file key names even from diffusers pipelines.",
)
@click.option("--title", help="Title written as modelspec.title (default: the output file name).")
@click.option("--compute-dtype", help="Dtype the merge is computed in (default fp32).")
@click.option("--device", help="cpu or cuda (default cpu).")
@click.option("--seed", type=int, help="Seed for methods that draw random numbers (default 0).")
@click.option(
    "--on-missing",
    type=click.Choice(["error", "keep", "skip"]),
    help="Keys some models lack: error (default), keep (copy from a model that has them), skip.",
)
@click.option(
    "--max-shard-size", help="Write a sharded set with shards of at most this size, e.g. 5GB."
)
@click.option(
    "--threads", type=click.IntRange(1, 64), help="Worker threads (default: CPU count, at most 8)."
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan, output size and peak memory; read headers only.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option(
    "--fingerprint",
    type=click.Choice(["sampled", "full"]),
    default="sampled",
    show_default=True,
    help="How inputs are fingerprinted in the output's metadata.",
)
@click.option("--fsync", is_flag=True, help="Force the output to disk before moving it into place.")
@click.option(
    "--save-recipe",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the effective recipe as YAML.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary.")
def merge(inputs: tuple[str, ...], output: Path | None, **flags: Any) -> None:
    """Merge INPUTS: one recipe file (.yaml), or model files (NAME=PATH to name them; else
    they are A, B, C ...).

    \b
    weightmix merge A.safetensors B.safetensors --alpha 0.3 -o out.safetensors
    weightmix merge A.safetensors B.safetensors C.safetensors -m add_difference -o out.safetensors
    weightmix merge recipe.yaml -o out.safetensors
    """
    recipe = _recipe_from(inputs, flags)
    if flags["save_recipe"]:
        flags["save_recipe"].write_text(recipe.to_yaml(), encoding="utf-8")
    if flags["dry_run"]:
        planned = api.make_plan(recipe, output, flags["overwrite"])
        try:
            click.echo(describe_plan(planned, threads=flags["threads"]))
        finally:
            planned.close()
        return
    if output is None:
        raise WeightmixError("no output path: pass -o OUT.safetensors (or --dry-run)")
    planned = api.make_plan(recipe, output, flags["overwrite"])
    _notes(planned.notes, flags["quiet"])
    result = api.execute(
        planned,
        threads=flags["threads"],
        progress=not flags["quiet"],
        fingerprint=flags["fingerprint"],
        fsync=flags["fsync"],
    )
    _summary(result, flags["quiet"])


def _notes(notes: list[str], quiet: bool) -> None:
    """What the user should know, said before the merge starts."""
    for note in [] if quiet else notes:
        click.echo(f"weightmix: note: {note}", err=True)


def _summary(result: api.MergeResult, quiet: bool) -> None:
    if quiet:
        return
    files = ", ".join(str(f) for f in result.files)
    click.echo(
        f"wrote {files}: {result.tensors} tensors, {format_size(result.bytes_written)}"
        f" in {result.seconds:.1f} s"
    )


def _recipe_from(inputs: tuple[str, ...], flags: dict[str, Any]) -> Recipe:
    """The recipe the command line describes: a file plus overrides, or one built from flags."""
    if len(inputs) == 1 and inputs[0].lower().endswith(RECIPE_SUFFIXES):
        given = [f"--{name.replace('_', '-')}" for name in BUILDING_FLAGS if flags[name]]
        if given:
            raise WeightmixError(
                f"{given[0]} builds a recipe from model files; with a recipe file, set it there"
            )
        recipe = load_recipe(inputs[0])
        data = recipe.model_dump(mode="json", exclude_none=True)
        base_dir = Path(inputs[0]).parent
    else:
        if any(i.lower().endswith(RECIPE_SUFFIXES) for i in inputs):
            raise WeightmixError("give one recipe file on its own, or model files only")
        models = _model_names(inputs)
        params = {
            name: _value(text) for name, text in (_pair(p, "--param") for p in flags["param"])
        }
        if flags["alpha"] is not None:
            params["alpha"] = flags["alpha"]
        if flags["weights"]:
            params["weights"] = _value(f"[{flags['weights']}]")
        node = {"method": flags["method"] or "weighted_sum", "inputs": list(models), **params}
        data = {"models": models, "merge": node}
        base_dir = Path(".")
    rules = data.setdefault("rules", [])
    for text in flags["take"]:
        pattern, model = _pair(text, "--take", separator="=", from_right=True)
        rules.append({"keys": pattern, "take": model})
    rules.extend({"keys": pattern, "drop": True} for pattern in flags["drop"])
    for text in flags["param_rules"]:
        pattern, _, assignments = text.rpartition(":")
        if not pattern or "=" not in assignments:
            raise WeightmixError(f"--rule '{text}': write PATTERN:NAME=VALUE[,NAME=VALUE]")
        pairs = (_pair(a, "--rule") for a in assignments.split(","))
        rules.append({"keys": pattern, "params": {n: _value(v) for n, v in pairs}})
    settings = ("dtype", "compute_dtype", "rounding", "device", "seed", "on_missing")
    for name in (*settings, "max_shard_size", "title", "layout"):
        if flags[name] is not None:
            data[name] = flags[name]
    if flags["components"]:
        data["components"] = [c.strip() for c in flags["components"].split(",") if c.strip()]
    return parse_recipe(data, "command line", base_dir)


def _model_names(inputs: tuple[str, ...]) -> dict[str, str]:
    """NAME=PATH pairs keep their names; plain paths become A, B, C ..."""
    models: dict[str, str] = {}
    letters = iter(string.ascii_uppercase)
    for text in inputs:
        name, sep, path = text.partition("=")
        if sep and name.isidentifier() and not Path(text).exists():
            models[name] = path
        else:
            models[next(letters, f"M{len(models) + 1}")] = text
    if len(models) != len(inputs):
        raise WeightmixError("two models are given the same name: name each NAME=PATH once")
    return models


def _pair(text: str, flag: str, separator: str = "=", from_right: bool = False) -> tuple[str, str]:
    left, sep, right = text.rpartition(separator) if from_right else text.partition(separator)
    if not sep or not left or not right:
        raise WeightmixError(f"{flag} '{text}': write it as NAME{separator}VALUE")
    return left.strip(), right.strip()


def _value(text: str) -> Any:
    """A flag value as YAML reads it: 0.3 -> float, [1, 2] -> list, true -> bool."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


@cli.command()
@click.argument("source")
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--dtype", help="Output dtype of float tensors (default: as they are).")
@click.option("--rounding", type=click.Choice(["nearest", "stochastic"]))
@click.option("--max-shard-size", help="Write a sharded set, e.g. 5GB.")
@click.option(
    "--like",
    help="A diffusers pipeline folder to mirror: SOURCE (a single file) is written as such a"
    " folder, OUTPUT, with diffusers key names and LIKE's configs.",
)
@click.option(
    "--single-file",
    is_flag=True,
    help="SOURCE is a diffusers pipeline: write one file with single-file (LDM/SGM/BFL) names.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary.")
def convert(source: str, output: Path, **flags: Any) -> None:
    """Convert SOURCE (a pickle such as .ckpt/.pt/.bin, read safely, a single file, a sharded
    set or a model folder) to OUTPUT, streamed where the format allows: .safetensors, or a
    diffusers folder with --like, or a single file from a pipeline with --single-file."""
    data: dict[str, Any] = {"models": {"source": source}, "merge": "source"}
    data.update({k: flags[k] for k in ("dtype", "rounding", "max_shard_size") if flags[k]})
    if flags["like"] and flags["single_file"]:
        raise WeightmixError("--like writes a folder, --single-file a file: give one of them")
    if flags["like"]:
        data["models"]["like"] = flags["like"]
        data["layout"] = "like"
    if flags["single_file"]:
        data["layout"] = "single_file"
    recipe = parse_recipe(data, "command line")
    planned = api.make_plan(recipe, output, flags["overwrite"])
    _notes(planned.notes, flags["quiet"])
    _summary(api.execute(planned, progress=not flags["quiet"]), flags["quiet"])


@cli.command()
@click.argument("path")
@click.option("--keys", is_flag=True, help="Also list every tensor with dtype and shape.")
def inspect(path: str, keys: bool) -> None:
    """Print a checkpoint's key count, dtypes, size, metadata and weightmix recipe."""
    with open_checkpoint(path) as checkpoint:
        click.echo(describe_checkpoint(checkpoint, keys))


@cli.command()
def methods() -> None:
    """List the merge methods with their inputs and parameters."""
    for name, spec in sorted(METHODS.items()):
        params = ", ".join(
            f"{p.name}" + ("" if p.required else f"={p.default!r}") for p in spec.params.values()
        )
        click.echo(f"{name}({spec.arity_text()} inputs{'; ' + params if params else ''})")
        click.echo(f"    {spec.summary}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors are one line on stderr and exit code 2."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cli.main(args=argv, prog_name="weightmix", standalone_mode=False)
    except WeightmixError as error:
        click.echo(f"weightmix: error: {error}", err=True)
        return error.exit_code
    except click.exceptions.NoArgsIsHelpError as error:  # bare `weightmix merge`
        click.echo(error.ctx.get_help() if error.ctx else str(error), err=True)
        return 2
    except click.ClickException as error:
        command = f" {error.ctx.command.name}" if getattr(error, "ctx", None) and error.ctx else ""
        click.echo(
            f"weightmix: error: {error.format_message()} (see weightmix{command} --help)", err=True
        )
        return 2
    except click.exceptions.Abort:
        click.echo("weightmix: interrupted; nothing was written at the output", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("weightmix: interrupted; nothing was written at the output", err=True)
        return 130
    except OSError as error:  # disk full, too many open files ... while writing
        where = f": {error.filename}" if error.filename else ""
        click.echo(
            f"weightmix: error: {error.strerror or error}{where};"
            " nothing was written at the output",
            err=True,
        )
        return 1
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
