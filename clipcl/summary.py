"""What a workspace has learned, as one JSON-ready dict: ``clipcl tasks --json`` prints it, ``clipcl serve`` answers
it at ``GET /tasks``.

Kept in one place so the command and the server cannot drift apart; torch-free, like ``clipcl tasks`` itself.
The rows (read from each task's checksummed ``task.json``) and the interrupted run (read from ``.resume/``) are
separate steps because the server reads the rows once per state it loads, while an interrupted run comes and goes
without the manifest changing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .checkpoint import Checkpoint
from .workspace import Workspace


def task_rows(ws: Workspace) -> list[dict[str, Any]]:
    """One dict per committed task: id, name, classes, sizes, when, epochs, stored accuracy and the method's facts."""
    rows = []
    for task in ws.tasks:
        record = ws.task_record(task)
        rows.append({
            "id": task.info.index,
            "name": task.name,
            "classes": list(task.info.classes),
            "train_images": record.train_images,
            "heldout_images": record.heldout_images,
            "tensor_bytes": record.tensors.bytes if record.tensors else 0,
            "created_at": task.created_at,
            "epochs": record.training.epochs,
            "accuracy": None if record.accuracy is None else dataclasses.asdict(record.accuracy),
            "method": record.method,
        })
    return rows


def interrupted_run(ws: Workspace) -> dict[str, Any] | None:
    """The add-task run that ``clipcl add-task --resume`` would continue, or ``None`` (a damaged checkpoint counts as
    none here: add-task reports it and replaces it)."""
    interrupted = Checkpoint.pending(ws.path, ws.next_task_index())
    if interrupted is None:
        return None
    return {"task": interrupted.run.task, "name": interrupted.run.name, "folder": interrupted.run.folder,
            "stage": interrupted.stage + 1, "epochs_done": interrupted.epochs_done}


def tasks_summary(ws: Workspace, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """``clipcl tasks --json``: the workspace, model, method, classes, :func:`task_rows` (pass ``rows`` already read
    to reuse them), the removed tasks and :func:`interrupted_run`."""
    rows = task_rows(ws) if rows is None else rows
    return {"workspace": str(ws.path), "model": ws.model_spec.describe(), "method": ws.method_name,
            "method_config": ws.method_config, "classes": ws.classes, "tasks": rows,
            "removed": [r.to_json() for r in ws.removed_tasks], "interrupted": interrupted_run(ws)}
