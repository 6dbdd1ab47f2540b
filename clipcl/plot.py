"""A picture of how well a workspace remembers: the accuracy-matrix heatmap and the accuracy-after-each-task curve.

Drawn on a bare matplotlib ``Figure`` with the Agg canvas, never through pyplot, so calling it from a notebook or
another program leaves that program's matplotlib backend and figures alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ClipclError
from .storage import TEMP_PREFIX


def check_plot_path(path: Path | str) -> Path:
    """Refuse, before any work, a plot path whose folder is missing or whose suffix matplotlib cannot write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise ClipclError(f"--plot: folder {path.parent} does not exist")
    formats = FigureCanvasAgg.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in formats:
        raise ClipclError(f"--plot: cannot write {path.suffix or 'a file without suffix'} "
                          f"(use one of {', '.join('.' + f for f in sorted(formats))})")
    return path


def plot_accuracy(path: Path | str, matrix: Sequence[Sequence[float | None]],
                  accuracy_after_task: Sequence[float | None], task_names: Sequence[str], title: str = "") -> Path:
    """Write the figure to ``path`` (its suffix picks the format: .png, .svg, .pdf, ...); returns the path.

    Left: ``A[i][j]`` in percent (row: after task i; column: task j's held-out set). Right: the sample-weighted
    accuracy over tasks 1..i after each task i. Unmeasured entries stay blank.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = check_plot_path(path)
    n = len(matrix)
    grid = [[math.nan] * n for _ in range(n)]
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                grid[i][j] = 100 * value
    fig = Figure(figsize=(6 + 0.5 * n, 4.5))
    FigureCanvasAgg(fig)
    heat, curve = fig.subplots(1, 2, width_ratios=(1.1, 1))
    image = heat.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(n):
            if not math.isnan(grid[i][j]):
                heat.text(j, i, f"{grid[i][j]:.1f}", ha="center", va="center", fontsize=8,
                          color="white" if grid[i][j] < 60 else "black")
    labels = [f"{i + 1}" for i in range(n)]
    heat.set_xticks(range(n), labels)
    heat.set_yticks(range(n), labels)
    heat.set_xlabel("evaluated on task")
    heat.set_ylabel("after training task")
    heat.set_title("accuracy matrix (%)")
    fig.colorbar(image, ax=heat, fraction=0.046, pad=0.04)
    points = [(i + 1, 100 * a) for i, a in enumerate(accuracy_after_task) if a is not None]
    curve.plot([x for x, _ in points], [y for _, y in points], marker="o")
    curve.set_xticks(range(1, n + 1), [f"{i + 1}\n{name[:12]}" for i, name in enumerate(task_names)], fontsize=8)
    curve.set_ylim(0, 100)
    curve.set_xlim(0.5, n + 0.5)
    curve.set_xlabel("after task")
    curve.set_ylabel("accuracy over tasks so far (%)")
    curve.grid(alpha=0.3)
    curve.set_title("accuracy after each task")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_methods(path: Path | str, curves: dict[str, Sequence[float | None]], title: str = "") -> Path:
    """Write one figure with each method's accuracy over the tasks so far after each task (``clipcl bench``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = check_plot_path(path)
    n = max((len(curve) for curve in curves.values()), default=0)
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots()
    for name, curve in curves.items():
        points = [(i + 1, 100 * a) for i, a in enumerate(curve) if a is not None]
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name,
                  linestyle="--" if name == "joint" else "-")
    axes.set_xticks(range(1, n + 1))
    axes.set_xlim(0.5, n + 0.5)
    axes.set_ylim(0, 100)
    axes.set_xlabel("after task")
    axes.set_ylabel("accuracy over tasks so far (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """Write the figure aside and rename it into place."""
    tmp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ClipclError(f"cannot write the plot to {path}: {exc.strerror}") from exc
    return path
