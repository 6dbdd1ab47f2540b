"""Named crash points, for the tests that prove a crash at any moment leaves the workspace loadable.

``CLIPCL_FAILPOINT=NAME[:N]`` makes the process kill itself with SIGKILL (no clean-up, no ``finally``, exactly
like a power cut or the OOM killer) the N-th time (default: first) it reaches :func:`failpoint` ``NAME``. Unset,
a failpoint costs one dictionary lookup. The names mark the moments that matter: after the data scan, after a
training step, after an epoch's checkpoint, and between each write of a task's commit.
"""

from __future__ import annotations

import os
import signal

ENV = "CLIPCL_FAILPOINT"
_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Die here, by SIGKILL, if ``CLIPCL_FAILPOINT`` names this point (and this is its N-th hit)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    target, _, count = wanted.partition(":")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
