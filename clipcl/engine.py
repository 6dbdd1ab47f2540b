"""The training engine: learn one folder as the next task of a workspace.

One loop, driven by Accelerate (CPU, one GPU, several GPUs or machines under ``accelerate launch``), that knows
nothing about any method: the method names its trainable parameters and returns its loss; the engine optimises,
reports progress, evaluates every task learned so far on its held-out images, and commits the task to the
workspace. Nothing is written before the commit, so an exception anywhere leaves the workspace as it was.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import __version__
from .checkpoint import Checkpoint, EpochState, capture_rng, restore_rng
from .data import ImageDataset, ImageItem, TaskData, scan_task_folder
from .errors import ClipclError, DataError, WorkspaceError
from .failpoints import failpoint
from .methods import Method, Route, TaskInfo, get_method_class
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
                 workers: int, seed: int, progress: Progress, label: str = "", start: EpochState | None = None,
                 on_epoch: Callable[[EpochState], None] | None = None) -> dict[str, float]:
    """Optimise ``method.trainable_parameters()`` on ``dataset``; returns step count, wall time and images/s.

    ``label`` prefixes the progress stages (the method's training stage, for methods with several). ``start``
    continues from a checkpointed epoch (optimiser, schedule, data order and random state as they stood), and
    ``on_epoch`` receives that state after every epoch, so a later run can continue from it."""
    method.requires_grad_(False)
    params = method.trainable_parameters()
    for param in params:
        param.requires_grad_(True)
    if not params or epochs == 0:
        return {"steps": 0, "seconds": 0.0, "images_per_s": 0.0, "images": 0}
    loader = _loader(dataset, batch_size, workers, shuffle=True, seed=seed)
    generator = loader.generator
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total_steps = epochs * len(loader)
    scheduler = cosine_with_warmup(optimizer, total_steps)
    first_epoch, seen, previous_seconds = 0, 0, 0.0
    if start is not None:
        optimizer.load_state_dict(start.optimizer)
        scheduler.load_state_dict(start.scheduler)
        generator.set_state(start.generator)
        restore_rng(start.rng)
        if start.scaler is not None and getattr(accelerator, "scaler", None) is not None:
            accelerator.scaler.load_state_dict(start.scaler)
        first_epoch, seen, previous_seconds = start.epochs_done, start.images, start.seconds
    model, optimizer, loader, scheduler = accelerator.prepare(method, optimizer, loader, scheduler)
    steps_per_process = epochs * len(loader)  # the scheduler is stepped once per process per step (Accelerate)
    model.train()  # Method.train keeps the frozen base in eval mode
    started = time.perf_counter()
    try:
        for epoch in range(first_epoch, epochs):
            progress.stage_start(f"{label}epoch {epoch + 1}/{epochs}", len(loader))
            for images, labels in loader:
                loss = model(images, labels)
                if not torch.isfinite(loss):
                    raise ClipclError(f"training diverged (loss {loss.item()}) in epoch {epoch + 1}: try a lower --lr")
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                failpoint("step")
                seen += images.shape[0] * accelerator.num_processes
                elapsed = previous_seconds + time.perf_counter() - started
                progress.stage_advance(1, loss=float(loss.detach()), images_per_s=seen / max(elapsed, 1e-9))
            progress.stage_end()
            if on_epoch is not None:
                scaler = getattr(accelerator, "scaler", None)
                on_epoch(EpochState(epoch + 1, optimizer.state_dict(), scheduler.state_dict(), generator.get_state(),
                                    capture_rng(), previous_seconds + time.perf_counter() - started, seen,
                                    scaler.state_dict() if scaler is not None else None))
            failpoint("epoch")
    finally:
        model.eval()
        accelerator.free_memory()
    seconds = previous_seconds + time.perf_counter() - started
    return {"steps": steps_per_process, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9), "images": seen}


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
    """Predict every image of ``dataset`` with ``method`` (gathered across processes)."""
    loader = accelerator.prepare(_loader(dataset, batch_size, workers))
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
    ``encoder_passes_per_image``: image-encoder passes per evaluated image (1 for single-pass methods).
    """

    per_task: list[float | None]
    images: list[int]
    accuracy: float | None
    task_id_per_task: list[float | None]
    task_id_accuracy: float | None
    encoder_passes_per_image: float | None = None


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


def evaluate_tasks(method: Method, sets: Sequence[tuple[TaskInfo, ImageDataset | None]], accelerator: Any,
                   batch_size: int, workers: int, progress: Progress, route: Route = None) -> Evaluation:
    """Evaluate ``method`` on each task's held-out set (``None``: images gone, warned about and left out)."""
    per_task: list[float | None] = []
    images: list[int] = []
    task_id: list[float | None] = []
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
            continue
        result = predict_dataset(method, dataset, accelerator, batch_size, workers, progress, route)
        labels = result.labels
        correct = int((result.probs.argmax(dim=1) == labels).sum())
        per_task.append(_share(correct, len(labels)))
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
                      passes_total / count_total if count_total else None)


