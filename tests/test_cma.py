"""cma: zero-initialised adapters compute the frozen model, frozen experts stay frozen, the loss terms, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import invoke, learn_two_tasks

from clipcl import Workspace
from clipcl.backbone import load_backbone, resolve_model_spec
from clipcl.methods import TaskInfo, build_config, get_method_class
from clipcl.methods.losses import distillation, relation_preservation, symmetric_image_text_contrastive

FAST = ("--epochs", "4", "--batch-size", "8", "--workers", "0", "--lr", "1e-2")


def _cma(tiny_config: Path, tiny_weights: Path, **options: str):
    backbone = load_backbone(resolve_model_spec(str(tiny_config), str(tiny_weights)), tiny_config.parent)
    method_class = get_method_class("cma")
    return method_class(backbone, build_config(method_class, options)), backbone


def test_zero_initialised_adapters_compute_the_frozen_model(tiny_config: Path, tiny_weights: Path) -> None:
    method, _ = _cma(tiny_config, tiny_weights, blocks="2", class_prompts="false")
    frozen = load_backbone(resolve_model_spec(str(tiny_config), str(tiny_weights)), tiny_config.parent)
    task = TaskInfo(1, ("red", "green", "blue"), 0)
    method.begin(task)
    images = torch.rand(5, 3, 32, 32)
    text = frozen.encode_texts([f"a photo of a {c}." for c in task.classes])
    expected = (frozen.logit_scale() * frozen.encode_images(images) @ text.T).softmax(dim=-1)
    torch.testing.assert_close(method.predict_proba(images), expected, rtol=1e-5, atol=1e-6)
    # the adapters are in the computation: a non-zero up-projection changes the features
    with torch.no_grad():
        for layer in method.adapters.layers:
            for up in layer.up:
                up.normal_(0, 0.5)
    assert not torch.allclose(method.encode(images), frozen.encode_images(images), atol=1e-4)


def test_each_image_mixes_its_top_k_experts(tiny_config: Path, tiny_weights: Path) -> None:
    method, _ = _cma(tiny_config, tiny_weights, experts="5", top_k="2")
    method.begin(TaskInfo(1, ("red", "green"), 0))
    layer = method.adapters.layers[0]
    tokens = torch.randn(4, 7, layer.down[0].shape[0])
    out, weights = layer(tokens, method.anchors.of(method.tasks).mean(dim=0))
    assert out.shape == tokens.shape
    assert ((weights > 0).sum(dim=1) == 2).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(4))


def test_loss_terms_vanish_or_rank_as_they_should() -> None:
    features = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    assert float(relation_preservation(features, features)) == 0.0  # identical models
    assert float(relation_preservation(features, torch.nn.functional.normalize(torch.randn(6, 8), dim=-1))) > 0
    logits = torch.randn(6, 4)
    assert float(distillation(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation(logits, -logits, 2.0)) > 0.1
    text = torch.eye(3, 8)
    labels = torch.tensor([0, 0, 1, 2, 1, 2])
    matched = text[labels]
    scale = torch.tensor(10.0)
    shuffled = matched[[2, 3, 0, 1, 5, 4]]
    assert symmetric_image_text_contrastive(matched, text, labels, scale) < \
        symmetric_image_text_contrastive(shuffled, text, labels, scale)


def test_cma_learns_freezes_experts_and_keeps_them_frozen(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                         runner) -> None:
    ws = tmp_path / "ws"
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--method", "cma",
                    "--set", "experts=4", "--set", "freeze_per_task=1")
    assert result.exit_code == 0, result.output
    learn_two_tasks(runner, ws, tmp_path / "data", *FAST)

    workspace = Workspace.open(ws)
    records = [workspace.task_record(t) for t in workspace.tasks]
    assert records[0].accuracy.task >= 0.8  # learned (chance 0.5)
    assert records[1].accuracy.per_task[1] >= 0.5  # the new task among four classes (chance 0.25)
    one, two = (workspace.task_tensors(t) for t in workspace.tasks)
    frozen_after_one = one["moe.frozen"]
    assert frozen_after_one.sum(dim=1).tolist() == [1]  # one expert per adapted block (the tiny model has one)
    assert (two["moe.frozen"] >= frozen_after_one).all()
    # the experts frozen after task 1 are bit-identical after task 2; free ones that task 2 routed to (and the
    # router) moved
    unchanged = []
    for expert in range(4):
        keys = [f"moe.layers.0.{part}.{expert}" for part in ("down", "down_bias", "up", "up_bias")]
        unchanged.append(all(torch.equal(one[k], two[k]) for k in keys))
    frozen_experts = frozen_after_one[0].tolist()
    assert all(same for same, frozen in zip(unchanged, frozen_experts, strict=True) if frozen)
    assert not all(same for same, frozen in zip(unchanged, frozen_experts, strict=True) if not frozen)
    assert not torch.equal(one["moe.layers.0.router.weight"], two["moe.layers.0.router.weight"])
    recorded = records[0].method["frozen_experts"]
    assert recorded == {"block 1": torch.nonzero(frozen_after_one[0]).flatten().tolist()}
    table = invoke(runner, "tasks", "-w", ws, env={"COLUMNS": "220"})
    assert "frozen experts: block 1" in table.stdout

    # restoring tasks 1..2 from the workspace reproduces the stored evaluation exactly
    report = invoke(runner, "eval", "-w", ws, "--json")
    assert report.exit_code == 0, report.output
    import json

    assert json.loads(report.stdout)["accuracy"] == pytest.approx(records[1].accuracy.all)


def test_bad_cma_options_are_one_line_errors(tmp_path: Path, tiny_config: Path, tiny_weights: Path, runner) -> None:
    for option in ("top_k=9", "freeze_per_task=-1", "kd_temperature=0", "template=no-slot"):
        result = invoke(runner, "init", "-w", tmp_path / option, "--model", tiny_config, "--pretrained",
                        tiny_weights, "--method", "cma", "--set", option)
        assert result.exit_code != 0
        assert "cma" in result.output and "Traceback" not in result.output
        assert not (tmp_path / option).exists()
