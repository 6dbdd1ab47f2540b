"""The on-disk workspace: clipcl's memory of everything learned.

Layout::

    <workspace>/
      manifest.json            format version, base model, method + options, ordered classes, tasks (+ checksums)
      model/<Name>.json        the model-config JSON, for custom architectures
      tasks/task-001/          one folder per task, never rewritten once committed
        task.json              the task's record (clipcl.records.TaskRecord): classes, counts, split and held-out
                               files, data fingerprint, settings, timings, accuracy
        tensors.safetensors    the method's tensors for this task
      .lock                    held by the process that writes

A task is committed by building its folder under a hidden staging name, renaming it into ``tasks/`` and finally
replacing ``manifest.json`` atomically. Until that last rename the manifest names only the earlier tasks, so a crash
anywhere leaves the previous workspace loadable and unchanged; leftovers are removed by the next writer. The first
commit records the fingerprint of the base weights the adapters were trained on (the caller passes it); every later
load is checked against it.

A task is removed (:func:`remove_task`, methods whose tasks are independent only) the other way round: the manifest
without it, listing it under ``removed`` (:class:`~clipcl.records.RemovedTask`), replaces the old one, and only then
is its folder deleted. Task numbers are never given twice, so after a removal they may skip one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WorkspaceError
from .failpoints import failpoint
from .modelspec import ModelSpec
from .reading import MAX_JSON_BYTES
from .records import RemovedTask, TaskInfo, TaskRecord, TensorFile
from .storage import (
    TEMP_PREFIX,
    atomic_write_json,
    fsync_dir,
    load_tensor_file,
    parse_stored_json,
    read_json,
    read_verified,
    sha256_bytes,
    tensors_to_bytes,
    to_json_bytes,
    write_synced,
)
from .version import __version__

if TYPE_CHECKING:  # reading a workspace (`clipcl tasks`) needs neither torch nor the methods; loading one does
    import torch

    from .methods import Method

FORMAT_NAME = "clipcl-workspace"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TASK_JSON = "task.json"
TENSORS_FILE = "tensors.safetensors"
STAGING_PREFIX = ".staging-"
DEFAULT_WORKSPACE = "clipcl-workspace"
WORKSPACE_ENV = "CLIPCL_WORKSPACE"
MAX_TASK_NAME_LENGTH = 100
TASK_DIR_PATTERN = re.compile(r"task-\d{3,}")
WEIGHTS_KEY = "weights_sha256"
REQUIRED_MANIFEST_KEYS = ("model", "method", "classes", "tasks")
REMOVED_KEY = "removed"  # tasks taken out by remove-task (records.RemovedTask); absent in older manifests: none


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def default_workspace_path() -> Path:
    return Path(os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE)


def validate_task_name(name: str) -> str:
    """Task names are labels, never paths: printable, at most 100 characters, no path separators."""
    name = name.strip()
    if not name:
        raise WorkspaceError("a task name cannot be empty")
    if len(name) > MAX_TASK_NAME_LENGTH:
        raise WorkspaceError(f"a task name is at most {MAX_TASK_NAME_LENGTH} characters")
    if re.search(r"[\x00-\x1f/\\]", name) or name in (".", ".."):
        raise WorkspaceError(f"task name {name!r} may not hold '/', '\\' or control characters")
    return name


@dataclass(frozen=True)
class StoredTask:
    """A committed task as the manifest lists it."""

    info: TaskInfo
    name: str
    dir: str
    files: dict[str, str]  # file name -> sha256
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.info.index,
            "name": self.name,
            "dir": self.dir,
            "classes": list(self.info.classes),
            "files": self.files,
            "created_at": self.created_at,
        }


class Workspace:
    """A workspace folder, opened for reading; :meth:`writing` takes the write lock for changes."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest

    # --- opening and creating -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path | str, spec: ModelSpec, method: str, options: dict[str, str] | None = None,
               check_model: bool = True) -> Workspace:
        """Create the workspace after checking everything that could make its first ``add-task`` fail late: the
        folder, the method and its options, and (``check_model``) that the base model loads, downloading its
        weights once where needed; the weights' fingerprint is recorded, so a later load of other weights is
        refused. Nothing is written before all of that passed."""
        path = Path(path).expanduser()
        if (path / MANIFEST).exists():
            raise WorkspaceError(f"a workspace already exists at {path}")
        if path.exists() and not path.is_dir():
            raise WorkspaceError(f"{path} exists and is not a folder")
        if path.is_dir() and any(not _is_init_leftover(p) for p in path.iterdir()):
            raise WorkspaceError(f"{path} is not empty: choose a new folder for the workspace")
        from .methods import build_config, get_method_class

        method_class = get_method_class(method)
        config = build_config(method_class, options)
        fingerprint = _loaded_weights_fingerprint(spec) if check_model else None
        path.mkdir(parents=True, exist_ok=True)
        if spec.config is not None:
            (path / "model").mkdir(exist_ok=True)
            atomic_write_json(path / "model" / f"{spec.name}.json", spec.config)
        (path / "tasks").mkdir(exist_ok=True)
        (path / ".lock").touch()  # exists from the start, so taking the lock never changes the folder
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "clipcl_version": __version__,
            "created_at": now_iso(),
            "updated_at": now_iso(),
            "model": {**spec.to_json(), **({WEIGHTS_KEY: fingerprint} if fingerprint else {})},
            "method": {"name": method, "config": dataclasses.asdict(config)},
            "classes": [],
            "tasks": [],
        }
        atomic_write_json(path / MANIFEST, manifest)
        return cls(path, manifest)

    @classmethod
    def open(cls, path: Path | str) -> Workspace:
        path = Path(path).expanduser()
        if not os.path.lexists(path / MANIFEST):  # a manifest that is not a regular file is refused by read_json
            raise WorkspaceError(f"no workspace at {path}: create one with `clipcl init -w {path} --model ...`")
        manifest = read_json(path / MANIFEST)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise WorkspaceError(f"{path / MANIFEST} is not a clipcl manifest")
        missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
        if missing:
            raise WorkspaceError(f"{path / MANIFEST} lacks {', '.join(missing)}: it is damaged")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise WorkspaceError(
                f"workspace format version {version} is not supported by this clipcl (reads version {FORMAT_VERSION})"
            )
        return cls(path, manifest)

    # --- reading --------------------------------------------------------------------------------------------------
    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_json(self.manifest["model"])

    @property
    def method_name(self) -> str:
        return self.manifest["method"]["name"]

    @property
    def method_config(self) -> dict[str, Any]:
        return dict(self.manifest["method"]["config"])

    @property
    def classes(self) -> list[str]:
        return [entry["name"] for entry in self.manifest["classes"]]

    @property
    def tasks(self) -> list[StoredTask]:
        tasks, offset = [], 0
        for entry in self.manifest["tasks"]:
            info = TaskInfo(index=entry["id"], classes=tuple(entry["classes"]), offset=offset)
            offset += len(info.classes)
            tasks.append(StoredTask(info, entry["name"], entry["dir"], dict(entry["files"]), entry["created_at"]))
        return tasks

    @property
    def removed_tasks(self) -> list[RemovedTask]:
        """The tasks taken out by ``clipcl remove-task``, in the order they were removed (a manifest written before
        removal existed has none)."""
        entries = self.manifest.get(REMOVED_KEY, [])
        try:
            if not isinstance(entries, list):
                raise ValueError("not a list")
            return [RemovedTask.from_json(entry) for entry in entries]
        except (TypeError, ValueError) as exc:
            raise WorkspaceError(f"{self.path / MANIFEST} has a damaged list of removed tasks: {exc}") from exc

    def find_task(self, key: str | int) -> StoredTask:
        """The task named by ``key``: its number or its name. A key that is one task's number and another's name is
        refused as ambiguous, and a removed task is named as such."""
        text = str(key).strip()
        tasks = self.tasks
        by_number = [t for t in tasks if text.isdigit() and t.info.index == int(text)]
        by_name = [t for t in tasks if t.name == text]
        found = {t.info.index: t for t in (*by_number, *by_name)}
        if len(found) > 1:
            raise WorkspaceError(f"{text!r} is task {by_number[0].info.index}'s number and task "
                                 f"{by_name[0].info.index}'s name: name the task by its other key")
        if found:
            return next(iter(found.values()))
        gone = [r for r in self.removed_tasks if (text.isdigit() and r.id == int(text)) or r.name == text]
        if gone:
            raise WorkspaceError(f"task {gone[-1].id} ({gone[-1].name}) was removed from {self.path} at "
                                 f"{gone[-1].removed_at}")
        known = ", ".join(f"{t.info.index} ({t.name})" for t in tasks) or "none"
        raise WorkspaceError(f"no task {text!r} in {self.path} (tasks: {known})")

    def task_path(self, task: StoredTask) -> Path:
        target = (self.path / task.dir).resolve()
        if self.path.resolve() not in target.parents:
            raise WorkspaceError(f"manifest names a task folder outside the workspace: {task.dir}")
        return target

    def task_record(self, task: StoredTask) -> TaskRecord:
        """The task's ``task.json``, checked against the manifest's checksum."""
        path = self.task_path(task) / TASK_JSON
        data = parse_stored_json(read_verified(path, task.files.get(TASK_JSON), MAX_JSON_BYTES), path)
        try:
            return TaskRecord.from_json(data, self.manifest.get("format_version", FORMAT_VERSION))
        except ValueError as exc:
            raise WorkspaceError(f"{path} is damaged: {exc}") from exc

    def task_tensors(self, task: StoredTask) -> dict[str, torch.Tensor]:
        return load_tensor_file(self.task_path(task) / TENSORS_FILE, task.files.get(TENSORS_FILE))

    def build_method(self, device: str | torch.device = "cpu", overrides: dict[str, str] | None = None) -> Method:
        """Load the base model and the method with every stored task restored; ``overrides`` change the method's
        inference options (``Method.inference_options``) for this load only, never what is stored."""
        from .backbone import load_backbone
        from .methods import build_config, check_inference_overrides, get_method_class

        method_class = get_method_class(self.method_name)
        check_inference_overrides(method_class, overrides)
        config = build_config(method_class, overrides, stored=self.method_config)
        backbone = load_backbone(self.model_spec, self.path / "model", device=device)
        self.check_base_weights(backbone.weights_fingerprint)
        method = method_class(backbone, config)
        for task in self.tasks:
            try:
                method.restore(task.info, self.task_tensors(task))
            except (KeyError, ValueError, RuntimeError) as exc:
                raise WorkspaceError(f"stored tensors of task {task.info.index} do not fit method "
                                     f"{self.method_name}: {exc}") from exc
        return method.eval()  # inference mode (no dropout, no routing noise) until the engine trains it

    def check_base_weights(self, fingerprint: str) -> None:
        """Refuse a base model whose weights differ from those the stored adapters were trained on (the fingerprint
        is recorded by the first task's commit)."""
        recorded = self.manifest["model"].get(WEIGHTS_KEY)
        if recorded is not None and recorded != fingerprint:
            raise WorkspaceError(f"the base model {self.model_spec.describe()} now loads different weights than the "
                                 f"ones this workspace's adapters were trained on (fingerprint {fingerprint[:12]}, "
                                 f"recorded {recorded[:12]}): refusing to load them")

    # --- writing --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, wait: float = 0.0, on_wait: Callable[[str], None] | None = None) -> Iterator[Workspace]:
        """Hold the workspace's write lock; re-read the manifest under it and clear a crashed writer's debris.

        Another writer holding the lock makes this wait up to ``wait`` seconds (telling ``on_wait`` once), then
        fail with a clear error. Readers never take the lock: every committed state is complete on disk."""
        lock_path = self.path / ".lock"
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        deadline = time.monotonic() + wait
        told = False
        try:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        hint = "try again later, or pass --wait SECONDS" if wait <= 0 else f"gave up after {wait:g} s"
                        raise WorkspaceError(
                            f"workspace {self.path} is being written by another clipcl process: {hint}"
                        ) from None
                    if on_wait is not None and not told:
                        on_wait(f"workspace {self.path} is being written by another clipcl process; "
                                f"waiting up to {wait:g} s for it to finish")
                        told = True
                    time.sleep(0.2)
            fresh = Workspace.open(self.path)
            self.manifest = fresh.manifest
            self._remove_debris()
            yield self
        finally:
            handle.close()

    def _remove_debris(self) -> None:
        referenced = {task.dir for task in self.tasks}
        for entry in self.path.iterdir():
            if entry.name.startswith((STAGING_PREFIX, TEMP_PREFIX)):
                _remove(entry)
        tasks_dir = self.path / "tasks"
        if tasks_dir.is_dir():
            for entry in tasks_dir.iterdir():
                if TASK_DIR_PATTERN.fullmatch(entry.name) and f"tasks/{entry.name}" not in referenced:
                    _remove(entry)

    def next_task_index(self) -> int:
        """The next task's number: one past every number given so far, a removed task's included (numbers are never
        given twice, so a number always names the same task in the history, the folders and the caches)."""
        given = [entry["id"] for entry in self.manifest["tasks"]] + [r.id for r in self.removed_tasks]
        return max(given, default=0) + 1

    def commit_task(self, info: TaskInfo, record: TaskRecord, tensors: dict[str, torch.Tensor],
                    weights_fingerprint: str) -> StoredTask:
        """Store a trained task and append it to the manifest (call inside :meth:`writing`). The first commit also
        records ``weights_fingerprint``, the base weights the task's adapters were trained on; ``record`` gets the
        tensor file's facts."""
        self.check_base_weights(weights_fingerprint)
        task_dir = f"tasks/task-{info.index:03d}"
        staging = self.path / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            tensor_bytes = tensors_to_bytes(tensors, metadata={"clipcl_task": str(info.index)})
            record.tensors = TensorFile(TENSORS_FILE, len(tensor_bytes), len(tensors))
            json_bytes = to_json_bytes(record.to_json())
            for file_name, data in ((TENSORS_FILE, tensor_bytes), (TASK_JSON, json_bytes)):
                write_synced(staging / file_name, data)
            fsync_dir(staging)
            failpoint("staged")
            final = self.path / task_dir
            if final.exists():  # a crashed writer's folder that the manifest never referenced
                _remove(final)
            os.rename(staging, final)
            fsync_dir(final.parent)
            failpoint("renamed")
        except BaseException:
            _remove(staging)
            raise
        stored = StoredTask(
            info=info,
            name=record.name,
            dir=task_dir,
            files={TENSORS_FILE: sha256_bytes(tensor_bytes), TASK_JSON: sha256_bytes(json_bytes)},
            created_at=now_iso(),
        )
        manifest = dict(self.manifest)
        if WEIGHTS_KEY not in manifest["model"]:
            manifest["model"] = {**manifest["model"], WEIGHTS_KEY: weights_fingerprint}
        manifest["classes"] = [*manifest["classes"], *({"name": c, "task": info.index} for c in info.classes)]
        manifest["tasks"] = [*manifest["tasks"], stored.to_json()]
        manifest["updated_at"] = now_iso()
        atomic_write_json(self.path / MANIFEST, manifest)
        self.manifest = manifest
        return stored

    def commit_removal(self, task: StoredTask) -> RemovedTask:
        """Take ``task`` and its classes out of the manifest (call inside :meth:`writing`), then delete its folder.

        The new manifest (without the task, with it added to the ``removed`` list) replaces the old one atomically,
        so a crash leaves either state; the folder is deleted only after that, and a crash before it leaves a folder
        that no manifest names, removed by the next writer. The other tasks keep their numbers, names and files.
        Whatever a method pools over tasks must be recomputed at restore from each task's own share (the methods
        that declare :attr:`~clipcl.methods.Method.independent_tasks`), so nothing of another task is rewritten."""
        folder = self.task_path(task)  # refuses a folder outside the workspace before anything changes
        try:  # the row of the accuracy matrix stays in the history; a damaged task.json must not block its removal
            record = self.task_record(task)
            heldout, accuracy = record.heldout_images, record.accuracy
        except WorkspaceError:
            heldout, accuracy = None, None
        removed = RemovedTask(id=task.info.index, name=task.name, classes=list(task.info.classes),
                              created_at=task.created_at, removed_at=now_iso(), next_task=self.next_task_index(),
                              heldout_images=heldout, accuracy=None if accuracy is None else list(accuracy.per_task))
        manifest = dict(self.manifest)
        manifest["tasks"] = [entry for entry in manifest["tasks"] if entry["id"] != task.info.index]
        manifest["classes"] = [entry for entry in manifest["classes"] if entry["task"] != task.info.index]
        manifest[REMOVED_KEY] = [*(r.to_json() for r in self.removed_tasks), removed.to_json()]
        manifest["updated_at"] = removed.removed_at
        failpoint("remove")
        atomic_write_json(self.path / MANIFEST, manifest)
        self.manifest = manifest
        failpoint("removed")
        _remove(self.path / task.dir)  # a link is unlinked, never followed
        fsync_dir(folder.parent)
        return removed


