"""Frozen features of held-out images, kept between evaluations so that the frozen work is done once.

What the frozen base model computes for an image (``dma``'s router input, the image embedding that ``ncm``, ``lda``
and ``zeroshot`` classify) depends on no task. Yet the evaluation after every ``add-task``, and every ``clipcl
eval``, runs every earlier task's held-out images through the frozen encoder again: with ``dma`` at ``route=K`` that
is one pass in ``K + 1`` wasted per image and evaluation, and with the baselines every pass. A method declares its
frozen part (:meth:`clipcl.methods.Method.frozen_features_key`, :meth:`~clipcl.methods.Method.frozen_features`);
:func:`clipcl.evaluation.predict_dataset` looks it up here per task, hands it to the method's ``predict`` and stores
what it had to compute, so each later evaluation runs only the passes that depend on what the tasks learned.

Layout: ``<workspace>/cache/features/task-NNN-<setting>-<images>.safetensors``, one file per task's held-out set,
outside the committed state (``tasks/``, ``manifest.json``): deleting ``cache/`` loses nothing but time, and the
workspace's integrity checks and debris removal never look there. A file is used only if everything that made its
features is unchanged, all of it in its name and again in its metadata:

* the *setting*: what the method calls its frozen features, the base weights' fingerprint, the model's name and
  config, the preprocessing (the transform's description), the precision and device type, and the versions of
  torch, open_clip and clipcl;
* the *images*: each held-out file's path, size, modification and change times (``st_ctime`` moves on every write
  and cannot be set back) and inode, in the dataset's order.

It is also refused when its bytes do not match the checksum stored with them, its shape does not fit, or it holds
a value that is not finite. Anything refused is a miss: the features are computed again and the file replaced. A
read-only workspace simply keeps no cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from .reading import MIB, parse_json_bounded, read_bounded
from .storage import TEMP_PREFIX, tensors_to_bytes
from .version import __version__

FORMAT = "clipcl-frozen-features/1"
FEATURES_DIR = Path("cache") / "features"
FEATURES_KEY = "features"
MAX_BYTES_PER_IMAGE = MIB  # a bound on what a stored file may hold (a feature of 262,144 floats per image)
STALE_TEMP_SECONDS = 3600.0  # a temporary file this old was left by a process that died while writing
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass(frozen=True)
class CacheEntry:
    """Where one dataset's frozen features are kept, and what must hold for the kept copy to be used."""

    name: str  # e.g. "task-001"
    setting: str  # sha256 of what computed the features
    images: str  # sha256 of which images, as they are on disk now
    count: int  # images in the dataset

    @property
    def file_name(self) -> str:
        return f"{self.name}-{self.setting[:16]}-{self.images[:16]}.safetensors"


def _library_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def describe_transform(transform: Any) -> str:
    """The transform's description without memory addresses (a lambda's ``repr`` changes from run to run)."""
    return _ADDRESS.sub("", repr(transform))


def setting_digest(method: Any, transform: Any, accelerator: Any) -> str | None:
    """sha256 of everything besides the images that determines ``method``'s frozen features, or ``None`` where the
    method declares none (or its base weights were never fingerprinted)."""
    key = method.frozen_features_key()
    backbone = method.backbone
    if key is None or not backbone.weights_fingerprint:
        return None
    setting = {
        "format": FORMAT,
        "features": key,
        "weights": backbone.weights_fingerprint,
        "model": {"name": backbone.spec.name, "config": backbone.spec.config},
        "transform": describe_transform(transform),
        "precision": str(getattr(accelerator, "mixed_precision", "no")),
        "device": torch.device(accelerator.device).type,
        "versions": {"torch": torch.__version__, "open_clip": _library_version("open_clip_torch"),
                     "clipcl": __version__},
    }
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()


def images_digest(dataset: Any) -> str | None:
    """sha256 of the identity of a dataset's image files as they are now (see the module docstring), or ``None``
    for a dataset that does not name its files (``root`` and ``items`` with a ``relpath``) or names one that is
    gone: such a dataset is not cached."""
    root, items = getattr(dataset, "root", None), getattr(dataset, "items", None)
    if root is None or items is None:
        return None
    root = Path(root)
    digest = hashlib.sha256(f"{root.resolve()}\n".encode())
    for item in items:
        relpath = getattr(item, "relpath", None)
        if not isinstance(relpath, str):
            return None
        try:
            info = os.stat(root / relpath)
        except OSError:
            return None
        digest.update(f"{relpath}\t{info.st_size}\t{info.st_mtime_ns}\t{info.st_ctime_ns}\t{info.st_ino}\n".encode())
    return digest.hexdigest()


