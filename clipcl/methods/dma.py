"""``dma``: dual-modality adaptation (Chen et al., Neural Networks 2025); ../shared/METHODS.md §1.

Each task gets its own LoRA on the image encoder's attention projections (a named peft adapter, frozen once the task
ends) and one learnable context per class, fed through the frozen text encoder (CoOp with class-specific context).
Training is cross-entropy over every class seen so far: earlier classes enter through their frozen prompts, whose
text features are computed once when the task begins, so only the current task's LoRA and prompts get gradients.

Inference is task-aware: the image is encoded once per task with that task's LoRA, the softmax over all classes is
taken, and each task contributes the probabilities of its own classes, weighted by the router's belief in the task
(:class:`~clipcl.methods.components.TaskRouter`, one pass of the frozen encoder). ``route=K`` keeps, for each image,
only the K tasks the router believes in most and runs only their LoRAs (K passes instead of one per task); with K
equal to the number of tasks it is the exhaustive computation itself.

Why the weighting (a change from METHODS.md's plain "highest probability across tasks"): a task's LoRA only ever
sees its own images, so it learns to pull *any* image toward its classes, and the newest task wins the vote on old
images. On split-imagenette tasks 1-2 with MiniCLIP-B, accuracy over both tasks was 54.4% with the plain rule and
63.2% with a cosine-weighted vote (task 1 alone: 31.1% before).

Why the Mahalanobis router by default (METHODS.md allows cosine or Mahalanobis): with the task known, this model
reaches 88.0% over all ten split-imagenette classes, so the router is what limits dma. Scoring each task by its best
class's Gaussian log-likelihood (class means of frozen features, one within-class covariance pooled over all tasks,
shrinkage 0.01) picks the right task for 54.8% of the test images after five tasks instead of 41.7% with the cosine
to the class means, and lifts Avg / Last from 54.16 / 35.87 to 62.02 / 48.76 (``clipcl bench``, BENCHMARKS.md).
The shrinkage is a conventional light value, not one picked on test data: 0.001 to 0.05 all give Last 47.6 to 50.2.
The Gaussian posterior is sharp (log-likelihoods of different tasks differ by tens of nats), so the vote is close to
hard routing: ``route=1`` gave 50.83% after five tasks against 48.76% exhaustive, at a third of the inference cost.
``--set router=cosine`` keeps the cosine router. Each task stores its classes' mean frozen features and its
within-class scatter (``D x D``, 256 KiB at D = 256), so the pooled covariance is exact for any set of tasks.

The context is initialised from the embedding of ``context_init`` ("a photo of a") in its last positions; positions
beyond the phrase's length start as N(0, 0.02) (CoOp's random initialisation). With ``context_tokens`` equal to the
phrase's length the initial prompts reproduce zero-shot CLIP exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import ClipclError
from .base import Method, Prediction, TaskInfo, encode_task_images, register_method
from .components import ClassPrompts, ImageLoRA, LoraPromptConfig, TaskRouter


@dataclass
class DMAConfig(LoraPromptConfig):
    """dma's options: each task's LoRA and its classes' prompts, and the router that weighs the tasks."""

    router: str = field(default="mahalanobis", metadata={"help": "task router: mahalanobis or cosine"})
    router_shrinkage: float = field(default=0.01, metadata={"help": "shrinkage of the router's pooled covariance"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router not in TaskRouter.KINDS:
            raise ClipclError(f"dma's router must be one of {', '.join(TaskRouter.KINDS)}, got {self.router!r}")
        if not 0 < self.router_shrinkage <= 1:
            raise ClipclError("dma needs 0 < router_shrinkage <= 1")


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
        self.router = TaskRouter(config.router, config.router_shrinkage)

    @staticmethod
    def adapter_name(task: TaskInfo) -> str:
        return f"task-{task.index}"

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.tasks.append(task)
        self.lora.add(self.adapter_name(task))
        self.lora.load(self.adapter_name(task), tensors)
        self.router.add(task, tensors, self.device)
        self.prompts.add(task, tensors)

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
            features, labels = encode_task_images(self, task, batches)
        self.router.add(task, TaskRouter.statistics(features, labels, len(task.classes)), self.device)

    def task_tensors(self, task: TaskInfo) -> dict[str, torch.Tensor]:
        return {**self.lora.state(self.adapter_name(task)), **self.prompts.tensors(task), **self.router.tensors(task)}

    # --- inference ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def task_weights(self, images: torch.Tensor) -> torch.Tensor:
        """``[batch, tasks]``: the router's belief in each task, from one pass of the frozen image encoder."""
        with self.lora.disabled():
            frozen = self.backbone.encode_images(images).float()
        return self.router.weights(frozen, self.backbone.logit_scale())

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
