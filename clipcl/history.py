"""The stored accuracy matrix across task removals: every task ever learned, the removed ones marked.

``add-task`` stores row i of the accuracy matrix in task i's record: its accuracy on each task the workspace held
then, in task order. After a ``remove-task`` those rows no longer line up with the tasks the workspace holds: a row
stored before the removal has a column for the removed task, a row stored after it has none, and the removed task's
own row is kept only in the manifest (:class:`~clipcl.records.RemovedTask`). :func:`accuracy_history` puts every
row back on the columns of the tasks it was measured on, by task number, so the history is shown as it was measured;
:meth:`AccuracyHistory.current` is the part about the tasks held now, from which the metrics are computed. Without
removals both are the matrix the records hold. Torch-free: ``clipcl tasks`` may read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .records import RemovedTask, TaskRecord

if TYPE_CHECKING:
    from .workspace import Workspace

Matrix = list[list[float | None]]


@dataclass(frozen=True)
class AccuracyHistory:
    """Every task ever learned (by number, the removed ones too) and the accuracy matrix stored over them.

    ``matrix[i][j]`` (``j <= i``): the accuracy on task ``tasks[j]`` after learning task ``tasks[i]``; ``None``
    where it was not measured or task ``tasks[j]`` was not in the workspace then (removed before task ``tasks[i]``
    was learned)."""

    tasks: list[int]
    names: list[str]
    removed: list[int]
    matrix: Matrix
    sizes: list[int | None]  # held-out images of each task (None: unknown for a removed task)

    def current(self) -> tuple[Matrix, list[int]]:
        """The matrix and held-out sizes of the tasks the workspace holds now, in task order (every removed task's
        row and column left out): what Avg, Last, Forgetting and BWT describe."""
        kept = [k for k, index in enumerate(self.tasks) if index not in self.removed]
        matrix = [[self.matrix[i][j] for j in kept if j <= i] for i in kept]
        return matrix, [self.sizes[k] or 0 for k in kept]

    def to_json(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "names": self.names, "removed": self.removed, "matrix": self.matrix}


def accuracy_history(workspace: Workspace, records: Mapping[int, TaskRecord]) -> AccuracyHistory:
    """The history of ``workspace``'s accuracy matrix from its tasks' ``records`` (by task number) and its
    removed tasks. A stored row whose length does not fit the tasks present when it was measured is shown as not
    measured rather than guessed at."""
    live = {task.info.index: task for task in workspace.tasks}
    # a number is never given twice; an older clipcl that ignored the list may have, and the task held wins
    removed: dict[int, RemovedTask] = {r.id: r for r in workspace.removed_tasks if r.id not in live}
    tasks = sorted([*live, *removed])

    def present(j: int, k: int) -> bool:
        """Whether task j was in the workspace when task k was learned."""
        return j <= k and (j in live or removed[j].next_task > k)

    names: list[str] = []
    sizes: list[int | None] = []
    matrix: Matrix = []
    for k in tasks:
        if k in live:
            record = records[k]
            names.append(live[k].name)
            sizes.append(record.heldout_images)
            row = None if record.accuracy is None else list(record.accuracy.per_task)
        else:
            names.append(removed[k].name)
            sizes.append(removed[k].heldout_images)
            row = removed[k].accuracy
        columns = [j for j in tasks if present(j, k)]
        values = dict(zip(columns, row, strict=True)) if row is not None and len(row) == len(columns) else {}
        matrix.append([values.get(j) for j in tasks if j <= k])
    return AccuracyHistory(tasks, names, sorted(removed), matrix, sizes)
