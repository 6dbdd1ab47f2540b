"""Continual-learning metrics from the accuracy matrix, as docs/methods.md defines them.

``A[i][j]`` is the accuracy on task j's held-out set after training task i (rows and columns from task 1; only
``j <= i`` is defined), predicting over every class seen after task i. ``sizes[j]`` is the number of held-out images
of task j, so that the accuracy over tasks 1..i is sample-weighted. An entry may be ``None`` (not measured, e.g. a
task whose images are gone); it is left out of every mean that would use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Matrix = Sequence[Sequence[float | None]]


@dataclass(frozen=True)
class ContinualMetrics:
    """Avg (mean accuracy after each task), Last, Forgetting and BWT; ``None`` where undefined."""

    accuracy_after_task: list[float | None]
    avg: float | None
    last: float | None
    forgetting: float | None
    bwt: float | None


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def accuracy_after_each_task(matrix: Matrix, sizes: Sequence[int]) -> list[float | None]:
    """acc_i: sample-weighted accuracy over the held-out sets of tasks 1..i after task i."""
    result: list[float | None] = []
    for i, row in enumerate(matrix):
        pairs = [(row[j], sizes[j]) for j in range(i + 1) if j < len(row) and row[j] is not None]
        total = sum(n for _, n in pairs)
        result.append(sum(a * n for a, n in pairs) / total if total else None)
    return result


def continual_metrics(matrix: Matrix, sizes: Sequence[int]) -> ContinualMetrics:
    """Avg, Last, Forgetting (mean over j<T of max_{i<T} A[i][j] - A[T][j]) and BWT (mean of A[T][j] - A[j][j])."""
    if len(sizes) < len(matrix):
        raise ValueError(f"{len(matrix)} tasks in the matrix but {len(sizes)} held-out sizes")
    acc = accuracy_after_each_task(matrix, sizes)
    tasks = len(matrix)
    forgetting: list[float | None] = []
    bwt: list[float | None] = []
    if tasks >= 2:
        final = matrix[-1]
        for j in range(tasks - 1):
            earlier = [matrix[i][j] for i in range(j, tasks - 1) if matrix[i][j] is not None]
            final_j = final[j] if j < len(final) else None
            if final_j is None or not earlier:
                continue
            forgetting.append(max(earlier) - final_j)
            if matrix[j][j] is not None:
                bwt.append(final_j - matrix[j][j])
    return ContinualMetrics(
        accuracy_after_task=acc,
        avg=_mean(acc),
        last=acc[-1] if acc else None,
        forgetting=_mean(forgetting) if forgetting else None,
        bwt=_mean(bwt) if bwt else None,
    )
