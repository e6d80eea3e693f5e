"""What a search leaves for people: the best recipe as a plain recipe file (`weightmix merge
NAME.best.yaml -o ...` reproduces it), a table of the best trials, and two PNGs: the score of
each trial with the best so far, and the importance of each variable (Optuna's default
evaluator) once two trials have a score."""

from __future__ import annotations

import math
from io import BytesIO
from pathlib import Path
from typing import Any

from weightmix.io.writer import write_file
from weightmix.recipe import parse_recipe
from weightmix.search.run import ERROR_ATTR, best_values, need_optuna, values_of
from weightmix.search.spec import SearchSpec


def outputs(spec: SearchSpec, folder: Path | None = None) -> dict[str, Path]:
    where = folder or spec.folder
    return {
        "recipe": where / f"{spec.stem}.best.yaml",
        "trials": where / f"{spec.stem}.trials.png",
        "importance": where / f"{spec.stem}.importance.png",
    }


def table(spec: SearchSpec, study: Any, count: int = 10) -> str:
    """The best `count` trials (value, then each variable), and how many failed and why."""
    scored = [t for t in study.trials if t.value is not None and math.isfinite(t.value)]
    scored.sort(key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
    names = [v.name for v in spec.variables]
    lines = [f"| trial | {study.direction.name.lower()} | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]  # fmt: skip
    for trial in scored[:count]:
        values = values_of(spec, trial.params)
        cells = [_cell(values[name]) for name in names]
        lines.append(f"| {trial.number} | {trial.value:.6g} | " + " | ".join(cells) + " |")
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    summary = f"{len(study.trials)} trials: {len(scored)} scored, {len(failed)} failed"
    if failed:
        reasons: dict[str, int] = {}
        for trial in failed:
            reason = trial.user_attrs.get(ERROR_ATTR, "interrupted")
            reasons[reason] = reasons.get(reason, 0) + 1
        summary += "".join(f"\n  {n} x {reason}" for reason, n in reasons.items())
    return "\n".join([*lines, summary])


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_best_recipe(spec: SearchSpec, study: Any, path: Path) -> bool:
    """The best trial's recipe, paths relative to `path`'s folder; False if none scored."""
    values = best_values(spec, study)
    if values is None:
        return False
    recipe = parse_recipe(spec.trial_data(values), str(spec.source), spec.folder)
    best = study.best_trial
    header = (f"# best of search {spec.study_name()!r} ({spec.source.name}): trial"
              f" {best.number}, {study.direction.name.lower()} {best.value:.6g}\n")  # fmt: skip
    write_file(path, (header + recipe.to_yaml(relative_to=path.parent)).encode())
    return True


def write_plots(spec: SearchSpec, study: Any, paths: dict[str, Path]) -> list[Path]:
    """The trials plot, and the importance plot where it can be computed; the paths written
    (nothing without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    scored = [t for t in study.trials if t.value is not None and math.isfinite(t.value)]
    if not scored:
        return written
    maximize = study.direction.name == "MAXIMIZE"
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        numbers = [t.number for t in scored]
        values = [t.value for t in scored]
        best, running = [], None
        for value in values:
            running = value if running is None else (max if maximize else min)(running, value)
            best.append(running)
        axes.scatter(numbers, values, s=14, label="trial")
        axes.step(numbers, best, where="post", color="tab:red", label="best so far")
        axes.set_xlabel("trial")
        axes.set_ylabel(f"score ({study.direction.name.lower()})")
        axes.set_title(f"search {spec.study_name()}", fontsize=10)
        axes.legend(fontsize=8)
        figure.tight_layout()
        written.append(_save(figure, paths["trials"]))
    finally:
        plt.close(figure)
    importance = _importance(study)
    if importance:
        names = list(importance)[::-1]
        figure, axes = plt.subplots(figsize=(7, 0.6 + 0.3 * len(names)), dpi=100)
        try:
            axes.barh(names, [importance[n] for n in names])
            axes.set_xlabel("importance")
            axes.tick_params(axis="y", labelsize=7)
            figure.tight_layout()
            written.append(_save(figure, paths["importance"]))
        finally:
            plt.close(figure)
    return written


def _importance(study: Any) -> dict[str, float]:
    optuna = need_optuna()
    if len([t for t in study.trials if t.value is not None]) < 2:
        return {}
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):  # all values equal, one trial ...
        return {}


def _save(figure: Any, path: Path) -> Path:
    buffer = BytesIO()
    figure.savefig(buffer, format="png")
    write_file(path, buffer.getvalue())
    return path
