"""Every bad input gives exit code 2, one error line, no traceback, and leaves the workspace byte-for-byte as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import FAST, invoke, make_task, snapshot


def assert_clean_failure(result, workspace: Path | None, before: dict[str, bytes] | None, needle: str) -> None:
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert needle in errors[0]
    assert "Traceback" not in result.output
    if workspace is not None:
        assert snapshot(workspace) == before


@pytest.fixture
def trained(workspace: Path, task_factory, runner) -> Path:
    result = invoke(runner, "add-task", "-w", workspace, task_factory("first", ["red", "green"]), *FAST)
    assert result.exit_code == 0, result.output
    return workspace


def test_missing_folder(trained: Path, runner) -> None:
    before = snapshot(trained)
    result = invoke(runner, "add-task", "-w", trained, trained.parent / "nope")
    assert_clean_failure(result, trained, before, "dataset folder not found")


def test_folder_without_class_subfolders(trained: Path, tmp_path: Path, runner) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "loose.png").write_bytes(b"")
    before = snapshot(trained)
    assert_clean_failure(invoke(runner, "add-task", "-w", trained, flat), trained, before, "no class sub-folders")


def test_class_without_a_readable_image(trained: Path, tmp_path: Path, runner) -> None:
    folder = make_task(tmp_path / "broken", ["blue"], per_class=4)
    (folder / "cyan").mkdir()
    (folder / "cyan" / "a.jpg").write_bytes(b"not a jpeg at all")
    (folder / "cyan" / "notes.txt").write_text("not an image")
    before = snapshot(trained)
    result = invoke(runner, "add-task", "-w", trained, folder)
    assert_clean_failure(result, trained, before, "class 'cyan' has no readable image")
    assert "skipped cyan/a.jpg" in result.stderr


def test_class_already_learned(trained: Path, task_factory, runner) -> None:
    folder = task_factory("again", ["red", "blue"])
    before = snapshot(trained)
    result = invoke(runner, "add-task", "-w", trained, folder)
    assert_clean_failure(result, trained, before, "class already learned by an earlier task: 'red' (task 1)")


def test_first_task_needs_two_classes(workspace: Path, task_factory, runner) -> None:
    before = snapshot(workspace)
    result = invoke(runner, "add-task", "-w", workspace, task_factory("one", ["red"]))
    assert_clean_failure(result, workspace, before, "at least two classes")


def test_workspace_that_does_not_exist(tmp_path: Path, task_factory, runner) -> None:
    result = invoke(runner, "add-task", "-w", tmp_path / "missing", task_factory("a", ["red", "green"]))
    assert_clean_failure(result, None, None, "clipcl init")
    assert not (tmp_path / "missing").exists()


def test_duplicate_task_name(trained: Path, task_factory, runner) -> None:
    before = snapshot(trained)
    result = invoke(runner, "add-task", "-w", trained, task_factory("first2", ["blue", "cyan"]), "--name", "first")
    assert_clean_failure(result, trained, before, "a task named 'first' exists already")


def test_unknown_flag_is_one_line(trained: Path, task_factory, runner) -> None:
    before = snapshot(trained)
    result = invoke(runner, "add-task", "-w", trained, task_factory("x", ["blue", "cyan"]), "--epoch", "3")
    assert_clean_failure(result, trained, before, "No such option")


def test_bad_precision(trained: Path, task_factory, runner) -> None:
    before = snapshot(trained)
    result = invoke(runner, "add-task", "-w", trained, task_factory("x", ["blue", "cyan"]), "--precision", "fp8")
    assert_clean_failure(result, trained, before, "--precision must be one of")


def test_init_into_an_existing_workspace(trained: Path, tiny_config: Path, tiny_weights: Path, runner) -> None:
    before = snapshot(trained)
    result = invoke(runner, "init", "-w", trained, "--model", tiny_config, "--pretrained", tiny_weights)
    assert_clean_failure(result, trained, before, "a workspace already exists")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "ViT-B-17"], "unknown model 'ViT-B-17'"),
        (["--model", "ViT-B-16", "--pretrained", "not-a-tag"], "unknown pretrained tag"),
        (["--model", "ViT-B-16", "--pretrained", "/nowhere/weights.safetensors"], "weights file not found"),
        (["--model", "/nowhere/Config.json"], "model config not found"),
        (["--model", "ViT-B-16"], "--pretrained is required"),
        (["--model", "ViT-B-16", "--pretrained", "openai", "--method", "nope"], "unknown method 'nope'"),
        (["--model", "ViT-B-16", "--pretrained", "openai", "--set", "lora_rank=many"], "expected int"),
        (["--model", "ViT-B-16", "--pretrained", "openai", "--set", "colour=red"], "has no option 'colour'"),
        (["--model", "ViT-B-16", "--pretrained", "openai", "--set", "context_tokens=0"], "context_tokens"),
        (["--model", "ViT-B-16", "--pretrained", "openai", "--set", "lora_rank=0"], "lora_rank >= 1"),
        (["--model", "ViT-B-16", "--pretrained", "openai", "--set", "router=nearest"], "router must be one of"),
        (["--model", "ViT-B-16", "--pretrained", "openai", "--set", "router_shrinkage=0"], "router_shrinkage"),
        (["--model", "ViT-B-16", "--pretrained", "openai", "--method", "finetune", "--set", "lora_dropout=1"],
         "lora_dropout < 1"),
    ],
)
def test_init_rejects_bad_model_and_method_options(tmp_path: Path, runner, args: list[str], needle: str) -> None:
    result = invoke(runner, "init", "-w", tmp_path / "ws", *args)
    assert_clean_failure(result, None, None, needle)
    assert not (tmp_path / "ws").exists()


def test_error_from_a_dataloader_worker_is_reduced_to_its_own_line() -> None:
    from clipcl.cli import _one_line

    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\nclipcl.errors.DataError: cannot read /data/a.jpg\n')
    assert _one_line(wrapped) == "cannot read /data/a.jpg"


# Bad input across every command, on a workspace that has learned one task: each case must exit 2 with one
# "error:" line, no traceback, and leave every byte of the workspace as it was. {ws} is the workspace, {data} a
# fresh task folder (blue, cyan), {image} one of task 1's images.
BAD_INPUT = [
    (["add-task", "-w", "{ws}", "{data}", "--name", "../escape"], "may not hold '/'"),
    (["add-task", "-w", "{ws}", "{data}", "--name", "/etc/passwd"], "may not hold '/'"),
    (["add-task", "-w", "{ws}", "{data}", "--name", "nul\x01byte"], "control characters"),
    (["add-task", "-w", "{ws}", "{data}", "--name", "x" * 300], "at most 100 characters"),
    (["add-task", "-w", "{ws}", "{data}", "--name", "   "], "cannot be empty"),
    (["add-task", "-w", "{ws}", "{long_class}"], "class folder name is longer than 200 characters"),
    (["add-task", "-w", "{ws}", "{control_class}"], "class folder name has control characters"),
    (["add-task", "-w", "{ws}", "{long_folder}"], "a task name is at most 100 characters"),
    (["add-task", "-w", "{ws}", "{data}", "--lr", "-1"], "--lr must be positive"),
    (["add-task", "-w", "{ws}", "{data}", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["add-task", "-w", "{ws}", "{data}", "--holdout", "1.5"], "Invalid value for '--holdout'"),
    (["add-task", "-w", "{ws}", "{data}", "--epochs-stage2", "2"], "trains in one stage"),
    (["add-task", "-w", "{ws}", "{data}", "--wait", "-3"], "Invalid value for '--wait'"),
    (["add-task", "-w", "{ws}", "--resume"], "nothing to resume"),
    (["add-task", "-w", "{ws}"], "needs a FOLDER"),
    (["add-task", "-w", "{ws}", "{ws}/manifest.json"], "not a folder"),
    (["predict", "-w", "{ws}", "{ws}/nothing-*.png"], "no image found at"),
    (["predict", "-w", "{ws}", "{image}", "--top-k", "0"], "Invalid value for '--top-k'"),
    (["predict", "-w", "{ws}", "{image}", "--route", "0"], "--route"),
    (["predict", "-w", "{ws}", "{image}", "--precision", "fp7"], "--precision must be one of"),
    (["eval", "-w", "{ws}", "--tasks", "9"], "no task '9'"),
    (["eval", "-w", "{ws}", "--tasks", "1,,x"], "--tasks"),
    (["eval", "-w", "{ws}", "--plot", "{ws}/../plot.txt"], "--plot"),
    (["eval", "-w", "{ws}", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["tasks", "-w", "{ws}/tasks"], "no workspace at"),
    (["bench", "{ws}", "--model", "{config}", "--methods", "dma"], "task-1"),
    (["init", "-w", "{ws}", "--model", "ViT-B-16", "--pretrained", "openai"], "a workspace already exists"),
    (["nonsense", "-w", "{ws}"], "No such command"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUT, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD_INPUT)])
def test_bad_input_changes_nothing(trained: Path, tmp_path: Path, tiny_config: Path, runner, args: list[str],
                                   needle: str) -> None:
    data = make_task(tmp_path / "new", ["blue", "cyan"], per_class=4)
    long_class = make_task(tmp_path / "long-class", ["blue"], per_class=2)
    shutil.copytree(long_class / "blue", long_class / ("c" * 220))
    control_class = make_task(tmp_path / "control-class", ["blue"], per_class=2)
    shutil.copytree(control_class / "blue", control_class / "bell\x07class")
    long_folder = make_task(tmp_path / ("f" * 150), ["blue", "cyan"], per_class=2)
    image = next((trained.parent / "data" / "first" / "red").iterdir())
    values = {"ws": str(trained), "data": str(data), "image": str(image), "config": str(tiny_config),
              "long_class": str(long_class), "control_class": str(control_class), "long_folder": str(long_folder)}
    before = snapshot(trained)
    result = invoke(runner, *[a.format(**values) for a in args])
    assert_clean_failure(result, trained, before, needle)
