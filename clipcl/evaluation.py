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
from .feature_cache import CacheEntry, FrozenFeatureCache
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


class _Numbered(torch.utils.data.Dataset):
    """A dataset's items with their index in front, so that a batch (shuffled across processes or not) knows which
    rows of the dataset's frozen features are its own."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any, Any]:
        return (index, *self.dataset[index])


def _kept_everywhere(accelerator: Any, kept: torch.Tensor | None) -> torch.Tensor | None:
    """``kept`` where every process found the features in the cache, else ``None`` in all: the processes then
    compute and gather them together (a collective that every process must enter)."""
    if accelerator.num_processes == 1:
        return kept
    found = torch.tensor([kept is not None], device=accelerator.device)
    return kept if bool(accelerator.gather(found).all()) else None


def _frozen_of(method: Method, images: torch.Tensor, indices: torch.Tensor, kept: torch.Tensor | None,
               computed: list[tuple[torch.Tensor, torch.Tensor]], accelerator: Any) -> torch.Tensor:
    """The batch's frozen features (``indices``: its images' places in the dataset): the kept rows, or computed now
    and gathered, with their places, for the cache."""
    if kept is not None:
        return kept[indices.cpu()].to(method.device)
    frozen = method.frozen_features(images)
    gathered_indices, gathered = accelerator.gather_for_metrics((indices, frozen.float()))
    computed.append((gathered_indices.cpu(), gathered.cpu()))
    return frozen


def _store_computed(cache: FrozenFeatureCache, entry: CacheEntry, computed: list[tuple[torch.Tensor, torch.Tensor]],
                    accelerator: Any) -> None:
    """Put the features computed batch by batch back in the dataset's order and keep them (main process only)."""
    if not computed or not accelerator.is_main_process:
        return
    indices = torch.cat([i for i, _ in computed])
    features = torch.cat([f for _, f in computed])
    full = torch.zeros((entry.count, *features.shape[1:]), dtype=torch.float32)
    filled = torch.zeros(entry.count, dtype=torch.bool)
    full[indices] = features
    filled[indices] = True
    if bool(filled.all()):
        cache.store(entry, full)


@torch.no_grad()
def predict_dataset(method: Method, dataset: torch.utils.data.Dataset, accelerator: Any, batch_size: int,
                    workers: int, progress: Progress | None = None, route: Route = None,
                    cache: FrozenFeatureCache | None = None, cache_name: str | None = None) -> DatasetPrediction:
    """Predict every image of ``dataset`` with ``method`` (gathered across processes), in inference mode.

    With ``cache`` and ``cache_name`` (e.g. ``task-001``), the method's frozen features of the dataset
    (:meth:`~clipcl.methods.Method.frozen_features`) are taken from the cache when an earlier evaluation kept them
    for these very images and this setting, and kept there otherwise (:mod:`clipcl.feature_cache`): the answer is
    the same, and only the passes that depend on the tasks run."""
    method.eval()
    entry = cache.entry(method, dataset, accelerator, cache_name) if cache is not None and cache_name else None
    kept = _kept_everywhere(accelerator, cache.load(entry)) if cache is not None and entry is not None else None
    computed: list[tuple[torch.Tensor, torch.Tensor]] = []
    loader = accelerator.prepare(make_loader(_Numbered(dataset) if entry is not None else dataset, batch_size,
                                             workers))
    probs, labels, task_scores, passes = [], [], [], []
    for batch in loader:
        indices, images, batch_labels = batch if entry is not None else (None, *batch)
        images = images.to(method.device)
        with accelerator.autocast():
            if indices is None:
                prediction = method.predict(images, route=route)
            else:
                frozen = _frozen_of(method, images, indices, kept, computed, accelerator)
                prediction = method.predict(images, route=route, frozen=frozen)
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
    if cache is not None and entry is not None:
        _store_computed(cache, entry, computed, accelerator)
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
                   batch_size: int, workers: int, progress: Progress, route: Route = None,
                   cache: FrozenFeatureCache | None = None) -> Evaluation:
    """Evaluate ``method`` on each task's held-out set (``None``: images gone, warned about and left out); with
    ``cache``, each task's frozen features are computed once and reused by every later evaluation
    (:func:`predict_dataset`)."""
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
        result = predict_dataset(method, dataset, accelerator, batch_size, workers, progress, route, cache,
                                 f"task-{task.index:03d}")
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
            own = [t.index for t in method.tasks].index(task.index)  # its column: numbers may skip a removed task
            routed = int((result.task_scores.argmax(dim=1) == own).sum())
            task_id.append(_share(routed, len(labels)))
            routed_total += routed
    progress.stage_end()
    routes = any(value is not None for value in task_id)
    return Evaluation(per_task, images, _share(correct_total, count_total), task_id,
                      _share(routed_total, count_total) if routes else None,
                      passes_total / count_total if count_total else None, within)
