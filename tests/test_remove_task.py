"""``clipcl remove-task``: a workspace without a task predicts as one that never learned it, the removal is atomic
under SIGKILL, methods whose tasks build on each other refuse, and ``tasks``/``eval`` keep the history, marked.

Which reference is valid: ``ncm`` and ``lda`` compute a task's statistics from its own images alone, so learning
a, b, c and removing b must give exactly what learning a, c gives. ``dma`` trains each task's LoRA and prompts
against the earlier tasks' frozen prompts (and restoring a task's LoRA draws from the seeded generator), so task c
learned after b is not task c learned after a alone; the reference that never learned the task is valid for the
*last* task (learn a, b, c and remove c against learn a, b), and for a middle task the remaining tasks' stored
files are untouched while the router's pooled statistics are exactly those of the remaining tasks' shares.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import invoke, make_task, snapshot
from PIL import Image
from typer.testing import CliRunner

from clipcl import Workspace, predict_images, remove_task
from clipcl.methods import available_methods
from clipcl.records import RemovedTask

TRAIN = ("--epochs", "2", "--batch-size", "8", "--workers", "0", "--lr", "5e-3", "--seed", "3")
TASKS = {"a": ["red", "green"], "b": ["blue", "yellow"], "c": ["magenta", "cyan"]}


def learn(root: Path, name: str, method: str, tasks: str, tiny_config: Path, tiny_weights: Path,
          *extra: str) -> Path:
    """A workspace of ``method`` that learned ``tasks`` (letters of TASKS, in order) with the same seeds."""
    runner = CliRunner()
    ws = root / name
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--method", method)
    assert result.exit_code == 0, result.output
    for letter in tasks:
        folder = make_task(root / "data" / letter, TASKS[letter], per_class=6)
        result = invoke(runner, "add-task", "-w", ws, folder, *TRAIN, *extra)
        assert result.exit_code == 0, result.output
    return ws


def images(root: Path) -> list[Path]:
    """Every image of every task, the removed task's included."""
    return sorted((root / "data").rglob("*.png"))


