"""Crash-safe file writes and checksummed tensor files.

Every file clipcl stores goes through :func:`atomic_write_bytes`: the bytes are written to a hidden sibling, flushed
to disk, and renamed over the target, so a reader (or a crash) only ever sees the old file or the new one, never a
half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WorkspaceError
from .failpoints import failpoint
from .reading import MAX_JSON_BYTES, InputError, parse_json_bounded, read_bounded

if TYPE_CHECKING:  # torch and safetensors load with the first tensor read or written, not with `clipcl tasks`
    import torch

TEMP_PREFIX = ".tmp-"
MAX_TENSOR_FILE_BYTES = 64 << 30  # far above any task's adapters and statistics; a bound on a replaced file


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename inside it survives a power loss."""
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` and flush it to the disk before returning."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``."""
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        write_synced(tmp, data)
        failpoint("replace")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def to_json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, to_json_bytes(obj))


def read_json(path: Path) -> Any:
    """Read one of clipcl's JSON files (at most :data:`~clipcl.reading.MAX_JSON_BYTES`, a regular file, not nested
    past the parser's limit), naming the file in the error when it is missing, too large or not valid JSON."""
    return parse_stored_json(_read_stored(path, MAX_JSON_BYTES), path)


def parse_stored_json(data: bytes, path: Path) -> Any:
    """The JSON value of a stored file's bytes; damage is a :class:`WorkspaceError` naming the file."""
    try:
        return parse_json_bounded(data, str(path))
    except ValueError as exc:
        raise WorkspaceError(str(exc)) from exc


def _read_stored(path: Path, limit: int) -> bytes:
    try:
        return read_bounded(path, limit)
    except FileNotFoundError as exc:
        raise WorkspaceError(f"missing file {path}") from exc
    except InputError as exc:
        if exc.errno == errno.ENOENT:
            raise WorkspaceError(f"missing file {path}") from exc
        raise WorkspaceError(f"cannot read {path}: {exc.strerror}; it is not a file clipcl wrote") from exc


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors as safetensors bytes (contiguous CPU copies, so views and GPU tensors are fine)."""
    from safetensors.torch import save

    prepared = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return save(prepared, metadata=metadata)


def read_verified(path: Path, expected_sha256: str | None, limit: int = MAX_TENSOR_FILE_BYTES) -> bytes:
    """The bytes of a stored file whose sha256 the manifest recorded; any other content, a file over ``limit`` bytes
    or a path that is not a regular file is refused."""
    data = _read_stored(path, limit)
    if expected_sha256 is None or sha256_bytes(data) != expected_sha256:
        raise WorkspaceError(f"checksum mismatch in {path}: the file was modified or is damaged")
    return data


def load_tensor_file(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """Load a stored safetensors file after checking it against its recorded checksum."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_verified(path, expected_sha256)
    try:
        return load(data)
    except (SafetensorError, ValueError) as exc:
        raise WorkspaceError(f"corrupt tensor file {path}: {exc}") from exc

