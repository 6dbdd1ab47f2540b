"""The training engine: learn one folder as the next task of a workspace (``clipcl add-task``).

One loop, driven by Accelerate (CPU, one GPU, several GPUs or machines under ``accelerate launch``), that knows
nothing about any method: the method names its trainable parameters and returns its loss, the engine optimises.
:func:`add_task` runs in named parts, each a function below:

1. :func:`resolve_run` - which run this is: a fresh one with the caller's settings, or the interrupted one that
   ``resume`` continues with its own folder and settings (given settings are refused then);
2. :func:`prepare_task` - under the workspace's write lock: scan the folder, check the classes and the name, and
   find the checkpoint to continue (or discard a stale one);
3. :func:`train_task` - build the method, train each of its stages with an epoch checkpoint after every epoch, and
   let the method gather its statistics;
4. :func:`build_record` - the task's :class:`~clipcl.records.TaskRecord`;
5. :func:`evaluate_after_task` - every task's held-out accuracy (:mod:`clipcl.evaluation`), row ``i`` of the
   accuracy matrix;
6. :func:`commit` - store the task (:meth:`clipcl.workspace.Workspace.commit_task`) and drop the checkpoint.

Nothing is written to the committed state before the commit, so an exception anywhere leaves the workspace as it
was.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .checkpoint import Checkpoint, EpochState, capture_rng, restore_rng
from .data import ImageDataset, TaskData, scan_task_folder
from .errors import ClipclError, DataError, WorkspaceError
from .evaluation import evaluate_tasks, heldout_dataset
from .failpoints import failpoint
from .imagecache import SPILL_DIR, CachedTrainImages, build_image_cache
from .methods import Method, TaskInfo, build_config, get_method_class
from .reading import DEFAULT_MAX_IMAGE_BYTES, MIB
from .records import RunIdentity, TaskAccuracy, TaskCounts, TaskRecord, TaskSource, TaskTimings, TrainingSettings
from .runtime import (
    Progress,
    check_loader_options,
    check_max_image_mb,
    default_workers,
    library_versions,
    make_accelerator,
    make_loader,
)
from .workspace import StoredTask, Workspace, validate_task_name

# the settings an interrupted run continues with (recorded in its checkpoint); None in TrainOptions means "not given"
RESUMED_OPTIONS = ("epochs", "epochs_stage2", "batch_size", "lr", "seed", "holdout", "precision", "workers",
                   "max_image_mb")
DEFAULTS: dict[str, Any] = {"batch_size": 32, "seed": 0, "holdout": 0.2, "precision": "fp32",
                            "max_image_mb": DEFAULT_MAX_IMAGE_BYTES / MIB}


@dataclass
class TrainOptions:
    """Settings of one ``add-task`` run. ``None`` means "not given": the method's default for ``epochs`` and
    ``lr``, the library's (:data:`DEFAULTS`, :func:`~clipcl.runtime.default_workers`) for the rest. A resumed run
    takes every one of :data:`RESUMED_OPTIONS` from its checkpoint, so giving one with ``resume`` is refused."""

    name: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    holdout: float | None = None
    precision: str | None = None
    workers: int | None = None
    evaluate: bool = True
    lock_wait: float = 0.0
    epochs_stage2: int | None = None  # methods that train in two stages: epochs of the second (default: epochs)
    max_image_mb: float | None = None  # larger image files are skipped, never read

    def given(self) -> list[str]:
        """The resumed settings (and the name) this run was given."""
        return [key for key in ("name", *RESUMED_OPTIONS) if getattr(self, key) is not None]

    def resolved(self) -> TrainOptions:
        """These options with the library's defaults filled in (``epochs`` and ``lr`` stay the method's to fill)."""
        defaults = {**DEFAULTS, "workers": default_workers()}
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def check(self) -> None:
        """Refuse settings that cannot train, before anything is loaded."""
        options = self.resolved()
        check_loader_options(options.batch_size, options.workers)
        check_max_image_mb(options.max_image_mb)
        if any(e is not None and e < 0 for e in (self.epochs, self.epochs_stage2)):
            raise ClipclError("--epochs cannot be negative")
        if self.lr is not None and not self.lr > 0:
            raise ClipclError("--lr must be positive")
        if not 0.0 <= options.holdout < 1.0:
            raise ClipclError(f"--holdout must be in [0, 1), got {options.holdout}")


@dataclass
class TaskReport:
    """The outcome of an ``add-task`` run: the stored task and its record (what its ``task.json`` holds)."""

    task: StoredTask
    record: TaskRecord
    is_main_process: bool = True


# --- 1. which run ---------------------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    """What :func:`add_task` will do: learn ``folder`` into ``workspace`` with ``options`` (resolved), continuing an
    interrupted run when ``resume``."""

    workspace: Workspace
    folder: Path | str
    options: TrainOptions
    resume: bool


def resolve_run(workspace_path: Path | str, folder: Path | str | None, options: TrainOptions,
                resume: bool) -> RunPlan:
    """Open the workspace and settle the folder and settings. ``resume`` continues the interrupted run with its own
    folder (``folder`` may be ``None``, or must name the same one) and its own settings: giving any of them is
    refused, in the Python API as on the command line."""
    workspace = Workspace.open(workspace_path)
    if resume:
        given = options.given()
        if given:
            flags = ", ".join(f"--{key.replace('_', '-')}" for key in given)
            raise ClipclError(f"--resume continues with the interrupted run's settings: drop {flags}")
        interrupted = Checkpoint.peek(workspace.path)  # its folder and settings; the whole of it is read under the lock
        if interrupted is None:
            raise WorkspaceError(f"nothing to resume in {workspace.path}: no add-task was interrupted after an epoch")
        if folder is not None and Path(folder).expanduser().resolve() != Path(interrupted.run.folder):
            raise ClipclError(f"--resume continues the interrupted run on {interrupted.run.folder}, not {folder}")
        folder = interrupted.run.folder
        options = dataclasses.replace(options, name=interrupted.run.name, **interrupted.run.options)
    elif folder is None:
        raise ClipclError("add-task needs a FOLDER (or --resume to continue an interrupted run)")
    options.check()
    return RunPlan(workspace, folder, options.resolved(), resume)


# --- 2. the task, under the lock ------------------------------------------------------------------------------------
@dataclass
class PreparedTask:
    """The scanned task and everything its training needs to know before the method is built."""

    plan: RunPlan
    data: TaskData
    task: TaskInfo
    name: str
    epochs: int
    lr: float
    stage_epochs: list[int]  # per training stage of the method
    identity: RunIdentity
    checkpoint: Checkpoint | None  # the interrupted run's state, when resuming
    scan_seconds: float

    @property
    def max_image_bytes(self) -> int:
        return check_max_image_mb(self.plan.options.max_image_mb)


def _check_new_classes(workspace: Workspace, data: TaskData) -> None:
    known = {name.casefold(): name for name in workspace.classes}
    clashes = [name for name in data.classes if name.casefold() in known]
    if clashes:
        owners = {e["name"].casefold(): e["task"] for e in workspace.manifest["classes"]}
        listed = ", ".join(f"{c!r} (task {owners[c.casefold()]})" for c in clashes)
        raise DataError(f"class already learned by an earlier task: {listed}; tasks must have disjoint classes")
    if not workspace.tasks and len(data.classes) < 2:
        raise DataError(f"the first task needs at least two classes, {data.root} has {len(data.classes)}")


def _check_resumable(checkpoint: Checkpoint, identity: RunIdentity, workspace: Path) -> None:
    run = checkpoint.run
    if run.task < identity.task:
        Checkpoint.discard(workspace)
        raise WorkspaceError(f"task {run.task} ({run.name}) was committed before the interruption: nothing to resume")
    if run.task != identity.task or run.method != identity.method:
        raise WorkspaceError(f"the interrupted run was task {run.task} of method {run.method}; the workspace now "
                             f"expects task {identity.task}: start over without --resume")
    if run.fingerprint != identity.fingerprint:
        raise DataError(f"{identity.folder} changed since the interrupted run (files added, removed or modified): "
                        "start over without --resume")
    if run.processes != identity.processes:
        raise ClipclError(f"the interrupted run used {run.processes} process(es), this one {identity.processes}: "
                          "resume it the way it was started")


def prepare_task(plan: RunPlan, accelerator: Any, progress: Progress) -> PreparedTask:
    """Scan the folder into the workspace's next task, check it, and find the checkpoint this run continues (with
    ``resume``) or replaces. Call under the write lock."""
    workspace, options = plan.workspace, plan.options
    started = time.perf_counter()
    data = scan_task_folder(plan.folder, options.holdout, options.seed, workers=max(1, options.workers),
                            on_skip=lambda relpath, why: progress.warn(f"skipped {relpath}: {why}"),
                            max_image_bytes=check_max_image_mb(options.max_image_mb))
    if data.skipped:
        progress.warn(f"{len(data.skipped)} file(s) skipped in {data.root}: not images, unreadable, or over the size "
                      f"limit (--max-image-mb {options.max_image_mb:g})")
    failpoint("scan")
    _check_new_classes(workspace, data)
    name = validate_task_name(options.name or data.root.name)
    if any(task.name == name for task in workspace.tasks):
        raise DataError(f"a task named {name!r} exists already: pass --name")
    scan_seconds = time.perf_counter() - started

    method_class = get_method_class(workspace.method_name)
    if options.epochs_stage2 is not None and len(method_class.stages) < 2:
        raise ClipclError(f"method {method_class.name} trains in one stage: drop --epochs-stage2")
    default_epochs, default_lr = method_class.default_training(build_config(method_class,
                                                                            stored=workspace.method_config))
    epochs = default_epochs if options.epochs is None else options.epochs
    later_epochs = epochs if options.epochs_stage2 is None else options.epochs_stage2
    task = TaskInfo(index=workspace.next_task_index(), classes=tuple(data.classes), offset=len(workspace.classes))
    identity = RunIdentity(task.index, name, str(data.root), data.fingerprint, workspace.method_name,
                           {key: getattr(options, key) for key in RESUMED_OPTIONS}, accelerator.num_processes)
    checkpoint = None
    if plan.resume:
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
            progress.warn(f"starting over: the checkpoint of the interrupted add-task of {interrupted.run.folder} "
                          "will be replaced (use --resume to continue it instead)")
    return PreparedTask(plan, data, task, name, epochs, options.lr or default_lr,
                        [epochs] + [later_epochs] * (len(method_class.stages) - 1), identity, checkpoint,
                        scan_seconds)


# --- 3. training ----------------------------------------------------------------------------------------------------
@dataclass
class TrainedTask:
    """The method with the new task learned, and what each of its training stages did."""

    method: Method
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s["train_s"] for s in self.stages)

    @property
    def images_per_s(self) -> float:
        return sum(s["images"] for s in self.stages) / self.seconds if self.seconds > 0 else 0.0


def train_task(prepared: PreparedTask, accelerator: Any, progress: Progress) -> TrainedTask:
    """Build the method with every stored task, learn the new one stage by stage (continuing the checkpoint's run
    where there is one, and writing a checkpoint after every epoch), and let the method gather its statistics."""
    from accelerate.utils import set_seed

    options, task, data = prepared.plan.options, prepared.task, prepared.data
    workspace = prepared.plan.workspace
    set_seed(options.seed)
    method = workspace.build_method(device=accelerator.device)
    method.begin(task)
    limit = prepared.max_image_bytes
    # decode once: every training image is decoded here, once, for both transforms (clipcl.imagecache); a transform
    # that cannot be cached falls back to decoding on access
    cache = build_image_cache(data.root, data.train,
                              method.backbone.train_transform if any(prepared.stage_epochs) else None,
                              method.backbone.eval_transform, task.offset, limit, threads=max(1, options.workers),
                              spill_dir=workspace.path / SPILL_DIR, progress=progress)
    train_set = (cache.train if cache.train is not None
                 else ImageDataset(data.root, data.train, method.backbone.train_transform, task.offset, limit))
    stats_set = (cache.eval if cache.eval is not None
                 else ImageDataset(data.root, data.train, method.backbone.eval_transform, task.offset, limit))
    stats_workers = 0 if cache.eval is not None else options.workers  # cached: nothing left for workers to do
    try:
        return _train_stages(prepared, method, train_set, stats_set, stats_workers, accelerator, progress)
    finally:
        cache.close()


def _train_stages(prepared: PreparedTask, method: Method, train_set: torch.utils.data.Dataset,
                  stats_set: torch.utils.data.Dataset, stats_workers: int, accelerator: Any,
                  progress: Progress) -> TrainedTask:
    """:func:`train_task`'s stages, on its datasets."""
    options, checkpoint, workspace = prepared.plan.options, prepared.checkpoint, prepared.plan.workspace
    stages: list[dict[str, Any]] = list(checkpoint.finished_stages) if checkpoint is not None else []
    stage_rng: list[dict[str, Any]] = list(checkpoint.stage_rng) if checkpoint is not None else []
    names = {id(param): param_name for param_name, param in method.named_parameters()}
    trained: dict[str, torch.nn.Parameter] = {}
    if checkpoint is not None:
        _load_parameters(method, checkpoint.parameters)
    for number, (stage, n_epochs) in enumerate(zip(method.stages, prepared.stage_epochs, strict=True), start=1):
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
                Checkpoint(prepared.identity, stage_index, state, trained, stages, stage_rng).save(workspace.path)
            except (OSError, TypeError, ValueError) as exc:  # a checkpoint is insurance: never stop training
                progress.warn(f"could not write the epoch checkpoint ({exc}); training goes on without it")

        if checkpoint is None or number - 1 >= checkpoint.stage:
            run = train_method(method, train_set, accelerator, n_epochs, options.batch_size, prepared.lr,
                               options.workers, options.seed, progress, label, start=start, on_epoch=save_checkpoint)
            stages.append({"stage": stage, "epochs": n_epochs, "steps": run["steps"],
                           "train_s": round(run["seconds"], 3), "images": run["images"]})
            stage_rng.append(capture_rng())  # what end_stage starts from, for a resume in a later stage
        else:
            restore_rng(checkpoint.stage_rng[number - 1])  # end_stage may draw (dmc-ot's calibration samples)
        if number < len(method.stages):
            method.end_stage(stage, _advancing(make_loader(stats_set, options.batch_size, stats_workers), progress,
                                               f"{label}statistics"))
    method.finish(_advancing(make_loader(stats_set, options.batch_size, stats_workers), progress,
                             "class statistics"))
    return TrainedTask(method, stages)


