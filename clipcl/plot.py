"""A picture of how well a workspace remembers: the accuracy-matrix heatmap and the accuracy-after-each-task curve."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import ClipclError
from .storage import TEMP_PREFIX


def plot_accuracy(path: Path | str, matrix: Sequence[Sequence[float | None]],
                  accuracy_after_task: Sequence[float | None], task_names: Sequence[str], title: str = "") -> Path:
    """Write the figure to ``path`` (its suffix picks the format: .png, .svg, .pdf); returns the path.

    Left: ``A[i][j]`` in percent (row: after task i; column: task j's held-out set). Right: the sample-weighted
    accuracy over tasks 1..i after each task i. Unmeasured entries stay blank.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise ClipclError(f"cannot write the plot: folder {path.parent} does not exist")
    n = len(matrix)
    grid = [[math.nan] * n for _ in range(n)]
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                grid[i][j] = 100 * value
    fig, (heat, curve) = plt.subplots(1, 2, figsize=(6 + 0.5 * n, 4.5), width_ratios=(1.1, 1))
    try:
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
        curve.set_xticks(range(1, n + 1), [f"{i + 1}\n{name[:12]}" for i, name in enumerate(task_names)],
                         fontsize=8)
        curve.set_ylim(0, 100)
        curve.set_xlim(0.5, n + 0.5)
        curve.set_xlabel("after task")
        curve.set_ylabel("accuracy over tasks so far (%)")
        curve.grid(alpha=0.3)
        curve.set_title("accuracy after each task")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        tmp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
        try:
            fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower() or None)
            os.replace(tmp, path)
        except (ValueError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            raise ClipclError(f"cannot write the plot to {path}: {exc}") from exc
    finally:
        plt.close(fig)
    return path