def probabilities(ws: Path, paths: list[Path]) -> tuple[list[str], torch.Tensor]:
    """The workspace's classes and its probabilities over them for ``paths``."""
    method = Workspace.open(ws).build_method()
    batch = torch.stack([method.backbone.eval_transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return method.classes, method.predict(batch).probs


def assert_same_answers(ws: Path, reference: Path, paths: list[Path]) -> None:
    classes, probs = probabilities(ws, paths)
    expected_classes, expected = probabilities(reference, paths)
    assert classes == expected_classes
    assert torch.equal(probs, expected), (probs - expected).abs().max()


def test_the_methods_whose_tasks_are_independent_say_so() -> None:
    independent = {name for name, cls in available_methods().items() if cls.independent_tasks}
    assert independent == {"dma", "lda", "ncm", "zeroshot"}


@pytest.mark.parametrize("method", ["ncm", "lda"])
def test_removing_a_task_predicts_as_never_having_learned_it(method: str, tmp_path: Path, tiny_config: Path,
                                                            tiny_weights: Path) -> None:
    full = learn(tmp_path, "full", method, "abc", tiny_config, tiny_weights)
    never = learn(tmp_path, "never", method, "ac", tiny_config, tiny_weights)
    removal = remove_task(full, "b")  # by name
    assert (removal.removed.id, removal.removed.name, removal.removed.classes) == (2, "b", ["blue", "yellow"])
    assert [t.info.index for t in removal.tasks] == [1, 3]
    assert not (full / "tasks" / "task-002").exists()
    assert_same_answers(full, never, images(tmp_path))
    answers = [[[(s.class_name, s.task_name, s.prob) for s in p.top] for p in predict_images(ws, images(tmp_path), 4)]
               for ws in (full, never)]
    assert answers[0] == answers[1]


def test_removing_a_dma_task_drops_its_share_of_the_pooled_router(tmp_path: Path, tiny_config: Path,
                                                                  tiny_weights: Path) -> None:
    full = learn(tmp_path, "full", "dma", "abc", tiny_config, tiny_weights)
    never = learn(tmp_path, "never", "dma", "ab", tiny_config, tiny_weights)
    middle = tmp_path / "middle"
    shutil.copytree(full, middle)
    before = Workspace.open(middle).build_method()
    pooled_before = before.router.gaussian.covariance()
    kept = {name: data for name, data in snapshot(middle).items()
            if name.startswith(("tasks/task-001", "tasks/task-003"))}

    # the last task: exactly the workspace that learned the others alone, with the same seeds
    assert remove_task(full, "3").removed.name == "c"  # by number
    for name in ("tasks/task-001/tensors.safetensors", "tasks/task-002/tensors.safetensors"):
        assert (full / name).read_bytes() == (never / name).read_bytes()  # the same seeds trained the same tensors
    assert_same_answers(full, never, images(tmp_path))

    # a middle task: the others' files untouched, the router pooled over their shares alone
    remove_task(middle, 2)
    assert {name: data for name, data in snapshot(middle).items() if name.startswith("tasks/")} == kept
    after = Workspace.open(middle).build_method()
    assert [t.index for t in after.tasks] == [1, 3] and after.classes == ["green", "red", "cyan", "magenta"]
    shares = [Workspace.open(middle).task_tensors(t) for t in Workspace.open(middle).tasks]
    scatter = sum(s["router.scatter"].double() for s in shares)
    count = sum(float(s["router.count"]) for s in shares)
    assert torch.allclose(after.router.gaussian.covariance(), scatter / count, rtol=0, atol=1e-12)
    assert not torch.allclose(pooled_before, scatter / count)
    _, probs = probabilities(middle, images(tmp_path))
    assert probs.shape == (len(images(tmp_path)), 4) and torch.allclose(probs.sum(dim=1), torch.ones(len(probs)))
    # every route answers, and the held-out evaluation routes to the right columns with the gap in the numbers
    evaluated = json.loads(invoke(CliRunner(), "eval", "-w", middle, "--json", "--workers", "0").stdout)
    assert [row["task"] for row in evaluated["per_task"]] == [1, 3]
    assert all(row["task_id_accuracy"] is not None for row in evaluated["per_task"])


@pytest.fixture(scope="module")
def ncm_root(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path, tiny_weights: Path) -> Path:
    """An ncm workspace that learned a, b, c (``ws``), and the same with b removed without interruption."""
    root = tmp_path_factory.mktemp("remove-ncm")
    ws = learn(root, "ws", "ncm", "abc", tiny_config, tiny_weights)
    shutil.copytree(ws, root / "removed")
    remove_task(root / "removed", "b")
    return root


def run_clipcl(*args: str | Path, failpoint: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPCL_FAILPOINT": failpoint, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "clipcl", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("failpoint, survives", [("remove", "old"), ("replace:1", "old"), ("removed", "new")])
def test_a_kill_during_the_removal_leaves_either_state(failpoint: str, survives: str, ncm_root: Path,
                                                      tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(ncm_root / "ws", ws)
    original = snapshot(ws)
    killed = run_clipcl("remove-task", "-w", ws, "b", failpoint=failpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    now = snapshot(ws)
    numbers = [t.info.index for t in Workspace.open(ws).tasks]
    if survives == "old":  # the manifest was never replaced: every file as it was, but a manifest written aside
        assert numbers == [1, 2, 3]
        assert {k: v for k, v in now.items() if k in original} == original
        assert_same_answers(ws, ncm_root / "ws", images(ncm_root))
    else:  # committed, killed before the folder went: it is invisible, and the next writer deletes it
        assert numbers == [1, 3]
        assert now["manifest.json"] != original["manifest.json"] and "tasks/task-002/task.json" in now
        assert_same_answers(ws, ncm_root / "removed", images(ncm_root))
    again = invoke(CliRunner(), "remove-task", "-w", ws, "b")
    assert again.exit_code == (0 if survives == "old" else 2), again.output
    assert not (ws / "tasks" / "task-002").exists() and not list((ws / "cache").rglob("task-002-*"))
    assert [p.name for p in ws.iterdir() if p.name.startswith((".tmp-", ".staging-"))] == []
    assert [t.info.index for t in Workspace.open(ws).tasks] == [1, 3]
    assert_same_answers(ws, ncm_root / "removed", images(ncm_root))


@pytest.mark.parametrize("method", ["finetune", "dmc"])
def test_methods_whose_tasks_build_on_each_other_refuse_and_change_nothing(method: str, tmp_path: Path,
                                                                         tiny_config: Path, tiny_weights: Path,
                                                                         runner: CliRunner) -> None:
    ws = learn(tmp_path, "ws", method, "a", tiny_config, tiny_weights, "--epochs", "1")
    before = {p.relative_to(ws).as_posix(): p.read_bytes() for p in sorted(ws.rglob("*")) if p.is_file()}
    result = invoke(runner, "remove-task", "-w", ws, "1")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: method {method} cannot remove a task: its later tasks "
                                                   "were trained on top of earlier ones"), result.stderr
    assert {p.relative_to(ws).as_posix(): p.read_bytes() for p in sorted(ws.rglob("*")) if p.is_file()} == before


def test_remove_task_on_the_command_line(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                         runner: CliRunner) -> None:
    """By name and by number; unknown, removed and ambiguous keys; a pending checkpoint and the removed task's
    cached features dropped; ``tasks`` and ``eval`` after it; the next task's fresh number."""
    ws = learn(tmp_path, "ws", "ncm", "abc", tiny_config, tiny_weights)
    assert list((ws / "cache" / "features").glob("task-002-*"))  # kept by add-task's evaluations
    (ws / ".resume").mkdir()
    (ws / ".resume" / "state.json").write_text("{ damaged")
    before = snapshot(ws)
    for key, needle in (("zz", "error: no task 'zz' in"), ("7", "error: no task '7' in")):
        result = invoke(runner, "remove-task", "-w", ws, key)
        assert result.exit_code == 2 and result.stderr.startswith(needle) and "tasks: 1 (a), 2 (b), 3 (c)" in \
            result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(ws) == before

    removed = invoke(runner, "remove-task", "-w", ws, "b")
    assert removed.exit_code == 0, removed.output
    assert "Removed task 2 (b)" in removed.stdout and "dropped the checkpoint" in removed.stderr
    assert not (ws / ".resume").exists() and not list((ws / "cache" / "features").glob("task-002-*"))
    again = invoke(runner, "remove-task", "-w", ws, "2")
    assert again.exit_code == 2 and again.stderr.startswith("error: task 2 (b) was removed from"), again.stderr

    listed = json.loads(invoke(runner, "tasks", "-w", ws, "--json").stdout)
    assert [t["id"] for t in listed["tasks"]] == [1, 3]
    assert listed["classes"] == ["green", "red", "cyan", "magenta"]
    assert [(r["id"], r["name"], r["classes"]) for r in listed["removed"]] == [(2, "b", ["blue", "yellow"])]
    table = invoke(runner, "tasks", "-w", ws, env={"COLUMNS": "250"}).stdout
    assert "1 removed" in table and "b (removed " in table

    evaluated = invoke(runner, "eval", "-w", ws, "--json", "--workers", "0")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    stored = [json.loads((ws / f"tasks/task-00{i}/task.json").read_text())["accuracy"]["per_task"] for i in (1, 3)]
    assert [row["task"] for row in report["per_task"]] == [1, 3]
    assert report["matrix"] == [stored[0], [stored[1][0], stored[1][2]]]  # task 2's column left out
    assert report["history"]["tasks"] == [1, 2, 3] and report["history"]["removed"] == [2]
    assert report["history"]["matrix"][2] == stored[1] and report["removed_tasks"][0]["task"] == 2
    shown = invoke(runner, "eval", "-w", ws, "--workers", "0", env={"COLUMNS": "250"}).stdout
    assert "task 2 (removed)" in shown and "2 (removed)" in shown

    # the last task by number; the next task gets a number never given, and the history lines up
    assert invoke(runner, "remove-task", "-w", ws, "3").exit_code == 0
    assert Workspace.open(ws).next_task_index() == 4
    added = invoke(runner, "add-task", "-w", ws, make_task(tmp_path / "data" / "d", ["cyan"], per_class=6),
                   "--name", "1", *TRAIN)
    assert added.exit_code == 0, added.output
    assert [(t.info.index, t.dir) for t in Workspace.open(ws).tasks] == [(1, "tasks/task-001"), (4, "tasks/task-004")]
    history = json.loads(invoke(runner, "eval", "-w", ws, "--json", "--workers", "0").stdout)["history"]
    assert history["tasks"] == [1, 2, 3, 4] and history["removed"] == [2, 3]
    assert history["matrix"][3][1:3] == [None, None] and None not in (history["matrix"][3][0], history["matrix"][3][3])
    ambiguous = invoke(runner, "remove-task", "-w", ws, "1")  # task 1's number, task 4's name
    assert ambiguous.exit_code == 2 and "name the task by its other key" in ambiguous.stderr


def test_a_manifest_without_the_removed_list_reads_as_none_removed(ncm_root: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(ncm_root / "ws", ws)
    assert "removed" not in json.loads((ws / "manifest.json").read_text())  # what every earlier clipcl wrote
    workspace = Workspace.open(ws)
    assert workspace.removed_tasks == [] and workspace.next_task_index() == 4
    entry = json.loads((ncm_root / "removed" / "manifest.json").read_text())["removed"][0]
    assert RemovedTask.from_json(entry).next_task == 4
