"""dma's task router: its stored statistics, the pooled covariance, and which task it picks."""

from __future__ import annotations

import torch

from clipcl.methods import TaskInfo
from clipcl.methods.components import TaskRouter


def _gaussian_task(generator: torch.Generator, centres: torch.Tensor, scales: torch.Tensor, per_class: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(len(centres)).repeat_interleave(per_class)
    noise = torch.randn(len(labels), centres.shape[1], generator=generator, dtype=torch.float64) * scales
    return centres[labels] + noise, labels


def test_statistics_are_class_means_and_the_within_class_scatter() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    features, labels = _gaussian_task(generator, centres, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), 50)
    stats = TaskRouter.statistics(features.float(), labels, 2)
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
        stats = TaskRouter.statistics(features.float(), labels, 2)
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
    routers = {kind: TaskRouter(kind) for kind in TaskRouter.KINDS}
    test_features, test_tasks = [], []
    for index, centres in enumerate(tasks, start=1):
        train, labels = _gaussian_task(generator, centres.double(), scales, 300)
        for router in routers.values():
            router.add(TaskInfo(index, ("c",), index - 1), TaskRouter.statistics(train.float(), labels, 1),
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


def test_cosine_router_is_an_option_recorded_in_the_workspace(tmp_path, tiny_config, tiny_weights, task_factory,
                                                              runner) -> None:
    import json

    from conftest import FAST, invoke

    ws = tmp_path / "ws"
    invoke(runner, "init", "-w", ws, "--model", tiny_config, "--pretrained", tiny_weights, "--set", "router=cosine")
    for name, classes in (("a", ["red", "green"]), ("b", ["blue", "yellow"])):
        assert invoke(runner, "add-task", "-w", ws, task_factory(name, classes), *FAST).exit_code == 0
    assert json.loads((ws / "manifest.json").read_text())["method"]["config"]["router"] == "cosine"
    report = json.loads(invoke(runner, "eval", "-w", ws, "--json").stdout)
    assert report["task_id_accuracy"] is not None and report["accuracy"] >= 0.5
