"""Baselines that train nothing: ``zeroshot``, ``ncm`` and ``lda`` (docs/methods.md).

All go through the same engine, workspace and evaluation as the trained methods, so their numbers are measured the
same way. ``zeroshot`` classifies with the frozen text features of "a photo of a {}."; ``ncm`` ("SimpleCIL") with the
class means of frozen image features, gathered once per task and stored; ``lda`` with the same class means and one
within-class covariance pooled over every task (linear discriminant analysis). None forgets anything by
construction, and ``add-task`` takes one pass over the task's images.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backbone import Backbone
from .base import (
    FROZEN_IMAGE_EMBEDDING,
    Method,
    MethodConfig,
    Prediction,
    Route,
    TaskInfo,
    TemplateConfig,
    check_route_supported,
    encode_task_images,
    image_class_means,
    register_method,
)
from .catalog import builtin_summary
from .components import PooledGaussian, check_shrinkage, shrinkage_value

CLASS_MEANS_KEY = "ncm.class_means"
LDA_PREFIX = "lda."


class FrozenFeatureClassifier(Method):
    """A method whose whole answer is a function of the frozen model's image embedding (every baseline here).

    That embedding is its :meth:`frozen_features`, so an evaluation that kept them from an earlier one answers
    without any encoder pass (:mod:`clipcl.feature_cache`); a subclass says only how it scores the features.
    """

    def frozen_features_key(self) -> str:
        return FROZEN_IMAGE_EMBEDDING

    @torch.no_grad()
    def frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_images(images).float()

    @abstractmethod
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[batch, len(self.classes)]`` of images with these frozen ``features``."""

    @torch.no_grad()
    def predict(self, images: torch.Tensor, route: Route = None, frozen: torch.Tensor | None = None) -> Prediction:
        check_route_supported(type(self), route)
        return Prediction(self.probabilities(self.frozen_features(images) if frozen is None else frozen))

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images).probs


@dataclass
class ZeroShotConfig(TemplateConfig):
    """zeroshot's option: the prompt of each class."""


@register_method
class ZeroShot(FrozenFeatureClassifier):
    name = "zeroshot"
    config_class = ZeroShotConfig
    default_epochs = 0
    independent_tasks = True  # stores nothing but each task's class names
    summary = builtin_summary("zeroshot")

    config: ZeroShotConfig

    def _encode(self, task: TaskInfo) -> None:
        self.keep("text_features", task.index,
                  self.backbone.encode_texts([self.config.template.format(c) for c in task.classes]))

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self._encode(task)

    def begin_task(self, task: TaskInfo) -> None:
        self._encode(task)

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP's softmax over the classes' prompts (:func:`~clipcl.methods.base.clip_probabilities`)."""
        text = self.kept_together("text_features", (t.index for t in self.tasks))
        return (self.backbone.logit_scale().float() * features @ text.float().T).softmax(dim=-1)


@register_method
class NearestClassMean(FrozenFeatureClassifier):
    name = "ncm"
    default_epochs = 0
    independent_tasks = True  # each task stores its own class means
    summary = builtin_summary("ncm")

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.keep("class_means", task.index, tensors[CLASS_MEANS_KEY].to(self.device))

    def begin_task(self, task: TaskInfo) -> None:
        """Nothing to set up: the class means are gathered once training (of nothing) is over."""

    @torch.no_grad()
    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.keep("class_means", task.index, image_class_means(self, task, batches))

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return {CLASS_MEANS_KEY: self.kept("class_means", self.tasks[-1].index)}

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        means = self.kept_together("class_means", (t.index for t in self.tasks))
        return (self.backbone.logit_scale().float() * features @ means.T).softmax(dim=-1)


@dataclass
class LDAConfig(MethodConfig):
    shrinkage: str = field(default="auto", metadata={
        "help": "weight of the scaled identity mixed into the pooled covariance: a number in (0, 1], or auto "
                "(Ledoit-Wolf's estimate from the images, recomputed as tasks are added)"})

    def __post_init__(self) -> None:
        self.shrinkage = check_shrinkage(self.shrinkage, "shrinkage")


@register_method
class LinearDiscriminant(FrozenFeatureClassifier):
    """Linear discriminant analysis on frozen image features, kept task by task.

    Each task stores its classes' mean frozen features, its within-class scatter and its image count
    (:class:`~clipcl.methods.components.PooledGaussian`); the covariance is pooled over every task learned so far
    and shrunk toward a scaled identity, and an image goes to the class of highest Gaussian log-likelihood. Where
    ``ncm`` measures every direction of the feature space alike, ``lda`` measures distances in units of the
    features' own within-class spread, which is what CLIP features need (RanPAC, McDonnell et al. 2023, report
    this kind of classifier well above nearest-class-mean). The shrinkage is Ledoit-Wolf's estimate by default: on
    the validation images of all three benchmarks of ../shared/bench it lands at 0.0011 and matches the best fixed
    value (0.001, ahead of 0.01 and 0.1; BENCHMARKS.md), and it grows by itself where a task has few images.
    """

    name = "lda"
    config_class = LDAConfig
    default_epochs = 0
    independent_tasks = True  # each task stores its share of the covariance, pooled at restore
    summary = builtin_summary("lda")

    config: LDAConfig

    def __init__(self, backbone: Backbone, config: LDAConfig) -> None:
        super().__init__(backbone, config)
        self.gaussian = PooledGaussian(LDA_PREFIX, shrinkage_value(config.shrinkage))

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.gaussian.add(task, tensors, self.device)

    def begin_task(self, task: TaskInfo) -> None:
        """Nothing to set up: the statistics are gathered once training (of nothing) is over."""

    @torch.no_grad()
    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        features, labels = encode_task_images(self, task, batches)
        self.gaussian.add(task, self.gaussian.statistics(features, labels, len(task.classes)), self.device)

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return self.gaussian.tensors(self.tasks[-1])

    def task_metadata(self, task: TaskInfo) -> dict[str, Any]:
        return {"shrinkage": round(self.gaussian.effective_shrinkage(), 6)}

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return self.gaussian.log_likelihoods(features).softmax(dim=-1).float()
