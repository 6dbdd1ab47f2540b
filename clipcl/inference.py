"""Asking a workspace about images: ``predict`` (any image files) and ``evaluate`` (each task's held-out images).

Both load the base model and every stored task through :meth:`clipcl.workspace.Workspace.build_method` and predict
over every class learned so far through the method's :meth:`~clipcl.methods.Method.predict`, so what they report is
what ``add-task`` measured (both use :mod:`clipcl.evaluation`; nothing here imports the training engine).
``evaluate`` also rebuilds the accuracy matrix that ``add-task`` stored row by row and derives the continual-learning
metrics from it (:mod:`clipcl.metrics`).
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .data import IMAGE_SUFFIXES, list_images, load_image_checked, why_unreadable
from .errors import ClipclError
from .evaluation import Evaluation, evaluate_tasks, heldout_dataset
from .feature_cache import FrozenFeatureCache
from .history import AccuracyHistory, accuracy_history
from .methods import Method, Route, build_config, check_inference_overrides, get_method_class, parse_route
from .methods.base import check_route_supported
from .metrics import ContinualMetrics, continual_metrics
from .reading import DEFAULT_MAX_IMAGE_BYTES, MIB, regular_file_problem
from .records import TaskRecord
from .runtime import Progress, check_loader_options, check_max_image_mb, make_accelerator, require_single_process
from .workspace import StoredTask, Workspace

GLOB_CHARACTERS = frozenset("*?[")


# --- which tasks, which route ---------------------------------------------------------------------------------------
def learned_tasks(workspace: Workspace) -> list[StoredTask]:
    """The workspace's tasks; a workspace that has learned nothing yet cannot answer anything."""
    if not workspace.tasks:
        raise ClipclError(f"workspace {workspace.path} has learned no task yet: run `clipcl add-task` first")
    return workspace.tasks


def select_tasks(workspace: Workspace, selection: str = "all") -> list[StoredTask]:
    """The tasks named by ``selection``: ``all``, or a comma-separated list of task numbers or names."""
    tasks = learned_tasks(workspace)
    if selection.strip().lower() == "all":
        return tasks
    by_key = {str(t.info.index): t for t in tasks} | {t.name: t for t in tasks}
    chosen: list[StoredTask] = []
    for key in (part.strip() for part in selection.split(",")):
        if key not in by_key:
            known = ", ".join(f"{t.info.index} ({t.name})" for t in tasks)
            raise ClipclError(f"--tasks: no task {key!r} in this workspace (tasks: {known})")
        if by_key[key] not in chosen:
            chosen.append(by_key[key])
    return sorted(chosen, key=lambda t: t.info.index)


def check_route(workspace: Workspace, route: int | str | None) -> Route:
    """``route`` checked (see :func:`~clipcl.methods.parse_route`): refused for a method that does not route by
    task, or a K below 1, before any model is loaded."""
    route = parse_route(route)
    check_route_supported(get_method_class(workspace.method_name), route)
    return route


def _check_options(workspace: Workspace, options: dict[str, str] | None) -> None:
    """Refuse inference overrides that are not inference options, or whose values are wrong, before loading."""
    method_class = get_method_class(workspace.method_name)
    check_inference_overrides(method_class, options)
    build_config(method_class, options, stored=workspace.method_config)


# --- evaluation -----------------------------------------------------------------------------------------------------
def stored_matrix(records: Sequence[TaskRecord]) -> tuple[list[list[float | None]], list[int]]:
    """The accuracy matrix ``A[i][j]`` that ``add-task`` stored in the tasks' records (in task order; row i: after
    task i; ``None`` where not measured, a whole row of ``None`` for a task added with ``--no-eval``) and each task's
    held-out size."""
    matrix: list[list[float | None]] = []
    sizes: list[int] = []
    for i, record in enumerate(records):
        sizes.append(record.heldout_images)
        matrix.append(list(record.accuracy.per_task) if record.accuracy is not None else [None] * (i + 1))
    return matrix, sizes


