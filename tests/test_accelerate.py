"""Accelerate paths a user takes: bf16 mixed precision and several processes (gloo on the CPU).

Each runs the real CLI in a subprocess: Accelerate's state is process-wide, as it is for a user's command.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import FAST, PYTHON, invoke


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([PYTHON, *args], capture_output=True, text=True, env=env, timeout=300)


def test_bf16_training_learns(workspace: Path, task_factory) -> None:
    result = _run("-m", "clipcl.cli", "add-task", "-w", str(workspace), str(task_factory("a", ["red", "green"])),
                  *FAST, "--precision", "bf16")
    assert result.returncode == 0, result.stderr
    details = json.loads((workspace / "tasks/task-001/task.json").read_text())
    assert details["training"]["precision"] == "bf16"
    assert details["accuracy"]["task"] >= 0.8


def test_two_processes_train_one_task_and_report_once(workspace: Path, task_factory, runner) -> None:
    folder = task_factory("a", ["red", "green"], per_class=20)
    result = _run("-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "clipcl.cli", "add-task",
                  "-w", str(workspace), str(folder), *FAST)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Stored task 1") == 1
    details = json.loads((workspace / "tasks/task-001/task.json").read_text())
    assert details["training"]["processes"] == 2
    assert details["training"]["steps"] == 3 * 2  # 32 training images, batches of 8, split over 2 processes
    assert details["accuracy"]["task"] >= 0.8
    assert invoke(runner, "tasks", "-w", workspace).exit_code == 0


def test_two_processes_facing_a_locked_workspace_both_stop_cleanly(workspace: Path, task_factory) -> None:
    from test_locking import _hold_lock

    holder = _hold_lock(workspace, 120)
    try:
        result = _run("-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "clipcl.cli", "add-task",
                      "-w", str(workspace), str(task_factory("a", ["red", "green"])), *FAST)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("being written by another clipcl process" in e for e in errors), result.stderr
