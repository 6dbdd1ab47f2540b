"""dmc and dmc-ot: class statistics, sampling, the OT calibration, and both methods learning through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, invoke, learn_two_tasks

from clipcl import Workspace
from clipcl.cli import app
from clipcl.methods.gaussian import ClassGaussian, GaussianBank, calibrate, estimate, sample, transport_plan


def _correlated(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.tensor([[0.3, 0.0, 0.0, 0.0], [0.2, 0.1, 0.0, 0.0], [0.0, 0.05, 0.2, 0.0], [0.1, 0.0, 0.0, 0.05]])
    return torch.randn(n, 4, generator=generator) @ mixing.T + torch.tensor([0.5, -0.2, 0.1, 0.3])


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_sampling_reproduces_the_stored_mean_and_covariance(kind: str) -> None:
    gaussian = estimate(_correlated(4000), kind, shrinkage=0.0)
    bank = GaussianBank()
    bank.set(3, gaussian)
    stored = bank.tensors([3])
    assert stored["stats.mean"].dtype == torch.float16  # stored at half precision
    restored = GaussianBank()
    restored.load(stored, torch.device("cpu"))
    draws = sample(restored.classes[3], 50_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(draws.mean(0), gaussian.mean, atol=4e-3, rtol=0)
    expected = torch.diag(gaussian.cov) if gaussian.diagonal else gaussian.cov
    torch.testing.assert_close(torch.cov(draws.T), expected, atol=2e-3, rtol=0.03)
    if kind == "diag":
        assert stored["stats.cov_factor"].shape == (1, 4)
        assert torch.cov(draws.T)[0, 1].abs() < 2e-3  # a diagonal model draws uncorrelated dimensions


def test_a_tiny_covariance_survives_half_precision_storage() -> None:
    """Unit-norm features of a class that barely varies give variances near 1e-6, below fp16's normal range; the
    stored factor must still give a positive definite covariance to sample from."""
    gaussian = estimate(1e-3 * _correlated(50) + 1.0, "full", shrinkage=0.0)
    bank = GaussianBank()
    bank.set(0, gaussian)
    restored = GaussianBank()
    restored.load(bank.tensors([0]), torch.device("cpu"))
    assert float(torch.linalg.eigvalsh(restored.classes[0].cov.double()).min()) >= 0
    draws = sample(restored.classes[0], 20_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.cov(draws.T), gaussian.cov, atol=2e-8, rtol=0.1)


def test_full_covariance_is_shrunk_toward_a_scaled_identity() -> None:
    features = _correlated(500)
    raw = torch.cov(features.T.double())
    shrunk = estimate(features, "full", shrinkage=0.25).cov.double()
    expected = 0.75 * raw + 0.25 * torch.eye(4, dtype=torch.float64) * raw.trace() / 4
    torch.testing.assert_close(shrunk, expected, atol=1e-6, rtol=1e-5)


def test_transport_plan_has_the_prescribed_marginals() -> None:
    source, target = _correlated(60, seed=1), _correlated(90, seed=2) + 0.3
    rows, columns = torch.full((60,), 1 / 60, dtype=torch.float64), torch.full((90,), 1 / 90, dtype=torch.float64)
    balanced = transport_plan(source, target, reg=0.05)
    assert balanced.shape == (60, 90) and bool((balanced >= 0).all())
    torch.testing.assert_close(balanced.sum(dim=1), rows, atol=1e-6, rtol=0)
    torch.testing.assert_close(balanced.sum(dim=0), columns, atol=1e-6, rtol=0)
    relaxed = transport_plan(source, target, reg=0.05, relaxation=0.1)
    torch.testing.assert_close(relaxed.sum(dim=1), rows, atol=1e-6, rtol=0)  # every sample moves in full
    assert float((relaxed.sum(dim=0) - columns).abs().max()) > 1e-3  # the features' share is free to follow


def test_calibration_keeps_statistics_when_the_encoder_did_not_move_and_follows_a_uniform_drift() -> None:
    gaussian = estimate(_correlated(800), "full", shrinkage=0.1)
    old_features = _correlated(300, seed=3)
    unchanged = calibrate(gaussian, old_features, torch.zeros_like(old_features), n_samples=128)
    torch.testing.assert_close(unchanged.mean, gaussian.mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(unchanged.cov, gaussian.cov, atol=1e-6, rtol=0)
    shift = torch.tensor([0.1, -0.05, 0.0, 0.02])
    moved = calibrate(gaussian, old_features, shift.expand_as(old_features), n_samples=128)
    torch.testing.assert_close(moved.mean, gaussian.mean + shift, atol=1e-5, rtol=0)
    torch.testing.assert_close(moved.cov, gaussian.cov, atol=1e-5, rtol=0)  # a translation keeps the shape


def test_calibration_moves_a_class_by_the_drift_of_the_features_it_matches() -> None:
    """Two clusters drift in opposite directions; a class that lies on one follows that one."""
    near = ClassGaussian(torch.tensor([1.0, 0.0]), torch.eye(2) * 0.01)
    left = torch.tensor([1.0, 0.0]) + 0.1 * torch.randn(200, 2, generator=torch.Generator().manual_seed(4))
    right = torch.tensor([-1.0, 0.0]) + 0.1 * torch.randn(200, 2, generator=torch.Generator().manual_seed(5))
    old = torch.cat([left, right])
    drift = torch.cat([torch.tensor([0.0, 0.5]).expand(200, 2), torch.tensor([0.0, -0.5]).expand(200, 2)])
    moved = calibrate(near, old, drift, n_samples=200, reg=0.05)
    assert float(moved.mean[1]) > 0.4  # follows its own cluster's drift (+0.5), not the average (0)
    balanced = calibrate(near, old, drift, n_samples=200, reg=0.05, relaxation=float("inf"))
    assert abs(float(balanced.mean[1])) < 0.05  # balanced OT spreads the class over both clusters


def _init(runner, tmp_path: Path, tiny_config: Path, tiny_weights: Path, method: str, *sets: str) -> Path:
    ws = tmp_path / method
    args = [item for value in sets for item in ("--set", value)]
    result = invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--method",
                    method, *args)
    assert result.exit_code == 0, result.output
    return ws


@pytest.mark.parametrize("method", ["dmc", "dmc-ot"])
def test_two_stage_methods_learn_and_keep_old_tasks(method: str, tmp_path: Path, tiny_config: Path,
                                                    tiny_weights: Path, task_factory, runner) -> None:
    ws = _init(runner, tmp_path, tiny_config, tiny_weights, method, "adapt=every")  # the paper's stage 1
    first, _ = learn_two_tasks(runner, ws, tmp_path / "data", *FAST, second_args=("--epochs-stage2", "5"))
    assert "stage 1 (image encoder): epoch 3/3" in first.stderr and "stage 2 (text prompts): epoch 3/3" in first.stderr
    workspace = Workspace.open(ws)
    records = [workspace.task_record(t) for t in workspace.tasks]
    assert records[0].accuracy.task >= 0.8
    accuracy = records[1].accuracy
    # over four classes (chance 0.25) the workspace stays well above chance; how much of the old task survives
    # depends on the data (with random weights, one shared text context has little to separate classes with),
    # so retention is measured on real photos in BENCHMARKS.md
    assert accuracy.all >= 0.5 and accuracy.per_task[1] >= 0.5
    stages = records[1].timings.stages
    assert [s["epochs"] for s in stages] == [3, 5] and stages[1]["steps"] > stages[0]["steps"]
    tensors = [workspace.task_tensors(t) for t in workspace.tasks]
    assert tensors[0]["stats.classes"].tolist() == [0, 1]
    # dmc stores the statistics of the new classes; dmc-ot every class's, calibrated
    assert tensors[1]["stats.classes"].tolist() == ([2, 3] if method == "dmc" else [0, 1, 2, 3])
    assert records[1].method["statistics_bytes_per_class"] == 2 * (32 + 32 * 32)  # fp16 mean + covariance
    if method == "dmc-ot":
        assert tensors[1]["prompt.task"].shape[0] == 4
        assert not torch.equal(tensors[1]["stats.mean"][:2], tensors[0]["stats.mean"])  # old classes moved
    table = invoke(runner, "tasks", "-w", ws, env={"COLUMNS": "220"})
    assert "statistics bytes per class: 2.1 KiB" in table.stdout  # 2,112 bytes


def test_diagonal_covariance_option_and_stage2_flag_checks(tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                          task_factory, runner) -> None:
    ws = _init(runner, tmp_path, tiny_config, tiny_weights, "dmc", "cov=diag")
    result = invoke(runner, "add-task", "-w", ws, task_factory("a", ["red", "green"]), *FAST, "--epochs-stage2", "1")
    assert result.exit_code == 0, result.output
    tensors = Workspace.open(ws).task_tensors(Workspace.open(ws).tasks[0])
    assert tensors["stats.cov_factor"].shape == (2, 32)
    details = json.loads((ws / "tasks/task-001/task.json").read_text())
    assert details["method"]["statistics_bytes_per_class"] == 2 * (32 + 32)
    bad = invoke(runner, "init", "-w", tmp_path / "x", "--model", tiny_config, "--pretrained", tiny_weights,
                 "--method", "dmc", "--set", "cov=low-rank")
    assert bad.exit_code == 2 and "cov must be one of full, diag" in bad.stderr
    dma = tmp_path / "dma"
    invoke(runner, "init", "-w", dma, "--model", tiny_config, "--pretrained", tiny_weights)
    refused = invoke(runner, "add-task", "-w", dma, task_factory("b", ["red", "green"]), "--epochs-stage2", "2")
    assert refused.exit_code == 2 and "trains in one stage" in refused.stderr


def test_linear_calibration_with_an_identity_map_returns_the_statistics_unchanged() -> None:
    from clipcl.methods.gaussian import fit_linear_map, map_gaussian

    features = _correlated(300)
    weight, bias = fit_linear_map(features, features)  # an encoder that did not move
    torch.testing.assert_close(weight, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(bias, torch.zeros(4), atol=1e-5, rtol=0)
    for kind in ("full", "diag"):
        gaussian = estimate(_correlated(200, seed=1), kind)
        mapped = map_gaussian(gaussian, weight, bias)
        torch.testing.assert_close(mapped.mean, gaussian.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(mapped.cov, gaussian.cov, atol=1e-6, rtol=1e-4)
    # a real linear change of the encoder is recovered and carried to a class it never saw
    change = torch.tensor([[1.1, 0.2, 0.0, 0.0], [0.0, 0.9, 0.1, 0.0], [0.0, 0.0, 1.0, 0.3], [0.1, 0.0, 0.0, 0.8]])
    weight, bias = fit_linear_map(features, features @ change.T + 0.05, ridge=0.0)
    torch.testing.assert_close(weight, change, atol=1e-4, rtol=0)
    other = estimate(_correlated(500, seed=2), "full", shrinkage=0.0)
    mapped = map_gaussian(other, weight, bias)
    torch.testing.assert_close(mapped.mean, change @ other.mean + 0.05, atol=1e-4, rtol=0)
    torch.testing.assert_close(mapped.cov, change @ other.cov @ change.T, atol=1e-5, rtol=1e-3)


def _dmc(tiny_config: Path, tiny_weights: Path, **options: str):
    from clipcl.backbone import load_backbone, resolve_model_spec
    from clipcl.methods import build_config, get_method_class

    spec = resolve_model_spec(str(tiny_config), str(tiny_weights))
    method_class = get_method_class("dmc")
    return method_class(load_backbone(spec, tiny_config.parent), build_config(method_class, options))


def test_feature_distillation_is_zero_until_the_adapter_moves(tiny_config: Path, tiny_weights: Path) -> None:
    from clipcl.methods import TaskInfo
    from clipcl.methods.dmc import IMAGE_STAGE

    method = _dmc(tiny_config, tiny_weights, feature_kd="1", adapt="every")
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    method.begin(TaskInfo(1, ("red", "green"), 0))
    with torch.no_grad():  # task 1 "learned": the shared LoRA moved away from zero
        for param in method.lora.parameters_of("shared"):
            param.add_(0.1 * torch.randn_like(param))
    method.begin(TaskInfo(2, ("blue", "yellow"), 2))
    method.begin_stage(IMAGE_STAGE)
    features = method.backbone.encode_images(images)
    assert float(method.feature_distillation(images, features).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for param in method.lora.parameters_of("shared"):
            param.add_(0.5 * torch.randn_like(param))
    moved = method.backbone.encode_images(images)
    assert float(method.feature_distillation(images, moved).detach()) > 1e-4
    torch.testing.assert_close(method.backbone.encode_images(images), moved)  # the student's adapter is back


def test_with_stage_one_off_the_statistics_are_the_frozen_encoders(tmp_path: Path, tiny_config: Path,
                                                                   tiny_weights: Path, runner) -> None:
    from PIL import Image

    from clipcl.backbone import load_backbone, resolve_model_spec

    ws = tmp_path / "ws"
    invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--method", "dmc",
           "--set", "class_residual=true", "--set", "replay=balanced", "--set", "replay_classes=1")
    learn_two_tasks(runner, ws, tmp_path / "data", "--epochs", "0", "--epochs-stage2", "2", "--batch-size", "8",
                    "--workers", "0")
    workspace = Workspace.open(ws)
    method = workspace.build_method()
    frozen = load_backbone(resolve_model_spec(str(tiny_config), str(tiny_weights)), tiny_config.parent)
    # the stored means of task 1's classes are those of the frozen encoder's features of its training images
    record = workspace.task_record(workspace.tasks[0])
    source = Path(record.source.root)
    for index, name in enumerate(record.classes):
        heldout = {source / relpath for relpath, _ in record.heldout_files}
        trained = sorted(set((source / name).iterdir()) - heldout)
        assert len(trained) < 14  # (some images were held out, and they are not in the statistics)
        images = torch.stack([frozen.eval_transform(Image.open(path).convert("RGB")) for path in trained])
        expected = frozen.encode_images(images).float().mean(dim=0)
        torch.testing.assert_close(method.bank.classes[index].mean, expected, atol=2e-3, rtol=0)  # fp16 storage
    tensors = [workspace.task_tensors(t) for t in workspace.tasks]
    assert tensors[0]["dmc.class_residual"].shape[0] == 2 and tensors[0]["dmc.class_residual"].abs().sum() > 0
    # task 2 stores every class's residual, the old ones trained again against the new classes
    assert tensors[1]["dmc.class_residual"].shape[0] == 4
    assert not torch.equal(tensors[1]["dmc.class_residual"][:2], tensors[0]["dmc.class_residual"])
    torch.testing.assert_close(method.class_residual, tensors[1]["dmc.class_residual"])  # restored


def test_adapting_on_the_first_task_only_leaves_the_encoder_as_task_one_left_it(tmp_path: Path, tiny_config: Path,
                                                                                tiny_weights: Path, runner) -> None:
    ws = tmp_path / "ws"
    invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--method", "dmc-ot",
           "--set", "adapt=first")
    learn_two_tasks(runner, ws, tmp_path / "data", "--epochs", "1", "--batch-size", "8", "--workers", "0")
    workspace = Workspace.open(ws)
    one, two = (workspace.task_tensors(t) for t in workspace.tasks)
    lora = [key for key in one if key.startswith("lora.")]
    assert lora and any(one[key].abs().sum() > 0 for key in lora)  # task 1 adapted the encoder
    assert all(torch.equal(one[key], two[key]) for key in lora)  # task 2 did not
    assert workspace.task_record(workspace.tasks[1]).training.steps > 0  # stage 2 still trained
    assert not torch.equal(one["prompt.shared"], two["prompt.shared"])


def test_balanced_replay_draws_a_few_old_classes_equally_often(tiny_config: Path, tiny_weights: Path) -> None:
    method = _dmc(tiny_config, tiny_weights, replay="balanced", replay_classes="3")
    torch.manual_seed(0)
    labels = method.replay_labels(32, 10, torch.device("cpu"))
    counts = torch.bincount(labels, minlength=10)
    assert len(labels) == 32 and int((counts > 0).sum()) == 3
    assert int(counts[counts > 0].max() - counts[counts > 0].min()) <= 1
    uniform = _dmc(tiny_config, tiny_weights).replay_labels(32, 10, torch.device("cpu"))
    assert int(torch.unique(uniform).numel()) > 3


@pytest.mark.parametrize("option", ["adapt=sometimes", "replay=weighted", "calibration=magic", "later_lr=0",
                                    "feature_kd=-1", "replay_classes=0", "current_from=nowhere", "map_ridge=-1",
                                    "replay_per=batch", "classifier=magic", "text_weight=2"])
def test_bad_new_dmc_options_are_one_line_errors(option: str, tmp_path: Path, tiny_config: Path, tiny_weights: Path,
                                                 runner) -> None:
    result = runner.invoke(app, ["init", "-w", str(tmp_path / "ws"), "--model", str(tiny_config), "--pretrained",
                                 str(tiny_weights), "--method", "dmc-ot", "--set", option])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: method dmc-ot:") and "\n" not in result.output.strip()
    assert not (tmp_path / "ws").exists()


def test_a_dmc_workspace_made_before_the_options_keeps_training_as_it_started() -> None:
    from clipcl.methods import build_config, get_method_class

    method_class = get_method_class("dmc-ot")
    fresh = build_config(method_class)
    new = ("adapt", "later_lr", "feature_kd", "class_residual", "replay", "replay_classes", "replay_per",
           "current_from", "calibration", "map_ridge", "classifier", "text_weight")
    old = build_config(method_class, stored={k: v for k, v in vars(fresh).items() if k not in new})
    assert (old.adapt, old.current_from, old.classifier, old.calibration) == ("every", "images", "text", "ot")
    assert (fresh.adapt, fresh.current_from, fresh.classifier, fresh.calibration) == ("first", "statistics", "hybrid",
                                                                                      "linear")
