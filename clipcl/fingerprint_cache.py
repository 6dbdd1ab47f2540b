"""What hashing a weights file told us, kept per file, so that a second load of the same file hashes nothing.

Every load of a base model checks it twice: the sha256 of a local weights file against the one the workspace
recorded, and the fingerprint of the loaded tensors (:func:`clipcl.backbone.weights_fingerprint`) against the first
task's. For a ViT-B/16 that is 600 MB hashed twice, most of what ``clipcl predict one.jpg`` spends after its
imports. Both are functions of the file's content, so they are kept here, per file, and used again only while the
file is provably the one that was hashed:

* the key is the file's resolved path, and the entry holds its size, modification time, *change* time (``st_ctime``
  moves on every write and on every ``utime``, and no user call can set it back) and inode, as they were before it
  was hashed; an entry whose file no longer matches all four is ignored, and the file hashed again;
* a value is recorded only if the file was the same before and after hashing (nothing wrote to it meanwhile) and
  last changed at least :data:`RACY_SECONDS` before, so that a write within the filesystem's timestamp granularity
  of the hashing cannot hide behind an unchanged change time;
* the tensor fingerprint also depends on how open_clip builds the model from the file, so it is kept per model
  (name, config) and per torch and open_clip version.

The cache is one small JSON file in the user's cache folder (``$CLIPCL_CACHE_DIR``, else
``$XDG_CACHE_HOME/clipcl``, else ``~/.cache/clipcl``; ``CLIPCL_CACHE_DIR=`` empty turns it off), shared by every
workspace on the same weights. Anything wrong with it (missing, damaged, unwritable, a FIFO) means it is ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Any

from .reading import MIB, read_json_bounded

CACHE_ENV = "CLIPCL_CACHE_DIR"
FILE_NAME = "weights-fingerprints.json"
FORMAT = "clipcl-weights-fingerprints/1"
MAX_FILES = 64  # weights files remembered; the least recently used are forgotten first
RACY_SECONDS = 2.0
FILE_SHA256 = "sha256"  # the value name of a file's own sha256


def user_cache_dir() -> Path | None:
    """clipcl's per-user cache folder, or ``None`` when ``$CLIPCL_CACHE_DIR`` is set and empty (no cache)."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return Path(configured).expanduser() if configured.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clipcl"


def file_identity(path: Path | str) -> dict[str, int] | None:
    """What says that a file is still the one that was hashed (see the module docstring); ``None`` for a path that
    is not a regular file."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns, "ino": info.st_ino}


def model_value_name(model_name: str, config: dict[str, Any] | None, versions: dict[str, str]) -> str:
    """The value name of the tensor fingerprint of ``model_name`` (``config``) built from a file by ``versions``."""
    described = json.dumps({"model": model_name, "config": config, "versions": versions}, sort_keys=True)
    return "tensors:" + hashlib.sha256(described.encode()).hexdigest()[:32]


class FingerprintCache:
    """The JSON file of kept values (see the module docstring); ``path`` ``None``: remembers nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    @classmethod
    def default(cls) -> FingerprintCache:
        folder = user_cache_dir()
        return cls(folder / FILE_NAME if folder is not None else None)

    def _read(self) -> dict[str, Any]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = read_json_bounded(self.path, MIB)
        except (OSError, ValueError):
            return {}
        files = data.get("files") if isinstance(data, dict) and data.get("format") == FORMAT else None
        return files if isinstance(files, dict) else {}

    def lookup(self, weights: Path | str, value_name: str) -> str | None:
        """The value kept for ``weights`` if the file is unchanged since it was hashed, else ``None``."""
        key = str(Path(weights).resolve())
        entry = self._read().get(key)
        if not isinstance(entry, dict) or entry.get("identity") != file_identity(key):
            return None
        values = entry.get("values")
        value = values.get(value_name) if isinstance(values, dict) else None
        return value if isinstance(value, str) else None

    def record(self, weights: Path | str, identity: dict[str, int] | None, value_name: str, value: str) -> bool:
        """Keep ``value`` for ``weights``, hashed while the file had ``identity`` (taken before hashing): only if
        the file still has it and last changed long enough ago. ``False`` when not kept (no harm but time)."""
        key = str(Path(weights).resolve())
        if self.path is None or identity is None or file_identity(key) != identity:
            return False
        if time.time_ns() - max(identity["mtime_ns"], identity["ctime_ns"]) < RACY_SECONDS * 1e9:
            return False
        files = self._read()
        entry = files.get(key)
        values = entry.get("values") if isinstance(entry, dict) and entry.get("identity") == identity else None
        values = dict(values) if isinstance(values, dict) else {}
        values[value_name] = value
        files[key] = {"identity": identity, "values": values, "used": time.time()}
        if len(files) > MAX_FILES:
            ranked = sorted(files, key=lambda k: files[k].get("used", 0) if isinstance(files[k], dict) else 0)
            for old in ranked[: len(files) - MAX_FILES]:
                del files[old]
        return self._write({"format": FORMAT, "files": files})

    def _write(self, data: dict[str, Any]) -> bool:
        assert self.path is not None
        tmp = self.path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        return True
