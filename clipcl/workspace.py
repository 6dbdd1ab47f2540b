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
from typing import Any

import torch

from .backbone import ModelSpec, load_backbone
from .errors import WorkspaceError
from .failpoints import failpoint
from .methods import Method, TaskInfo, build_config, check_inference_overrides, get_method_class
from .reading import MAX_JSON_BYTES
from .records import TaskRecord, TensorFile
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
    def create(cls, path: Path | str, spec: ModelSpec, method: str, options: dict[str, str] | None = None
               ) -> Workspace:
        path = Path(path).expanduser()
        if (path / MANIFEST).exists():
            raise WorkspaceError(f"a workspace already exists at {path}")
        if path.exists() and not path.is_dir():
            raise WorkspaceError(f"{path} exists and is not a folder")
        if path.is_dir() and any(not _is_init_leftover(p) for p in path.iterdir()):
            raise WorkspaceError(f"{path} is not empty: choose a new folder for the workspace")
        method_class = get_method_class(method)
        config = build_config(method_class, options)
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
            "model": spec.to_json(),
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
        return len(self.manifest["tasks"]) + 1

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
