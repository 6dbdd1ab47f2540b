"""dma's task router: its stored statistics, the pooled covariance, and which task it picks."""

from __future__ import annotations

import pytest
import torch

from clipcl.methods import TaskInfo
from clipcl.methods.routing import TaskRouter


def _gaussian_task(generator: torch.Generator, centres: torch.Tensor, scales: torch.Tensor, per_class: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(len(centres)).repeat_interleave(per_class)
    noise = torch.randn(len(labels), centres.shape[1], generator=generator, dtype=torch.float64) * scales
    return centres[labels] + noise, labels


def test_statistics_are_class_means_and_the_within_class_scatter() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    features, labels = _gaussian_task(generator, centres, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), 50)
    stats = TaskRouter().statistics(features.float(), labels, 2)
    for c in range(2):
        torch.testing.assert_close(stats[TaskRouter.MEANS_KEY][c], features[labels == c].mean(0).float())
    expected = sum(((labels == c).sum() - 1) * torch.cov(features[labels == c].T) for c in range(2))
    torch.testing.assert_close(stats[TaskRouter.SCATTER_KEY], expected.float(), rtol=1e-4, atol=1e-5)
    assert float(stats[TaskRouter.COUNT_KEY]) == 100


def test_precision_pools_every_task_and_is_shrunk_toward_a_scaled_identity() -> None:
    generator = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.05, 0.5, 0.2, 0.1], dtype=torch.float64)
    router = TaskRouter("mahalanobis", shrinkage=0.2)
    pooled_scatter, count = torch.zeros(4, 4, dtype=torch.float64), 0
    for index, centres in enumerate((torch.eye(4)[:2], torch.eye(4)[2:]), start=1):
        features, labels = _gaussian_task(generator, centres.double(), scales, 400)
        stats = TaskRouter().statistics(features.float(), labels, 2)
        router.add(TaskInfo(index, ("a", "b"), 2 * (index - 1)), stats, torch.device("cpu"))
        pooled_scatter += stats[TaskRouter.SCATTER_KEY].double()
        count += len(labels)
    covariance = pooled_scatter / count
    shrunk = 0.8 * covariance + 0.2 * covariance.trace() / 4 * torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(router.precision(), torch.linalg.inv(shrunk))
    torch.testing.assert_close(torch.diag(covariance), scales**2, rtol=0.15, atol=0)  # the noise it was drawn with


def test_mahalanobis_routes_by_the_shape_of_the_noise_where_cosine_cannot() -> None:
    """Classes that differ along a quiet axis, with loud noise along another: distance must be measured in units of
    the noise to tell the tasks apart."""
    generator = torch.Generator().manual_seed(2)
    scales = torch.tensor([2.0, 0.05], dtype=torch.float64)
    tasks = [torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.3]])]
    routers = {kind: TaskRouter(kind) for kind in ("mahalanobis", "cosine")}
    test_features, test_tasks = [], []
    for index, centres in enumerate(tasks, start=1):
        train, labels = _gaussian_task(generator, centres.double(), scales, 300)
        for router in routers.values():
            router.add(TaskInfo(index, ("c",), index - 1), TaskRouter().statistics(train.float(), labels, 1),
                       torch.device("cpu"))
        test, _ = _gaussian_task(generator, centres.double(), scales, 200)
        test_features.append(test.float())
        test_tasks += [index - 1] * 200
    features, truth = torch.cat(test_features), torch.tensor(test_tasks)
    scale = torch.tensor(10.0)
    accuracy = {kind: float((router.weights(features, scale).argmax(1) == truth).float().mean())
                for kind, router in routers.items()}
    assert accuracy["mahalanobis"] > 0.95
    assert accuracy["cosine"] < 0.8
    weights = routers["mahalanobis"].weights(features, scale)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(len(features)))


@pytest.mark.parametrize("router", ["cosine", "class-covariance"])
def test_other_routers_are_options_recorded_in_the_workspace(tmp_path, tiny_config, tiny_weights, task_factory,
                                                             runner, router: str) -> None:
    import json

    from conftest import FAST, invoke

    from clipcl import Workspace

    ws = tmp_path / "ws"
    invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--set", f"router={router}")
    for name, classes in (("a", ["red", "green"]), ("b", ["blue", "yellow"])):
        assert invoke(runner, "add-task", "-w", ws, task_factory(name, classes), *FAST).exit_code == 0
    assert json.loads((ws / "manifest.json").read_text())["method"]["config"]["router"] == router
    workspace = Workspace.open(ws)
    stored = workspace.task_tensors(workspace.tasks[1])
    assert (TaskRouter.CLASS_SCATTER_KEY in stored) == (router == "class-covariance")
    report = json.loads(invoke(runner, "eval", "-w", ws, "--json").stdout)
    assert report["task_id_accuracy"] is not None and report["accuracy"] >= 0.5