# --- 4. the record --------------------------------------------------------------------------------------------------
def build_record(prepared: PreparedTask, trained: TrainedTask, accelerator: Any) -> TaskRecord:
    """The new task's ``task.json``, without its evaluation (:func:`evaluate_after_task`) and its tensor file (set
    by the commit)."""
    options, data, workspace = prepared.plan.options, prepared.data, prepared.plan.workspace
    return TaskRecord(
        id=prepared.task.index,
        name=prepared.name,
        classes=list(prepared.task.classes),
        source=TaskSource(str(data.root), data.split, data.holdout, data.fingerprint, prepared.max_image_bytes),
        counts=TaskCounts(data.counts(data.train), data.counts(data.test), len(data.skipped)),
        skipped_files=list(data.skipped),
        heldout_files=[(item.relpath, item.label) for item in data.test],
        training=TrainingSettings(
            method=workspace.method_name, method_config=workspace.method_config, epochs=prepared.epochs,
            batch_size=options.batch_size, lr=prepared.lr, seed=options.seed, precision=options.precision,
            workers=options.workers, steps=sum(s["steps"] for s in trained.stages),
            processes=accelerator.num_processes, device=str(accelerator.device)),
        timings=TaskTimings(round(prepared.scan_seconds, 3), round(trained.seconds, 3),
                            round(trained.images_per_s, 2), trained.stages if len(trained.stages) > 1 else None),
        method=trained.method.task_metadata(prepared.task),
        versions=library_versions(),
    )


