"""The training engine: learn one folder as the next task of a workspace.

One loop, driven by Accelerate (CPU, one GPU, several GPUs or machines under ``accelerate launch``), that knows
nothing about any method: the method names its trainable parameters and returns its loss; the engine optimises,
reports progress, evaluates every task learned so far on its held-out images, and commits the task to the
workspace. Nothing is written before the commit, so an exception anywhere leaves the workspace as it was.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import __version__
from .data import ImageDataset, ImageItem, TaskData, scan_task_folder
from .errors import ClipclError, DataError
from .methods import Method, TaskInfo, get_method_class
from .workspace import StoredTask, Workspace, validate_task_name

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


@dataclass
class TrainOptions:
    """Settings of one ``add-task`` run; ``None`` means the method's default."""

    name: str | None = None
    epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None
    seed: int = 0
    holdout: float = 0.2
    precision: str = "fp32"
    workers: int = field(default_factory=default_workers)
    evaluate: bool = True
    lock_wait: float = 0.0
    epochs_stage2: int | None = None  # methods that train in two stages: epochs of the second (default: epochs)

    def check(self) -> None:
        """Refuse settings that cannot train, before anything is loaded."""
        check_loader_options(self.batch_size, self.workers)
        if any(e is not None and e < 0 for e in (self.epochs, self.epochs_stage2)):
            raise ClipclError("--epochs cannot be negative")
        if self.lr is not None and not self.lr > 0:
            raise ClipclError("--lr must be positive")


class Progress:
    """What the engine tells its caller while it works; the CLI draws it with rich, the library stays silent."""

    def warn(self, message: str) -> None:
        """Something the user should know that does not stop the run (a skipped file, a missing test folder)."""

    def info(self, message: str) -> None:
        """Where a longer run stands (which method, which task)."""

    def stage_start(self, description: str, total: int) -> None:
        """A stage of ``total`` steps begins (scanning, an epoch loop, evaluation)."""

    def stage_advance(self, steps: int = 1, **metrics: float) -> None:
        """``steps`` more steps are done; ``metrics`` are running figures such as ``loss`` or ``images_per_s``."""

    def stage_end(self) -> None:
        """The current stage is finished."""


@dataclass
class TaskReport:
    """The outcome of an ``add-task`` run, as stored in the task's ``task.json``."""

    task: StoredTask
    details: dict[str, Any]
    is_main_process: bool = True

    @property
    def accuracy(self) -> dict[str, Any]:
        return self.details.get("accuracy") or {}


def make_accelerator(precision: str) -> Any:
    from accelerate import Accelerator

    if precision not in PRECISIONS:
        raise ClipclError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ClipclError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    try:
        return Accelerator(mixed_precision=PRECISIONS[precision])
    except ValueError as exc:
        raise ClipclError(f"cannot use --precision {precision}: {exc}") from exc


def check_loader_options(batch_size: int, workers: int) -> None:
    if batch_size < 1 or workers < 0:
        raise ClipclError("--batch-size must be at least 1 and --workers at least 0")