@dataclass
class EvalReport:
    """Held-out accuracy now (``evaluation``) and the stored accuracy matrix with its metrics.

    Under several processes every one evaluates its share and gets the whole result; only the main one reports.
    """

    workspace: Workspace
    tasks: list[StoredTask]
    evaluation: Evaluation
    route: Route
    matrix: list[list[float | None]]  # over the tasks held now (history.current())
    metrics: ContinualMetrics
    is_main_process: bool = True
    history: AccuracyHistory | None = None  # the stored matrix over every task ever learned, removed ones marked

    @property
    def within_task_accuracy(self) -> float | None:
        """Accuracy over every evaluated image when each is answered among its own task's classes (the task given)."""
        pairs = [(share, n) for share, n in zip(self.evaluation.within_task_per_task, self.evaluation.images,
                                                strict=True) if share is not None]
        total = sum(n for _, n in pairs)
        return sum(share * n for share, n in pairs) / total if total else None

    def to_json(self) -> dict[str, Any]:
        ev = self.evaluation
        return {
            "workspace": str(self.workspace.path),
            "method": self.workspace.method_name,
            "route": self.route,
            "per_task": [
                {"task": t.info.index, "name": t.name, "classes": list(t.info.classes), "images": n,
                 "accuracy": acc, "within_task_accuracy": within, "task_id_accuracy": tid}
                for t, acc, n, within, tid in zip(self.tasks, ev.per_task, ev.images, ev.within_task_per_task,
                                                  ev.task_id_per_task, strict=True)
            ],
            "accuracy": ev.accuracy,
            "within_task_accuracy": self.within_task_accuracy,
            "task_id_accuracy": ev.task_id_accuracy,
            "encoder_passes_per_image": ev.encoder_passes_per_image,
            "matrix": self.matrix,
            "accuracy_after_task": self.metrics.accuracy_after_task,
            "avg": self.metrics.avg,
            "last": self.metrics.last,
            "forgetting": self.metrics.forgetting,
            "bwt": self.metrics.bwt,
            "removed_tasks": [{"task": r.id, "name": r.name, "classes": r.classes, "removed_at": r.removed_at}
                              for r in self.workspace.removed_tasks],
            "history": None if self.history is None else self.history.to_json(),
        }


def evaluate(workspace_path: Path | str, tasks: str = "all", route: int | str | None = None, batch_size: int = 64,
             workers: int = 0, precision: str = "fp32", progress: Progress | None = None,
             options: dict[str, str] | None = None, feature_cache: bool = True) -> EvalReport:
    """Evaluate the workspace on the held-out images of ``tasks``, predicting over every class learned so far;
    ``options`` override the method's inference options for this evaluation (nothing is stored). The frozen
    features of the held-out images are taken from, and kept in, the workspace's cache folder
    (:mod:`clipcl.feature_cache`; ``feature_cache=False``: computed afresh and not kept), with the same answer."""
    progress = progress or Progress()
    workspace = Workspace.open(workspace_path)
    chosen = select_tasks(workspace, tasks)
    route = check_route(workspace, route)
    _check_options(workspace, options)
    check_loader_options(batch_size, workers)
    records = {t.info.index: workspace.task_record(t) for t in workspace.tasks}  # each task.json read once
    history = accuracy_history(workspace, records)  # rows and columns of removed tasks marked, not misaligned
    matrix, sizes = history.current()
    accelerator = make_accelerator(precision)
    method = workspace.build_method(device=accelerator.device, overrides=options)
    sets = [(t.info, heldout_dataset(method, t.info, records[t.info.index])) for t in chosen]
    cache = FrozenFeatureCache.for_workspace(workspace.path) if feature_cache else None
    evaluation = evaluate_tasks(method, sets, accelerator, batch_size, workers, progress, route=route, cache=cache)
    return EvalReport(workspace, chosen, evaluation, route, matrix, continual_metrics(matrix, sizes),
                      accelerator.is_main_process, history)


# --- prediction -----------------------------------------------------------------------------------------------------
def expand_image_paths(patterns: Sequence[str | Path], on_skip: Callable[[Path, str], None] | None = None
                       ) -> tuple[list[Path], list[str]]:
    """Files to predict from files, folders (recursive, image files only) and glob patterns, in the order given
    and without repeats; also the patterns that named nothing. Only regular files count: a FIFO, a socket, a device
    or a link to one (or a link loop) found in a folder or by a pattern is reported to ``on_skip`` and never opened;
    one named directly is among the patterns that named nothing, with its reason passed to ``on_skip``."""
    found: list[Path] = []
    unmatched: list[str] = []
    for pattern in map(str, patterns):
        path = Path(pattern).expanduser()
        problem = regular_file_problem(path)
        if problem is None:
            matches = [path]
        elif path.is_dir():
            matches = list_images(path, on_skip)
        elif GLOB_CHARACTERS & set(pattern):
            matches = []
            for hit in map(Path, sorted(glob.glob(str(path), recursive=True))):
                if hit.is_dir():
                    matches.extend(list_images(hit, on_skip))
                elif hit.suffix.lower() in IMAGE_SUFFIXES:
                    hit_problem = regular_file_problem(hit)
                    if hit_problem is None:
                        matches.append(hit)
                    elif on_skip is not None:
                        on_skip(hit, hit_problem)
        else:
            matches = []
            if on_skip is not None and problem != "missing":
                on_skip(path, problem)
        if not matches:
            unmatched.append(pattern)
        found.extend(matches)
    return list(dict.fromkeys(found)), unmatched


