"""`clipcl predict` and `clipcl eval` as a user runs them, and dma's task routing, on one trained workspace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, invoke, make_task, snapshot
from PIL import Image

from clipcl import Workspace
from clipcl.evaluation import heldout_dataset

TWO_TASKS = (("warm", ["red", "green"]), ("cool", ["blue", "yellow"]))


def _learned_workspace(root: Path, tiny_config: Path, tiny_weights: Path, tasks, *init_args: str) -> Path:
    """A dma workspace under ``root`` (``init`` with ``init_args``) that learned ``tasks``: (name, colours) pairs."""
    from typer.testing import CliRunner

    runner = CliRunner()
    ws = root / "ws"
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, *init_args)
    assert result.exit_code == 0, result.output
    for name, classes in tasks:
        result = invoke(runner, "add-task", "-w", ws, make_task(root / "data" / name, classes), *FAST)
        assert result.exit_code == 0, result.output
    return ws


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path, tiny_weights: Path) -> Path:
    """A dma workspace that learned two tasks (red, green) and (blue, yellow); tests only read it."""
    return _learned_workspace(tmp_path_factory.mktemp("inference"), tiny_config, tiny_weights, TWO_TASKS)


@pytest.fixture
def images(trained: Path) -> Path:
    return trained.parent / "data"


def _json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_predict_a_directory_as_json_covers_every_image_and_every_task(trained: Path, images: Path, runner) -> None:
    before = snapshot(trained)
    result = invoke(runner, "predict", "-w", trained, images, "--json", "--top-k", "3", "--batch-size", "5")
    assert result.exit_code == 0, result.output
    lines = _json_lines(result.stdout)
    assert len(lines) == 4 * 14  # every image below the folder, recursively
    owner = {"red": 1, "green": 1, "blue": 2, "yellow": 2}
    correct = 0
    for line in lines:
        top = line["top"]
        assert len(top) == 3
        probs = [entry["prob"] for entry in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(owner[entry["class"]] == entry["task"] for entry in top)
        correct += top[0]["class"] == Path(line["path"]).parent.name
    assert correct / len(lines) >= 0.7  # the classes of both tasks are recognised (chance: 0.25)
    assert snapshot(trained) == before  # predicting never writes to the workspace


def test_predict_a_glob_and_a_file_and_top_k_beyond_the_class_count(trained: Path, images: Path, runner) -> None:
    pattern = str(images / "*" / "red" / "00[0-2].png")
    single = images / "cool" / "blue" / "005.png"
    result = invoke(runner, "predict", "-w", trained, pattern, single, "--json", "-k", "10")
    assert result.exit_code == 0, result.output
    lines = _json_lines(result.stdout)
    assert [Path(line["path"]).name for line in lines] == ["000.png", "001.png", "002.png", "005.png"]
    assert all(len(line["top"]) == 4 for line in lines)  # only four classes were learned
    assert sum(entry["prob"] for entry in lines[0]["top"]) == pytest.approx(1.0, abs=1e-5)


def test_predict_table_names_each_image_its_class_and_task(trained: Path, images: Path, runner) -> None:
    result = invoke(runner, "predict", "-w", trained, images / "warm" / "red" / "000.png", "-k", "2",
                    env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "000.png" in result.stdout and "(warm)" in result.stdout and "%" in result.stdout


def test_unreadable_image_gets_its_own_error_and_the_rest_are_predicted(trained: Path, tmp_path: Path,
                                                                        runner) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (40, 40), (220, 30, 30)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG but truncated")
    Image.new("RGB", (40, 40), (30, 40, 220)).save(folder / "c.png")
    result = invoke(runner, "predict", "-w", trained, folder, tmp_path / "absent.jpg", "--json")
    assert result.exit_code == 1
    lines = _json_lines(result.stdout)
    by_name = {Path(line["path"]).name: line for line in lines}
    assert set(by_name) == {"absent.jpg", "a.png", "b.png", "c.png"}
    assert "error" in by_name["b.png"] and "error" in by_name["absent.jpg"]
    assert len(by_name["a.png"]["top"]) == len(by_name["c.png"]["top"]) == 4

    table = invoke(runner, "predict", "-w", trained, folder)
    assert table.exit_code == 1
    assert [line for line in table.stderr.splitlines() if line.startswith("error:")] == [
        line for line in table.stderr.splitlines() if "b.png" in line]
    assert "a.png" in table.stdout and "c.png" in table.stdout and "Traceback" not in table.output


def test_predict_with_nothing_to_read_or_nothing_learned_fails_cleanly(trained: Path, workspace: Path,
                                                                       tmp_path: Path, images: Path, runner) -> None:
    result = invoke(runner, "predict", "-w", trained, tmp_path / "nothing-*.png")
    assert result.exit_code == 2 and "no image found" in result.stderr
    result = invoke(runner, "predict", "-w", workspace, images, tmp_path / "absent.png")
    assert result.exit_code == 2 and "learned no task yet" in result.stderr
    assert "absent.png" not in result.output  # the workspace is checked before any image is reported on
    result = invoke(runner, "predict", "-w", trained, images, env={"WORLD_SIZE": "2"})
    assert result.exit_code == 2 and "runs in one process" in result.stderr


def test_eval_json_reproduces_what_add_task_stored(trained: Path, runner) -> None:
    before = snapshot(trained)
    result = invoke(runner, "eval", "-w", trained, "--json", "--batch-size", "8", "--workers", "0")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"per_task", "accuracy", "matrix", "avg", "last", "forgetting", "bwt"} <= set(report)
    assert [(t["task"], t["name"], t["classes"]) for t in report["per_task"]] == [
        (1, "warm", ["green", "red"]), (2, "cool", ["blue", "yellow"])]
    ws = Workspace.open(trained)
    stored = [ws.task_record(task).accuracy for task in ws.tasks]
    assert report["matrix"] == [row.per_task for row in stored]
    # the same model on the same images: today's evaluation equals the last stored row
    assert [t["accuracy"] for t in report["per_task"]] == stored[-1].per_task
    assert report["accuracy"] == pytest.approx(stored[-1].all)
    assert report["task_id_accuracy"] == pytest.approx(stored[-1].task_id)
    # dma routes by task: no task-given accuracy (its task-id accuracy tells that story), stored or reported
    assert stored[-1].within_task == [None, None]
    assert all(t["within_task_accuracy"] is None for t in report["per_task"])
    assert report["within_task_accuracy"] is None
    assert report["accuracy_after_task"] == pytest.approx([stored[0].all, stored[1].all])
    assert report["avg"] == pytest.approx((stored[0].all + stored[1].all) / 2)
    assert report["last"] == pytest.approx(stored[1].all)
    assert report["forgetting"] == pytest.approx(stored[0].per_task[0] - stored[1].per_task[0])
    assert snapshot(trained) == before


def test_eval_selected_tasks_by_number_or_name(trained: Path, runner) -> None:
    by_number = json.loads(invoke(runner, "eval", "-w", trained, "--tasks", "2", "--json").stdout)
    by_name = json.loads(invoke(runner, "eval", "-w", trained, "--tasks", "cool", "--json").stdout)
    assert [t["task"] for t in by_number["per_task"]] == [t["task"] for t in by_name["per_task"]] == [2]
    assert by_number["accuracy"] == by_name["accuracy"] == by_number["per_task"][0]["accuracy"]
    result = invoke(runner, "eval", "-w", trained, "--tasks", "1,7")
    assert result.exit_code == 2 and "no task '7'" in result.stderr


def test_eval_table_and_plot(trained: Path, tmp_path: Path, runner) -> None:
    plot = tmp_path / "acc.png"
    result = invoke(runner, "eval", "-w", trained, "--plot", plot, env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "stored accuracy matrix" in result.stdout and "Avg" in result.stdout and "Forgetting" in result.stdout
    assert "task-id" in result.stdout and "task given" not in result.stdout  # dma routes: task-id, not task given
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 400
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    missing = invoke(runner, "eval", "-w", trained, "--plot", tmp_path / "no" / "acc.png")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    unknown = invoke(runner, "eval", "-w", trained, "--plot", tmp_path / "acc.xyz")
    assert unknown.exit_code == 2 and "cannot write .xyz" in unknown.stderr


def test_eval_of_a_workspace_with_a_task_added_without_evaluation(workspace: Path, images: Path, tmp_path: Path,
                                                                  runner) -> None:
    invoke(runner, "add-task", "-w", workspace, images / "warm", *FAST)
    invoke(runner, "add-task", "-w", workspace, images / "cool", *FAST, "--no-eval")
    report = json.loads(invoke(runner, "eval", "-w", workspace, "--json").stdout)
    first = Workspace.open(workspace).task_record(Workspace.open(workspace).tasks[0]).accuracy
    assert report["matrix"] == [first.per_task, [None, None]]
    assert report["avg"] == pytest.approx(first.all) and report["last"] is None and report["forgetting"] is None
    assert report["accuracy"] is not None  # today's evaluation does not depend on the stored rows
    table = invoke(runner, "eval", "-w", workspace, "--plot", tmp_path / "gap.png", env={"COLUMNS": "160"})
    assert table.exit_code == 0, table.output
    assert "Last -" in table.stdout and (tmp_path / "gap.png").stat().st_size > 0


def _heldout_images(trained: Path, with_labels: bool = False):
    """The workspace's method and every task's held-out images (and their labels)."""
    ws = Workspace.open(trained)
    method = ws.build_method()
    items = []
    for task in ws.tasks:
        dataset = heldout_dataset(method, task.info, ws.task_record(task))
        items += [dataset[i] for i in range(len(dataset))]
    images = torch.stack([image for image, _ in items])
    if with_labels:
        return method, images, torch.tensor([label for _, label in items])
    return method, images


def _branch_features(method, images: torch.Tensor) -> list[torch.Tensor]:
    """Each task's LoRA's image features, computed here without dma.predict."""
    branches = []
    for task in method.tasks:
        method.lora.activate(method.adapter_name(task))
        branches.append(method.backbone.encode_images(images).double())
    return branches


def _branch_probs(method, images: torch.Tensor) -> list[torch.Tensor]:
    """Each task's LoRA's softmax over all classes."""
    text = method.prompts.features(method.tasks).double()
    return [(method.backbone.logit_scale() * features @ text.T).softmax(-1)
            for features in _branch_features(method, images)]


@pytest.fixture(scope="module")
def voting(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path, tiny_weights: Path) -> Path:
    """A dma workspace with the first versions' inference: the frozen router's weighted vote over every task."""
    return _learned_workspace(tmp_path_factory.mktemp("voting"), tiny_config, tiny_weights, TWO_TASKS,
                              "--set", "router=mahalanobis", "--set", "route=0")


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path, tiny_weights: Path) -> Path:
    """A dma workspace with the default inference that learned three tasks of two colours."""
    return _learned_workspace(tmp_path_factory.mktemp("three"), tiny_config, tiny_weights,
                              (*TWO_TASKS, ("pink", ["magenta", "cyan"])))


def _vote(method, images: torch.Tensor, k: int) -> torch.Tensor:
    """The weighted vote of the mahalanobis router over the ``k`` best tasks, computed from its parts."""
    weights = method.task_weights(images)
    chosen = torch.zeros_like(weights, dtype=torch.bool).scatter_(1, weights.topk(k, dim=1).indices, True)
    parts = [torch.where(chosen[:, i : i + 1], weights[:, i : i + 1] * probs[:, task.class_slice], 0.0)
             for i, (task, probs) in enumerate(zip(method.tasks, _branch_probs(method, images), strict=True))]
    expected = torch.cat(parts, dim=1)
    return (expected / expected.sum(dim=1, keepdim=True)).float()


def _count_encoder_passes(method) -> list[int]:
    """Images through the image encoder, counted at the encoder itself."""
    counted: list[int] = []
    method.clip.visual.register_forward_hook(lambda _module, _args, output: counted.append(output.shape[0]))
    return counted


def test_vote_over_every_task_is_exactly_the_exhaustive_answer(voting: Path) -> None:
    method, images = _heldout_images(voting)
    exhaustive = method.predict(images)
    torch.testing.assert_close(exhaustive.probs, _vote(method, images, len(method.tasks)))
    torch.testing.assert_close(exhaustive.task_scores, method.task_weights(images))
    assert torch.equal(method.predict(images, route=len(method.tasks)).probs, exhaustive.probs)
    assert torch.equal(method.predict(images, route="all").probs, exhaustive.probs)
    assert torch.equal(method.predict(images, route=99).probs, exhaustive.probs)  # K beyond T means every task


def test_vote_route_one_runs_one_adapter_per_image_and_keeps_its_task_only(voting: Path) -> None:
    method, images = _heldout_images(voting)
    expected = _vote(method, images, 1)
    counted = _count_encoder_passes(method)
    routed = method.predict(images, route=1)
    torch.testing.assert_close(routed.probs, expected)
    assert sum(counted) == routed.encoder_passes == 2 * len(images)  # one frozen pass, one adapter pass per image
    counted.clear()
    assert method.predict(images).encoder_passes == sum(counted) == (1 + len(method.tasks)) * len(images)


def test_combined_inference_over_every_task_is_the_documented_sum_of_evidence(three_tasks: Path) -> None:
    """``--route all`` with the default router, recomputed from the stored tensors with plain linear algebra."""
    method, images = _heldout_images(three_tasks)
    ws = Workspace.open(three_tasks)
    stored = [ws.task_tensors(task) for task in ws.tasks]
    config = method.config
    with torch.no_grad(), method.lora.disabled():
        frozen = method.backbone.encode_images(images).double()

    def shrunk_inverse(scatter: torch.Tensor, count: float, shrinkage: float) -> torch.Tensor:
        covariance = scatter.double() / count
        dim = covariance.shape[0]
        return torch.linalg.inv((1 - shrinkage) * covariance + shrinkage * covariance.trace() / dim * torch.eye(dim))

    def log_likelihoods(x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
        diff = x[:, None, :] - means.double()[None]
        return -0.5 * torch.einsum("ncd,de,nce->nc", diff, precision, diff)

    pooled = shrunk_inverse(sum(t["router.scatter"] for t in stored), sum(float(t["router.count"]) for t in stored),
                            method.router.gaussian.effective_shrinkage())
    frozen_scores = log_likelihoods(frozen, torch.cat([t["router.feature_means"] for t in stored]), pooled)
    text = method.prompts.features(method.tasks).double()
    scale = float(method.backbone.logit_scale())
    parts = []
    with torch.no_grad():
        features = _branch_features(method, images)
    for task, tensors, adapted in zip(method.tasks, stored, features, strict=True):
        precision = shrunk_inverse(tensors["router.adapted_scatter"], float(tensors["router.adapted_count"]),
                                   config.adapted_shrinkage)
        likelihoods = log_likelihoods(adapted, tensors["router.adapted_means"], precision)
        mean, std = tensors["router.adapted_fit"].double()
        fit = (likelihoods.max(dim=1, keepdim=True).values - mean) / std
        clip = (scale * adapted @ text[task.class_slice].T).log_softmax(dim=1)
        parts.append(frozen_scores[:, task.class_slice] + config.text_weight * clip
                     + config.adapted_weight * likelihoods.log_softmax(dim=1) + config.fit_weight * fit)
    expected = torch.cat(parts, dim=1).softmax(dim=1).float()
    exhaustive = method.predict(images, route="all")
    torch.testing.assert_close(exhaustive.probs, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(method.predict(images, route=len(method.tasks)).probs, exhaustive.probs)
    assert (exhaustive.probs.argmax(1) == expected.argmax(1)).all()


def test_the_default_route_runs_at_most_k_adapters_per_image(three_tasks: Path, runner) -> None:
    method, images = _heldout_images(three_tasks)
    k = method.config.route
    assert 1 <= k < len(method.tasks)
    counted = _count_encoder_passes(method)
    default = method.predict(images)
    assert sum(counted) == default.encoder_passes == (1 + k) * len(images)
    # the images' best tasks by the frozen router are the ones whose adapters ran; the rest get no probability
    best = method.router.task_scores(method.frozen_features(images), method.backbone.logit_scale()).topk(k, 1).indices
    for i, task in enumerate(method.tasks):
        kept = (best == i).any(dim=1)
        assert (default.probs[~kept][:, task.class_slice] == 0).all()
    counted.clear()
    assert method.predict(images, route="all").encoder_passes == sum(counted) == (1 + len(method.tasks)) * len(images)
    report = json.loads(invoke(runner, "eval", "-w", three_tasks, "--json").stdout)
    assert report["encoder_passes_per_image"] == pytest.approx(1 + k) and report["route"] is None
    stored = Workspace.open(three_tasks).task_record(Workspace.open(three_tasks).tasks[-1]).accuracy
    assert stored.encoder_passes_per_image == pytest.approx(1 + k)  # add-task's evaluation routes too
    everything = json.loads(invoke(runner, "eval", "-w", three_tasks, "--json", "--route", "all").stdout)
    assert everything["encoder_passes_per_image"] == pytest.approx(1 + len(method.tasks))
    assert everything["route"] == "all"


def test_a_workspace_made_before_routing_by_default_keeps_predicting_as_before(voting: Path, tmp_path: Path,
                                                                               runner) -> None:
    """A manifest written before the route and adapted-space options existed: every task's adapter still runs and
    the answer is the weighted vote it gave then."""
    old = tmp_path / "old"
    shutil.copytree(voting, old)
    manifest = json.loads((old / "manifest.json").read_text())
    config = manifest["method"]["config"]
    for key in ("route", "adapted_shrinkage", "text_weight", "adapted_weight", "fit_weight"):
        config.pop(key)
    (old / "manifest.json").write_text(json.dumps(manifest))
    method, images = _heldout_images(old)
    prediction = method.predict(images)
    assert prediction.encoder_passes == (1 + len(method.tasks)) * len(images)
    torch.testing.assert_close(prediction.probs, _vote(method, images, len(method.tasks)))
    report = json.loads(invoke(runner, "eval", "-w", old, "--json").stdout)
    assert report["encoder_passes_per_image"] == pytest.approx(1 + len(method.tasks))


def test_route_through_the_cli(trained: Path, images: Path, runner) -> None:
    result = invoke(runner, "eval", "-w", trained, "--route", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["route"] == 1 and report["task_id_accuracy"] is not None
    assert report["encoder_passes_per_image"] == pytest.approx(2)
    predicted = invoke(runner, "predict", "-w", trained, images / "cool", "--route", "all", "--json")
    assert predicted.exit_code == 0 and len(_json_lines(predicted.stdout)) == 28
    for bad in ("0", "-1", "some"):
        refused = invoke(runner, "eval", "-w", trained, "--route", bad)
        assert refused.exit_code == 2 and "--route" in refused.stderr and "Traceback" not in refused.output


def test_route_is_refused_for_a_method_that_does_not_route(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                            images: Path, runner) -> None:
    ws = tmp_path / "ncm"
    invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--method", "ncm")
    invoke(runner, "add-task", "-w", ws, images / "warm", *FAST)
    for command in (["eval", "-w", ws], ["predict", "-w", ws, images / "warm"]):
        result = invoke(runner, *command, "--route", "1")
        assert result.exit_code == 2 and "does not route by task" in result.stderr
    assert json.loads(invoke(runner, "eval", "-w", ws, "--json").stdout)["task_id_accuracy"] is None


def test_eval_after_held_out_images_are_gone(trained: Path, tmp_path: Path, runner) -> None:
    data = trained.parent / "data"
    moved = tmp_path / "moved"
    shutil.move(data / "warm", moved)
    try:
        result = invoke(runner, "eval", "-w", trained, "--json")
    finally:
        shutil.move(moved, data / "warm")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["per_task"][0]["accuracy"] is None and report["per_task"][1]["accuracy"] is not None
    assert "no held-out images found" in result.stderr


def test_eval_and_predict_may_change_inference_options_only(three_tasks: Path, voting: Path, images: Path,
                                                             runner) -> None:
    before = snapshot(three_tasks)
    vote = json.loads(invoke(runner, "eval", "-w", three_tasks, "--json", "--set", "router=mahalanobis",
                             "--route", "all").stdout)
    method, held, labels = _heldout_images(three_tasks, with_labels=True)
    expected = _vote(method, held, len(method.tasks))
    assert vote["accuracy"] == pytest.approx(float((expected.argmax(1) == labels).float().mean()))
    predicted = invoke(runner, "predict", "-w", three_tasks, images / "warm", "--json", "--set", "text_weight=0")
    assert predicted.exit_code == 0 and len(_json_lines(predicted.stdout)) == 28
    assert snapshot(three_tasks) == before  # nothing of it is stored
    fixed = invoke(runner, "eval", "-w", three_tasks, "--set", "lora_rank=4")
    assert fixed.exit_code == 2 and "fixes it when the workspace is created" in fixed.stderr
    wrong = invoke(runner, "predict", "-w", three_tasks, images / "warm", "--set", "router=nearest")
    assert wrong.exit_code == 2 and "router must be one of" in wrong.stderr
    missing = invoke(runner, "eval", "-w", voting, "--set", "router=combined")
    assert missing.exit_code == 2 and "lacks the adapted-space statistics" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