def _check_new_classes(workspace: Workspace, data: TaskData) -> None:
    known = {name.casefold(): name for name in workspace.classes}
    clashes = [name for name in data.classes if name.casefold() in known]
    if clashes:
        owners = {e["name"].casefold(): e["task"] for e in workspace.manifest["classes"]}
        listed = ", ".join(f"{c!r} (task {owners[c.casefold()]})" for c in clashes)
        raise DataError(f"class already learned by an earlier task: {listed}; tasks must have disjoint classes")
    if not workspace.tasks and len(data.classes) < 2:
        raise DataError(f"the first task needs at least two classes, {data.root} has {len(data.classes)}")


RESUMED_OPTIONS = ("epochs", "epochs_stage2", "batch_size", "lr", "seed", "holdout", "precision", "workers")


def _run_identity(workspace: Workspace, task: TaskInfo, name: str, data: TaskData, options: TrainOptions,
                  processes: int) -> dict[str, Any]:
    """What a checkpoint must match to be continued: the same next task of the same workspace, the same folder
    content, the same method, the same settings and the same number of processes."""
    return {"task": task.index, "name": name, "folder": str(data.root), "fingerprint": data.fingerprint,
            "method": workspace.method_name, "options": {key: getattr(options, key) for key in RESUMED_OPTIONS},
            "processes": processes}


def _check_resumable(checkpoint: Checkpoint, identity: dict[str, Any], workspace: Path) -> None:
    run = checkpoint.run
    if run["task"] < identity["task"]:
        Checkpoint.discard(workspace)
        raise WorkspaceError(f"task {run['task']} ({run['name']}) was committed before the interruption: nothing "
                             "to resume")
    if run["task"] != identity["task"] or run["method"] != identity["method"]:
        raise WorkspaceError(f"the interrupted run was task {run['task']} of method {run['method']}; the workspace "
                             f"now expects task {identity['task']}: start over without --resume")
    if run["fingerprint"] != identity["fingerprint"]:
        raise DataError(f"{identity['folder']} changed since the interrupted run (files added, removed or "
                        "modified): start over without --resume")
    if run.get("processes", 1) != identity["processes"]:
        raise ClipclError(f"the interrupted run used {run.get('processes', 1)} process(es), this one "
                          f"{identity['processes']}: resume it the way it was started")


