"""SIGKILL at any moment of ``clipcl add-task`` leaves a workspace that loads and predicts as before, and an
interrupted run resumes to the tensors of an uninterrupted one.

The harness runs ``python -m clipcl add-task`` as a subprocess and kills it either at a named failpoint
(``CLIPCL_FAILPOINT``: after the scan, a training step, an epoch's checkpoint, each write of the commit) or after a
random delay. Four cases run by default; the full set (``-m slow``) runs 26 more.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import invoke, make_task, snapshot
from safetensors.torch import load_file

from clipcl import Workspace, predict_images

TRAIN = ("--epochs", "2", "--batch-size", "8", "--workers", "0", "--lr", "5e-3")
# An add-task of 2 epochs makes 4 steps and 5 atomic replaces: each epoch's checkpoint tensors and JSON (1-4), then
# the manifest (5), which is what commits the task.
MANIFEST_WRITE = "replace:5"
NAMED = ["scan", "step:3", "epoch:1", "checkpoint:2", "staged", "renamed", MANIFEST_WRITE, "committed"]
DEFAULT_CASES = ["step:3", "epoch:1", "renamed", MANIFEST_WRITE]


def run_clipcl(*args: str, failpoint: str | None = None, kill_after: float | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess | int:
    """Run ``python -m clipcl ARGS``; with ``kill_after``, SIGKILL it after that many seconds (returns the exit
    status, negative for a signal)."""
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("CLIPCL_FAILPOINT", None)
    if failpoint:
        env["CLIPCL_FAILPOINT"] = failpoint
    command = [sys.executable, "-m", "clipcl", *map(str, args)]
    if kill_after is None:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    try:
        return process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        return process.wait()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path, tiny_weights: Path) -> dict:
    """A one-task workspace, the next task's folder, task 1's predictions, and how long a full add-task takes."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("kill")
    runner = CliRunner()
    ws = root / "ws"
    assert invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights).exit_code == 0
    first = make_task(root / "data" / "first", ["red", "green"], per_class=8)
    assert invoke(runner, "add-task", "-w", ws, first, *TRAIN).exit_code == 0
    images = sorted(first.rglob("*.png"))
    predictions = [p.to_json() for p in predict_images(ws, images, top_k=2)]
    second = make_task(root / "data" / "second", ["blue", "yellow"], per_class=8)
    return {"ws": ws, "second": second, "images": images, "predictions": predictions}


def check_survivor(ws: Path, base: dict, retrain: bool) -> int:
    """The killed workspace loads, task 1 is byte-for-byte intact and predicts exactly as before (when task 2 was
    not committed), ``clipcl tasks`` lists only committed tasks, and (``retrain``) the next add-task completes and
    clears every leftover; returns the number of committed tasks."""
    from typer.testing import CliRunner

    original = snapshot(base["ws"])
    now = snapshot(ws)
    for name in ("tasks/task-001/task.json", "tasks/task-001/tensors.safetensors"):
        assert now[name] == original[name]
    workspace = Workspace.open(ws)
    committed = len(workspace.tasks)
    assert committed in (1, 2)
    if committed == 1:
        assert now["manifest.json"] == original["manifest.json"]
        predictions = [p.to_json() for p in predict_images(ws, base["images"], top_k=2)]
        assert predictions == base["predictions"]
    listing = invoke(CliRunner(), "tasks", "-w", ws, "--json")
    assert listing.exit_code == 0, listing.output
    assert [t["id"] for t in json.loads(listing.stdout)["tasks"]] == list(range(1, committed + 1))
    if committed == 1 and retrain:  # the interrupted task can be learned now; the next writer clears the debris
        again = run_clipcl("add-task", "-w", ws, base["second"], *TRAIN)
        assert again.returncode == 0, again.stderr
        leftovers = [p.name for p in ws.iterdir() if p.name.startswith((".staging-", ".tmp-", ".resume"))]
        leftovers += [p.name for p in (ws / "tasks").iterdir() if p.name not in ("task-001", "task-002")]
        assert leftovers == []
        assert len(Workspace.open(ws).tasks) == 2
    return committed


def _kill_case(case: str, base: dict, tmp_path: Path, retrain: bool = True) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(base["ws"], ws)
    if case.startswith("after:"):
        status = run_clipcl("add-task", "-w", ws, base["second"], *TRAIN, kill_after=float(case.split(":")[1]))
        assert status in (0, -signal.SIGKILL)
    else:
        result = run_clipcl("add-task", "-w", ws, base["second"], *TRAIN, failpoint=case)
        assert result.returncode == -signal.SIGKILL, result.stderr
    if case == MANIFEST_WRITE:  # killed with the new manifest written aside, not yet renamed over the old one
        assert [p.name for p in ws.iterdir() if p.name.endswith("manifest.json") and p.name != "manifest.json"]
    committed = check_survivor(ws, base, retrain)
    if case in ("committed",):
        assert committed == 2


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_sigkill_at_a_named_moment_leaves_a_working_workspace(case: str, base: dict, tmp_path: Path) -> None:
    _kill_case(case, base, tmp_path, retrain=case == "renamed")  # the full set retrains after every case


