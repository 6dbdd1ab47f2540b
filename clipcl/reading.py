"""Reading what comes from outside clipcl, with bounds.

Task folders live on synced drives and mounted shares, and a workspace folder can be tampered with, so nothing is
read on the strength of its name. A path counts as a file only if it resolves to a *regular* file: a FIFO would block
a reader forever, ``/dev/zero`` would fill the memory, and a socket or a device is never an image. Every read is
bounded by a size limit checked before reading (and again while reading, for a file that grows meanwhile), and is
opened non-blocking so that a file swapped for a FIFO between the check and the open cannot hang the process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 1 << 20
DEFAULT_MAX_IMAGE_BYTES = 256 * MIB  # far above any photograph; --max-image-mb raises it
MAX_JSON_BYTES = 64 * MIB  # a manifest, task.json or checkpoint of a task of millions of images stays far below
CHUNK_BYTES = MIB


class InputError(OSError):
    """A path that cannot be read as a file of bounded size: not a regular file, too large, or unreadable."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def describe_mode(mode: int) -> str:
    """What a ``st_mode`` is, in words, for the files that are not regular."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def not_regular(mode: int) -> str:
    return f"{describe_mode(mode)}, not a regular file"


def format_size(size: int) -> str:
    return f"{size / MIB:.1f} MiB" if size >= MIB else f"{size} bytes"


def regular_file_problem(path: Path | str) -> str | None:
    """``None`` when ``path`` resolves to a regular file (through any symbolic links); otherwise why it is not one,
    in a few words. Nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        if exc.errno == errno.ENOENT:
            return "a broken symbolic link" if os.path.islink(path) else "missing"
        return exc.strerror or type(exc).__name__
    if stat.S_ISREG(mode):
        return None
    return not_regular(mode)


def _open_regular(path: Path | str) -> tuple[int, os.stat_result]:
    """An open descriptor of ``path``, refused unless it is a regular file (checked on the open descriptor, so a
    file replaced meanwhile is caught; non-blocking, so a FIFO put in its place cannot hang the open)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:  # say what the path is when that is why (a socket cannot be opened at all)
        problem = regular_file_problem(path) or exc.strerror or type(exc).__name__
        raise InputError(exc.errno, problem, str(path)) from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise InputError(errno.EINVAL, not_regular(info.st_mode))
    return fd, info


def _too_large(size: int, limit: int) -> InputError:
    return InputError(errno.EFBIG, f"{format_size(size)}, over the limit of {format_size(limit)}")


def read_bounded(path: Path | str, limit: int) -> bytes:
    """All bytes of the regular file ``path``, refused with :class:`InputError` when it is larger than ``limit``
    bytes. A file that grows while it is read is read up to the size it had when opened (and refused if that
    already breaks the limit), so no writer can keep the read going."""
    fd, info = _open_regular(path)
    try:
        if info.st_size > limit:
            raise _too_large(info.st_size, limit)
        chunks, remaining = [], info.st_size
        while remaining > 0:
            chunk = os.read(fd, min(remaining, CHUNK_BYTES))
            if not chunk:  # shrunk meanwhile: what is there is what we have
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def sha256_of_file(path: Path | str, limit: int | None = None,
                   on_chunk: Callable[[bytes], None] | None = None) -> str:
    """The sha256 of a regular file, streamed in fixed-size chunks (memory stays at one chunk whatever the size);
    with ``limit``, a file larger than that is refused before reading. Reads stop at the size the file had when it
    was opened."""
    fd, info = _open_regular(path)
    digest = hashlib.sha256()
    try:
        if limit is not None and info.st_size > limit:
            raise _too_large(info.st_size, limit)
        remaining = info.st_size
        while remaining > 0:
            chunk = os.read(fd, min(remaining, CHUNK_BYTES))
            if not chunk:
                break
            digest.update(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def parse_json_bounded(data: bytes, what: str) -> Any:
    """Parse the JSON bytes of one of clipcl's files, refusing (``ValueError`` naming ``what``) text that is not
    UTF-8 JSON, or that nests so deeply that the parser would exhaust the stack: CPython's parser stops at the
    interpreter's recursion limit (about a thousand levels; clipcl's own files nest five deep) with a
    ``RecursionError``, which is reported here like any other damage."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} is not UTF-8 text: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt JSON in {what}: {exc}") from exc
    except RecursionError as exc:
        raise ValueError(f"{what} nests too deeply to be a file clipcl wrote") from exc


def read_json_bounded(path: Path | str, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of at most ``limit`` bytes that resolves to a regular file; :class:`InputError` for a path that is
    not one or too large, ``ValueError`` for content that is not bounded JSON."""
    return parse_json_bounded(read_bounded(path, limit), str(path))