@dataclass(frozen=True)
class Removal:
    """What :func:`remove_task` did: the task it took out, the tasks left, and whether it dropped the checkpoint of
    an interrupted ``add-task`` (which trained with the removed task present, so it cannot be continued)."""

    removed: RemovedTask
    tasks: list[StoredTask]
    discarded_checkpoint: bool


def check_tasks_independent(method_name: str) -> None:
    """Refuse to remove a task of a method whose later tasks were trained on top of earlier ones
    (:attr:`~clipcl.methods.Method.independent_tasks`): none of its stored states is the one without that task."""
    from .errors import ClipclError
    from .methods import available_methods, get_method_class

    if not get_method_class(method_name).independent_tasks:
        able = ", ".join(name for name, cls in available_methods().items() if cls.independent_tasks)
        raise ClipclError(f"method {method_name} cannot remove a task: its later tasks were trained on top of "
                          f"earlier ones, so no stored state is the one without it (methods that can: {able})")


def remove_task(workspace_path: Path | str, task: str | int, wait: float = 0.0,
                on_wait: Callable[[str], None] | None = None) -> Removal:
    """Take a task (its number or name) and its classes out of a workspace, as if it had never been learned.

    Only for methods whose tasks are independent of each other (:func:`check_tasks_independent`): the workspace
    then predicts exactly as one that learned the other tasks alone would, pooled statistics included (they are
    recomputed from the remaining tasks' shares whenever the workspace is loaded). The task's folder, and the
    frozen features of its held-out images kept in ``cache/``, are deleted after the commit
    (:meth:`Workspace.commit_removal`); its row of the accuracy matrix stays in the manifest's history. Later
    tasks keep their numbers, and no number is given again. Waits up to ``wait`` seconds for another writer."""
    from .checkpoint import Checkpoint

    workspace = Workspace.open(workspace_path)
    check_tasks_independent(workspace.method_name)
    with workspace.writing(wait=wait, on_wait=on_wait):
        stored = workspace.find_task(task)
        try:
            pending = Checkpoint.peek(workspace.path) is not None
        except WorkspaceError:
            pending = True  # damaged: add-task would discard it too
        # before the commit, so that a crash after it leaves neither: a checkpoint that would resume a run trained
        # with the task present, nor features of its images (the folder is the next writer's debris). Once more
        # after it, for features an evaluation holding the previous state may have kept in between.
        if pending:
            Checkpoint.discard(workspace.path)
        _forget_cached_features(workspace.path, stored.info.index)
        removed = workspace.commit_removal(stored)
        _forget_cached_features(workspace.path, removed.id)
    return Removal(removed, workspace.tasks, pending)