def _slow_cases() -> list[str]:
    timed = [f"after:{delay:.2f}" for delay in random.Random(7).sample([x / 4 for x in range(6, 40)], 14)]
    return [c for c in NAMED if c not in DEFAULT_CASES] + ["step:1", "step:4", "epoch:2", "replace:1",
                                                          "replace:2", "replace:3", "replace:4", "checkpoint:1"] + timed


@pytest.mark.slow
@pytest.mark.parametrize("case", _slow_cases())
def test_sigkill_anywhere_leaves_a_working_workspace(case: str, base: dict, tmp_path: Path) -> None:
    _kill_case(case, base, tmp_path)


def test_resume_after_sigkill_reaches_the_tensors_of_an_uninterrupted_run(tmp_path: Path, tiny_config: Path,
                                                                          tiny_weights: Path, runner) -> None:
    """A real SIGKILL of the CLI, then ``add-task --resume`` (every method resumes exactly in
    test_method_contract.py, interrupted in-process)."""
    method, failpoint = "dma", "epoch:1"
    data = tmp_path / "data"
    first = make_task(data / "first", ["red", "green"], per_class=8)
    train = ("--epochs", "2", "--batch-size", "8", "--workers", "0", "--lr", "5e-3")
    workspaces = []
    for name in ("straight", "interrupted"):
        ws = tmp_path / name
        assert invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights,
                      "--method", method).exit_code == 0
        assert invoke(runner, "add-task", "-w", ws, first, *train).exit_code == 0
        workspaces.append(ws)
    straight, interrupted = workspaces
    second = make_task(data / "second", ["blue", "yellow"], per_class=8)
    uninterrupted = invoke(runner, "add-task", "-w", straight, second, *train)
    assert uninterrupted.exit_code == 0, uninterrupted.output
    killed = run_clipcl("add-task", "-w", interrupted, second, *train, failpoint=failpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (interrupted / ".resume" / "state.json").is_file()
    assert len(Workspace.open(interrupted).tasks) == 1
    listing = invoke(runner, "tasks", "-w", interrupted, env={"COLUMNS": "200"})
    assert "continue it with `clipcl add-task --resume`" in listing.stdout
    as_json = json.loads(invoke(runner, "tasks", "-w", interrupted, "--json").stdout)
    assert as_json["interrupted"]["task"] == 2 and as_json["interrupted"]["epochs_done"] >= 1

    conflicting = invoke(runner, "add-task", "-w", interrupted, "--resume", "--epochs", "3")
    assert conflicting.exit_code == 2 and "drop --epochs" in conflicting.stderr
    resumed = invoke(runner, "add-task", "-w", interrupted, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming task 2" in resumed.output
    # only the epochs left ran (a restart from scratch would reach the same tensors, so this is what tells them apart)
    epochs_before_kill = int(failpoint.split(":")[1])
    assert _epoch_lines(resumed.output) == _epoch_lines(uninterrupted.output) - epochs_before_kill
    assert not (interrupted / ".resume").exists()
    expected = load_file(straight / "tasks/task-002/tensors.safetensors")
    got = load_file(interrupted / "tasks/task-002/tensors.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    details = [json.loads((ws / "tasks/task-002/task.json").read_text()) for ws in workspaces]
    assert details[0]["accuracy"] == details[1]["accuracy"]
    assert details[0]["training"]["steps"] == details[1]["training"]["steps"]


def _epoch_lines(output: str) -> int:
    return sum(1 for line in output.splitlines() if re.search(r"epoch \d+/\d+", line))


def test_resume_refuses_what_it_cannot_continue(workspace: Path, task_factory, runner) -> None:
    nothing = invoke(runner, "add-task", "-w", workspace, "--resume")
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.stderr
    folder = task_factory("a", ["red", "green"], per_class=6)
    killed = run_clipcl("add-task", "-w", workspace, folder, "--epochs", "2", "--batch-size", "4", "--workers", "0",
                        failpoint="epoch:1")
    assert killed.returncode == -signal.SIGKILL
    before = snapshot(workspace)
    elsewhere = invoke(runner, "add-task", "-w", workspace, "--resume", task_factory("b", ["blue", "yellow"]))
    assert elsewhere.exit_code == 2 and "continues the interrupted run on" in elsewhere.stderr
    make_task(folder, ["cyan"], per_class=3)  # the folder changed since the interrupted run
    changed = invoke(runner, "add-task", "-w", workspace, "--resume")
    assert changed.exit_code == 2 and "changed since the interrupted run" in changed.stderr
    assert snapshot(workspace) == before

    # a damaged checkpoint blocks neither readers nor a fresh run, which says so and leaves no checkpoint behind
    (workspace / ".resume" / "state.json").write_text("{ not json")
    assert invoke(runner, "tasks", "-w", workspace).exit_code == 0
    fresh = invoke(runner, "add-task", "-w", workspace, folder, "--epochs", "1", "--batch-size", "4", "--workers", "0")
    assert fresh.exit_code == 0, fresh.output
    assert "ignoring a damaged checkpoint" in fresh.stderr
    assert not (workspace / ".resume").exists()
