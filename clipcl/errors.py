"""Errors the user can act on.

Anything raised as :class:`ClipclError` is the user's input or environment being wrong (a missing folder, an empty
class, a workspace that does not exist). The CLI prints its message as one line and exits with ``exit_code``; any
other exception is a bug in clipcl and is reported as such.
"""

from __future__ import annotations


class ClipclError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code: int = 2


class WorkspaceError(ClipclError):
    """The workspace is missing, locked, corrupt or of an unknown format."""


class DataError(ClipclError):
    """A dataset folder cannot be used as a task."""


class ModelError(ClipclError):
    """The base model cannot be resolved or loaded."""
