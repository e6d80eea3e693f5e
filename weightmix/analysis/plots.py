"""The similarity heatmap: models × groups, the value printed in each cell, group names on the
axis, drawn with matplotlib (the `analysis` extra) into a PNG of a known layout."""

from __future__ import annotations

from pathlib import Path

from weightmix.errors import WeightmixError

EXTRA = "the plot needs matplotlib: pip install 'weightmix[analysis]'"
CELL_INCHES = 0.42
DPI = 100
MARGINS = (1.6, 0.8, 2.2, 0.6)  # inches: left, right, bottom (group names), top


def check_plot_path(path: Path) -> None:
    """Before anything is read: the folder exists, the name is a .png, matplotlib is there."""
    if path.suffix.lower() != ".png":
        raise WeightmixError(f"--plot {path}: give a .png path")
    if not path.parent.is_dir():
        raise WeightmixError(f"--plot {path}: folder {path.parent} does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise WeightmixError(EXTRA) from None


def geometry(rows: int, columns: int) -> tuple[float, float, tuple[float, float, float, float]]:
    """Figure width and height (inches) and the heatmap's axes rectangle (figure fractions)."""
    left, right, bottom, top = MARGINS
    width = left + right + columns * CELL_INCHES
    height = bottom + top + rows * CELL_INCHES
    return width, height, (left / width, bottom / height, columns * CELL_INCHES / width,
                           rows * CELL_INCHES / height)  # fmt: skip


def heatmap(values: list[list[float | None]], rows: list[str], columns: list[str], title: str,
            path: Path) -> None:  # fmt: skip
    """Cell (i, j) = values[i][j] on a fixed colour scale from -1 to 1 (cosine), written to
    `path` whole or not at all."""
    from weightmix.io.writer import write_file

    write_file(path, heatmap_png(values, rows, columns, title))


def heatmap_png(values: list[list[float | None]], rows: list[str], columns: list[str],
                title: str) -> bytes:  # fmt: skip
    """heatmap()'s picture as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    width, height, rectangle = geometry(len(rows), len(columns))
    figure = plt.figure(figsize=(width, height), dpi=DPI)
    try:
        axes = figure.add_axes(rectangle)
        axes.imshow(data, cmap="viridis", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
        axes.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        axes.set_yticks(range(len(rows)), rows, fontsize=8)
        axes.set_title(title, fontsize=9)
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                if value is not None:
                    axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5,
                              color="white" if value < 0.2 else "black")  # fmt: skip
        from io import BytesIO

        buffer = BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI)
    finally:
        plt.close(figure)
    return buffer.getvalue()
