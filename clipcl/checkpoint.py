"""The epoch checkpoint that lets an interrupted ``add-task`` continue (``clipcl add-task --resume``).

After every training epoch the engine writes ``<workspace>/.resume/``: ``state-<id>.safetensors`` (the task's trained
parameters, the optimiser's moments, the data order's generator and the random number generators) and
``state.json`` (which task, folder, data fingerprint and settings, how far training got, and the tensors' sha256).
Each epoch's tensors go to a new file and the JSON that names them is replaced atomically afterwards, so a crash
while checkpointing leaves the previous epoch's checkpoint whole; older tensor files are removed after the switch.

Nothing here touches the committed workspace: the checkpoint lives in a hidden folder the manifest never names, and
it is removed once its task is committed. Restoring it on the same device, with the same seed, gives the same tensors
as a run that was never interrupted: every source of randomness is saved as it stood at the end of the epoch.
"""

from __future__ import annotations

import random
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WorkspaceError
from .failpoints import failpoint
from .records import RunIdentity
from .storage import atomic_write_bytes, atomic_write_json, load_tensor_file, read_json, sha256_bytes, tensors_to_bytes

if TYPE_CHECKING:  # torch loads with a run's first checkpoint, not with `clipcl tasks` asking whether one is pending
    import torch

CHECKPOINT_DIR = ".resume"
STATE_JSON = "state.json"
STATE_TENSORS_PREFIX = "state-"
CHECKPOINT_FORMAT = 1


@dataclass
class EpochState:
    """Where one stage's training stands after ``epochs_done`` epochs: what its loop needs to go on exactly."""

    epochs_done: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generator: torch.Tensor
    rng: dict[str, Any]
    seconds: float = 0.0
    images: int = 0
    scaler: dict[str, Any] | None = None  # fp16's gradient scaler, where one is used


def capture_rng() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and every GPU) random states."""
    import numpy as np
    import torch

    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by ``{"tensor": key}`` and moved into ``tensors``: JSON + safetensors."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu()
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and set(obj) == {"tensor"}:
        return tensors[obj["tensor"]]
    if isinstance(obj, dict):
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser state dict read back from JSON: integer parameter ids again, tuples where torch expects them."""
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["param_groups"]]
    return {"state": {int(k): v for k, v in state["state"].items()}, "param_groups": groups}


@dataclass(frozen=True)
class PendingRun:
    """What the checkpoint's JSON says of an interrupted run, without its tensors: who it is and how far it got."""

    run: RunIdentity
    stage: int  # index into the method's stages
    epochs_done: int


@dataclass
class Checkpoint:
    """A run's identity (``run``: task, folder, fingerprint, settings) and its progress: ``stage`` (index into the
    method's stages), that stage's :class:`EpochState`, the trained parameters by name, the finished stages'
    records, and the random state each finished stage ended with (what its ``end_stage`` started from)."""

    run: RunIdentity
    stage: int
    state: EpochState
    parameters: dict[str, torch.Tensor]
    finished_stages: list[dict[str, Any]] = field(default_factory=list)
    stage_rng: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def folder(workspace: Path) -> Path:
        return Path(workspace) / CHECKPOINT_DIR

    def save(self, workspace: Path) -> None:
        folder = self.folder(workspace)
        folder.mkdir(exist_ok=True)
        tensors: dict[str, torch.Tensor] = {f"param.{name}": p.detach().cpu() for name, p in self.parameters.items()}
        progress = _split_tensors({"optimizer": self.state.optimizer, "scheduler": self.state.scheduler,
                                   "generator": self.state.generator, "rng": self.state.rng,
                                   "scaler": self.state.scaler, "stage_rng": self.stage_rng}, "state", tensors)
        data = tensors_to_bytes(tensors)
        tensor_file = f"{STATE_TENSORS_PREFIX}{uuid.uuid4().hex}.safetensors"
        atomic_write_bytes(folder / tensor_file, data)
        failpoint("checkpoint")
        atomic_write_json(folder / STATE_JSON, {
            "format": CHECKPOINT_FORMAT, "run": self.run.to_json(), "stage": self.stage,
            "epochs_done": self.state.epochs_done,
            "seconds": self.state.seconds, "images": self.state.images, "finished_stages": self.finished_stages,
            "progress": progress, "parameters": sorted(self.parameters), "tensors": tensor_file,
            "sha256": sha256_bytes(data)})
        for old in folder.glob(f"{STATE_TENSORS_PREFIX}*"):
            if old.name != tensor_file:
                old.unlink(missing_ok=True)

    @classmethod
    def _read_info(cls, workspace: Path) -> dict[str, Any] | None:
        """The checkpoint's JSON, checked to be of a format this clipcl reads; ``None`` when there is none."""
        path = cls.folder(workspace) / STATE_JSON
        if not path.exists() and not path.is_symlink():
            return None
        info = read_json(path)
        if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
            raise WorkspaceError(f"{path} is not a checkpoint this clipcl can resume (format "
                                 f"{info.get('format') if isinstance(info, dict) else '?'}, reads {CHECKPOINT_FORMAT})")
        return info

    @classmethod
    def peek(cls, workspace: Path) -> PendingRun | None:
        """The interrupted run the checkpoint describes (no tensors read), or ``None`` when there is none."""
        info = cls._read_info(workspace)
        return None if info is None else cls._pending(workspace, info)

    @classmethod
    def _pending(cls, workspace: Path, info: dict[str, Any]) -> PendingRun:
        try:
            return PendingRun(RunIdentity.from_json(info["run"]), int(info["stage"]), int(info["epochs_done"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise WorkspaceError(f"{cls.folder(workspace) / STATE_JSON} is damaged: {exc}") from exc

    @classmethod
    def pending(cls, workspace: Path, next_task: int, on_damaged: Callable[[str], None] | None = None
                ) -> PendingRun | None:
        """The JSON of the checkpoint an interrupted run of ``next_task`` left, or ``None``: none there, one whose task
        was committed before the clean-up (nothing left to resume), or a damaged one (reported to ``on_damaged``).
        Reads only, so readers of the workspace may call it without the lock."""
        try:
            info = cls.peek(workspace)
        except WorkspaceError as exc:
            if on_damaged is not None:
                on_damaged(str(exc))
            return None
        return info if info is not None and info.run.task == next_task else None

    @classmethod
    def load(cls, workspace: Path) -> Checkpoint:
        info = cls._read_info(workspace)
        if info is None:
            raise WorkspaceError(f"nothing to resume in {workspace}: no add-task was interrupted after an epoch")
        pending = cls._pending(workspace, info)
        tensor_file = str(info.get("tensors", ""))
        if not tensor_file.startswith(STATE_TENSORS_PREFIX) or "/" in tensor_file or "\\" in tensor_file:
            raise WorkspaceError(f"{cls.folder(workspace) / STATE_JSON} names no checkpoint tensors file")
        tensors = load_tensor_file(cls.folder(workspace) / tensor_file, info["sha256"])
        progress = _join_tensors(info["progress"], tensors)
        state = EpochState(info["epochs_done"], _optimizer_state(progress["optimizer"]), progress["scheduler"],
                           progress["generator"], progress["rng"], info["seconds"], info["images"],
                           progress["scaler"])
        parameters = {name: tensors[f"param.{name}"] for name in info["parameters"]}
        return cls(pending.run, pending.stage, state, parameters, info["finished_stages"], progress["stage_rng"])

    @classmethod
    def discard(cls, workspace: Path) -> None:
        shutil.rmtree(cls.folder(workspace), ignore_errors=True)
