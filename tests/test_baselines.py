"""The no-training baselines run through the same CLI, engine and workspace as every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, invoke

from clipcl import Workspace
from clipcl.evaluation import heldout_dataset


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
    # eval reproduces the stored task-given accuracy, which is never below the accuracy among all classes
    report = json.loads(invoke(runner, "eval", "-w", ws, "--json").stdout)
    assert [t["within_task_accuracy"] for t in report["per_task"]] == details["accuracy"]["within_task"]
    assert all(t["within_task_accuracy"] >= t["accuracy"] for t in report["per_task"])
    assert report["within_task_accuracy"] >= report["accuracy"]
    table = invoke(runner, "eval", "-w", ws, env={"COLUMNS": "160"})
    assert "task given" in table.stdout and "task-id" not in table.stdout


def test_zeroshot_scores_are_clip_zero_shot_probabilities(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                          task_factory, runner) -> None:
    ws = _init(runner, tmp_path, tiny_config, tiny_weights, "zeroshot")
    result = invoke(runner, "add-task", "-w", ws, task_factory("a", ["red", "green"]), *FAST)
    assert result.exit_code == 0, result.output
    invoke(runner, "add-task", "-w", ws, task_factory("b", ["blue", "yellow"]), *FAST)
    workspace = Workspace.open(ws)
    method = workspace.build_method()
    dataset = heldout_dataset(method, workspace.tasks[0].info, workspace.task_record(workspace.tasks[0]))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    backbone = method.backbone
    text = backbone.encode_texts([f"a photo of a {c}." for c in workspace.classes])
    expected = (backbone.logit_scale() * backbone.encode_images(images) @ text.T).softmax(dim=-1)
    torch.testing.assert_close(method.predict_proba(images), expected)


def test_lda_learns_without_training_and_pools_the_covariance_over_tasks(tmp_path: Path, tiny_config: Path,
                                                                         tiny_weights: Path, task_factory,
                                                                         runner) -> None:
    from clipcl.data import ImageDataset, scan_task_folder

    ws = _init(runner, tmp_path, tiny_config, tiny_weights, "lda")
    folders = [task_factory("a", ["red", "green"]), task_factory("b", ["blue", "yellow", "cyan"])]
    assert invoke(runner, "add-task", "-w", ws, folders[0], *FAST).exit_code == 0
    first = (ws / "tasks/task-001/tensors.safetensors").read_bytes()
    result = invoke(runner, "add-task", "-w", ws, folders[1], *FAST)
    assert result.exit_code == 0, result.output
    assert (ws / "tasks/task-001/tensors.safetensors").read_bytes() == first
    details = json.loads((ws / "tasks/task-002/task.json").read_text())
    assert details["training"]["steps"] == 0 and details["accuracy"]["all"] >= 0.9

    # the pooled covariance equals the within-class covariance of the frozen features computed here, directly
    method = Workspace.open(ws).build_method()
    centred, offset = [], 0
    for folder in folders:
        data = scan_task_folder(folder, holdout=0.2, seed=0)
        dataset = ImageDataset(data.root, data.train, method.backbone.eval_transform)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        with torch.no_grad():
            features = method.backbone.encode_images(images).double()
        for label in labels.unique():
            rows = features[labels == label]
            centred.append(rows - rows.mean(dim=0))
        offset += len(data.classes)
    stacked = torch.cat(centred)
    torch.testing.assert_close(method.gaussian.covariance(), stacked.T @ stacked / len(stacked), rtol=1e-4,
                               atol=1e-6)
    probs = method.predict_proba(images)
    assert probs.shape == (len(images), offset)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(images)))
    bad = invoke(runner, "init", "-w", tmp_path / "bad", "--model", tiny_config, "--pretrained", tiny_weights,
                 "--method", "lda", "--set", "shrinkage=0")
    assert bad.exit_code == 2 and "0 < shrinkage <= 1" in bad.stderr
    assert 0 < details["method"]["shrinkage"] <= 1  # Ledoit-Wolf's estimate, recorded with the task


def test_ledoit_wolf_shrinkage_matches_scikit_learns_formula() -> None:
    """The estimate from the stored per-task sums equals the one computed from all centred features at once."""
    from clipcl.methods import TaskInfo
    from clipcl.methods.components import PooledGaussian

    generator = torch.Generator().manual_seed(0)
    pooled = PooledGaussian("lda.", None)
    centred = []
    for index, n in ((1, 40), (2, 25)):
        features = torch.randn(n, 6, generator=generator) * torch.tensor([3.0, 1, 1, 0.5, 0.2, 0.1])
        labels = torch.arange(n) % 2
        pooled.add(TaskInfo(index, ("a", "b"), 2 * (index - 1)), pooled.statistics(features, labels, 2),
                   torch.device("cpu"))
        means = torch.stack([features[labels == c].mean(0) for c in (0, 1)])
        centred.append((features - means[labels]).double())
    x = torch.cat(centred)
    n, p = x.shape
    covariance = x.T @ x / n
    mu = covariance.trace() / p
    beta = ((x.pow(2).sum(1) ** 2).sum() / n - (covariance**2).sum()) / (p * n)
    delta = ((covariance - mu * torch.eye(p, dtype=x.dtype)) ** 2).sum() / p
    expected = float(min(beta, delta) / delta)
    assert 0 < expected < 1
    assert pooled.effective_shrinkage() == pytest.approx(expected, rel=1e-4)