def _stored_metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file's bytes (its header: 8 bytes of length, then JSON)."""
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if not 0 < length <= len(data) - 8:
        raise ValueError("not a safetensors file")
    header = parse_json_bounded(data[8 : 8 + length], "a frozen-feature file's header")
    found = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(found, dict):
        raise ValueError("no metadata")
    return found


def _checksum(features: torch.Tensor) -> str:
    return hashlib.sha256(features.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class FrozenFeatureCache:
    """Frozen features of datasets, one file per dataset in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)

    @classmethod
    def for_workspace(cls, workspace_path: Path | str) -> FrozenFeatureCache:
        """The cache of the workspace at ``workspace_path``: ``cache/features/``, beside its committed state."""
        return cls(Path(workspace_path) / FEATURES_DIR)

    def entry(self, method: Any, dataset: Any, accelerator: Any, name: str) -> CacheEntry | None:
        """Where ``method``'s frozen features of ``dataset`` are kept under ``name`` (e.g. ``task-001``), or
        ``None`` when they cannot be kept: the method declares none, or the dataset does not name its files."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a cache name: {name!r}")
        transform = getattr(dataset, "transform", None) or method.backbone.eval_transform
        setting = setting_digest(method, transform, accelerator)
        if setting is None:
            return None
        images = images_digest(dataset)
        if images is None:
            return None
        return CacheEntry(name, setting, images, len(dataset))

    def load(self, entry: CacheEntry) -> torch.Tensor | None:
        """The kept features ``[count, ...]`` (float32, CPU), or ``None`` when there are none that can be trusted:
        missing, made otherwise, damaged, or not a regular file."""
        path = self.folder / entry.file_name
        if not os.path.lexists(path):
            return None
        try:
            data = read_bounded(path, entry.count * MAX_BYTES_PER_IMAGE + MIB)
            stored = _stored_metadata(data)
            if (stored.get("format"), stored.get("setting"), stored.get("images")) != (FORMAT, entry.setting,
                                                                                       entry.images):
                return None
            features = load_safetensors_bytes(data).get(FEATURES_KEY)
        except Exception:  # unreadable or malformed in any way (safetensors, JSON, OS errors): a miss, not an error
            return None
        if (features is None or features.dtype != torch.float32 or features.dim() < 2
                or features.shape[0] != entry.count or _checksum(features) != stored.get("sha256")
                or not bool(torch.isfinite(features).all())):
            return None
        return features

    def store(self, entry: CacheEntry, features: torch.Tensor) -> bool:
        """Keep ``features`` ``[count, ...]`` for ``entry`` (replacing a copy for an earlier state of the same
        dataset); ``False`` when the folder cannot be written, which only costs the next evaluation the pass."""
        features = features.detach().to("cpu", torch.float32).contiguous()
        if features.dim() < 2 or features.shape[0] != entry.count or not bool(torch.isfinite(features).all()):
            return False
        data = tensors_to_bytes({FEATURES_KEY: features}, metadata={
            "format": FORMAT, "setting": entry.setting, "images": entry.images, "sha256": _checksum(features)})
        tmp = self.folder / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, self.folder / entry.file_name)  # readers see the old file or the whole new one
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        self._prune(entry)
        return True

    def _prune(self, entry: CacheEntry) -> None:
        """Remove what can never be used again: this dataset's files under the same setting for other images (a
        held-out file changed), and temporary files of writers that died."""
        stale_before = time.time() - STALE_TEMP_SECONDS
        with contextlib.suppress(OSError):
            for path in self.folder.iterdir():
                same_set = path.name.startswith(f"{entry.name}-{entry.setting[:16]}-")
                dead_temp = path.name.startswith(TEMP_PREFIX) and path.lstat().st_mtime < stale_before
                if (same_set and path.name != entry.file_name) or dead_temp:
                    with contextlib.suppress(OSError):
                        path.unlink()
