"""``dma``: dual-modality adaptation (Chen et al., Neural Networks 2025); ../shared/METHODS.md §1.

Each task gets its own LoRA on the image encoder's attention projections (a named peft adapter, frozen once the task
ends) and one learnable context per class, fed through the frozen text encoder (CoOp with class-specific context).
Training is cross-entropy over every class seen so far: earlier classes enter through their frozen prompts, whose
text features are computed once when the task begins, so only the current task's LoRA and prompts get gradients.

Inference is task-aware: the image is encoded once per task with that task's LoRA, the softmax over all classes is
taken, and each task contributes the probabilities of its own classes, weighted by how well the image matches the
task on frozen features (softmax over tasks, at CLIP's logit scale, of the best cosine to the task's class means).
``route=K`` keeps, for each image, only the K tasks that match best and runs only their LoRAs (K passes instead of
one per task); with K equal to the number of tasks it is the exhaustive computation itself.

Why the weighting (a change from METHODS.md's plain "highest probability across tasks"): a task's LoRA only ever
sees its own images, so it learns to pull *any* image toward its classes, and the newest task wins the vote on old
images. On split-imagenette tasks 1-2 with MiniCLIP-B, accuracy over both tasks was 54.4% with the plain rule and
63.2% with the weighting (task 1 alone: 31.1% before); every task's LoRA still runs (exhaustive inference).

The context is initialised from the embedding of ``context_init`` ("a photo of a") in its last positions; positions
beyond the phrase's length start as N(0, 0.02) (CoOp's random initialisation). With ``context_tokens`` equal to the
phrase's length the initial prompts reproduce zero-shot CLIP exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from .base import Method, Prediction, TaskInfo, image_class_means, register_method
from .components import ClassPrompts, ImageLoRA, LoraPromptConfig

LORA_PREFIX = "lora."
CONTEXT_KEY = "prompt.context"
CLASS_MEANS_KEY = "router.class_means"


class DMAConfig(LoraPromptConfig):
    """dma's options: each task's LoRA and its classes' prompts."""


@register_method
class DMA(Method):
    name = "dma"
    config_class = DMAConfig
    default_epochs = 5
    default_lr = 1e-3
    summary = "LoRA per task on the image encoder + class-specific prompts; task-aware inference (default)"
    routes_tasks = True

    config: DMAConfig

    def __init__(self, backbone: Backbone, config: DMAConfig) -> None:
        super().__init__(backbone, config)
        self.lora = ImageLoRA(self.clip.visual, config.lora())
        self.prompts = ClassPrompts(backbone, config.context_tokens, config.context_init)

    @staticmethod
    def adapter_name(task: TaskInfo) -> str:
        return f"task-{task.index}"

    def _class_means(self, task: TaskInfo) -> torch.Tensor:
        return getattr(self, f"class_means_{task.index}")

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.tasks.append(task)
        self.lora.add(self.adapter_name(task))
        self.lora.load(self.adapter_name(task),
                       {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)})
        self.register_buffer(f"class_means_{task.index}", tensors[CLASS_MEANS_KEY].to(self.device), persistent=False)
        self.prompts.add(task, tensors[CONTEXT_KEY])

    def begin_task(self, task: TaskInfo) -> None:
        self.tasks.append(task)
        self.lora.add(self.adapter_name(task))
        self.prompts.add(task)

    def trainable_parameters(self) -> list[nn.Parameter]:
        current = self.tasks[-1]
        return [*self.lora.parameters_of(self.adapter_name(current)), self.prompts.context(current)]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        current = self.tasks[-1]
        image_features = self.backbone.encode_images(images)
        text_features = torch.cat([*map(self.prompts.cached, self.tasks[:-1]), self.prompts.encode(current)])
        logits = self.backbone.logit_scale() * image_features @ text_features.T
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.prompts.freeze(task)
        with self.lora.disabled():  # the router's statistics are of frozen features
            means = image_class_means(self, task, batches)
        self.register_buffer(f"class_means_{task.index}", means, persistent=False)

    def task_tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        lora = self.lora.state(self.adapter_name(task))
        return {
            **{LORA_PREFIX + k: v for k, v in lora.items()},
            CONTEXT_KEY: self.prompts.context(task).detach(),
            CLASS_MEANS_KEY: self._class_means(task),
        }

    # --- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def task_weights(self, images: torch.Tensor) -> torch.Tensor:
        """``[batch, tasks]``: softmax over tasks of the best frozen-feature cosine to a task's class means."""
        with self.lora.disabled():
            frozen = self.backbone.encode_images(images).float()
        best = torch.stack([(frozen @ self._class_means(t).T).max(dim=1).values for t in self.tasks], dim=1)
        return (self.backbone.logit_scale().float() * best).softmax(dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, route: int | None = None) -> Prediction:
        """Each selected task's LoRA scores its own classes, weighted by the task's match (see the module doc)."""
        weights = self.task_weights(images)
        k = len(self.tasks) if route is None else min(route, len(self.tasks))
        selected = torch.zeros_like(weights, dtype=torch.bool).scatter_(1, weights.topk(k, dim=1).indices, True)
        text_features = self.prompts.features(self.tasks)
        scale = self.backbone.logit_scale()
        combined = torch.zeros(images.shape[0], len(text_features), device=weights.device)
        try:
            for i, task in enumerate(self.tasks):
                rows = selected[:, i].nonzero().squeeze(1)
                if rows.numel() == 0:
                    continue
                self.lora.activate(self.adapter_name(task))
                image_features = self.backbone.encode_images(images[rows])
                probs = (scale * image_features @ text_features.T).float().softmax(dim=-1)
                combined[rows, task.class_slice] = weights[rows, i : i + 1] * probs[:, task.class_slice]
        finally:
            self.lora.activate(self.adapter_name(self.tasks[-1]))
        return Prediction(combined / combined.sum(dim=1, keepdim=True), task_scores=weights)

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images).probs
