"""The `weightmix` command: a thin layer that turns flags into a Recipe and calls the API."""

from __future__ import annotations

import gc
import os
import re
import signal
import string
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml

from weightmix import __version__, api
from weightmix.blocks import presets as block_presets
from weightmix.errors import WeightmixError, one_line
from weightmix.io import open_checkpoint
from weightmix.io.interrupts import HELD_SIGNALS, abort_unfinished, placed_count, placed_since
from weightmix.methods import METHODS, describe_method
from weightmix.plan import Plan
from weightmix.prompts import prompt_params
from weightmix.recipe import MODEL_NAME, Recipe, parse_recipe, read_recipe_data
from weightmix.report import describe_checkpoint, describe_plan, recorded_recipe
from weightmix.units import count, format_size

RECIPE_SUFFIXES = (".yaml", ".yml")
BUILDING_FLAGS = ("method", "alpha", "weights", "param")
RULE_TEXT = re.compile(r"^(?P<pattern>.+):(?P<assignments>\s*[A-Za-z_][\w.]*\s*=.*)$", re.DOTALL)


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
    "-m",
    "--method",
    multiple=True,
    help="Merge method for model files given directly (default weighted_sum).",
)
@click.option(
    "--alpha",
    multiple=True,
    help="The method's alpha: a number, or one per block: '0,1,1,...' in the architecture's"
    " block order, 'IN00-IN05=0.2,M00=1,default=0.5', '{gradient: [0, 1]}' or a preset"
    " (weightmix presets).",
)
@click.option(
    "--weights",
    multiple=True,
    help="Comma-separated weights, one per model (weighted_sum of N models).",
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
@click.option(
    "--seed",
    type=int,
    help="Seed of every random choice: today stochastic rounding (default 0). The same recipe"
    " and seed give the same bytes.",
)
@click.option(
    "--text-encoder",
    help="Where prompt parameters (concept, prompt_coefficients) are encoded: a model's name, or"
    " a checkpoint, diffusers folder or CLIP text encoder (default: the first model).",
)
@click.option(
    "--tokenizer",
    help="CLIP's tokenizer for prompts: a folder with vocab.json and merges.txt (default: the"
    " text encoder's diffusers tokenizer/, or an installed open_clip or clip package).",
)
@click.option(
    "--strict-rules/--no-strict-rules",
    default=None,
    help="Refuse rules that match no key, and take rules whose model has none of the keys"
    " (notes otherwise).",
)
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
    "--check-finite",
    is_flag=True,
    help="Read every input first and name each tensor holding NaN or inf (an error unless"
    " --allow-nonfinite).",
)
@click.option(
    "--allow-nonfinite",
    is_flag=True,
    default=None,
    help="Write NaN/inf that the merge makes from finite inputs (e.g. fp16 overflow) instead of"
    " stopping.",
)
@click.option(
    "--save-recipe",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the effective recipe as YAML.",
)
@click.option(
    "--model-card/--no-model-card",
    default=None,
    help="Write a README.md model card (Hugging Face convention) beside the output, or in it"
    " for a folder (the default for folders).",
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
    for name in ("method", "alpha", "weights"):  # each once: a repeat would win silently
        if len(flags[name]) > 1:
            raise WeightmixError(f"--{name} is given {len(flags[name])} times; give it once")
        flags[name] = flags[name][0] if flags[name] else None
    recipe, recipe_file = _recipe_from(inputs, flags)
    save_to = flags["save_recipe"]
    planned = plan_or_dry_run(recipe, output, flags, [recipe_file] if recipe_file else [])
    if planned is None:
        return
    card = flags["model_card"]
    card = planned.base_folder is not None if card is None else card
    card_at = None
    if card:
        from weightmix.analysis.card import check_card

        try:
            folder = planned.base_folder is not None  # the output is a folder like it
            card_at = check_card(planned.output or Path(output), flags["overwrite"], folder)
        except BaseException:
            planned.close()
            raise
    if flags["check_finite"]:
        from weightmix.finite import report_inputs

        try:
            planned.notes += report_inputs(planned.checkpoints, planned.recipe.allow_nonfinite)
        except BaseException:
            planned.close()
            raise
    _notes(planned.notes, flags["quiet"])
    result = api.execute(
        planned,
        threads=flags["threads"],
        progress=not flags["quiet"],
        fingerprint=flags["fingerprint"],
        fsync=flags["fsync"],
    )
    _summary(result, flags["quiet"])
    if card_at is not None:
        from weightmix.analysis.card import write_card

        write_card(card_at, planned, result.metadata)
        if not flags["quiet"]:
            click.echo(f"wrote the model card {card_at}")
    _save_recipe(recipe, save_to, flags["quiet"], output)


def plan_or_dry_run(
    recipe: Recipe, output: Path | None, flags: dict[str, Any], protected: list[Path]
) -> Plan | None:
    """The plan of a merge command; with --dry-run, print it (and save the recipe) instead."""
    if not flags["dry_run"] and output is None:
        raise WeightmixError("no output path: pass -o OUT.safetensors (or --dry-run)")
    save_to = flags["save_recipe"]
    if not flags["dry_run"] and output is not None:
        from weightmix.output_checks import sweep_notes

        # before the plan's "exists" check: pieces a killed run left are not an output
        _notes(sweep_notes(output.parent), flags["quiet"])
    planned = api.make_plan(
        recipe, output, flags["overwrite"], save_recipe=save_to, protected=protected
    )
    if not flags["dry_run"]:
        return planned
    try:
        click.echo(describe_plan(planned, threads=flags["threads"]))
    finally:
        planned.close()
    _save_recipe(recipe, save_to, flags["quiet"], None)
    return None


def _save_recipe(recipe: Recipe, path: Path | None, quiet: bool, output: Path | None) -> None:
    """--save-recipe: written once the merge (or the dry run) has succeeded."""
    if path is None:
        return
    try:
        api.save_recipe(recipe, path)
    except OSError as error:
        done = f"the merge was written to {output}, but " if output is not None else ""
        failure = WeightmixError(
            f"{done}the recipe could not be saved to {path} ({error.strerror or error});"
            f" nothing was written at {path}"
        )
        failure.exit_code = 1
        raise failure from None
    if not quiet:
        click.echo(f"wrote the recipe to {path}")


def _notes(notes: list[str], quiet: bool) -> None:
    """What the user should know, said before the merge starts."""
    for note in [] if quiet else notes:
        click.echo(f"weightmix: note: {one_line(note)}", err=True)


def _summary(result: api.MergeResult, quiet: bool) -> None:
    if quiet:
        return
    files = ", ".join(str(f) for f in result.files)
    click.echo(
        f"wrote {files}: {count(result.tensors, 'tensor')}, {format_size(result.bytes_written)}"
        f" in {result.seconds:.1f} s"
    )


def _recipe_from(inputs: tuple[str, ...], flags: dict[str, Any]) -> tuple[Recipe, Path | None]:
    """The recipe the command line describes: a file plus overrides, or one built from flags;
    and the recipe file when there is one. The file's data reaches the schema as written."""
    recipe_file = None
    if len(inputs) == 1 and inputs[0].lower().endswith(RECIPE_SUFFIXES):
        given = [
            f"--{name.replace('_', '-')}"
            for name in BUILDING_FLAGS
            if flags[name] not in (None, ())
        ]
        if given:
            raise WeightmixError(
                f"{given[0]} builds a recipe from model files; with a recipe file, set it there"
            )
        recipe_file = Path(inputs[0])
        data = read_recipe_data(recipe_file)
        parse_recipe(data, str(recipe_file), recipe_file.parent)  # its own problems name it
        base_dir, source = recipe_file.parent, f"{recipe_file} with the command line's flags"
    else:
        if any(i.lower().endswith(RECIPE_SUFFIXES) for i in inputs):
            raise WeightmixError("give one recipe file on its own, or model files only")
        data = {"models": _model_names(inputs), "merge": _merge_node(inputs, flags)}
        base_dir, source = Path("."), "command line"
    rules = _flag_rules(flags)
    if rules:
        data["rules"] = [*data.get("rules", []), *rules]
    settings = (
        "dtype",
        "compute_dtype",
        "rounding",
        "device",
        "seed",
        "on_missing",
        "strict_rules",
        "allow_nonfinite",
    )
    for name in (*settings, "max_shard_size", "title", "layout"):
        if flags[name] is not None:
            data[name] = flags[name]
    for name in ("text_encoder", "tokenizer"):  # paths from here, not from the recipe's folder
        value = flags[name]
        if value is not None:
            named = name == "text_encoder" and value in (data.get("models") or {})
            data[name] = value if named else os.path.abspath(os.path.expanduser(value))
    if flags["components"] is not None:
        data["components"] = [c.strip() for c in flags["components"].split(",") if c.strip()]
        if not data["components"]:
            raise WeightmixError("--components is empty: name components, e.g. unet,vae")
    return parse_recipe(data, source, base_dir), recipe_file


def _merge_node(inputs: tuple[str, ...], flags: dict[str, Any]) -> dict[str, Any] | str:
    """The merge expression that -m/--alpha/--weights/-p describe over the models given."""
    pairs = [_pair(p, "--param") for p in flags["param"]]
    params = _assignments(pairs, "--param")
    spec = METHODS.get(flags["method"] or "weighted_sum")
    texts = prompt_params(spec) if spec is not None else []
    params.update({name: text for name, text in pairs if name in texts})  # prompts: as typed
    reserved = sorted(set(params) & {"method", "inputs", "name"})
    if reserved:
        raise WeightmixError(
            f"--param {reserved[0]}=...: '{reserved[0]}' is not a parameter; the method is -m,"
            " the inputs are the models given"
        )
    for name, value in (("alpha", flags["alpha"]), ("weights", flags["weights"])):
        if value is not None and name in params:
            raise WeightmixError(f"{name} is given twice (--{name} and --param {name}=...)")
    if flags["alpha"] is not None:
        params["alpha"] = _number_or_value(flags["alpha"], "--alpha")
        if params["alpha"] in (None, ""):
            raise WeightmixError(
                f"--alpha '{flags['alpha']}' is empty: give a number or values per block"
            )
    if flags["weights"] is not None:
        if not flags["weights"].strip():
            raise WeightmixError("--weights is empty: give one weight per model, e.g. 1,2,1")
        params["weights"] = _value(f"[{flags['weights']}]", "--weights")
    models = list(_model_names(inputs))
    method = flags["method"]
    if len(models) == 1 and not params and method is None:
        return models[0]  # one model: rewritten (dtype, rules, components), as convert does
    return {"method": "weighted_sum" if method is None else method, "inputs": models, **params}


def _assignments(pairs: list[tuple[str, str]], flag: str) -> dict[str, Any]:
    """NAME=VALUE pairs as parameters: each name once, each value a value (not null)."""
    params: dict[str, Any] = {}
    for name, text in pairs:
        if name in params:
            raise WeightmixError(f"{flag}: '{name}' is given twice; give each parameter once")
        params[name] = _value(text, f"{flag} {name}")
        if params[name] is None:
            raise WeightmixError(
                f"{flag} {name}={text}: null is not a value; leave the parameter out instead"
            )
    return params


def _flag_rules(flags: dict[str, Any]) -> list[dict[str, Any]]:
    """Rules from --take, --drop and --rule, in that order (later rules win)."""
    rules: list[dict[str, Any]] = []
    for text in flags["take"]:
        pattern, model = _pair(text, "--take", "PATTERN=MODEL", from_right=True)
        rules.append({"keys": pattern, "take": model})
    rules.extend({"keys": pattern, "drop": True} for pattern in flags["drop"])
    for text in flags["param_rules"]:
        rules.append(_param_rule(text))
    return rules


def _param_rule(text: str) -> dict[str, Any]:
    """--rule PATTERN:NAME=VALUE[,NAME=VALUE]; a value may be a list: weights=[1,2,3]."""
    form = "PATTERN:NAME=VALUE[,NAME=VALUE]"
    split = RULE_TEXT.match(text)  # the last ':' that a NAME= follows ends the pattern
    if split is None:
        raise WeightmixError(f"--rule '{text}': write it as {form}")
    pattern = split.group("pattern")
    assignments = _split_top_level(split.group("assignments"))
    pairs = [_pair(a, f"--rule '{text}':", form, whole=text) for a in assignments]
    return {"keys": pattern, "params": _assignments(pairs, f"--rule '{text}'")}


def _split_top_level(text: str) -> list[str]:
    """'a=1,w=[1,2],b="x=1,y"' -> ['a=1', 'w=[1,2]', 'b="x=1,y"']: commas inside brackets,
    braces or quotes stay."""
    parts, depth, current, quote = [], 0, [], ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        else:
            depth += char in "[{"
            depth -= char in "]}"
        if char == "," and depth == 0 and not quote:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _model_names(inputs: tuple[str, ...]) -> dict[str, str]:
    """NAME=PATH pairs keep their names (the same rule as model names in recipe files);
    plain paths become A, B, C ... (skipping names given)."""
    named: list[tuple[str | None, str]] = []
    for text in inputs:
        name, sep, path = text.partition("=")
        named.append(
            (name, path)
            if sep and MODEL_NAME.match(name) and not Path(text).exists()
            else (None, text)
        )
    given = [name for name, _ in named if name is not None]
    twice = next((name for name in given if given.count(name) > 1), None)
    if twice is not None:
        raise WeightmixError(f"two models are named '{twice}': name each model once")
    letters = (
        c for c in [*string.ascii_uppercase, *(f"M{i}" for i in range(27, 10**4))] if c not in given
    )
    return {name if name is not None else next(letters): path for name, path in named}


def _pair(
    text: str,
    flag: str,
    form: str = "NAME=VALUE",
    from_right: bool = False,
    whole: str | None = None,
) -> tuple[str, str]:
    left, sep, right = text.rpartition("=") if from_right else text.partition("=")
    if not sep or not left.strip() or not right.strip():
        if whole is not None:  # a part of a longer flag value: quote all of it
            raise WeightmixError(f"{flag} '{text}' is not NAME=VALUE: write it as {form}")
        raise WeightmixError(f"{flag} '{text}': write it as {form}")
    return left.strip(), right.strip()


def _number_or_value(text: str, where: str) -> Any:
    """A number as Python reads it ('nan' too, refused later with its name), else as YAML."""
    try:
        return float(text)
    except ValueError:
        return _value(text, where)


def _value(text: str, where: str) -> Any:
    """A flag value as YAML reads it: 0.3 -> float, [1, 2] -> list, true -> bool."""
    from weightmix.recipe import MAX_FLOW_DEPTH, flow_depth

    try:
        if flow_depth(text) > MAX_FLOW_DEPTH:  # PyYAML's scanner is quadratic in this depth
            raise RecursionError
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError):  # ValueError: 5000 digits, 2001-13-45
        return text
    except RecursionError:
        raise WeightmixError(f"{where}: nested too deeply") from None


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
    data.update(
        {k: flags[k] for k in ("dtype", "rounding", "max_shard_size") if flags[k] is not None}
    )
    if flags["like"] is not None and flags["single_file"]:
        raise WeightmixError("--like writes a folder, --single-file a file: give one of them")
    if flags["like"] is not None:
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
@click.option(
    "--recipe",
    "recipe_only",
    is_flag=True,
    help="Print only the recipe recorded in a weightmix output (YAML; its model paths are"
    " relative to the folder that holds the output: save it there to re-run it).",
)
def inspect(path: str, keys: bool, recipe_only: bool) -> None:
    """Print a checkpoint's key count, dtypes, size, metadata and weightmix recipe."""
    with open_checkpoint(path) as checkpoint:
        if recipe_only:
            click.echo(recorded_recipe(checkpoint), nl=False)
        else:
            click.echo(describe_checkpoint(checkpoint, keys))
            from weightmix.analysis.card import card_path, read_card

            card = read_card(Path(path))
            if card is not None:
                bases = ", ".join(str(b) for b in card.get("base_model") or [])
                click.echo(f"  model card: {card_path(Path(path))} (base models: {bases})")


