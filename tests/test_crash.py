"""A failure anywhere in add-task leaves the workspace as it was, and the next add-task works."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST, invoke, snapshot

from clipcl import Workspace
from clipcl.engine import TrainOptions, add_task
from clipcl.methods.dma import DMA


class Injected(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["training", "saving", "manifest"])
def test_an_exception_mid_add_task_leaves_the_workspace_unchanged(workspace: Path, task_factory, runner,
                                                                 monkeypatch, where: str) -> None:
    invoke(runner, "add-task", "-w", workspace, task_factory("a", ["red", "green"]), *FAST)
    before = snapshot(workspace)
    calls = {"n": 0}
    if where == "training":
        original = DMA.forward

        def failing_forward(self, images, labels):
            calls["n"] += 1
            if calls["n"] == 3:
                raise Injected("boom")
            return original(self, images, labels)

        monkeypatch.setattr(DMA, "forward", failing_forward)
    elif where == "saving":
        monkeypatch.setattr("clipcl.workspace.fsync_dir", lambda path: (_ for _ in ()).throw(Injected("boom")))
    else:
        import clipcl.workspace

        def failing_manifest(path, obj):
            raise Injected("boom")

        monkeypatch.setattr(clipcl.workspace, "atomic_write_json", failing_manifest)
    with pytest.raises(Injected):
        add_task(workspace, task_factory("b", ["blue", "yellow"]), TrainOptions(epochs=1, batch_size=4, workers=0))
    monkeypatch.undo()
    after = snapshot(workspace)
    # Only invisible debris may remain (a renamed but unreferenced task folder); the manifest and task 1 are intact.
    assert after["manifest.json"] == before["manifest.json"]
    assert {k: v for k, v in after.items() if k in before} == before
    assert len(Workspace.open(workspace).tasks) == 1
    result = invoke(runner, "add-task", "-w", workspace, task_factory("c", ["blue", "yellow"]), *FAST)
    assert result.exit_code == 0, result.output
    assert [t.name for t in Workspace.open(workspace).tasks] == ["a", "c"]
    assert snapshot(workspace).keys() - before.keys() == {"tasks/task-002/task.json",
                                                         "tasks/task-002/tensors.safetensors"}


def test_init_over_the_leftovers_of_an_interrupted_init(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                        runner) -> None:
    ws = tmp_path / "ws"
    (ws / "tasks").mkdir(parents=True)
    (ws / ".lock").touch()
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights)
    assert result.exit_code == 0, result.output


def test_debris_cleanup_removes_only_clipcl_task_folders(workspace: Path, task_factory, runner) -> None:
    (workspace / "tasks" / "task-007").mkdir()  # a crashed writer's unreferenced task folder
    (workspace / "tasks" / "my-notes.txt").write_text("keep me")
    invoke(runner, "add-task", "-w", workspace, task_factory("a", ["red", "green"]), *FAST)
    assert not (workspace / "tasks" / "task-007").exists()
    assert (workspace / "tasks" / "my-notes.txt").read_text() == "keep me"
