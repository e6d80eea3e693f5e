"""`weightmix hyper CONFIG`, `weightmix hyper reconstruct`, `weightmix hyper evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from weightmix.cli import _notes


class _HyperGroup(click.Group):
    """`weightmix hyper CONFIG.yaml` runs the merge; a subcommand name runs that."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_HyperGroup)
def hyper() -> None:
    """Hyper-Merge (seed 001): many models as one average plus shared LoRAs.

    \b
    weightmix hyper config.yaml                  # name, models, device, dtype, iterations, ranks
    weightmix hyper reconstruct config.yaml --model 2 -o model2.safetensors
    weightmix hyper evaluate config.yaml
    """


@hyper.command("run")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or summary.")
def run_command(config: Path, overwrite: bool, quiet: bool) -> None:
    """Write NAME_average.safetensors, NAME_STEP-RANK.safetensors per rank (kohya LoRAs) and
    NAME_multipliers.txt/.json beside CONFIG (or in its `output` folder)."""
    from weightmix.hyper.config import load_config
    from weightmix.hyper.run import hyper_merge

    settings, folder = load_config(config)
    result = hyper_merge(settings, folder, overwrite=overwrite, progress=not quiet)
    _notes(result.notes, quiet)
    if not quiet:
        for path in result.files:
            click.echo(f"wrote {path}")


@hyper.command("reconstruct")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "which", required=True, help="The model: its number (0 ..), path or name.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
@click.option("--multipliers", type=click.Path(dir_okay=False, path_type=Path),
              help="Multipliers JSON (default: NAME_multipliers.json).")  # fmt: skip
@click.option("--dtype", help="Output dtype (default: the average's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
def reconstruct_command(config: Path, which: str, output: Path, **flags: Any) -> None:
    """Rebuild one model: the average plus each LoRA at the model's multiplier."""
    from weightmix.hyper.config import load_config
    from weightmix.hyper.evaluate import pick_model, read_outputs, reconstruct

    settings, folder = load_config(config)
    outputs = read_outputs(settings, folder, flags["multipliers"])
    result = reconstruct(outputs, pick_model(outputs, which), output, flags["overwrite"],
                         flags["dtype"])  # fmt: skip
    if not flags["quiet"]:
        click.echo(f"wrote {result.files[0]}")


@hyper.command("evaluate")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--multipliers", type=click.Path(dir_okay=False, path_type=Path),
              help="Multipliers JSON (default: NAME_multipliers.json).")  # fmt: skip
def evaluate_command(config: Path, multipliers: Path | None) -> None:
    """Per model, ‖W − rebuild‖/‖W − mean‖ beside each layer's own truncated SVD at the same
    total rank; for all models together also the bound: the best approximation of all of them
    by as many whole-model directions as LoRAs (the Gram matrix's eigenvalue tail)."""
    from weightmix.hyper.config import load_config
    from weightmix.hyper.evaluate import evaluate, read_outputs

    settings, folder = load_config(config)
    outputs = read_outputs(settings, folder, multipliers)
    reports = evaluate(settings, folder, outputs)
    rank = sum(outputs.ranks)
    click.echo(
        f"relative error ‖W − rebuild‖ / ‖W − mean‖, {len(outputs.loras)} LoRAs, rank {rank}"
    )
    click.echo(f"{'hyper':>10} {'own SVD':>10} {'bound':>10}  model")
    for report in reports:
        bound = "-" if report.bound is None else f"{report.bound:.4g}"
        click.echo(f"{report.hyper:10.4g} {report.private:10.4g} {bound:>10}  {report.model}")