def add_task(workspace_path: Path | str, folder: Path | str | None, options: TrainOptions | None = None,
             progress: Progress | None = None, resume: bool = False) -> TaskReport:
    """Learn ``folder`` (class sub-folders) as the workspace's next task, evaluate, and store it.

    After every epoch a checkpoint is written beside the workspace's committed state; with ``resume`` the run
    continues from the checkpoint of an interrupted one, with its folder (``folder`` may be ``None``) and its
    settings (those of ``options`` are replaced), and reaches the tensors the uninterrupted run would have.
    """
    options = options or TrainOptions()
    progress = progress or Progress()
    workspace = Workspace.open(workspace_path)
    checkpoint = None
    if resume:
        interrupted = Checkpoint.peek(workspace.path)  # its folder and settings; the whole of it is read under the lock
        if interrupted is None:
            raise WorkspaceError(f"nothing to resume in {workspace.path}: no add-task was interrupted after an epoch")
        stored_folder = interrupted["run"]["folder"]
        if folder is not None and Path(folder).expanduser().resolve() != Path(stored_folder):
            raise ClipclError(f"--resume continues the interrupted run on {stored_folder}, not {folder}")
        folder = stored_folder
        options = dataclasses.replace(options, name=interrupted["run"]["name"], **interrupted["run"]["options"])
    elif folder is None:
        raise ClipclError("add-task needs a FOLDER (or --resume to continue an interrupted run)")
    options.check()
    accelerator = make_accelerator(options.precision)
    if not accelerator.is_main_process:
        progress = Progress()  # one report per run, from the main process
    with _writing_on_main(workspace, accelerator, options.lock_wait, progress):
        started = time.perf_counter()
        data = scan_task_folder(folder, options.holdout, options.seed, workers=max(1, options.workers),
                                on_skip=lambda relpath, why: progress.warn(f"skipped unreadable {relpath}: {why}"))
        if data.skipped:
            progress.warn(f"{len(data.skipped)} unreadable file(s) skipped in {data.root}")
        failpoint("scan")
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
        task = TaskInfo(index=workspace.next_task_index(), classes=tuple(data.classes), offset=len(workspace.classes))
        identity = _run_identity(workspace, task, name, data, options, accelerator.num_processes)
        if resume:
            checkpoint = Checkpoint.load(workspace.path)
            _check_resumable(checkpoint, identity, workspace.path)
            progress.info(f"resuming task {task.index} ({name}) after epoch {checkpoint.state.epochs_done} of stage "
                          f"{checkpoint.stage + 1}")
        else:
            interrupted = Checkpoint.pending(workspace.path, task.index, on_damaged=lambda why: progress.warn(
                f"ignoring a damaged checkpoint of an interrupted add-task ({why})"))
            if interrupted is None and accelerator.is_main_process:
                Checkpoint.discard(workspace.path)  # damaged, or its task committed: nothing there to resume
            elif interrupted is not None:
                progress.warn(f"starting over: the checkpoint of the interrupted add-task of "
                              f"{interrupted['run']['folder']} will be replaced (use --resume to continue it instead)")
        from accelerate.utils import set_seed

        set_seed(options.seed)
        method = workspace.build_method(device=accelerator.device)
        method.begin_task(task)
        train_set = ImageDataset(data.root, data.train, method.backbone.train_transform, label_offset=task.offset)
        stats_set = ImageDataset(data.root, data.train, method.backbone.eval_transform, label_offset=task.offset)
        later_epochs = epochs if options.epochs_stage2 is None else options.epochs_stage2
        stage_epochs = [epochs] + [later_epochs] * (len(method.stages) - 1)
        stages: list[dict[str, Any]] = list(checkpoint.finished_stages) if checkpoint is not None else []
        stage_rng: list[dict[str, Any]] = list(checkpoint.stage_rng) if checkpoint is not None else []
        names = {id(param): param_name for param_name, param in method.named_parameters()}
        trained: dict[str, torch.nn.Parameter] = {}
        if checkpoint is not None:
            _load_parameters(method, checkpoint.parameters)
        for number, (stage, n_epochs) in enumerate(zip(method.stages, stage_epochs, strict=True), start=1):
            method.begin_stage(stage)
            label = f"{stage}: " if len(method.stages) > 1 else ""
            trained.update({names[id(p)]: p for p in method.trainable_parameters()})
            start = None
            if checkpoint is not None and number - 1 <= checkpoint.stage:
                _load_parameters(method, checkpoint.parameters)  # after begin_stage, which may set up parameters
                start = checkpoint.state if number - 1 == checkpoint.stage else None

            def save_checkpoint(state: EpochState, stage_index: int = number - 1) -> None:
                if not accelerator.is_main_process:
                    return
                try:
                    Checkpoint(identity, stage_index, state, trained, stages, stage_rng).save(workspace.path)
                except (OSError, TypeError, ValueError) as exc:  # a checkpoint is insurance: never stop training
                    progress.warn(f"could not write the epoch checkpoint ({exc}); training goes on without it")

            if checkpoint is None or number - 1 >= checkpoint.stage:
                run = train_method(method, train_set, accelerator, n_epochs, options.batch_size, lr, options.workers,
                                   options.seed, progress, label, start=start, on_epoch=save_checkpoint)
                stages.append({"stage": stage, "epochs": n_epochs, "steps": run["steps"],
                               "train_s": round(run["seconds"], 3), "images": run["images"]})
                stage_rng.append(capture_rng())  # what end_stage starts from, for a resume in a later stage
            else:
                restore_rng(checkpoint.stage_rng[number - 1])  # end_stage may draw (dmc-ot's calibration samples)
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
                                   "task_id": result.task_id_accuracy,
                                   "encoder_passes_per_image": result.encoder_passes_per_image}
            details["timings"]["eval_s"] = round(time.perf_counter() - eval_started, 3)

        tensors = method.task_tensors(task)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            stored = workspace.commit_task(name, task, details, tensors)
            failpoint("committed")
            Checkpoint.discard(workspace.path)
        else:
            stored = StoredTask(task, name, f"tasks/task-{task.index:03d}", {}, "")
        accelerator.wait_for_everyone()
    return TaskReport(stored, details, accelerator.is_main_process)


