"""Typed records of what clipcl stores as JSON: a task's ``task.json`` and an interrupted run's identity.

Every reader goes through these classes instead of indexing dicts by string keys, so a renamed or added field is
one change here, and a record written by an earlier clipcl (before a field existed) reads with that field's default.
The records are versioned with the workspace format (:data:`clipcl.workspace.FORMAT_VERSION`): ``from_json`` reads
the versions it knows and :meth:`TaskRecord.to_json` writes the current one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

RECORD_FORMAT_VERSION = 1  # the workspace format these records belong to


@dataclass(frozen=True)
class TaskInfo:
    """A task as a method sees it: its number (from 1), its classes and the global index of its first class."""

    index: int
    classes: tuple[str, ...]
    offset: int

    @property
    def class_slice(self) -> slice:
        return slice(self.offset, self.offset + len(self.classes))


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``data`` that are fields of dataclass ``cls`` (a later clipcl may have written more)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {key: value for key, value in data.items() if key in names}


@dataclass
class TaskSource:
    """Where a task's images came from, and how they were split and bounded."""

    root: str
    split: str  # "folders" (train/ and test/ given) or "holdout"
    holdout: float | None
    fingerprint: str  # sha256 over every readable image's path and content
    max_image_bytes: int | None = None  # the size limit of the scan (None: recorded before the limit existed)


@dataclass
class TaskCounts:
    train: dict[str, int]
    heldout: dict[str, int]
    skipped: int = 0


@dataclass
class TrainingSettings:
    """How a task was trained: the method with its options, and the run's settings."""

    method: str
    method_config: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    seed: int
    precision: str
    workers: int
    optimizer: str = "AdamW"
    schedule: str = "cosine, 5% warm-up"
    steps: int = 0
    processes: int = 1
    device: str = "cpu"


@dataclass
class TaskTimings:
    scan_s: float
    train_s: float
    images_per_s: float
    stages: list[dict[str, Any]] | None = None  # per training stage, for methods that train in several
    eval_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"scan_s": self.scan_s, "train_s": self.train_s, "images_per_s": self.images_per_s}
        if self.stages is not None:
            data["stages"] = self.stages
        if self.eval_s is not None:
            data["eval_s"] = self.eval_s
        return data


@dataclass
class TaskAccuracy:
    """The held-out evaluation after the task: row ``i`` of the accuracy matrix, and what it cost."""

    task: float | None  # the new task's own held-out accuracy
    all: float | None  # over every task's held-out images
    per_task: list[float | None]
    task_id: float | None = None  # share of images routed to their own task (methods that route)
    encoder_passes_per_image: float | None = None
    within_task: list[float | None] | None = None  # per task, answering among its own classes (None: older record)


@dataclass
class TensorFile:
    file: str
    bytes: int
    count: int


@dataclass
class TaskRecord:
    """A committed task's ``task.json``."""

    id: int
    name: str
    classes: list[str]
    source: TaskSource
    counts: TaskCounts
    skipped_files: list[str]
    heldout_files: list[tuple[str, int]]  # (path relative to source.root, class index within the task)
    training: TrainingSettings
    timings: TaskTimings
    method: dict[str, Any] = field(default_factory=dict)  # the method's own facts (Method.task_metadata)
    versions: dict[str, str] = field(default_factory=dict)
    accuracy: TaskAccuracy | None = None  # None: added with --no-eval
    tensors: TensorFile | None = None  # set by the commit

    @property
    def train_images(self) -> int:
        return sum(self.counts.train.values())

    @property
    def heldout_images(self) -> int:
        return sum(self.counts.heldout.values())

    def to_json(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "name": self.name,
            "classes": list(self.classes),
            "source": dataclasses.asdict(self.source),
            "counts": dataclasses.asdict(self.counts),
            "skipped_files": list(self.skipped_files),
            "heldout_files": [[path, label] for path, label in self.heldout_files],
            "training": dataclasses.asdict(self.training),
            "timings": self.timings.to_json(),
            "method": self.method,
            "versions": self.versions,
            "accuracy": None if self.accuracy is None else dataclasses.asdict(self.accuracy),
        }
        if self.tensors is not None:
            data["tensors"] = dataclasses.asdict(self.tensors)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], format_version: int = RECORD_FORMAT_VERSION) -> TaskRecord:
        """Read a ``task.json`` of workspace format ``format_version``; a field missing from an older record takes
        its default. Raises ``ValueError`` for a record that lacks what every version has."""
        if format_version != RECORD_FORMAT_VERSION:
            raise ValueError(f"task records of workspace format {format_version} are not readable here")
        try:
            accuracy = data.get("accuracy")
            tensors = data.get("tensors")
            return cls(
                id=int(data["id"]),
                name=str(data["name"]),
                classes=list(data["classes"]),
                source=TaskSource(**_known(TaskSource, data["source"])),
                counts=TaskCounts(**_known(TaskCounts, data["counts"])),
                skipped_files=list(data.get("skipped_files", [])),
                heldout_files=[(str(path), int(label)) for path, label in data["heldout_files"]],
                training=TrainingSettings(**_known(TrainingSettings, data["training"])),
                timings=TaskTimings(**_known(TaskTimings, data["timings"])),
                method=dict(data.get("method") or {}),
                versions=dict(data.get("versions") or {}),
                accuracy=None if accuracy is None else TaskAccuracy(**_known(TaskAccuracy, accuracy)),
                tensors=None if tensors is None else TensorFile(**_known(TensorFile, tensors)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a task record: {type(exc).__name__} {exc}") from exc


@dataclass
class RemovedTask:
    """A task taken out of a workspace (``clipcl remove-task``), as the manifest's ``removed`` list keeps it.

    Its folder is deleted; what stays is what the history needs: which task it was and when, and its row of the
    accuracy matrix, so ``clipcl eval`` still shows the matrix as it was measured. ``next_task`` is the number the
    next task would have got at the removal: the tasks numbered from it on were learned after it, without it."""

    id: int
    name: str
    classes: list[str]
    created_at: str
    removed_at: str
    next_task: int
    heldout_images: int | None = None  # None: its task.json could not be read at the removal
    accuracy: list[float | None] | None = None  # its stored row A[i][*] (TaskAccuracy.per_task); None: not measured

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RemovedTask:
        """Raises ``ValueError`` for an entry that is not a removed task."""
        try:
            removed = cls(**_known(cls, data))
            removed.id, removed.next_task = int(removed.id), int(removed.next_task)
            removed.classes = [str(name) for name in removed.classes]
            return removed
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a removed task: {exc}") from exc


@dataclass
class RunIdentity:
    """What an interrupted ``add-task`` must match to be continued: the same next task of the same workspace, the
    same folder content, the same method, the same settings and the same number of processes."""

    task: int
    name: str
    folder: str
    fingerprint: str
    method: str
    options: dict[str, Any]  # TrainOptions' resumed settings, by name
    processes: int = 1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunIdentity:
        try:
            return cls(**_known(cls, data))
        except TypeError as exc:
            raise ValueError(f"not a run identity: {exc}") from exc