def test_adapted_space_statistics_are_those_of_each_task_under_its_own_lora(tmp_path, tiny_config, tiny_weights,
                                                                           runner) -> None:
    """Every task stores its classes as its own LoRA sees them, and the spread of its images' fit there; the next
    task leaves those bytes alone (learn_two_tasks checks)."""
    from conftest import FAST, invoke, learn_two_tasks

    from clipcl import Workspace
    from clipcl.data import ImageDataset, scan_task_folder
    from clipcl.methods.routing import AdaptedSpaces

    ws = tmp_path / "ws"
    invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights)
    learn_two_tasks(runner, ws, tmp_path / "data", *FAST)
    workspace = Workspace.open(ws)
    method = workspace.build_method()
    shrinkage = method.config.adapted_shrinkage
    for stored, task in zip(workspace.tasks, method.tasks, strict=True):
        tensors = workspace.task_tensors(stored)
        data = scan_task_folder(workspace.task_record(stored).source.root, holdout=0.2, seed=0)
        dataset = ImageDataset(data.root, data.train, method.backbone.eval_transform)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        method.lora.activate(method.adapter_name(task))
        with torch.no_grad():
            features = method.backbone.encode_images(images).double()
        means = torch.stack([features[labels == c].mean(0) for c in range(len(task.classes))])
        torch.testing.assert_close(tensors[AdaptedSpaces.MEANS_KEY].double(), means, rtol=1e-4, atol=1e-5)
        centred = features - means[labels]
        torch.testing.assert_close(tensors[AdaptedSpaces.SCATTER_KEY].double(), centred.T @ centred, rtol=1e-4,
                                   atol=1e-5)
        covariance = centred.T @ centred / len(features)
        dim = covariance.shape[0]
        precision = torch.linalg.inv((1 - shrinkage) * covariance + shrinkage * covariance.trace() / dim
                                     * torch.eye(dim, dtype=torch.float64))
        diff = features[:, None] - means[None]
        fit = (-0.5 * torch.einsum("ncd,de,nce->nc", diff, precision, diff)).max(dim=1).values
        torch.testing.assert_close(tensors[AdaptedSpaces.FIT_KEY].double(), torch.stack([fit.mean(), fit.std()]),
                                   rtol=1e-3, atol=1e-3)
        # frozen statistics sit beside them, under the frozen encoder
        with torch.no_grad(), method.lora.disabled():
            frozen = method.backbone.encode_images(images).double()
        frozen_means = torch.stack([frozen[labels == c].mean(0) for c in range(len(task.classes))])
        torch.testing.assert_close(tensors[TaskRouter.MEANS_KEY].double(), frozen_means, rtol=1e-4, atol=1e-5)


def test_class_covariance_tells_apart_classes_that_differ_only_in_their_spread() -> None:
    """Two tasks whose single classes share a mean, one spread along x and one along y: a pooled covariance sees
    one blob, each class's own covariance (router class-covariance) tells them apart; with class_mix=1 it is the
    pooled router again."""
    generator = torch.Generator().manual_seed(3)
    spreads = [torch.tensor([1.0, 0.05], dtype=torch.float64), torch.tensor([0.05, 1.0], dtype=torch.float64)]
    routers = {name: TaskRouter(kind, shrinkage=0.01, class_mix=mix)
               for name, kind, mix in (("pooled", "mahalanobis", 0.9), ("own", "class-covariance", 0.0),
                                       ("mixed", "class-covariance", 1.0))}
    test_features, truth = [], []
    for index, spread in enumerate(spreads, start=1):
        train, labels = _gaussian_task(generator, torch.zeros(1, 2, dtype=torch.float64), spread, 400)
        for router in routers.values():
            router.add(TaskInfo(index, ("c",), index - 1), router.statistics(train.float(), labels, 1),
                       torch.device("cpu"))
        test, _ = _gaussian_task(generator, torch.zeros(1, 2, dtype=torch.float64), spread, 200)
        test_features.append(test.float())
        truth += [index - 1] * 200
    features, truth = torch.cat(test_features), torch.tensor(truth)
    scale = torch.tensor(10.0)
    accuracy = {name: float((router.weights(features, scale).argmax(1) == truth).float().mean())
                for name, router in routers.items()}
    assert accuracy["own"] > 0.85 and accuracy["pooled"] < 0.7
    torch.testing.assert_close(routers["mixed"].weights(features, scale), routers["pooled"].weights(features, scale))
    stats = routers["own"].tensors(TaskInfo(1, ("c",), 0))
    assert stats[TaskRouter.CLASS_SCATTER_KEY].shape == (1, 2, 2) and float(stats[TaskRouter.CLASS_COUNT_KEY]) == 400
