"""The core loop as a user runs it: init, add-task twice, tasks; learning, isolation, reloading, determinism."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from conftest import FAST, PYTHON, invoke

from clipcl import Workspace
from clipcl.engine import TrainOptions, add_task
from clipcl.evaluation import heldout_dataset


def test_add_task_learns_an_easy_task(workspace: Path, task_factory, runner) -> None:
    folder = task_factory("colours", ["red", "green", "blue"])
    result = invoke(runner, "add-task", "-w", workspace, folder, *FAST)
    assert result.exit_code == 0, result.output
    details = json.loads((workspace / "tasks/task-001/task.json").read_text())
    assert details["accuracy"]["task"] >= 0.8  # chance is 1/3
    assert details["classes"] == ["blue", "green", "red"]
    assert sum(details["counts"]["heldout"].values()) == len(details["heldout_files"]) == 9  # round(0.2 * 14) a class
    manifest = json.loads((workspace / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == ["blue", "green", "red"]
    assert manifest["tasks"][0]["name"] == "colours"
    assert "task 1: colours" in result.output


def test_second_task_keeps_first_task_tensors_and_predicts_all_classes(workspace: Path, task_factory, runner
                                                                      ) -> None:
    invoke(runner, "add-task", "-w", workspace, task_factory("a", ["red", "green"]), *FAST)
    first = workspace / "tasks/task-001"
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    result = invoke(runner, "add-task", "-w", workspace, task_factory("b", ["blue", "yellow"]), *FAST)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    ws = Workspace.open(workspace)
    assert ws.classes == ["green", "red", "blue", "yellow"]
    record = ws.task_record(ws.tasks[1])
    assert len(record.accuracy.per_task) == 2
    assert record.accuracy.all >= 0.7  # four classes, chance 0.25


def test_new_process_reloads_the_workspace_and_predicts_the_same(workspace: Path, task_factory, runner) -> None:
    invoke(runner, "add-task", "-w", workspace, task_factory("a", ["red", "green"]), *FAST)
    invoke(runner, "add-task", "-w", workspace, task_factory("b", ["blue", "yellow"]), *FAST)
    script = f"""
import torch
from clipcl import Workspace
from clipcl.evaluation import heldout_dataset
ws = Workspace.open({str(workspace)!r})
method = ws.build_method()
task = ws.tasks[0]
ds = heldout_dataset(method, task.info, ws.task_record(task))
images = torch.stack([ds[i][0] for i in range(len(ds))])
torch.save(method.predict_proba(images), {str(workspace.parent / "probs.pt")!r})
"""
    subprocess.run([PYTHON, "-c", script], check=True, capture_output=True)
    ws = Workspace.open(workspace)
    method = ws.build_method()
    ds = heldout_dataset(method, ws.tasks[0].info, ws.task_record(ws.tasks[0]))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    other = torch.load(workspace.parent / "probs.pt", weights_only=True)
    torch.testing.assert_close(method.predict_proba(images), other, rtol=0, atol=1e-6)


def test_same_seed_gives_the_same_tensors(tmp_path: Path, tiny_config: Path, tiny_weights: Path, task_factory,
                                          runner) -> None:
    folder = task_factory("a", ["red", "green"])
    stored = []
    for name in ("ws1", "ws2"):
        invoke(runner, "init", "-w", tmp_path / name, "--model", tiny_config, "--pretrained", tiny_weights)
        invoke(runner, "add-task", "-w", tmp_path / name, folder, *FAST, "--seed", "3")
        stored.append((tmp_path / name / "tasks/task-001/tensors.safetensors").read_bytes())
    assert stored[0] == stored[1]


def test_library_api_matches_the_cli(workspace: Path, task_factory) -> None:
    report = add_task(workspace, task_factory("a", ["red", "green"]),
                      TrainOptions(epochs=1, batch_size=8, workers=0, name="first"))
    assert report.task.name == "first"
    assert report.record.training.epochs == 1
    assert Workspace.open(workspace).tasks[0].name == "first"


def test_tasks_command_lists_what_was_learned(workspace: Path, task_factory, runner) -> None:
    invoke(runner, "add-task", "-w", workspace, task_factory("a", ["red", "green"]), *FAST, "--name", "primary")
    result = invoke(runner, "tasks", "-w", workspace, "--json")
    data = json.loads(result.output)
    assert data["classes"] == ["green", "red"]
    assert data["tasks"][0]["name"] == "primary"
    assert data["tasks"][0]["train_images"] + data["tasks"][0]["heldout_images"] == 28
    assert data["tasks"][0]["tensor_bytes"] == (workspace / "tasks/task-001/tensors.safetensors").stat().st_size
    table = invoke(runner, "tasks", "-w", workspace, env={"COLUMNS": "200"}).output
    assert "primary" in table and "green, red" in table


def test_workspace_falls_back_to_the_environment_variable(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                          runner) -> None:
    ws = tmp_path / "from-env"
    result = invoke(runner, "init", "--model", tiny_config, "--pretrained", tiny_weights,
                    env={"CLIPCL_WORKSPACE": str(ws)})
    assert result.exit_code == 0
    assert (ws / "manifest.json").is_file()
    result = invoke(runner, "tasks", env={"CLIPCL_WORKSPACE": str(ws)})
    assert result.exit_code == 0 and "0 tasks" in result.output


def test_train_and_test_folders_are_used_as_given(workspace: Path, task_factory, runner) -> None:
    root = task_factory("split/train", ["red", "green"], per_class=6)
    task_factory("split/test", ["red", "green"], per_class=3)
    result = invoke(runner, "add-task", "-w", workspace, root.parent, *FAST)
    assert result.exit_code == 0, result.output
    details = json.loads((workspace / "tasks/task-001/task.json").read_text())
    assert details["source"]["split"] == "folders"
    assert details["counts"]["train"] == {"green": 6, "red": 6}
    assert all(path.startswith("test/") for path, _ in details["heldout_files"])


def test_old_task_whose_images_are_gone_is_skipped_with_a_warning(workspace: Path, task_factory, runner) -> None:
    import shutil

    first = task_factory("a", ["red", "green"])
    invoke(runner, "add-task", "-w", workspace, first, *FAST)
    shutil.rmtree(first)
    result = invoke(runner, "add-task", "-w", workspace, task_factory("b", ["blue", "yellow"]), *FAST)
    assert result.exit_code == 0, result.output
    assert "task 1: no held-out images found" in result.stderr
    accuracy = json.loads((workspace / "tasks/task-002/task.json").read_text())["accuracy"]
    assert accuracy["per_task"][0] is None and accuracy["per_task"][1] >= 0.8