def _load_parameters(method: Method, parameters: dict[str, torch.Tensor]) -> None:
    """Put checkpointed parameter values back into ``method`` by name."""
    own = dict(method.named_parameters())
    missing = sorted(set(parameters) - set(own))
    if missing:
        raise WorkspaceError(f"the checkpoint holds parameters this method does not have: {', '.join(missing[:3])}")
    with torch.no_grad():
        for param_name, value in parameters.items():
            own[param_name].copy_(value)


@contextmanager
def _writing_on_main(workspace: Workspace, accelerator: Any, wait: float, progress: Progress) -> Iterator[None]:
    """The workspace's write lock, taken by the main process; every process learns whether it was taken, so no
    rank trains (and then blocks in a collective) when another clipcl holds the workspace."""
    from accelerate.utils import broadcast_object_list

    held = workspace.writing(wait=wait, on_wait=progress.warn) if accelerator.is_main_process else nullcontext()
    outcome: list[Any] = [None]
    try:
        held.__enter__()
    except BaseException as exc:  # tell the other ranks before stopping, or they wait in the broadcast
        outcome = [str(exc) or type(exc).__name__]
        if accelerator.num_processes == 1:
            raise
        broadcast_object_list(outcome)
        raise
    if accelerator.num_processes > 1:  # the main rank's wait counts against the process group's timeout
        outcome = broadcast_object_list(outcome)
        if outcome[0] is not None:
            raise WorkspaceError(outcome[0])
        if not accelerator.is_main_process:  # the main process re-read it under the lock
            workspace.manifest = Workspace.open(workspace.path).manifest
    try:
        yield
    except BaseException as exc:
        if not held.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        held.__exit__(None, None, None)


def _advancing(loader: DataLoader, progress: Progress, stage: str) -> Iterator[Any]:
    """The loader's batches, shown as a progress stage once the method starts reading them (many never do)."""
    progress.stage_start(stage, len(loader))
    try:
        for batch in loader:
            yield batch
            progress.stage_advance(1)
    finally:
        progress.stage_end()

