"""``finetune``: naive sequential fine-tuning, the lower bound every benchmark reports (docs/methods.md).

One LoRA on the image encoder, shared by all tasks and trained on, task after task, and class-specific prompts like
``dma``'s. Each task trains with cross-entropy over its own classes only and nothing protects what earlier tasks
learned, so the shared LoRA drifts toward the newest classes: the forgetting a continual method has to beat.
Inference is one pass with the shared LoRA over every class's (frozen) prompt.

A task stores the shared LoRA as it stood after that task, and the prompts of its own classes: restoring tasks
1..i in order rebuilds the model as it was after task i, and no task's file is ever rewritten.

Trained on a single task that holds all classes, this is also the ``joint`` upper bound of ``clipcl bench``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from .base import Method, TaskInfo, clip_probabilities, register_method
from .catalog import builtin_summary
from .components import ClassPrompts, ImageLoRA, LoraPromptConfig

SHARED_ADAPTER = "shared"


class FinetuneConfig(LoraPromptConfig):
    """finetune's options: the shared LoRA and the class prompts."""


@register_method
class Finetune(Method):
    name = "finetune"
    config_class = FinetuneConfig
    default_epochs = 5
    default_lr = 1e-3
    summary = builtin_summary("finetune")

    config: FinetuneConfig

    def __init__(self, backbone: Backbone, config: FinetuneConfig) -> None:
        super().__init__(backbone, config)
        self.lora = ImageLoRA(self.clip.visual, config.lora())
        self.prompts = ClassPrompts(backbone, config.context_tokens, config.context_init)

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.lora.ensure(SHARED_ADAPTER)
        self.lora.load(SHARED_ADAPTER, tensors)
        self.prompts.add(task, tensors)

    def begin_task(self, task: TaskInfo) -> None:
        self.lora.ensure(SHARED_ADAPTER)
        self.prompts.add(task)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.lora.parameters_of(SHARED_ADAPTER), self.prompts.context(self.tasks[-1])]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        current = self.tasks[-1]
        logits = self.backbone.logit_scale() * self.backbone.encode_images(images) @ self.prompts.encode(current).T
        return F.cross_entropy(logits, labels - current.offset)

    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.prompts.freeze(task)

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.lora.state(SHARED_ADAPTER), **self.prompts.tensors(self.tasks[-1])}

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        return clip_probabilities(self.backbone, images, self.prompts.features(self.tasks))
