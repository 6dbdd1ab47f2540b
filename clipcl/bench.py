"""``clipcl bench``: run methods on a class-incremental split and compare them on the same numbers.

A split is a folder of ``task-1 ... task-N`` task folders, each with ``train/`` and ``test/`` (or ``val/``) class
folders. Every method learns the tasks in order in a fresh workspace, through the code behind ``clipcl init`` and
``clipcl add-task``, so its accuracy matrix is the one ``add-task`` stores and ``clipcl eval`` shows.

``joint`` is the upper bound: ``finetune`` trained once on a task that holds every class (the task folders are
linked side by side, nothing is copied). To be comparable with the incremental rows, its matrix is filled from that
one model: ``A[i][j]`` is its accuracy on task j's test images predicting among the classes of tasks 1..i only.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbone import resolve_model_spec
from .data import ImageItem, class_folders, list_images, stratified_split, task_layout
from .engine import TrainOptions, add_task
from .errors import ClipclError, DataError
from .evaluation import heldout_dataset, predict_dataset
from .inference import stored_matrix
from .methods import build_config, get_method_class
from .metrics import continual_metrics
from .records import TaskRecord
from .runtime import Progress, library_versions, make_accelerator, require_single_process
from .storage import atomic_write_json
from .workspace import Workspace, now_iso

JOINT = "joint"
VALIDATION_FOLDER = "validation-split"
JOINT_METHOD = "finetune"
TASK_FOLDER = re.compile(r"task-(\d+)")


@dataclass
class BenchSettings:
    """Training settings shared by every method of a run; ``epochs=None`` means each method's default."""

    epochs: int | None = None
    epochs_stage2: int | None = None
    batch_size: int = 32
    lr: float | None = None
    seed: int = 0
    workers: int = 0
    precision: str = "fp32"
    max_tasks: int | None = None
    validation: float | None = None  # share of each task's training images kept as its test set (test/ unread)

    def check(self) -> None:
        """Refuse settings that cannot run, before anything is read."""
        TrainOptions(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, workers=self.workers,
                     epochs_stage2=self.epochs_stage2).check()
        if self.validation is not None and not 0 < self.validation < 1:
            raise ClipclError(f"--validation must be a share between 0 and 1 (e.g. 0.2), got {self.validation}")


@dataclass
class MethodResult:
    """One method's outcome: the accuracy matrix, its metrics, and what training cost."""

    method: str
    matrix: list[list[float | None]]
    accuracy_after_task: list[float | None]
    avg: float | None
    last: float | None
    forgetting: float | None
    bwt: float | None
    train_s: float
    train_images_per_s: float | None
    total_s: float
    task_id_accuracy: float | None = None
    encoder_passes_per_image: float | None = None  # in the evaluation after the last task
    eval_s: float | None = None  # wall time of the evaluation after the last task
    # the matrix when each image is answered among its own task's classes only (the task given), and its Last:
    # beside ``matrix``, it separates a task learned poorly from old and new classes badly calibrated
    within_task_matrix: list[list[float | None]] | None = None
    within_task_last: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_matrix(cls, method: str, matrix: list[list[float | None]], sizes: list[int],
                    records: Sequence[TaskRecord], started: float, **more: Any) -> MethodResult:
        """The metrics of ``matrix`` and the training cost recorded in the tasks' ``records``."""
        metrics = continual_metrics(matrix, sizes)
        seconds = sum(r.timings.train_s for r in records)
        images = sum(r.timings.images_per_s * r.timings.train_s for r in records)
        return cls(method, matrix, metrics.accuracy_after_task, metrics.avg, metrics.last, metrics.forgetting,
                   metrics.bwt, seconds, images / seconds if seconds > 0 else None, time.perf_counter() - started,
                   **more)