@dataclass(frozen=True)
class ClassScore:
    """One of an image's top classes: its name, the task that learned it, and its probability."""

    class_name: str
    task: int
    task_name: str
    prob: float

    def to_json(self) -> dict[str, Any]:
        return {"class": self.class_name, "task": self.task, "task_name": self.task_name, "prob": self.prob}


@dataclass(frozen=True)
class ImagePrediction:
    """The top classes of one image, or why it could not be read."""

    path: str
    top: list[ClassScore]
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "top": [score.to_json() for score in self.top]}


class _ImageFiles(torch.utils.data.Dataset):
    """Image files decoded with the eval transform; one that cannot be read (or is over ``max_bytes``) yields its
    reason instead."""

    def __init__(self, paths: Sequence[Path], transform: Any, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(load_image_checked(self.paths[index], self.max_bytes)), None
        except Exception as exc:  # any decoding failure is reported for this file alone
            return index, None, why_unreadable(exc)


def _as_list(batch: list[tuple[int, torch.Tensor | None, str | None]]) -> list[tuple[int, Any, str | None]]:
    """Collate nothing: a batch may hold unreadable files, so images are stacked after those are set aside."""
    return batch


def predict_images(workspace_path: Path | str, paths: Sequence[Path], top_k: int = 5, route: int | str | None = None,
                   batch_size: int = 32, workers: int = 0, precision: str = "fp32",
                   method: Method | None = None, options: dict[str, str] | None = None,
                   max_image_mb: float = DEFAULT_MAX_IMAGE_BYTES / MIB) -> Iterator[ImagePrediction]:
    """Predict each image's ``top_k`` classes over everything learned, in the order of ``paths``.

    The workspace and the options are checked, and the model loaded, before this returns; the predictions then
    come batch by batch. An unreadable file (or one over ``max_image_mb`` MiB, or not a regular file) yields an
    :class:`ImagePrediction` with ``error`` set, without its content being read; the others are still predicted.
    Pass ``method`` (from :meth:`Workspace.build_method`) to reuse a loaded model across calls.
    """
    require_single_process("predict")
    workspace = Workspace.open(workspace_path)
    task_names = {task.info.index: task.name for task in learned_tasks(workspace)}
    route = check_route(workspace, route)
    _check_options(workspace, options)
    check_loader_options(batch_size, workers)
    max_bytes = check_max_image_mb(max_image_mb)
    if top_k < 1:
        raise ClipclError("--top-k must be at least 1")
    accelerator = make_accelerator(precision)
    method = method or workspace.build_method(device=accelerator.device, overrides=options)
    owners = class_owners(method, task_names)
    loader = DataLoader(_ImageFiles(paths, method.backbone.eval_transform, max_bytes), batch_size=batch_size,
                        num_workers=workers, collate_fn=_as_list)
    return _predict_batches(method, loader, paths, owners, min(top_k, len(owners)), route, accelerator)


def class_owners(method: Method, task_names: dict[int, str]) -> list[tuple[int, str]]:
    """Each class's task number and name, in the method's class order: what a :class:`ClassScore` names."""
    return [(task.index, task_names.get(task.index, "")) for task in method.tasks for _ in task.classes]


def top_classes(probs: torch.Tensor, k: int, classes: Sequence[str], owners: Sequence[tuple[int, str]]
                ) -> list[list[ClassScore]]:
    """Each row's ``k`` most probable classes, best first, with the task that learned each."""
    values, indices = probs.topk(min(k, len(classes)), dim=1)
    return [[ClassScore(classes[c], *owners[c], float(p)) for p, c in zip(row_values, row_indices, strict=True)]
            for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True)]


def _predict_batches(method: Method, loader: DataLoader, paths: Sequence[Path], owners: list[tuple[int, str]],
                     k: int, route: Route, accelerator: Any) -> Iterator[ImagePrediction]:
    classes = method.classes
    for batch in loader:
        readable = [(i, image) for i, image, _ in batch if image is not None]
        results: dict[int, ImagePrediction] = {
            i: ImagePrediction(str(paths[i]), [], error) for i, image, error in batch if image is None
        }
        if readable:
            images = torch.stack([image for _, image in readable]).to(method.device)
            with torch.no_grad(), accelerator.autocast():
                probs = method.predict(images, route=route).probs.float().cpu()
            for (i, _), top in zip(readable, top_classes(probs, k, classes, owners), strict=True):
                results[i] = ImagePrediction(str(paths[i]), top)
        for i, _, _ in batch:
            yield results[i]
