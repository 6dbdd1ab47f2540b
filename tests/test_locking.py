"""Two writers never interleave: the second fails at once with a clear error, or waits with --wait; readers keep
working while a write is in progress."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import FAST, invoke, snapshot
from test_bad_input import assert_clean_failure

HOLD_LOCK = """
import sys, time
from clipcl import Workspace
with Workspace.open(sys.argv[1]).writing():
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_lock(workspace: Path, seconds: float) -> subprocess.Popen:
    """Another process that writes the workspace: it holds the write lock for ``seconds``."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workspace), str(seconds)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_fails_at_once_and_changes_nothing(workspace: Path, task_factory, runner) -> None:
    invoke(runner, "add-task", "-w", workspace, task_factory("a", ["red", "green"]), *FAST)
    holder = _hold_lock(workspace, 30)
    try:
        before = snapshot(workspace)
        result = invoke(runner, "add-task", "-w", workspace, task_factory("b", ["blue", "yellow"]), *FAST)
        assert_clean_failure(result, workspace, before, "is being written by another clipcl process")
        assert "--wait" in result.stderr
        # readers work during the write
        listing = invoke(runner, "tasks", "-w", workspace, "--json")
        assert listing.exit_code == 0 and len(json.loads(listing.stdout)["tasks"]) == 1
        image = next((workspace.parent / "data" / "a" / "red").iterdir())
        predicted = invoke(runner, "predict", "-w", workspace, image, "--json")
        assert predicted.exit_code == 0 and json.loads(predicted.stdout)["top"][0]["class"] in ("red", "green")
        assert invoke(runner, "eval", "-w", workspace, "--json").exit_code == 0
        short = invoke(runner, "add-task", "-w", workspace, task_factory("c", ["blue", "yellow"]), *FAST,
                       "--wait", "0.5")
        assert short.exit_code == 2 and "gave up after 0.5 s" in short.stderr
        assert snapshot(workspace) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_writer_with_wait_goes_on_when_the_other_finishes(workspace: Path, task_factory, runner) -> None:
    holder = _hold_lock(workspace, 8)  # longer than add-task needs to reach the lock, even on a busy machine
    try:
        result = invoke(runner, "add-task", "-w", workspace, task_factory("a", ["red", "green"]), *FAST,
                        "--wait", "60")
    finally:
        holder.wait()
    assert result.exit_code == 0, result.output
    assert "waiting up to 60 s" in result.stderr
    assert holder.returncode == 0
    assert len(json.loads(invoke(runner, "tasks", "-w", workspace, "--json").stdout)["tasks"]) == 1
