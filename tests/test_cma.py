"""cma: zero-initialised adapters compute the frozen model, frozen experts stay frozen, the loss terms, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import invoke, learn_two_tasks

from clipcl import Workspace
from clipcl.backbone import load_backbone, resolve_model_spec
from clipcl.errors import ClipclError
from clipcl.methods import TaskInfo, build_config, get_method_class
from clipcl.methods.losses import distillation, relation_preservation, symmetric_image_text_contrastive

FAST = ("--epochs", "4", "--batch-size", "8", "--workers", "0", "--lr", "1e-2")


def _cma(tiny_config: Path, tiny_weights: Path, **options: str):
    backbone = load_backbone(resolve_model_spec(str(tiny_config), str(tiny_weights)), tiny_config.parent)
    method_class = get_method_class("cma")
    return method_class(backbone, build_config(method_class, options)), backbone


def test_zero_initialised_adapters_compute_the_frozen_model(tiny_config: Path, tiny_weights: Path) -> None:
    method, _ = _cma(tiny_config, tiny_weights, blocks="2", class_prompts="false", calibration="none",
                     classifier="text")
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
                    "--set", "experts=4", "--set", "freeze_per_task=1", "--set", "blocks=-1")
    assert result.exit_code == 0, result.output
    learn_two_tasks(runner, ws, tmp_path / "data", *FAST)

    workspace = Workspace.open(ws)
    records = [workspace.task_record(t) for t in workspace.tasks]
    assert records[0].accuracy.task >= 0.8  # learned (chance 0.5)
    assert records[1].accuracy.per_task[1] >= 0.5  # the new task among four classes (chance 0.25)
    one, two = (workspace.task_tensors(t) for t in workspace.tasks)
    frozen_after_one = one["moe.frozen"]
    assert frozen_after_one.sum(dim=1).tolist() == [1, 1]  # one expert per adapted block (every block of two)
    assert (two["moe.frozen"] >= frozen_after_one).all()
    # the experts frozen after task 1, and their router rows, are bit-identical after task 2; free ones that task 2
    # routed to, and their rows, moved
    for layer in range(2):
        frozen = frozen_after_one[layer].tolist()
        same_expert, same_row = [], []
        for expert in range(4):
            keys = [f"moe.layers.{layer}.{part}.{expert}" for part in ("down", "down_bias", "up", "up_bias")]
            same_expert.append(all(torch.equal(one[k], two[k]) for k in keys))
            same_row.append(all(torch.equal(one[f"moe.layers.{layer}.{part}"][expert],
                                            two[f"moe.layers.{layer}.{part}"][expert])
                                for part in ("router.weight", "router.bias", "noise.weight")))
        assert all(same for same, f in zip(same_expert, frozen, strict=True) if f)
        assert all(same for same, f in zip(same_row, frozen, strict=True) if f)
        assert not all(same for same, f in zip(same_expert, frozen, strict=True) if not f)
        assert not all(same for same, f in zip(same_row, frozen, strict=True) if not f)
    recorded = records[0].method["frozen_experts"]
    assert recorded == {f"block {b}": torch.nonzero(frozen_after_one[b]).flatten().tolist() for b in range(2)}
    table = invoke(runner, "tasks", "-w", ws, env={"COLUMNS": "220"})
    assert "frozen experts: block 0" in table.stdout

    # restoring tasks 1..2 from the workspace reproduces the stored evaluation exactly
    report = invoke(runner, "eval", "-w", ws, "--json")
    assert report.exit_code == 0, report.output
    import json

    assert json.loads(report.stdout)["accuracy"] == pytest.approx(records[1].accuracy.all)


def test_bad_cma_options_are_one_line_errors(tmp_path: Path, tiny_config: Path, tiny_weights: Path, runner) -> None:
    for option in ("top_k=23", "freeze_per_task=-1", "kd_temperature=0", "template=no-slot", "calibration=bias",
                   "router_input=text", "dropout=1", "blocks=-2", "freeze_by=age"):
        result = invoke(runner, "init", "-w", tmp_path / option, "--model", tiny_config, "--pretrained",
                        tiny_weights, "--method", "cma", "--set", option)
        assert result.exit_code != 0
        assert "cma" in result.output and "Traceback" not in result.output
        assert not (tmp_path / option).exists()


def test_router_rows_store_in_the_linear_layout_and_load_back(tiny_config: Path, tiny_weights: Path) -> None:
    method, _ = _cma(tiny_config, tiny_weights, experts="3", router_noise="false")
    layer = method.adapters.layers[0]
    state = layer.state_dict()
    width = layer.down[0].shape[0]
    assert state["router.weight"].shape == (3, width) and state["router.bias"].shape == (3,)
    assert not any(key.startswith("router.weight_") for key in state)  # rows are parameters, not stored keys
    assert "noise.weight" not in state
    changed = {key: value + 1 if key.startswith("router.") else value for key, value in state.items()}
    layer.load_state_dict(changed)
    torch.testing.assert_close(layer.router.weight(), state["router.weight"] + 1)
    with pytest.raises(RuntimeError, match=r"router\.weight"):
        layer.load_state_dict({**changed, "router.weight": torch.zeros(4, width)})


def test_workspaces_made_before_the_recipe_keep_training_as_they_started(tiny_config: Path) -> None:
    method_class = get_method_class("cma")
    fresh = build_config(method_class)
    assert method_class.default_training(fresh) == (1, 1e-3)
    assert (fresh.adapter_input, fresh.router_input, fresh.calibration, fresh.classifier, fresh.blocks) == \
        ("residual", "image", "replay", "gaussian", 0)
    # a stored config from before the options existed: every new option takes the old behaviour, and 5 epochs
    stored = {"blocks": 0, "experts": 8, "top_k": 2, "width": 64, "freeze_per_task": 2, "kd_weight": 1.0,
              "kd_temperature": 2.0, "align_weight": 0.5, "relation_weight": 1.0, "class_prompts": True,
              "template": "a photo of a {}.", "context_tokens": 8, "context_init": "a photo of a",
              "ce_classes": "current"}
    legacy = build_config(method_class, stored=stored)
    assert (legacy.adapter_input, legacy.scale, legacy.dropout, legacy.router_input, legacy.router_noise,
            legacy.freeze_router_rows, legacy.freeze_by, legacy.calibration, legacy.classifier) == \
        ("normalized", 1.0, 0.0, "image+text", False, False, "weight", "none", "text")
    assert method_class.default_training(legacy) == (5, 1e-3)


def _two_task_method(tiny_config: Path, tiny_weights: Path, **options: str):
    """A cma method after task 1 (trained a little, statistics kept) and begun on task 2."""
    torch.manual_seed(0)
    method, _ = _cma(tiny_config, tiny_weights, experts="4", freeze_per_task="1", **options)
    first, second = TaskInfo(1, ("red", "green"), 0), TaskInfo(2, ("blue", "white"), 2)
    images = torch.rand(8, 3, 32, 32)
    method.begin(first)
    with torch.no_grad():
        for layer in method.adapters.layers:
            for up in layer.up:
                up.normal_(0, 0.1)
    method.finish([(images, torch.tensor([0, 1] * 4))])
    method.begin(second)
    return method, second, images


def test_ce_calibration_moves_only_new_columns_through_the_image(tiny_config: Path, tiny_weights: Path) -> None:
    """Old-class columns see detached image features: the loss's gradient on the features comes from the new
    classes only, so the same batch gives the adapters a different gradient than plain all-class cross-entropy."""
    grads = {}
    for calibration in ("ce", "none"):
        method, _, images = _two_task_method(tiny_config, tiny_weights, calibration=calibration, ce_classes="seen",
                                             kd_weight="0", align_weight="0", relation_weight="0")
        method.train()
        params = method.trainable_parameters()
        loss = method(images, torch.tensor([2, 3, 2, 3, 0, 1, 2, 3]))
        grads[calibration] = torch.autograd.grad(loss, params, allow_unused=True)
        # the new task's context gets a gradient either way
        assert grads[calibration][-1] is not None and grads[calibration][-1].abs().sum() > 0
    differs = [a is not None and b is not None and not torch.allclose(a, b)
               for a, b in zip(grads["ce"], grads["none"], strict=True)]
    assert any(differs)


def test_replay_calibration_trains_only_the_new_prompts(tiny_config: Path, tiny_weights: Path) -> None:
    method, second, images = _two_task_method(tiny_config, tiny_weights, calibration="replay", replay_steps="20",
                                              replay_lr="1e-2")
    assert set(method.bank.classes) == {0, 1}  # task 1's statistics were kept
    adapters_before = {k: v.clone() for k, v in method.adapters.state_dict().items() if not k.endswith("frozen")}
    old_context = method.prompts.context(method.tasks[0]).detach().clone()
    old_text = method.prompts.cached(method.tasks[0]).clone()
    new_context = method.prompts.context(second).detach().clone()
    method.finish([(images, torch.tensor([2, 3] * 4))])
    after = method.adapters.state_dict()
    assert all(torch.equal(value, after[key]) for key, value in adapters_before.items())  # adapters: untouched
    assert torch.equal(method.prompts.context(method.tasks[0]), old_context)
    assert torch.equal(method.prompts.cached(method.tasks[0]), old_text)
    assert not torch.equal(method.prompts.context(second), new_context)  # the new prompts learned
    assert "replay_loss" in method.task_metadata(second)
    assert set(method.bank.classes) == {0, 1, 2, 3}
    stored = method.task_tensors()
    assert stored["stats.classes"].tolist() == [2, 3]  # each task stores its own classes' statistics only
    # what the evaluation after the task uses is what a later load restores (half precision)
    assert torch.equal(method.bank.classes[2].mean, stored["stats.mean"][0].float())


def test_gaussian_classifier_scores_classes_by_their_kept_statistics(tiny_config: Path, tiny_weights: Path) -> None:
    method, _, images = _two_task_method(tiny_config, tiny_weights, classifier="gaussian")
    method.finish([(images, torch.tensor([2, 3] * 4))])
    method.eval()
    assert method.task_tensors()["stats.classes"].tolist() == [2, 3]  # kept without replay, for the classifier
    probs = method.predict_proba(images)
    assert probs.shape == (8, 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(8))
    # a class mean moved onto an image's features wins that image
    features = method.encode(images[:1]).float()
    moved = method.bank.classes[1]
    method.bank.set(1, type(moved)(features[0], moved.cov))
    assert int(method.predict_proba(images[:1]).argmax()) == 1
    for name in ("text+gaussian", "text"):
        method.config.classifier = name
        torch.testing.assert_close(method.predict_proba(images).sum(dim=1), torch.ones(8))


def test_gaussian_classifier_without_kept_statistics_is_a_clear_error(tiny_config: Path, tiny_weights: Path) -> None:
    method, _, images = _two_task_method(tiny_config, tiny_weights, calibration="none", classifier="text")
    method.finish([(images, torch.tensor([2, 3] * 4))])
    method.config.classifier = "gaussian"
    with pytest.raises(ClipclError, match="class statistics"):
        method.predict_proba(images)
