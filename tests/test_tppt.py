"""tppt-v and tppt-vt: deep visual prompts that start as a no-op, the diversity term, and both methods learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_CONFIG, invoke, learn_two_tasks, make_task

from clipcl import Workspace
from clipcl.backbone import load_backbone, resolve_model_spec
from clipcl.errors import ModelError
from clipcl.methods import build_config, get_method_class
from clipcl.methods.losses import text_to_image_contrastive
from clipcl.methods.tppt import relational_diversity


def _method(name: str, tiny_config: Path, tiny_weights: Path):
    spec = resolve_model_spec(str(tiny_config), str(tiny_weights))
    backbone = load_backbone(spec, tiny_config.parent)
    method_class = get_method_class(name)
    return method_class(backbone, build_config(method_class))


@pytest.mark.parametrize("name", ["tppt-v", "tppt-vt"])
def test_prompts_at_their_initial_value_compute_the_frozen_model(name: str, tiny_config: Path, tiny_weights: Path,
                                                                 tmp_path: Path) -> None:
    from clipcl.methods import TaskInfo

    method = _method(name, tiny_config, tiny_weights)
    method.config.classifier = "text"  # (the hybrid classifier needs a finished task's prototypes)
    frozen = load_backbone(resolve_model_spec(str(tiny_config), str(tiny_weights)), tiny_config.parent)
    images = torch.rand(6, 3, 32, 32)
    torch.testing.assert_close(method.backbone.encode_images(images), frozen.encode_images(images),
                               rtol=1e-5, atol=1e-6)
    task = TaskInfo(1, ("red", "green", "blue"), 0)
    method.begin(task)
    text = frozen.encode_texts([f"a photo of a {c}." for c in task.classes])
    expected = (frozen.logit_scale() * frozen.encode_images(images) @ text.T).softmax(dim=-1)
    torch.testing.assert_close(method.predict_proba(images), expected, rtol=1e-5, atol=1e-6)
    # and the prompts are really in the computation once their gates open
    with torch.no_grad():
        method.visual_prompts.gates.fill_(1.0)
    method.text_features = None
    assert not torch.allclose(method.backbone.encode_images(images), frozen.encode_images(images), atol=1e-4)


def test_relational_diversity_is_zero_until_anchors_grow_closer() -> None:
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    initial = rotation[:5]  # five orthonormal anchors: every pair at cosine 0
    assert float(relational_diversity(initial, initial)) == 0.0
    spread = initial.clone()
    spread[1] = -initial[0]  # cosine -1 with anchor 0, still 0 with the others: farther apart is allowed
    assert float(relational_diversity(spread, initial)) == pytest.approx(0.0, abs=1e-10)
    collapsed = initial.clone()
    collapsed[1] = initial[0]  # anchors 0 and 1 on top of each other: cosine 1 instead of 0
    assert float(relational_diversity(collapsed, initial)) == pytest.approx(1.0 / 10, rel=1e-5)  # 1 pair of 10


def test_text_to_image_term_prefers_images_of_the_anchor_class() -> None:
    text = torch.eye(3)
    labels = torch.tensor([0, 0, 1, 2])
    matched = torch.nn.functional.one_hot(labels, 3).float()
    shuffled = matched[[2, 3, 0, 1]]
    scale = torch.tensor(10.0)
    assert text_to_image_contrastive(matched, text, labels, scale) < text_to_image_contrastive(shuffled, text,
                                                                                            labels, scale)


def test_a_model_without_a_vision_transformer_is_refused(tmp_path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    config = {**TINY_CONFIG, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16}}
    path = tmp_path / "TinyResNetCLIP.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    model = open_clip.create_model("TinyResNetCLIP")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    with pytest.raises(ModelError, match="deep visual prompts need a ViT image tower"):
        _method("tppt-v", path, tmp_path / "w.safetensors")


@pytest.mark.parametrize("name", ["tppt-v", "tppt-vt"])
def test_tppt_learns_and_keeps_old_tasks(name: str, tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                         runner) -> None:
    ws = tmp_path / name
    invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--method", name)
    # the prompts' gates start at zero, so a few steps need a larger rate than the default for generated data
    learn_two_tasks(runner, ws, tmp_path / "data", "--epochs", "5", "--batch-size", "8", "--workers", "0",
                    "--lr", "5e-2")
    workspace = Workspace.open(ws)
    records = [workspace.task_record(t) for t in workspace.tasks]
    assert records[0].accuracy.task >= 0.8  # learned (chance 0.5)
    assert records[1].accuracy.per_task[1] >= 0.5  # the new task, among four classes (chance 0.25)
    assert records[1].method["prompt_change"] > 0  # what task 2 changed in the one prompt set
    one, two = (workspace.task_tensors(t) for t in workspace.tasks)
    assert not torch.equal(one["vpt.tokens"], two["vpt.tokens"])
    assert ("prompt.shared" in two) == (name == "tppt-vt")
    table = invoke(runner, "tasks", "-w", ws, env={"COLUMNS": "220"})
    assert "prompt change" in table.stdout


def test_a_workspace_made_before_an_option_keeps_training_as_it_started() -> None:
    method_class = get_method_class("tppt-v")
    fresh = build_config(method_class)
    assert fresh.ce_classes == "current"
    stored = {k: v for k, v in vars(fresh).items() if k != "ce_classes"}  # a manifest written before the option
    assert build_config(method_class, stored=stored).ce_classes == "seen"
    # one written before the stability options and the hybrid classifier trains and answers as it did
    before = {k: v for k, v in vars(fresh).items()
              if k not in ("kd_weight", "kd_temperature", "later_lr", "attention", "classifier", "text_weight")}
    old = build_config(method_class, stored=before)
    assert (old.kd_weight, old.later_lr, old.attention, old.classifier) == (0.0, 1.0, "gated", "text")
    assert (fresh.kd_weight, fresh.later_lr, fresh.classifier) == (1.0, 0.01, "hybrid")
    assert method_class.default_training(old) == (5, 1e-2) and method_class.default_training(fresh) == (2, 1e-2)


def _two_tasks(method, images: torch.Tensor) -> None:
    """Task 1 (red, green) learned with prompts moved at random, then task 2 (blue, yellow) begun."""
    from clipcl.methods import TaskInfo

    first = TaskInfo(1, ("red", "green"), 0)
    method.begin(first)
    with torch.no_grad():
        method.visual_prompts.tokens.add_(torch.randn_like(method.visual_prompts.tokens))
        method.visual_prompts.gates.fill_(0.5)
    method.finish([(images, torch.tensor([0, 1] * (len(images) // 2)))])
    method.begin(TaskInfo(2, ("blue", "yellow"), 2))


@pytest.mark.parametrize("name", ["tppt-v", "tppt-vt"])
def test_distillation_is_zero_until_the_prompts_move(name: str, tiny_config: Path, tiny_weights: Path) -> None:
    method = _method(name, tiny_config, tiny_weights)
    method.config.kd_weight = 1.0
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _two_tasks(method, images)
    features, text = method.backbone.encode_images(images), method.class_text()
    assert float(method.old_class_distillation(images, features, text).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # (not a rescaling: the blocks' layer norm would undo it)
        method.visual_prompts.tokens.add_(torch.randn_like(method.visual_prompts.tokens))
    moved = method.backbone.encode_images(images)
    assert float(method.old_class_distillation(images, moved, text).detach()) > 1e-4
    # the previous prompts were only borrowed: the current ones are back after the teacher's pass
    torch.testing.assert_close(method.backbone.encode_images(images), moved)


def test_hybrid_classifier_with_text_weight_one_is_the_anchor_classifier(tiny_config: Path,
                                                                         tiny_weights: Path) -> None:
    method = _method("tppt-v", tiny_config, tiny_weights)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _two_tasks(method, images)
    method.finish([(images, torch.tensor([2, 3] * 4))])
    method.config.classifier = "text"
    text_only = method.predict_proba(images)
    method.config.classifier = "hybrid"
    method.config.text_weight = 1.0
    torch.testing.assert_close(method.predict_proba(images), text_only)
    method.config.text_weight = 0.0  # the visual prototypes alone: an lda on the prompted features
    features = method.backbone.encode_images(images).float()
    torch.testing.assert_close(method.predict_proba(images),
                               method.prototypes.log_likelihoods(features).softmax(dim=-1).float())
    assert not torch.allclose(method.predict_proba(images), text_only, atol=1e-3)


def test_absolute_diversity_pushes_apart_anchors_that_started_parallel() -> None:
    parallel = torch.ones(3, 4) + 0.01 * torch.eye(3, 4)
    assert float(relational_diversity(parallel, parallel)) == 0.0  # relative: never fires
    assert float(relational_diversity(parallel, None, cap=0.8)) > 0.03  # absolute: every pair is above the cap
    assert float(relational_diversity(torch.eye(3, 4), None, cap=0.8)) == 0.0


def test_stability_options_train_keep_earlier_tasks_and_answer_both_ways(tmp_path: Path, tiny_config: Path,
                                                                         tiny_weights: Path, runner) -> None:
    import hashlib

    ws = tmp_path / "ws"
    invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--method", "tppt-vt",
           "--set", "kd_weight=1", "--set", "later_lr=0.1", "--set", "attention=joint",
           "--set", "diversity=absolute", "--set", "classifier=hybrid")
    args = ("--epochs", "2", "--batch-size", "8", "--workers", "0", "--lr", "5e-2")
    invoke(runner, "add-task", "-w", ws, make_task(tmp_path / "a", ["red", "green"]), *args)
    workspace = Workspace.open(ws)
    first_file = workspace.task_path(workspace.tasks[0]) / "tensors.safetensors"
    assert first_file.is_file()
    before = hashlib.sha256(first_file.read_bytes()).hexdigest()
    invoke(runner, "add-task", "-w", ws, make_task(tmp_path / "b", ["blue", "yellow"]), *args)
    assert hashlib.sha256(first_file.read_bytes()).hexdigest() == before
    workspace = Workspace.open(ws)
    records = [workspace.task_record(t) for t in workspace.tasks]
    assert [r.method["lr_scale"] for r in records] == [1.0, 0.1]
    assert "mean_gate" not in records[1].method  # joint attention has no gates
    tensors = workspace.task_tensors(workspace.tasks[1])
    assert tensors["hybrid.feature_means"].shape[0] == 2  # task 2's own two prototypes
    for classifier in ("hybrid", "text"):
        result = invoke(runner, "eval", "-w", ws, "--json", "--set", f"classifier={classifier}")
        assert result.exit_code == 0, result.output
        assert 0.0 <= json.loads(result.stdout)["accuracy"] <= 1.0
