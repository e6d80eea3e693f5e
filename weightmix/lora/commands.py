"""`weightmix lora apply | extract | merge`: thin commands over the API and lora/."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import click

from weightmix import api
from weightmix.cli import _notes, _number_or_value, _save_recipe, _summary, plan_or_dry_run
from weightmix.errors import WeightmixError
from weightmix.lora.formats import KOHYA, PEFT
from weightmix.recipe import MODEL_NAME, parse_recipe


@click.group()
def lora() -> None:
    """Apply LoRAs to a model, extract them from fine-tunes, merge them."""


def lora_strength(text: str) -> tuple[str, Any]:
    """'PATH:STRENGTH' -> (PATH, strength): a number, a preset or a block list (one strength
    per block); a PATH alone (or one that exists with its colon) has strength 1."""
    path, colon, value = text.rpartition(":")
    if not colon or not path or Path(text).exists():
        return text, 1.0
    return path, _number_or_value(value, f"LoRA {text}")


def _names(paths: list[str]) -> list[str]:
    """Model names for the recipe: file stems where they are valid and unique."""
    names: list[str] = []
    for number, path in enumerate(paths):
        stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(path).name.split(".")[0])
        name = stem if MODEL_NAME.match(stem) and stem not in names else f"lora{number}"
        names.append(name if number else "model")
    return names


@lora.command("apply")
@click.argument("model")
@click.argument("loras", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file or folder.")
@click.option("--dtype", help="Output dtype of float tensors (default: the model's).")
@click.option("--compute-dtype", help="Dtype the update is computed in (default fp32).")
@click.option("--threads", type=click.IntRange(1, 64), help="Worker threads.")
@click.option("--dry-run", is_flag=True, help="Print the plan; read headers only.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option(
    "--save-recipe",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the recipe (a merge of the model and the LoRAs) as YAML.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary.")
def apply(model: str, loras: tuple[str, ...], output: Path | None, **flags: Any) -> None:
    """Bake LORAS into MODEL: W + Σ sᵢ·(αᵢ/rᵢ)·upᵢ·downᵢ per layer, streamed.

    \b
    weightmix lora apply model.safetensors a.safetensors:0.8 b.safetensors:0.5 -o out.safetensors
    weightmix lora apply model.safetensors style.safetensors:GRAD_V -o out.safetensors
    """
    pairs = [lora_strength(text) for text in loras]
    names = _names([model, *(path for path, _ in pairs)])
    deltas: list[Any] = []
    for name, (_, strength) in zip(names[1:], pairs):
        if strength == 1.0:
            deltas.append(name)
        else:
            deltas.append({"method": "scale", "inputs": [name], "factor": strength})
    data: dict[str, Any] = {
        "models": dict(zip(names, [model, *(path for path, _ in pairs)])),
        "merge": {"method": "add", "inputs": [names[0], *deltas]},
    }
    for name in ("dtype", "compute_dtype"):
        if flags[name] is not None:
            data[name] = flags[name]
    recipe = parse_recipe(data, "command line")
    _run(recipe, output, flags)


def _run(recipe, output: Path | None, flags: dict[str, Any]) -> None:
    planned = plan_or_dry_run(recipe, output, flags, [])
    if planned is None:
        return
    _notes(planned.notes, flags["quiet"])
    result = api.execute(planned, threads=flags["threads"], progress=not flags["quiet"])
    _summary(result, flags["quiet"])
    _save_recipe(recipe, flags["save_recipe"], flags["quiet"], output)


@lora.command("extract")
@click.argument("base")
@click.argument("tuned")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The LoRA file (.safetensors).")  # fmt: skip
@click.option("--rank", type=int, default=32, show_default=True,
              help="Rank of each layer (a layer allows at most min(rows, columns)).")  # fmt: skip
@click.option("--energy", type=float,
              help="Per layer, the smallest rank keeping this share of Δ's squared singular"
              " values (0 < E ≤ 1), at most --rank.")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice([KOHYA, PEFT]), default=KOHYA,
              show_default=True, help="kohya (lora_up/down) or PEFT (lora_A/B).")  # fmt: skip
@click.option("--dtype", default="fp16", show_default=True, help="Dtype of the factors.")
@click.option("--compute-dtype", help="Dtype Δ and its SVD are computed in (default fp32).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary.")
def extract_command(base: str, tuned: str, output: Path, **flags: Any) -> None:
    """A LoRA that turns BASE into (nearly) TUNED: per layer, the truncated SVD of TUNED − BASE."""
    from weightmix.lora.extract import check_file_output, check_rank, extract
    from weightmix.progress import make_progress

    check_rank(flags["rank"], flags["energy"])
    from weightmix.output_checks import sweep_notes

    swept = sweep_notes(output.parent)  # before "exists", as merge does
    check_file_output(output, flags["overwrite"], [Path(base), Path(tuned)])
    data: dict[str, Any] = {
        "models": {"base": base, "tuned": tuned},
        "merge": {"method": "subtract", "inputs": ["tuned", "base"]},
    }
    if flags["compute_dtype"] is not None:
        data["compute_dtype"] = flags["compute_dtype"]
    planned = api.make_plan(parse_recipe(data, "command line"))
    try:
        _notes(swept + planned.notes, flags["quiet"])
        settings = (flags["fmt"], flags["rank"], flags["energy"], flags["dtype"])
        done = extract(planned, output, *settings, make_progress(not flags["quiet"]))
    finally:
        planned.close()
    _notes(done.notes, flags["quiet"])
    if not flags["quiet"]:
        click.echo(f"wrote {done.files[0]}: {done.layers} LoRA layers")


@lora.command("merge")
@click.argument("loras", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The merged LoRA (.safetensors).")  # fmt: skip
@click.option("--rank", type=int,
              help="Re-SVD each layer's summed update to this rank (default: concatenate, exact,"
              " rank = the sum of the ranks).")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice([KOHYA, PEFT]),
              help="Output names (default: the first LoRA's).")  # fmt: skip
@click.option("--dtype", default="fp16", show_default=True, help="Dtype of the factors.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
def merge_command(loras: tuple[str, ...], output: Path, **flags: Any) -> None:
    """Merge LORAS (PATH:STRENGTH, strength 1 when left out) into one LoRA."""
    from weightmix.io import open_checkpoint
    from weightmix.io.dtypes import OUTPUT_DTYPES, dtype_from_name
    from weightmix.lora.merge import Source, merge_loras

    if flags["rank"] is not None and flags["rank"] < 1:
        raise WeightmixError(f"--rank {flags['rank']}: give a rank of at least 1")
    dtype = dtype_from_name(flags["dtype"], OUTPUT_DTYPES)
    if not dtype.is_float:
        raise WeightmixError(f"--dtype {flags['dtype']}: LoRA factors are floats")
    from weightmix.lora.extract import check_file_output

    pairs = [lora_strength(text) for text in loras]
    for path, strength in pairs:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise WeightmixError(f"LoRA {path}: strength {strength!r} is not a number")
        if not math.isfinite(strength):
            raise WeightmixError(f"LoRA {path}: strength {strength} is not a finite number")
    from weightmix.output_checks import sweep_notes

    if output.parent.is_dir():  # before "exists": pieces a killed run left are not an output
        _notes(sweep_notes(output.parent), flags["quiet"])
    check_file_output(output, flags["overwrite"], [Path(path) for path, _ in pairs])
    sources = []
    try:
        for number, (path, strength) in enumerate(pairs):
            try:
                checkpoint = open_checkpoint(path)
            except WeightmixError as error:
                raise WeightmixError(f"LoRA {number + 1}: {error}") from None
            sources.append(Source(checkpoint, float(strength), f"LoRA {path}"))
        files = merge_loras(sources, output, flags["rank"], flags["fmt"], dtype)
    finally:
        for source in sources:
            source.checkpoint.close()
    if not flags["quiet"]:
        click.echo(f"wrote {files[0]}")