def _forget_cached_features(path: Path, index: int) -> None:
    """Delete the frozen features of task ``index``'s held-out images that evaluations kept
    (:mod:`clipcl.feature_cache`): they were computed from the removed task's images."""
    from .feature_cache import FEATURES_DIR

    folder = path / FEATURES_DIR
    if folder.is_dir():
        for entry in folder.glob(f"task-{index:03d}-*"):
            _remove(entry)


def _loaded_weights_fingerprint(spec: ModelSpec) -> str:
    """Load ``spec``'s model once (refusing at once weights that would have to be downloaded and cannot be) and
    return the fingerprint of its weights."""
    import tempfile

    from .backbone import load_backbone
    from .hub import check_weights_reachable
    from .storage import to_json_bytes

    check_weights_reachable(spec)
    with tempfile.TemporaryDirectory(prefix="clipcl-init-") as config_dir:
        if spec.config is not None:
            (Path(config_dir) / f"{spec.name}.json").write_bytes(to_json_bytes(spec.config))
        return load_backbone(spec, Path(config_dir)).weights_fingerprint


def _remove(path: Path) -> None:
    """Delete a file or folder left by a crashed writer; fail loudly if it cannot be removed."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as exc:
        raise WorkspaceError(f"cannot remove {path} left by an interrupted write: {exc.strerror}") from exc


def _is_init_leftover(entry: Path) -> bool:
    """What an interrupted ``init`` leaves before writing the manifest: hidden files, an empty tasks/, model/."""
    if entry.name.startswith(".") or entry.name == "model":
        return True
    return entry.name == "tasks" and entry.is_dir() and not any(entry.iterdir())
