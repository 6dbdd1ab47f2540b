"""Every registered method, clipcl's own and any added later, held to the contract the engine relies on.

Parametrised over :func:`clipcl.available_methods`, so a new method is tested here without anyone listing it: two
generated tasks learned through the CLI; restoring tasks 1..i reproduces the evaluation row ``add-task`` stored after
task i; the first task's files are byte-identical after the second; probabilities have one column per class and rows
that sum to one; an interrupted run resumes to the tensors of an uninterrupted one; bad options are one-line errors.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import invoke, make_task, snapshot
from typer.testing import CliRunner

from clipcl import ClipclError, TrainOptions, Workspace, add_task, load_backbone
from clipcl.evaluation import evaluate_tasks, heldout_dataset
from clipcl.methods import available_methods, build_config, get_method_class
from clipcl.runtime import Progress, make_accelerator

METHODS = sorted(available_methods())
EPOCHS = 2
TRAIN = ("--epochs", str(EPOCHS), "--batch-size", "8", "--workers", "0", "--lr", "5e-3", "--seed", "1")
TASKS = (("warm", ["red", "green"]), ("cool", ["blue", "yellow"]))


@dataclass
class Learned:
    method: str
    workspace: Path
    folders: list[Path]
    task_one_files: dict[str, bytes]  # every file of task 1's folder right after task 1


@pytest.fixture(scope="module", params=METHODS)
def learned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_config: Path,
            tiny_weights: Path) -> Learned:
    """A workspace of the method that learned two generated tasks through the CLI."""
    runner = CliRunner()
    root = tmp_path_factory.mktemp(f"contract-{request.param}")
    ws = root / "ws"
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights,
                    "--method", request.param)
    assert result.exit_code == 0, result.output
    folders, task_one = [], {}
    for i, (name, classes) in enumerate(TASKS):
        folders.append(make_task(root / "data" / name, classes, per_class=8))
        result = invoke(runner, "add-task", "-w", ws, folders[-1], *TRAIN)
        assert result.exit_code == 0, result.output
        if i == 0:
            task_one = snapshot(ws / "tasks" / "task-001")
    return Learned(request.param, ws, folders, task_one)


def test_an_earlier_task_is_never_rewritten(learned: Learned) -> None:
    assert snapshot(learned.workspace / "tasks" / "task-001") == learned.task_one_files


def test_restoring_tasks_one_to_i_reproduces_the_row_stored_after_task_i(learned: Learned) -> None:
    workspace = Workspace.open(learned.workspace)
    method_class = get_method_class(learned.method)
    config = build_config(method_class, stored=workspace.method_config)
    method = method_class(load_backbone(workspace.model_spec, workspace.path / "model"), config)
    accelerator = make_accelerator("fp32")
    for stored in workspace.tasks:  # the state after each task in turn
        method.restore(stored.info, workspace.task_tensors(stored))
        sets = [(task.info, heldout_dataset(method, task.info, workspace.task_record(task)))
                for task in workspace.tasks[: stored.info.index]]
        evaluation = evaluate_tasks(method, sets, accelerator, 8, 0, Progress())
        record = workspace.task_record(stored)
        assert evaluation.per_task == record.accuracy.per_task
        assert evaluation.task_id_accuracy == record.accuracy.task_id


def test_probabilities_cover_every_class_and_sum_to_one(learned: Learned) -> None:
    workspace = Workspace.open(learned.workspace)
    method = workspace.build_method()
    images = torch.stack([heldout_dataset(method, t.info, workspace.task_record(t))[0][0] for t in workspace.tasks])
    prediction = method.predict(images)
    assert prediction.probs.shape == (len(images), len(workspace.classes)) == (2, 4)
    assert (prediction.probs >= 0).all()
    torch.testing.assert_close(prediction.probs.sum(dim=1), torch.ones(len(images)), rtol=0, atol=1e-5)
    if prediction.task_scores is not None:
        assert method.routes_tasks and prediction.task_scores.shape == (len(images), len(workspace.tasks))
    assert torch.equal(method.predict_proba(images), method.predict(images).probs)


def test_frozen_features_handed_back_give_the_same_answer(learned: Learned) -> None:
    """A method that declares a frozen part (kept by the evaluation between runs, clipcl.feature_cache) answers the
    same when handed it as when it computes it, and the part does not depend on the tasks learned."""
    workspace = Workspace.open(learned.workspace)
    method = workspace.build_method()
    if method.frozen_features_key() is None:
        pytest.skip(f"{learned.method} declares no frozen features")
    images = torch.stack([heldout_dataset(method, t.info, workspace.task_record(t))[0][0] for t in workspace.tasks])
    frozen = method.frozen_features(images)
    assert frozen.dtype == torch.float32 and frozen.shape[0] == len(images)
    plain, handed = method.predict(images), method.predict(images, frozen=frozen.clone())
    torch.testing.assert_close(handed.probs, plain.probs)
    assert handed.encoder_passes == plain.encoder_passes
    method_class = get_method_class(learned.method)
    first_only = method_class(load_backbone(workspace.model_spec, workspace.path / "model"),
                              build_config(method_class, stored=workspace.method_config))
    first_only.restore(workspace.tasks[0].info, workspace.task_tensors(workspace.tasks[0]))
    torch.testing.assert_close(first_only.eval().frozen_features(images), frozen)  # what task 2 learned: no matter


class Interrupted(Exception):
    """Stands for a kill: raised at an epoch's end, after its checkpoint was written."""