def require_single_process(command: str) -> None:
    """Refuse a command that does not split its work across processes when started under torchrun or Accelerate."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ClipclError(f"{command} runs in one process: start it without torchrun or accelerate launch")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"clipcl": __version__, "python": platform.python_version()}
    for package in ("torch", "open_clip_torch", "peft", "accelerate", "safetensors"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def _loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, shuffle: bool = False,
            seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warmup = max(1, total_steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_method(method: Method, dataset: ImageDataset, accelerator: Any, epochs: int, batch_size: int, lr: float,
                 workers: int, seed: int, progress: Progress, label: str = "") -> dict[str, float]:
    """Optimise ``method.trainable_parameters()`` on ``dataset``; returns step count, wall time and images/s.

    ``label`` prefixes the progress stages (the method's training stage, for methods with several)."""
    method.requires_grad_(False)
    params = method.trainable_parameters()
    for param in params:
        param.requires_grad_(True)
    if not params or epochs == 0:
        return {"steps": 0, "seconds": 0.0, "images_per_s": 0.0, "images": 0}
    loader = _loader(dataset, batch_size, workers, shuffle=True, seed=seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total_steps = epochs * len(loader)
    scheduler = cosine_with_warmup(optimizer, total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(method, optimizer, loader, scheduler)
    steps_per_process = epochs * len(loader)  # the scheduler is stepped once per process per step (Accelerate)
    model.train()  # Method.train keeps the frozen base in eval mode
    seen, started = 0, time.perf_counter()
    try:
        for epoch in range(epochs):
            progress.stage_start(f"{label}epoch {epoch + 1}/{epochs}", len(loader))
            for images, labels in loader:
                loss = model(images, labels)
                if not torch.isfinite(loss):
                    raise ClipclError(f"training diverged (loss {loss.item()}) in epoch {epoch + 1}: try a lower --lr")
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                seen += images.shape[0] * accelerator.num_processes
                elapsed = time.perf_counter() - started
                progress.stage_advance(1, loss=float(loss.detach()), images_per_s=seen / max(elapsed, 1e-9))
            progress.stage_end()
    finally:
        model.eval()
        accelerator.free_memory()
    seconds = time.perf_counter() - started
    return {"steps": steps_per_process, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9), "images": seen}


@torch.no_grad()
def predict_dataset(method: Method, dataset: torch.utils.data.Dataset, accelerator: Any, batch_size: int,
                    workers: int, progress: Progress | None = None, route: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Probabilities over all classes, labels, and the router's task scores (``None`` for methods that do not
    route) for every image of ``dataset``, gathered across processes."""
    loader = accelerator.prepare(_loader(dataset, batch_size, workers))
    probs, labels, task_scores = [], [], []
    for images, batch_labels in loader:
        with accelerator.autocast():
            prediction = method.predict(images.to(method.device), route=route)
        gathered = accelerator.gather_for_metrics(
            (prediction.probs.float(), batch_labels,
             *(() if prediction.task_scores is None else (prediction.task_scores.float(),))))
        probs.append(gathered[0].cpu())
        labels.append(gathered[1].cpu())
        if len(gathered) == 3:
            task_scores.append(gathered[2].cpu())
        if progress is not None:
            progress.stage_advance(1)
    if not probs:
        return torch.empty(0, len(method.classes)), torch.empty(0, dtype=torch.long), None
    return torch.cat(probs), torch.cat(labels), torch.cat(task_scores) if task_scores else None


def heldout_dataset(method: Method, task: TaskInfo, details: dict[str, Any]) -> ImageDataset | None:
    """The held-out images a task recorded that still exist, or ``None`` when none is left."""
    root = Path(details["source"]["root"])
    items = [ImageItem(relpath, label) for relpath, label in details["heldout_files"] if (root / relpath).is_file()]
    if not items:
        return None
    return ImageDataset(root, items, method.backbone.eval_transform, label_offset=task.offset)


@dataclass
class Evaluation:
    """Held-out accuracy of each evaluated task and of their union, predicting over every class learned so far.

    ``task_id_*`` is the share of images whose best-scored task is their own, for methods that route by task
    (``None`` otherwise). A task whose held-out images are gone has ``None`` and 0 images.
    """

    per_task: list[float | None]
    images: list[int]
    accuracy: float | None
    task_id_per_task: list[float | None]
    task_id_accuracy: float | None


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


def evaluate_tasks(method: Method, sets: Sequence[tuple[TaskInfo, ImageDataset | None]], accelerator: Any,
                   batch_size: int, workers: int, progress: Progress, route: int | None = None) -> Evaluation:
    """Evaluate ``method`` on each task's held-out set (``None``: images gone, warned about and left out)."""
    per_task: list[float | None] = []
    images: list[int] = []
    task_id: list[float | None] = []
    correct_total = count_total = routed_total = 0
    total_batches = sum(math.ceil(len(ds) / batch_size) for _, ds in sets if ds is not None)
    progress.stage_start("evaluating", total_batches)
    for task, dataset in sets:
        if dataset is None:
            progress.warn(f"task {task.index}: no held-out images found (none kept, or moved since); "
                          "its accuracy is not measured")
            per_task.append(None)
            images.append(0)
            task_id.append(None)
            continue
        probs, labels, task_scores = predict_dataset(method, dataset, accelerator, batch_size, workers, progress,
                                                     route)
        correct = int((probs.argmax(dim=1) == labels).sum())
        per_task.append(_share(correct, len(labels)))
        images.append(len(labels))
        correct_total += correct
        count_total += len(labels)
        if task_scores is None:
            task_id.append(None)
        else:
            routed = int((task_scores.argmax(dim=1) == task.index - 1).sum())
            task_id.append(_share(routed, len(labels)))
            routed_total += routed
    progress.stage_end()
    routes = any(value is not None for value in task_id)
    return Evaluation(per_task, images, _share(correct_total, count_total), task_id,
                      _share(routed_total, count_total) if routes else None)


def _check_new_classes(workspace: Workspace, data: TaskData) -> None:
    known = {name.casefold(): name for name in workspace.classes}
    clashes = [name for name in data.classes if name.casefold() in known]
    if clashes:
        owners = {e["name"].casefold(): e["task"] for e in workspace.manifest["classes"]}
        listed = ", ".join(f"{c!r} (task {owners[c.casefold()]})" for c in clashes)
        raise DataError(f"class already learned by an earlier task: {listed}; tasks must have disjoint classes")
    if not workspace.tasks and len(data.classes) < 2:
        raise DataError(f"the first task needs at least two classes, {data.root} has {len(data.classes)}")


def add_task(workspace_path: Path | str, folder: Path | str, options: TrainOptions | None = None,
             progress: Progress | None = None) -> TaskReport:
    """Learn ``folder`` (class sub-folders) as the workspace's next task, evaluate, and store it."""
    options = options or TrainOptions()
    progress = progress or Progress()
    options.check()
    workspace = Workspace.open(workspace_path)
    accelerator = make_accelerator(options.precision)
    if not accelerator.is_main_process:
        progress = Progress()  # one report per run, from the main process
    writing = workspace.writing(wait=options.lock_wait) if accelerator.is_main_process else nullcontext(workspace)
    with writing:
        started = time.perf_counter()
        data = scan_task_folder(folder, options.holdout, options.seed, workers=max(1, options.workers),
                                on_skip=lambda relpath, why: progress.warn(f"skipped unreadable {relpath}: {why}"))
        if data.skipped:
            progress.warn(f"{len(data.skipped)} unreadable file(s) skipped in {data.root}")
        _check_new_classes(workspace, data)
        name = validate_task_name(options.name or data.root.name)
        if any(task.name == name for task in workspace.tasks):
            raise DataError(f"a task named {name!r} exists already: pass --name")
        scan_seconds = time.perf_counter() - started

        method_class = get_method_class(workspace.method_name)
        if options.epochs_stage2 is not None and len(method_class.stages) < 2:
            raise ClipclError(f"method {method_class.name} trains in one stage: drop --epochs-stage2")
        epochs = method_class.default_epochs if options.epochs is None else options.epochs
        lr = options.lr or method_class.default_lr
        from accelerate.utils import set_seed

        set_seed(options.seed)
        method = workspace.build_method(device=accelerator.device)
        task = TaskInfo(index=workspace.next_task_index(), classes=tuple(data.classes), offset=len(workspace.classes))
        method.begin_task(task)
        train_set = ImageDataset(data.root, data.train, method.backbone.train_transform, label_offset=task.offset)
        stats_set = ImageDataset(data.root, data.train, method.backbone.eval_transform, label_offset=task.offset)
        later_epochs = epochs if options.epochs_stage2 is None else options.epochs_stage2
        stage_epochs = [epochs] + [later_epochs] * (len(method.stages) - 1)
        stages = []
        for number, (stage, n_epochs) in enumerate(zip(method.stages, stage_epochs, strict=True), start=1):
            method.begin_stage(stage)
            label = f"{stage}: " if len(method.stages) > 1 else ""
            run = train_method(method, train_set, accelerator, n_epochs, options.batch_size, lr, options.workers,
                               options.seed, progress, label)
            stages.append({"stage": stage, "epochs": n_epochs, "steps": run["steps"],
                           "train_s": round(run["seconds"], 3), "images": run["images"]})
            if number < len(method.stages):
                method.end_stage(stage, _advancing(_loader(stats_set, options.batch_size, options.workers), progress,
                                                   f"{label}statistics"))
        method.end_task(task, _advancing(_loader(stats_set, options.batch_size, options.workers), progress,
                                         "class statistics"))
        train_seconds = sum(s["train_s"] for s in stages)
        training = {"steps": sum(s["steps"] for s in stages), "seconds": train_seconds,
                    "images_per_s": sum(s["images"] for s in stages) / train_seconds if train_seconds > 0 else 0.0}

        details: dict[str, Any] = {
            "id": task.index,
            "name": name,
            "classes": list(task.classes),
            "source": {"root": str(data.root), "split": data.split, "holdout": data.holdout,
                       "fingerprint": data.fingerprint},
            "counts": {"train": data.counts(data.train), "heldout": data.counts(data.test),
                       "skipped": len(data.skipped)},
            "skipped_files": data.skipped,
            "heldout_files": [[item.relpath, item.label] for item in data.test],
            "training": {"method": workspace.method_name, "method_config": workspace.method_config,
                         "epochs": epochs, "batch_size": options.batch_size, "lr": lr, "seed": options.seed,
                         "precision": options.precision, "workers": options.workers, "optimizer": "AdamW",
                         "schedule": "cosine, 5% warm-up", "steps": training["steps"],
                         "processes": accelerator.num_processes, "device": str(accelerator.device)},
            "timings": {"scan_s": round(scan_seconds, 3), "train_s": round(training["seconds"], 3),
                        "images_per_s": round(training["images_per_s"], 2),
                        **({"stages": stages} if len(stages) > 1 else {})},
            "method": method.task_metadata(task),
            "versions": library_versions(),
            "accuracy": None,
        }
        if options.evaluate:
            eval_started = time.perf_counter()
            sets = [(stored.info, heldout_dataset(method, stored.info, workspace.task_json(stored)))
                    for stored in workspace.tasks]
            sets.append((task, ImageDataset(data.root, data.test, method.backbone.eval_transform, task.offset)
                         if data.test else None))
            result = evaluate_tasks(method, sets, accelerator, options.batch_size, options.workers, progress)
            details["accuracy"] = {"task": result.per_task[-1], "all": result.accuracy, "per_task": result.per_task,
                                   "task_id": result.task_id_accuracy}
            details["timings"]["eval_s"] = round(time.perf_counter() - eval_started, 3)

        tensors = method.task_tensors(task)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            stored = workspace.commit_task(name, task, details, tensors)
        else:
            stored = StoredTask(task, name, f"tasks/task-{task.index:03d}", {}, "")
        accelerator.wait_for_everyone()
    return TaskReport(stored, details, accelerator.is_main_process)


def _advancing(loader: DataLoader, progress: Progress, stage: str) -> Iterator[Any]:
    """The loader's batches, shown as a progress stage once the method starts reading them (many never do)."""
    progress.stage_start(stage, len(loader))
    try:
        for batch in loader:
            yield batch
            progress.stage_advance(1)
    finally:
        progress.stage_end()