# --- 5. evaluation --------------------------------------------------------------------------------------------------
def evaluate_after_task(prepared: PreparedTask, method: Method, record: TaskRecord, accelerator: Any,
                        progress: Progress) -> None:
    """Every task's held-out accuracy with the new task learned (the method's default route): fills
    ``record.accuracy`` (row ``i`` of the accuracy matrix) and the evaluation's wall time. The earlier tasks' frozen
    features come from the workspace's cache, where the evaluations after their own tasks kept them, and the new
    task's are kept there for the next (:mod:`clipcl.feature_cache`; never part of the committed state)."""
    from .feature_cache import FrozenFeatureCache

    options, data, task = prepared.plan.options, prepared.data, prepared.task
    workspace = prepared.plan.workspace
    started = time.perf_counter()
    sets = [(stored.info, heldout_dataset(method, stored.info, workspace.task_record(stored)))
            for stored in workspace.tasks]
    sets.append((task, ImageDataset(data.root, data.test, method.backbone.eval_transform, task.offset,
                                    prepared.max_image_bytes) if data.test else None))
    result = evaluate_tasks(method, sets, accelerator, options.batch_size, options.workers, progress,
                            cache=FrozenFeatureCache.for_workspace(workspace.path))
    record.accuracy = TaskAccuracy(result.per_task[-1], result.accuracy, result.per_task, result.task_id_accuracy,
                                   result.encoder_passes_per_image, result.within_task_per_task)
    record.timings.eval_s = round(time.perf_counter() - started, 3)


