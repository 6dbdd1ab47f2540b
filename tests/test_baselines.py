"""The no-training baselines run through the same CLI, engine and workspace as every method."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import FAST, invoke

from clipcl import Workspace
from clipcl.engine import heldout_dataset


def _init(runner, tmp_path: Path, tiny_config: Path, tiny_weights: Path, method: str) -> Path:
    ws = tmp_path / method
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--method", method)
    assert result.exit_code == 0, result.output
    return ws


def test_ncm_learns_without_training_and_keeps_old_tasks(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                          task_factory, runner) -> None:
    ws = _init(runner, tmp_path, tiny_config, tiny_weights, "ncm")
    invoke(runner, "add-task", "-w", ws, task_factory("a", ["red", "green"]), *FAST)
    first = (ws / "tasks/task-001/tensors.safetensors").read_bytes()
    result = invoke(runner, "add-task", "-w", ws, task_factory("b", ["blue", "yellow"]), *FAST)
    assert result.exit_code == 0, result.output
    details = json.loads((ws / "tasks/task-002/task.json").read_text())
    assert details["training"]["steps"] == 0
    assert details["accuracy"]["all"] >= 0.9  # distinct colours are easy for class means, even on random features
    assert (ws / "tasks/task-001/tensors.safetensors").read_bytes() == first


def test_zeroshot_scores_are_clip_zero_shot_probabilities(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                          task_factory, runner) -> None:
    ws = _init(runner, tmp_path, tiny_config, tiny_weights, "zeroshot")
    result = invoke(runner, "add-task", "-w", ws, task_factory("a", ["red", "green"]), *FAST)
    assert result.exit_code == 0, result.output
    invoke(runner, "add-task", "-w", ws, task_factory("b", ["blue", "yellow"]), *FAST)
    workspace = Workspace.open(ws)
    method = workspace.build_method()
    dataset = heldout_dataset(method, workspace.tasks[0].info, workspace.task_json(workspace.tasks[0]))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    backbone = method.backbone
    text = backbone.encode_texts([f"a photo of a {c}." for c in workspace.classes])
    expected = (backbone.logit_scale() * backbone.encode_images(images) @ text.T).softmax(dim=-1)
    torch.testing.assert_close(method.predict_proba(images), expected)
