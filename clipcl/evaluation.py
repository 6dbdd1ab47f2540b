"""Held-out evaluation: a method's answer over a dataset, each task's held-out images, and accuracy per task.

Used by ``add-task`` (the row of the accuracy matrix it stores), ``eval`` and ``bench``; it knows nothing of training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import ImageDataset, ImageItem
from .methods import Method, Route, TaskInfo
from .reading import DEFAULT_MAX_IMAGE_BYTES
from .records import TaskRecord
from .runtime import Progress, make_loader


@dataclass
class DatasetPrediction:
    """A method's answer for every image of a dataset: probabilities over all classes, labels, the router's task
    scores (``None`` for methods that do not route) and how many image-encoder passes each image took."""

    probs: torch.Tensor
    labels: torch.Tensor
    task_scores: torch.Tensor | None
    encoder_passes: torch.Tensor  # [images], float


@torch.no_grad()
def predict_dataset(method: Method, dataset: torch.utils.data.Dataset, accelerator: Any, batch_size: int,
                    workers: int, progress: Progress | None = None, route: Route = None) -> DatasetPrediction:
    """Predict every image of ``dataset`` with ``method`` (gathered across processes), in inference mode."""
    method.eval()
    loader = accelerator.prepare(make_loader(dataset, batch_size, workers))
    probs, labels, task_scores, passes = [], [], [], []
    for images, batch_labels in loader:
        with accelerator.autocast():
            prediction = method.predict(images.to(method.device), route=route)
        rows = len(batch_labels)
        per_image = (prediction.encoder_passes if prediction.encoder_passes is not None else rows) / max(rows, 1)
        gathered = accelerator.gather_for_metrics(
            (prediction.probs.float(), batch_labels, torch.full((rows,), float(per_image), device=batch_labels.device),
             *(() if prediction.task_scores is None else (prediction.task_scores.float(),))))
        probs.append(gathered[0].cpu())
        labels.append(gathered[1].cpu())
        passes.append(gathered[2].cpu())
        if len(gathered) == 4:
            task_scores.append(gathered[3].cpu())
        if progress is not None:
            progress.stage_advance(1)
    if not probs:
        return DatasetPrediction(torch.empty(0, len(method.classes)), torch.empty(0, dtype=torch.long), None,
                                 torch.empty(0))
    return DatasetPrediction(torch.cat(probs), torch.cat(labels), torch.cat(task_scores) if task_scores else None,
                             torch.cat(passes))


def heldout_dataset(method: Method, task: TaskInfo, record: TaskRecord) -> ImageDataset | None:
    """The held-out images a task recorded that still exist, or ``None`` when none is left."""
    root = Path(record.source.root)
    items = [ImageItem(relpath, label) for relpath, label in record.heldout_files if (root / relpath).is_file()]
    if not items:
        return None
    limit = record.source.max_image_bytes or DEFAULT_MAX_IMAGE_BYTES  # the bound the task was scanned with
    return ImageDataset(root, items, method.backbone.eval_transform, label_offset=task.offset, max_image_bytes=limit)


@dataclass
class Evaluation:
    """Held-out accuracy of each evaluated task and of their union, predicting over every class learned so far.

    ``task_id_*`` is the share of images whose best-scored task is their own, for methods that route by task
    (``None`` otherwise). A task whose held-out images are gone has ``None`` and 0 images.
    ``encoder_passes_per_image``: image-encoder passes per evaluated image (1 for single-pass methods).
    ``within_task_per_task``: each task's accuracy when the answer is restricted to that task's own classes (the
    task given). Beside ``per_task`` it tells a method that learns a task poorly (both low) from one whose old and new
    classes are badly calibrated against each other (high within, low among all). ``None`` for methods that route by
    task, whose answer has no scores for the tasks it did not run (their task-id accuracy tells the same story).
    """

    per_task: list[float | None]
    images: list[int]
    accuracy: float | None
    task_id_per_task: list[float | None]
    task_id_accuracy: float | None
    encoder_passes_per_image: float | None = None
    within_task_per_task: list[float | None] = field(default_factory=list)


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


def evaluate_tasks(method: Method, sets: Sequence[tuple[TaskInfo, ImageDataset | None]], accelerator: Any,
                   batch_size: int, workers: int, progress: Progress, route: Route = None) -> Evaluation:
    """Evaluate ``method`` on each task's held-out set (``None``: images gone, warned about and left out)."""
    per_task: list[float | None] = []
    images: list[int] = []
    task_id: list[float | None] = []
    within: list[float | None] = []
    correct_total = count_total = routed_total = 0
    passes_total = 0.0
    total_batches = sum(math.ceil(len(ds) / batch_size) for _, ds in sets if ds is not None)
    progress.stage_start("evaluating", total_batches)
    for task, dataset in sets:
        if dataset is None:
            progress.warn(f"task {task.index}: no held-out images found (none kept, or moved since); "
                          "its accuracy is not measured")
            per_task.append(None)
            images.append(0)
            task_id.append(None)
            within.append(None)
            continue
        result = predict_dataset(method, dataset, accelerator, batch_size, workers, progress, route)
        labels = result.labels
        correct = int((result.probs.argmax(dim=1) == labels).sum())
        per_task.append(_share(correct, len(labels)))
        if result.task_scores is None:
            own_classes = result.probs[:, task.class_slice].argmax(dim=1) + task.offset
            within.append(_share(int((own_classes == labels).sum()), len(labels)))
        else:  # a routed answer has no scores for tasks it did not run: its task-id accuracy says this instead
            within.append(None)
        images.append(len(labels))
        correct_total += correct
        count_total += len(labels)
        passes_total += float(result.encoder_passes.sum())
        if result.task_scores is None:
            task_id.append(None)
        else:
            routed = int((result.task_scores.argmax(dim=1) == task.index - 1).sum())
            task_id.append(_share(routed, len(labels)))
            routed_total += routed
    progress.stage_end()
    routes = any(value is not None for value in task_id)
    return Evaluation(per_task, images, _share(correct_total, count_total), task_id,
                      _share(routed_total, count_total) if routes else None,
                      passes_total / count_total if count_total else None, within)
