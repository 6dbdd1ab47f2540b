"""Baselines that train nothing: ``zeroshot`` and ``ncm`` (../shared/METHODS.md, "Baselines every benchmark reports").

Both go through the same engine, workspace and evaluation as the trained methods, so their numbers are measured the
same way. ``zeroshot`` classifies with the frozen text features of "a photo of a {}."; ``ncm`` ("SimpleCIL") with the
class means of frozen image features, gathered once per task and stored. Neither forgets anything by construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..errors import ClipclError
from .base import Method, MethodConfig, TaskInfo, clip_probabilities, image_class_means, register_method

CLASS_MEANS_KEY = "ncm.class_means"


@dataclass
class ZeroShotConfig(MethodConfig):
    template: str = field(default="a photo of a {}.", metadata={"help": "prompt; {} is replaced by the class name"})

    def __post_init__(self) -> None:
        if "{}" not in self.template:
            raise ClipclError("zeroshot's template needs a {} where the class name goes")


@register_method
class ZeroShot(Method):
    name = "zeroshot"
    config_class = ZeroShotConfig
    default_epochs = 0
    summary = "frozen CLIP with the prompt 'a photo of a {}.' (baseline, trains nothing)"

    config: ZeroShotConfig

    def _add(self, task: TaskInfo) -> None:
        self.tasks.append(task)
        features = self.backbone.encode_texts([self.config.template.format(c) for c in task.classes])
        self.register_buffer(f"text_features_{task.index}", features, persistent=False)

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self._add(task)

    def begin_task(self, task: TaskInfo) -> None:
        self._add(task)

    def task_tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        text = torch.cat([getattr(self, f"text_features_{t.index}") for t in self.tasks])
        return clip_probabilities(self.backbone, images, text)


@register_method
class NearestClassMean(Method):
    name = "ncm"
    default_epochs = 0
    summary = "nearest class mean of frozen image features, 'SimpleCIL' (baseline, trains nothing)"

    def _means(self, task: TaskInfo) -> torch.Tensor:
        return getattr(self, f"class_means_{task.index}")

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.tasks.append(task)
        self.register_buffer(f"class_means_{task.index}", tensors[CLASS_MEANS_KEY].to(self.device), persistent=False)

    def begin_task(self, task: TaskInfo) -> None:
        self.tasks.append(task)

    @torch.no_grad()
    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.register_buffer(f"class_means_{task.index}", image_class_means(self, task, batches), persistent=False)

    def task_tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        return {CLASS_MEANS_KEY: self._means(task)}

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        means = torch.cat([self._means(t) for t in self.tasks])
        features = self.backbone.encode_images(images).float()
        return (self.backbone.logit_scale().float() * features @ means.T).softmax(dim=-1)
