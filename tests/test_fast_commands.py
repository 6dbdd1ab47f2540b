"""Commands that run no model import no deep-learning library, so they answer in a fraction of a second.

Importing torch, open_clip (which pulls in transformers), peft and accelerate takes 10+ seconds on a small machine;
`clipcl --help` used to pay all of it. Each check runs the real command in a fresh interpreter under
``python -X importtime`` and fails if one of those packages was imported (a timing threshold would be flaky).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, invoke

from clipcl.cli import app

HEAVY = {"torch", "open_clip", "peft", "accelerate", "matplotlib", "transformers", "safetensors", "numpy"}


def run_recording_imports(*args: str | Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -m clipcl ARGS``; its result and the top-level packages it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "clipcl", *map(str, args)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    imported = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            imported.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return result, imported


def assert_light(*args: str | Path, exit_code: int = 0) -> subprocess.CompletedProcess:
    result, imported = run_recording_imports(*args)
    assert result.returncode == exit_code, result.stderr[-2000:]
    assert "clipcl" in imported  # the import log was read
    assert not imported & HEAVY, f"`clipcl {' '.join(map(str, args))}` imported {sorted(imported & HEAVY)}"
    return result


COMMANDS = sorted(command.name or command.callback.__name__ for command in app.registered_commands)


@pytest.mark.parametrize("args", [("--help",), ("--version",)] + [(name, "--help") for name in COMMANDS],
                         ids=lambda args: " ".join(args))
def test_help_and_version_import_no_model_code(args: tuple[str, ...]) -> None:
    result = assert_light(*args)
    assert result.stdout.strip()


def test_usage_errors_import_no_model_code() -> None:
    result = assert_light("add-task", "--no-such-flag", exit_code=2)
    messages = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert messages == ["error: No such option: --no-such-flag"]
    assert_light("init", exit_code=2)  # --model is missing
    assert_light("frobnicate", exit_code=2)


def test_tasks_reads_a_trained_workspace_without_torch(workspace: Path, task_factory, runner) -> None:
    added = invoke(runner, "add-task", "-w", workspace, task_factory("first", ["red", "green"]), *FAST)
    assert added.exit_code == 0, added.output

    listed = json.loads(assert_light("tasks", "-w", workspace, "--json").stdout)
    assert [task["classes"] for task in listed["tasks"]] == [["green", "red"]]
    assert listed["tasks"][0]["accuracy"] is not None
    table = assert_light("tasks", "-w", workspace).stdout
    assert "green, red" in table
    assert_light("tasks", "-w", workspace.parent / "missing", exit_code=2)


def test_the_method_help_lists_every_registered_method() -> None:
    """The help's list comes from a torch-free catalog; it must not drift from the registry."""
    from clipcl.methods import available_methods, method_summaries

    summaries = method_summaries()
    registered = available_methods()
    assert set(summaries) == set(registered)
    for name, cls in registered.items():
        assert summaries[name] == cls.summary