def test_an_interrupted_run_resumes_to_the_tensors_of_an_uninterrupted_one(learned: Learned, tmp_path: Path,
                                                                           tiny_config: Path, tiny_weights: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import clipcl.engine

    ws = tmp_path / "ws"
    assert invoke(CliRunner(), "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights,
                  "--method", learned.method).exit_code == 0
    stages = len(get_method_class(learned.method).stages)
    stop_at = EPOCHS * (stages - 1) + 1  # the first epoch of the last stage: finished stages are resumed too
    hits = []

    def failpoint(name: str) -> None:
        if name == "epoch":
            hits.append(name)
            if len(hits) == stop_at:
                raise Interrupted

    monkeypatch.setattr(clipcl.engine, "failpoint", failpoint)
    options = TrainOptions(epochs=EPOCHS, batch_size=8, workers=0, lr=5e-3, seed=1)
    trains = get_method_class(learned.method).default_epochs > 0
    if trains:
        with pytest.raises(Interrupted):
            add_task(ws, learned.folders[0], options)
        assert not Workspace.open(ws).tasks and (ws / ".resume" / "state.json").is_file()
        with pytest.raises(ClipclError, match="drop --epochs"):  # the library refuses what the CLI refuses
            add_task(ws, None, TrainOptions(epochs=EPOCHS), resume=True)
        report = add_task(ws, None, resume=True)
        assert report.record.training.epochs == EPOCHS  # the interrupted run's settings
    else:  # nothing trains, so nothing is checkpointed: a plain run
        add_task(ws, learned.folders[0], options)
        assert not hits
    assert not (ws / ".resume").exists()
    resumed = (ws / "tasks" / "task-001" / "tensors.safetensors").read_bytes()
    assert resumed == learned.task_one_files["tensors.safetensors"]


def _bad_values(method: str) -> list[tuple[str, str]]:
    """An unknown option, and a value of the wrong type for each numeric option of ``method``."""
    config_class = get_method_class(method).config_class
    types = typing.get_type_hints(config_class)
    wrong = [(f"{f.name}=not-a-number", "expected") for f in dataclasses.fields(config_class)
             if types[f.name] in (int, float)]
    return [("no_such_option=1", "has no option"), *wrong]


@pytest.mark.parametrize("method", METHODS)
def test_bad_options_are_one_line_errors_and_create_nothing(method: str, tmp_path: Path, tiny_config: Path,
                                                           tiny_weights: Path, runner) -> None:
    for option, needle in _bad_values(method):
        target = tmp_path / option.split("=")[0]
        result = invoke(runner, "init", "-w", target, "--model", tiny_config, "--pretrained", tiny_weights,
                        "--method", method, "--set", option)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and needle in errors[0], (option, result.output)
        assert "Traceback" not in result.output and not target.exists()
