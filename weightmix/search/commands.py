"""`weightmix search FILE`: run, resume or show a merge search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--resume", is_flag=True, help="Continue the search stored for FILE.")
@click.option("--overwrite", is_flag=True, help="Drop the stored search for FILE and start again.")
@click.option("--show", is_flag=True, help="Run nothing: print and write what the search found.")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Run trials as Ray tasks: 'auto' (the cluster this machine is in), 'local'"
                   " (start one here) or the head's address.")  # fmt: skip
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Trials at once (default: search.workers; bounded by memory per trial).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Merge threads per trial.",
)
@click.option("--trials", type=click.IntRange(min=1), help="Override search.trials.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the best recipe and plots (default: FILE's folder).",
)
def search(file: Path, **flags: Any) -> None:
    """Search the values a recipe marks {search: [low, high]} or {choice: [...]} for the best
    score of `search.objective`. Trials are stored (SQLite beside FILE by default), so a
    stopped search resumes; the best recipe goes to NAME.best.yaml, plots beside it."""
    from weightmix.errors import WeightmixError
    from weightmix.search import report
    from weightmix.search.run import need_optuna, open_study
    from weightmix.search.run import search as run
    from weightmix.search.spec import load_search

    need_optuna()
    spec = load_search(file)
    if flags["trials"]:
        spec.settings.trials = flags["trials"]
    folder = flags["out"] or spec.folder
    if not folder.is_dir():
        raise WeightmixError(f"--out {folder}: not a folder")
    if flags["show"]:
        from weightmix.search.run import prepare

        prepare(spec)
        study = open_study(spec, resume=True, overwrite=False, create=False)
    else:
        if flags["overwrite"]:  # what the dropped search wrote is not this one's
            for path in report.outputs(spec, folder).values():
                path.unlink(missing_ok=True)
        outcome = run(
            spec, resume=flags["resume"], overwrite=flags["overwrite"],
            ray_address=flags["ray_address"], workers=flags["workers"],
            threads=flags["threads"], echo=click.echo,
        )  # fmt: skip
        study = outcome.study
        if outcome.stopped:
            click.echo(f"stopped: {outcome.stopped}")
    click.echo(report.table(spec, study))
    paths = report.outputs(spec, folder)
    if report.write_best_recipe(spec, study, paths["recipe"]):
        click.echo(f"best recipe: {paths['recipe']} (weightmix merge {paths['recipe']} -o ...)")
    for path in report.write_plots(spec, study, paths):
        click.echo(f"plot: {path}")