# --- 6. commit ------------------------------------------------------------------------------------------------------
def commit(prepared: PreparedTask, method: Method, record: TaskRecord, accelerator: Any) -> StoredTask:
    """Store the task from the main process (the others wait) and drop the checkpoint it no longer needs."""
    tensors = method.task_tensors()
    accelerator.wait_for_everyone()
    workspace = prepared.plan.workspace
    if accelerator.is_main_process:
        stored = workspace.commit_task(prepared.task, record, tensors, method.backbone.weights_fingerprint)
        failpoint("committed")
        Checkpoint.discard(workspace.path)
    else:
        stored = StoredTask(prepared.task, prepared.name, f"tasks/task-{prepared.task.index:03d}", {}, "")
    accelerator.wait_for_everyone()
    return stored


def add_task(workspace_path: Path | str, folder: Path | str | None, options: TrainOptions | None = None,
             progress: Progress | None = None, resume: bool = False) -> TaskReport:
    """Learn ``folder`` (class sub-folders) as the workspace's next task, evaluate, and store it.

    After every epoch a checkpoint is written beside the workspace's committed state; with ``resume`` the run
    continues from the checkpoint of an interrupted one, with its folder (``folder`` may be ``None``) and its
    settings (``options`` may then give none of them), and reaches the tensors the uninterrupted run would have.
    """
    progress = progress or Progress()
    plan = resolve_run(workspace_path, folder, options or TrainOptions(), resume)
    accelerator = make_accelerator(plan.options.precision)
    if not accelerator.is_main_process:
        progress = Progress()  # one report per run, from the main process
    with _writing_on_main(plan.workspace, accelerator, plan.options.lock_wait, progress):
        prepared = prepare_task(plan, accelerator, progress)
        trained = train_task(prepared, accelerator, progress)
        record = build_record(prepared, trained, accelerator)
        if plan.options.evaluate:
            evaluate_after_task(prepared, trained.method, record, accelerator, progress)
        stored = commit(prepared, trained.method, record, accelerator)
    return TaskReport(stored, record, accelerator.is_main_process)