@cli.command()
@click.argument("path")
@click.option(
    "--inputs",
    "recompute",
    is_flag=True,
    help="Also run the recorded recipe again from the inputs and compare every tensor.",
)
def verify(path: str, recompute: bool) -> None:
    """Check an output end to end: header, sizes, every tensor readable and finite, the inputs'
    recorded fingerprints (where the inputs are present). Exit 1 with the first problem."""
    from weightmix.verify import verify as check

    found = check(path, recompute)
    inputs = f"{len(found.inputs_checked)} input(s) match their fingerprints"
    if found.inputs_absent:
        inputs += f"; not present, not checked: {', '.join(found.inputs_absent)}"
    again = "; recomputed from the inputs: identical" if found.recomputed else ""
    click.echo(
        f"{path}: ok: {found.tensors} tensors ({format_size(found.nbytes)}) read, all finite;"
        f" {inputs}{again}"
    )


@cli.command()
def presets() -> None:
    """List the block-weight presets (values in SD1's 26-block order; converted for SDXL)."""
    for name, values in block_presets().items():
        click.echo(f"{name}: {','.join(f'{v:g}' for v in values)}")


@cli.command()
@click.option(
    "--threads", type=click.IntRange(min=1), help="Worker threads (default: CPUs, up to 8)."
)
def wizard(threads: int | None) -> None:
    """Ask for the models, output, method and parameters; show the plan, merge, and save the
    recipe beside the output (OUT.yaml) to re-run without questions."""
    from weightmix.wizard import run_wizard

    run_wizard(threads)