def split_tasks(split_dir: Path | str, max_tasks: int | None = None, need_test: bool = True) -> list[Path]:
    """``task-1 ... task-N`` of a split folder, in order, each checked to hold a train and (with ``need_test``) a
    test split and classes of its own, before anything trains."""
    root = Path(split_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"split folder not found: {root}")
    numbered: dict[int, Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        match = TASK_FOLDER.fullmatch(folder.name)
        if match is None:
            continue
        number = int(match.group(1))
        if number in numbered:
            raise DataError(f"{numbered[number].name} and {folder.name} in {root} are both task {number}")
        numbered[number] = folder
    if not numbered:
        raise DataError(f"no task-1 ... task-N folders in {root}")
    if min(numbered) != 1:
        raise DataError(f"the tasks in {root} must be numbered from task-1")
    missing = [f"task-{i}" for i in range(1, max(numbered) + 1) if i not in numbered]
    if missing:
        raise DataError(f"{root} lacks {', '.join(missing)}: tasks must be numbered 1..N without gaps")
    tasks = [numbered[i] for i in sorted(numbered)][:max_tasks]
    owner: dict[str, str] = {}
    for folder in tasks:
        layout = task_layout(folder.resolve())
        if need_test and layout.test_dir is None:
            raise DataError(f"{folder} has no train/ and test/ (or val/) split: a benchmark needs fixed test sets")
        for name in layout.classes:
            if name.casefold() in owner:
                raise DataError(f"class {name!r} is in both {owner[name.casefold()]} and {folder.name}: "
                                "the tasks of a split must have disjoint classes")
            owner[name.casefold()] = folder.name
    return tasks


def validation_split(tasks: Sequence[Path], fraction: float, seed: int, target: Path) -> list[Path]:
    """Each task's *training* images split into ``target/task-N/train`` and ``target/task-N/test`` (links to the
    original files): a seeded, stratified ``fraction`` of each class becomes the test set, so that settings are
    chosen without the real test images. Nothing under a task's ``test/`` folder is listed or read."""
    views = []
    for folder in tasks:
        layout = task_layout(folder.resolve())
        items, sources = [], {}
        for label, class_dir in enumerate(layout.class_dirs):
            for path in list_images(class_dir):
                relpath = f"{class_dir.name}/{path.relative_to(class_dir).as_posix()}"
                items.append(ImageItem(relpath, label))
                sources[relpath] = path
        train, test = stratified_split(items, fraction, seed)
        view = target / folder.name
        for split, chosen in (("train", train), ("test", test)):
            for class_dir in layout.class_dirs:
                (view / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for item in chosen:
                link = view / split / item.relpath
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(sources[item.relpath].resolve())
        views.append(view)
    return views


def _options(settings: BenchSettings, method: str, name: str, evaluate: bool = True) -> TrainOptions:
    method_class = get_method_class(method)
    trains = method_class.default_epochs > 0
    two_stages = len(method_class.stages) > 1
    return TrainOptions(name=name, epochs=settings.epochs if trains else None, batch_size=settings.batch_size,
                        lr=settings.lr, seed=settings.seed, precision=settings.precision, workers=settings.workers,
                        evaluate=evaluate, epochs_stage2=settings.epochs_stage2 if two_stages else None)


def parse_method_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``NAME[:KEY=VALUE...]`` (``cma:align_weight=0``) as the method's name and its option overrides, checked, so
    one run can compare a method with its ablations."""
    name, *assignments = spec.split(":")
    options: dict[str, str] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key.strip():
            raise ClipclError(f"--methods {spec!r}: expected NAME:KEY=VALUE, got {assignment!r}")
        options[key.strip()] = value.strip()
    if name == JOINT:
        if options:
            raise ClipclError(f"--methods {spec!r}: joint takes no options")
    else:
        build_config(get_method_class(name), options)
    return name, options


def workspace_name(spec: str) -> str:
    """A folder name for a method spec: options become ``_KEY-VALUE`` so that no shell or OS trips on it."""
    return re.sub(r"[^\w.-]+", "_", spec.replace("=", "-"))


def run_incremental(method: str, tasks: Sequence[Path], workspace_dir: Path, model: str, pretrained: str | None,
                    settings: BenchSettings, progress: Progress) -> MethodResult:
    """Learn ``tasks`` one after another with ``method`` (a spec: a name, optionally with ``:KEY=VALUE`` options)
    in a new workspace, as ``clipcl init`` and ``clipcl add-task`` do."""
    started = time.perf_counter()
    name, options = parse_method_spec(method)
    Workspace.create(workspace_dir, resolve_model_spec(model, pretrained), name, options)
    for i, folder in enumerate(tasks, start=1):
        progress.info(f"{method}: task {i}/{len(tasks)} ({folder.name})")
        add_task(workspace_dir, folder, _options(settings, name, folder.name), progress)
    workspace = Workspace.open(workspace_dir)
    records = [workspace.task_record(t) for t in workspace.tasks]
    matrix, sizes = stored_matrix(records)
    last = records[-1].accuracy
    within = within_task_matrix(records)
    return MethodResult.from_matrix(method, matrix, sizes, records, started,
                                    task_id_accuracy=last.task_id if last else None,
                                    encoder_passes_per_image=last.encoder_passes_per_image if last else None,
                                    eval_s=records[-1].timings.eval_s, within_task_matrix=within,
                                    within_task_last=continual_metrics(within, sizes).last if within else None)


def within_task_matrix(records: Sequence[TaskRecord]) -> list[list[float | None]] | None:
    """The stored task-given accuracy matrix, or ``None`` when a record predates it or was added with --no-eval."""
    rows = [record.accuracy.within_task if record.accuracy is not None else None for record in records]
    if any(row is None for row in rows) or all(value is None for row in rows for value in row):
        return None  # not measured: older records, --no-eval, or a method that routes by task
    return [list(row) for row in rows]


def _link_joint_folder(tasks: Sequence[Path], target: Path) -> list[list[str]]:
    """Link every task's class folders into ``target/train`` and ``target/test``; return each task's classes."""
    classes = []
    for folder in tasks:
        layout = task_layout(folder.resolve())
        assert layout.test_dir is not None
        for split, class_dirs in (("train", layout.class_dirs), ("test", class_folders(layout.test_dir))):
            (target / split).mkdir(parents=True, exist_ok=True)
            for class_dir in class_dirs:
                (target / split / class_dir.name).symlink_to(class_dir.resolve(), target_is_directory=True)
        classes.append(layout.classes)
    return classes


def run_joint(tasks: Sequence[Path], workspace_dir: Path, model: str, pretrained: str | None,
              settings: BenchSettings, progress: Progress) -> MethodResult:
    """Train ``finetune`` once on all classes; fill the matrix by restricting its predictions to seen classes."""
    started = time.perf_counter()
    task_classes = _link_joint_folder(tasks, joint_data_folder(workspace_dir))
    Workspace.create(workspace_dir, resolve_model_spec(model, pretrained), JOINT_METHOD)
    progress.info(f"{JOINT}: one task of {sum(map(len, task_classes))} classes ({JOINT_METHOD} on all of them)")
    report = add_task(workspace_dir, joint_data_folder(workspace_dir),
                      _options(settings, JOINT_METHOD, JOINT, evaluate=False), progress)
    workspace = Workspace.open(workspace_dir)
    accelerator = make_accelerator(settings.precision)
    method = workspace.build_method(device=accelerator.device)
    dataset = heldout_dataset(method, method.tasks[0], report.record)
    if dataset is None:
        raise DataError("the joint task has no test images")
    progress.stage_start("evaluating", -(-len(dataset) // settings.batch_size))
    eval_started = time.perf_counter()
    result = predict_dataset(method, dataset, accelerator, settings.batch_size, settings.workers, progress)
    progress.stage_end()
    matrix, sizes = seen_class_matrix(result.probs, result.labels, method.classes, task_classes)
    return MethodResult.from_matrix(JOINT, matrix, sizes, [report.record], started,
                                    encoder_passes_per_image=float(result.encoder_passes.mean()),
                                    eval_s=time.perf_counter() - eval_started, extra={"trained_as": JOINT_METHOD})


def seen_class_matrix(probs: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                      task_classes: Sequence[Sequence[str]]) -> tuple[list[list[float | None]], list[int]]:
    """The accuracy matrix of one model that knows every class, if after task i it could only answer with the
    classes of tasks 1..i: ``A[i][j]`` = accuracy on task j's images with predictions restricted to those classes.
    Also the number of images of each task."""
    column = {name: i for i, name in enumerate(classes)}
    task_of_label = torch.empty(len(classes), dtype=torch.long)
    for j, names in enumerate(task_classes):
        task_of_label[[column[name] for name in names]] = j
    image_task = task_of_label[labels]
    sizes = [int((image_task == j).sum()) for j in range(len(task_classes))]
    matrix: list[list[float | None]] = []
    for i in range(len(task_classes)):
        seen = torch.tensor([column[name] for names in task_classes[: i + 1] for name in names])
        predicted = seen[probs[:, seen].argmax(dim=1)]
        hits = predicted == labels
        matrix.append([float(hits[image_task == j].float().mean()) if sizes[j] else None for j in range(i + 1)])
    return matrix, sizes


def joint_data_folder(workspace_dir: Path) -> Path:
    """Where ``joint`` links the split's class folders side by side, next to its workspace."""
    return workspace_dir.parent / f"{workspace_dir.name}-data"


def hardware() -> dict[str, Any]:
    """The machine a benchmark ran on, for the record."""
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def check_output_file(path: Path | str) -> Path:
    """Refuse, before any work, a results file that could not be written."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ClipclError(f"--out: {path} is a folder")
    if not path.parent.is_dir():
        raise ClipclError(f"--out: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ClipclError(f"--out: {path} cannot be written")
    return path


def run_benchmark(split_dir: Path | str, methods: Sequence[str], model: str, pretrained: str | None = None,
                  settings: BenchSettings | None = None, progress: Progress | None = None,
                  keep_workspaces: Path | str | None = None, out: Path | str | None = None) -> dict[str, Any]:
    """Run each of ``methods`` (registered names, or ``joint``) on the split; returns the JSON-ready results.

    Everything that can be checked is checked before the first method trains. With ``out``, the results so far are
    written after each method, so a long run that fails late keeps what it measured.
    """
    require_single_process("bench")
    settings = settings or BenchSettings()
    progress = progress or Progress()
    methods = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    if not methods:
        raise ClipclError("--methods names no method")
    for spec in methods:
        parse_method_spec(spec)
    folders = [workspace_name(spec) for spec in methods]
    clashing = sorted({f for f in folders if folders.count(f) > 1})
    if clashing:
        raise ClipclError(f"--methods: two methods would share the workspace folder {clashing[0]}: write them apart")
    settings.check()
    make_accelerator(settings.precision)
    out_path = check_output_file(out) if out is not None else None
    tasks = split_tasks(split_dir, settings.max_tasks, need_test=settings.validation is None)
    resolve_model_spec(model, pretrained)  # a wrong model fails here, not after the first method has trained
    keep = Path(keep_workspaces).expanduser() if keep_workspaces is not None else None
    if keep is not None:
        if keep.exists() and not keep.is_dir():
            raise ClipclError(f"--workspaces: {keep} exists and is not a folder")
        folders = [keep / workspace_name(m) for m in methods]
        taken = [p.name for folder in folders for p in (folder, joint_data_folder(folder)) if p.exists()]
        taken += [VALIDATION_FOLDER] if (keep / VALIDATION_FOLDER).exists() else []
        if taken:
            raise ClipclError(f"{keep} already holds {', '.join(taken)}: choose an empty folder for --workspaces")
        keep.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "split": str(Path(split_dir).expanduser().resolve()),
        "tasks": [t.name for t in tasks],
        "model": model,
        "pretrained": pretrained,
        "settings": dataclasses.asdict(settings),
        "evaluated_on": "test" if settings.validation is None else f"validation ({settings.validation:g} of each "
                        "task's training images; test/ folders unread)",
        "started_at": now_iso(),
        "finished_at": None,
        "hardware": hardware(),
        "versions": library_versions(),
        "methods": [],
    }
    with tempfile.TemporaryDirectory(prefix="clipcl-bench-") as scratch:
        base = keep if keep is not None else Path(scratch)
        if settings.validation is not None:
            tasks = validation_split(tasks, settings.validation, settings.seed, base / VALIDATION_FOLDER)
        for spec in methods:
            if spec == JOINT:
                result = run_joint(tasks, base / JOINT, model, pretrained, settings, progress)
            else:
                result = run_incremental(spec, tasks, base / workspace_name(spec), model, pretrained, settings,
                                         progress)
            results["methods"].append(dataclasses.asdict(result))
            if out_path is not None:
                atomic_write_json(out_path, results)
    results["finished_at"] = now_iso()
    if out_path is not None:
        atomic_write_json(out_path, results)
    return results
