"""`weightmix similarity`: a table on the terminal, --json for scripts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from weightmix.errors import WeightmixError


def _cell(value: object) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(result) -> str:
    names = list(result.models)
    lines = [f"each model against {names[0]} ({result.models[names[0]]}):"]
    header = f"{'group':<28}" + "".join(
        f"{n + ' cos':>12}{'relL2':>9}{'scale':>9}" for n in names[1:]
    )
    if len(names) == 3:
        header += f"{'lossless b/c':>15}{'maxdiff b/c':>14}"
    lines.append(header)
    rows = [*result.groups.items(), ("all", result.total)]
    for group, row in rows:
        text = f"{group:<28}"
        for figures in row["models"]:
            text += (f"{_cell(figures['cosine']):>12}{_cell(figures['relative_l2']):>9}"
                     f"{_cell(figures['scale']):>9}")  # fmt: skip
        if "lossless" in row:
            lossless, maxdiff = row["lossless"], row["maxdiff"]
            text += (
                f"{lossless['b']:>8.3f}/{lossless['c']:.3f}{maxdiff['b']:>7.3f}/{maxdiff['c']:.3f}"
            )
        lines.append(text)
    return "\n".join(lines)


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--keys", "per_key", is_flag=True, help="One row per key instead of per block.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--alpha", type=float, default=1.0, show_default=True,
              help="lossless/maxdiff shares: d_b = |a − α·b|.")  # fmt: skip
@click.option("--beta", type=float, default=1.0, show_default=True,
              help="lossless/maxdiff shares: d_c = |a − β·c|.")  # fmt: skip
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the cosines (models × groups) as a heatmap PNG.")  # fmt: skip
@click.option("-q", "--quiet", is_flag=True, help="No progress.")
def similarity(models: tuple[str, ...], **flags: Any) -> None:
    """How alike MODELS are (NAME=PATH or paths), each against the first, per block and
    component: cosine, ‖M − A‖/‖A‖, the least-squares scale; for three models the shares
    lossless and maxdiff would take from each."""
    from weightmix.analysis.similarity import measure_similarity
    from weightmix.cli import _model_names
    from weightmix.progress import make_progress

    if len(models) < 2:
        raise WeightmixError("similarity compares models: give at least two")
    for name in ("alpha", "beta"):
        if not math.isfinite(flags[name]):
            raise WeightmixError(f"--{name} {flags[name]}: give a finite number")
    if flags["plot"] is not None:
        from weightmix.analysis.plots import check_plot_path

        check_plot_path(flags["plot"])
    paths = _model_names(models)
    bar = make_progress(not flags["quiet"] and not flags["as_json"])
    total = sum(Path(p).stat().st_size for p in paths.values() if Path(p).is_file())
    bar.start(0, total)
    try:
        result = measure_similarity(paths, flags["per_key"], flags["alpha"], flags["beta"],
                                    lambda n: bar.advance(n, tensor_done=False))  # fmt: skip
    finally:
        bar.close()
    if flags["plot"] is not None:
        from weightmix.analysis.plots import heatmap

        names = list(result.models)
        groups = list(result.groups)
        values = [[result.groups[g]["models"][m]["cosine"] for g in groups]
                  for m in range(len(names) - 1)]  # fmt: skip
        heatmap(values, names[1:], groups, f"cosine against {names[0]}", flags["plot"])
    if flags["as_json"]:
        document = {"models": result.models, "groups": result.groups, "all": result.total}
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(table(result))


@click.command()
@click.argument("recipe_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--param", "params", multiple=True, required=True,
              help="NAME=V1,V2,... along the columns; a second --param: the rows.")  # fmt: skip
@click.option("--prompt", required=True, help="The prompt every cell is drawn with.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--size", type=click.IntRange(8, 4096), default=512, show_default=True,
              help="Width and height of each image.")  # fmt: skip
@click.option("--pipeline", type=click.Path(file_okay=False, path_type=Path),
              help="A local diffusers pipeline folder (default: the layout model).")  # fmt: skip
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The grid PNG; cells go beside it as NAME-ROW-COLUMN.png.")  # fmt: skip
def preview(recipe_path: Path, params: tuple[str, ...], **flags: Any) -> None:
    """Merge RECIPE for each value of one or two parameters (into memory), draw an image with
    each merge, and write a labelled grid."""
    from io import BytesIO

    from weightmix.analysis.preview import (
        check_sweeps,
        parse_sweep,
        pipeline_folder,
        run_preview,
    )
    from weightmix.cli import _number_or_value
    from weightmix.io.writer import write_file
    from weightmix.plan import parse_device
    from weightmix.recipe import parse_recipe, read_recipe_data

    if len(params) > 2:
        raise WeightmixError(f"--param is given {len(params)} times: sweep one or two parameters")
    output = flags["output"]
    if output.suffix.lower() != ".png":
        raise WeightmixError(f"-o {output}: give a .png path")
    if not output.parent.is_dir():
        raise WeightmixError(f"-o {output}: folder {output.parent} does not exist")
    data = read_recipe_data(recipe_path)
    recipe = parse_recipe(data, str(recipe_path), recipe_path.parent)
    sweeps = [parse_sweep(text, _number_or_value) for text in params]
    parse_device(flags["device"])
    family = check_sweeps(data, sweeps, recipe_path.parent)
    folder = pipeline_folder(recipe, flags["pipeline"], family)
    grid = run_preview(data, recipe, sweeps, flags["prompt"], flags["seed"], flags["steps"],
                       folder, flags["device"], flags["size"])  # fmt: skip
    for i, row in enumerate(grid.cells):
        for j, image in enumerate(row):
            buffer = BytesIO()
            image.save(buffer, format="PNG")
            write_file(output.with_name(f"{output.stem}-{i}-{j}.png"), buffer.getvalue())
    buffer = BytesIO()
    grid.image.save(buffer, format="PNG")
    write_file(output, buffer.getvalue())
    click.echo(f"wrote {output} ({len(grid.cells)} × {len(grid.cells[0])} cells)")