@cli.command()
def methods() -> None:
    """List the merge methods with their inputs and parameters."""
    for name, spec in sorted(METHODS.items()):
        click.echo(f"{name}: {describe_method(spec)}")
        click.echo(f"    {spec.summary}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors are one line on stderr and exit code 2."""
    # what exists now (the imported modules: about a million objects) outlives the command;
    # frozen, no collection during the merge walks through it. Thawed again after, unless
    # the caller had frozen objects itself: freezing does not nest, so those are left alone.
    thaw = gc.get_freeze_count() == 0
    if thaw:
        gc.freeze()
    try:
        return _signalled(argv)
    finally:
        if thaw:
            gc.unfreeze()


def command() -> NoReturn:
    """The `weightmix` executable: main() on the process's arguments, then exit with its code.
    What main() froze stays frozen: the interpreter's last collection at exit passes it by
    (0.4 s of start-up otherwise). A Ctrl-C after the command is done changes nothing: it
    is ignored until the process has exited."""
    gc.freeze()
    code = _signalled(None, restore=False)
    # ignored, not merely handled by a handler that ignores it: Python resets its own
    # handlers to the default as it finalizes, and a signal then would end the process
    for number in HELD_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    sys.exit(code)


_finished = False  # the command's outcome is known: SIGINT and SIGTERM are ignored from then


def _signalled(argv: list[str] | None, restore: bool = True) -> int:
    """_run() with SIGINT and SIGTERM raising KeyboardInterrupt until its outcome is known."""
    global _finished
    _finished = False
    previous = {  # a signal the caller ignores (a shell's background job) stays ignored
        number: signal.signal(number, _interrupt)
        for number in HELD_SIGNALS
        if signal.getsignal(number) is not signal.SIG_IGN
    }
    try:
        return _run(argv)
    finally:  # (_run set _finished once cli.main returned or raised)
        if restore:  # a caller's own handlers come back after a call from Python
            for number, handler in previous.items():
                signal.signal(number, signal.SIG_DFL if handler is None else handler)


def _run(argv: list[str] | None) -> int:
    global _finished
    mark = placed_count()
    try:
        try:
            cli.main(args=argv, prog_name="weightmix", standalone_mode=False)
        finally:
            _finished = True  # an interrupt from here on would say nothing true
    except WeightmixError as error:
        click.echo(f"weightmix: error: {error}", err=True)  # one line: see WeightmixError
        return error.exit_code
    except click.exceptions.NoArgsIsHelpError as error:  # bare `weightmix merge`
        click.echo(error.ctx.get_help() if error.ctx else str(error), err=True)
        return 2
    except click.ClickException as error:
        context = getattr(error, "ctx", None)
        command = context.command_path if context is not None else "weightmix"
        click.echo(f"weightmix: error: {error.format_message()} (see {command} --help)", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        return _interrupted(mark)
    except OSError as error:  # disk full, too many open files ... while writing
        where = f": {error.filename}" if error.filename else ""
        click.echo(
            one_line(
                f"weightmix: error: {error.strerror or error}{where};"
                " nothing was written at the output"
            ),
            err=True,
        )
        return 1
    return 0


def _interrupt(signum: int, frame: object) -> None:
    if not _finished:
        raise KeyboardInterrupt


def _interrupted(mark: int) -> int:
    """Say what an interrupted command left: outputs moved into place before the interrupt
    (placed() since `mark`, still there) are whole; nothing else was written: what an
    interrupt caught between an output's creation and its clean-up left is removed here."""
    abort_unfinished()
    recorded = placed_since(mark)
    whole = [str(path) for path in recorded if os.path.lexists(path)]
    more = placed_count() - mark - len(recorded)  # older than the record keeps
    if whole or more:
        rest = more + len(whole[3:])
        said = ", ".join(whole[:3])
        if rest:
            said = f"{said} and {rest} more" if said else f"{rest} outputs"
        click.echo(f"weightmix: interrupted after writing {said} in full; nothing else was"
                   " written", err=True)  # fmt: skip
    else:
        click.echo("weightmix: interrupted; nothing was written at the output", err=True)
    return 130


def _add_groups() -> None:
    """Command groups that live beside their rooms (they use the helpers above)."""
    from weightmix.analysis.commands import preview, similarity
    from weightmix.hyper.commands import hyper
    from weightmix.lora.commands import lora
    from weightmix.search.commands import search
    from weightmix.ui.commands import ui

    cli.add_command(lora)
    cli.add_command(hyper)
    cli.add_command(search)
    cli.add_command(similarity)
    cli.add_command(preview)
    cli.add_command(ui)


_add_groups()


if __name__ == "__main__":
    sys.exit(main())