# --- the training loop ------------------------------------------------------------------------------------------------
def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warmup = max(1, total_steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_method(method: Method, dataset: torch.utils.data.Dataset, accelerator: Any, epochs: int, batch_size: int,
                 lr: float, workers: int, seed: int, progress: Progress, label: str = "",
                 start: EpochState | None = None, on_epoch: Callable[[EpochState], None] | None = None
                 ) -> dict[str, float]:
    """Optimise ``method.trainable_parameters()`` on ``dataset``; returns step count, wall time and images/s.

    ``label`` prefixes the progress stages (the method's training stage, for methods with several). ``start``
    continues from a checkpointed epoch (optimiser, schedule, data order and random state as they stood), and
    ``on_epoch`` receives that state after every epoch, so a later run can continue from it.

    ``dataset`` is a :class:`~clipcl.imagecache.CachedTrainImages` (decoded once; its loader batches indices in this
    process, and each epoch's augmentation, seeded by a draw from the data-order generator that the checkpoint saves,
    makes the images on the device) or any dataset of ``(image tensor, label)`` items, decoded by ``workers``."""
    method.requires_grad_(False)
    params = method.trainable_parameters()
    for param in params:
        param.requires_grad_(True)
    if not params or epochs == 0:
        return {"steps": 0, "seconds": 0.0, "images_per_s": 0.0, "images": 0}
    cached = isinstance(dataset, CachedTrainImages)
    loader = make_loader(dataset, batch_size, 0 if cached else workers, shuffle=True, seed=seed)
    generator = loader.generator
    optimizer = torch.optim.AdamW(params, lr=lr * method.learning_rate_scale(), weight_decay=0.0)
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
            augment = (dataset.epoch_augmenter(generator, accelerator.process_index, accelerator.device)
                       if cached else None)
            for images, labels in loader:
                if augment is not None:
                    images = augment(images)  # the batch's indices -> its augmented images
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

