"""``tppt-v`` and ``tppt-vt``: textual prototypes guiding visual prompt tuning (Lu et al., TMLR 2025);
docs/methods.md says where this departs from the paper.

One set of deep visual prompts (VPT-deep: ``prompt_tokens`` learnable tokens entering every block of the image
encoder, :mod:`clipcl.methods.visual_prompts`) is tuned across all tasks, guided by the classes' text
embeddings as anchors. The loss is bidirectional: cross-entropy of each image against the anchors of every class
seen so far, plus ``contrastive_weight`` times a text-to-image supervised contrastive term (each anchor of a class in
the batch pulls that class's images against the batch's other images).

``tppt-v`` keeps the anchors fixed: the frozen text encoder's embedding of ``template``. ``tppt-vt`` also learns a
context shared by all classes (starting from "a photo of a", so the first anchors equal tppt-v's) and adds the
relational diversity regulariser: ``diversity_weight`` times the mean over class pairs of
``max(0, cos(t_i, t_j) - cos(t0_i, t0_j))^2``, so no two anchors grow closer than the pre-trained space put them.

Prompt attention is gated per block by ``tanh(gate)``, gates starting at zero, so before training the model
computes exactly what the frozen CLIP computes (``attention=joint``: standard VPT-deep instead).

What holds old classes in place while the one prompt set keeps learning (issue 16, BENCHMARKS.md):

* ``kd_weight``: distillation of the old classes' logits from the prompts (and text) as they stood before the task;
* ``later_lr``: the learning rate of every task after the first, as a share of the first task's;
* ``classifier=hybrid``: prototypes from both modalities. Each task keeps its classes' mean prompted image features
  and its within-class scatter (:class:`~clipcl.methods.components.PooledGaussian`, as ``lda`` keeps frozen ones);
  an image's class scores are ``text_weight`` times the log-softmax over the text anchors plus ``1 - text_weight``
  times the log-softmax of the Gaussian (shared-covariance) scores over the visual prototypes. ``text_weight=1`` is
  the anchor classifier alone;
* tppt-vt's ``diversity=absolute``: the diversity term caps every pair's cosine at ``diversity_cap``; relative to
  the start (the default) it never fires when the anchors start nearly parallel.

Inference is one pass. Each task stores the prompts as they stood after it (and its classes' statistics), and
``task_metadata`` records how far the task moved them, so ``clipcl tasks`` shows what each task changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..errors import ClipclError
from .base import (
    CrossEntropyClassesConfig,
    HybridClassifierConfig,
    Method,
    MethodConfig,
    PromptContextConfig,
    TaskInfo,
    TemplateConfig,
    encode_task_images,
    hybrid_probabilities,
    register_method,
)
from .catalog import builtin_summary
from .components import PooledGaussian, SharedPrompt, TextAnchors
from .losses import cross_entropy_over, distillation, text_to_image_contrastive
from .visual_prompts import ATTENTIONS, GATES_KEY, TOKENS_KEY, DeepVisualPrompts

STATS_PREFIX = "hybrid."
DIVERSITY_KINDS = ("relative", "absolute")


@dataclass
class TPPTConfig(TemplateConfig, CrossEntropyClassesConfig, HybridClassifierConfig):
    """tppt-v's options: the visual prompts, the anchors' template, and the weight of the text-to-image term."""

    # workspaces made before an option train and answer as they did then
    stored_defaults: ClassVar[dict[str, Any]] = {"ce_classes": "seen", "kd_weight": 0.0, "later_lr": 1.0,
                                                 "attention": "gated", "classifier": "text"}

    prompt_tokens: int = field(default=8, metadata={"help": "visual prompt tokens per image-encoder block"})
    contrastive_weight: float = field(default=0.5, metadata={"help": "weight of the text-to-image contrastive term"})
    kd_weight: float = field(default=1.0, metadata={
        "help": "weight of the distillation of old classes' logits from the prompts as they stood before the task"})
    kd_temperature: float = field(default=2.0, metadata={"help": "temperature of that distillation"})
    later_lr: float = field(default=0.01, metadata={
        "help": "learning rate of every task after the first, as a share of the first task's"})
    attention: str = field(default="gated", metadata={
        "help": "how the image tower attends to the prompts: 'gated' (zero-initialised gate per block, starts as "
                "the frozen model) or 'joint' (standard VPT-deep, one softmax)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.prompt_tokens <= 64 or self.contrastive_weight < 0:
            raise ClipclError("needs 1 <= prompt_tokens <= 64 and contrastive_weight >= 0")
        if self.kd_weight < 0 or self.kd_temperature <= 0:
            raise ClipclError("needs kd_weight >= 0 and kd_temperature > 0")
        if not 0 < self.later_lr <= 1:
            raise ClipclError(f"later_lr must be in (0, 1], got {self.later_lr}")
        if self.attention not in ATTENTIONS:
            raise ClipclError(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")


@dataclass
class TPPTVTConfig(TPPTConfig, PromptContextConfig):
    """tppt-vt's options: tppt-v's, the shared text context, and the diversity regulariser."""

    stored_defaults: ClassVar[dict[str, Any]] = {**TPPTConfig.stored_defaults, "diversity": "relative"}

    context_tokens: int = field(default=4, metadata={"help": "learnable text context tokens shared by all classes"})
    diversity_weight: float = field(default=1.0, metadata={"help": "weight of the relational diversity term"})
    diversity: str = field(default="relative", metadata={
        "help": "'relative': no pair of anchors may grow closer than the pre-trained space put them; 'absolute': "
                "no pair above cosine diversity_cap"})
    diversity_cap: float = field(default=0.8, metadata={"help": "diversity=absolute: the highest pair cosine"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.diversity_weight < 0:
            raise ClipclError("needs diversity_weight >= 0")
        if self.diversity not in DIVERSITY_KINDS:
            raise ClipclError(f"diversity must be one of {', '.join(DIVERSITY_KINDS)}, got {self.diversity!r}")
        if not -1 <= self.diversity_cap <= 1:
            raise ClipclError(f"diversity_cap must be a cosine between -1 and 1, got {self.diversity_cap}")


def relational_diversity(anchors: torch.Tensor, initial: torch.Tensor | None, cap: float = 1.0) -> torch.Tensor:
    """Mean over class pairs of ``max(0, cos(t_i, t_j) - cos(t0_i, t0_j))^2``: zero while no two anchors are
    closer than they were in the pre-trained space. With ``initial`` None, of ``max(0, cos(t_i, t_j) - cap)^2``
    instead: an absolute cap, which also pushes apart anchors that started nearly parallel."""
    n = len(anchors)
    if n < 2:
        return anchors.new_zeros(())
    now = F.normalize(anchors.float(), dim=-1)
    pairs = torch.triu_indices(n, n, offset=1, device=anchors.device)
    if initial is None:
        limit = torch.full((n, n), cap, device=anchors.device)
    else:
        before = F.normalize(initial.float(), dim=-1)
        limit = before @ before.T
    closer = (now @ now.T - limit)[pairs[0], pairs[1]]
    return F.relu(closer).pow(2).mean()


@register_method
class TPPTV(Method):
    name = "tppt-v"
    config_class = TPPTConfig
    inference_options = ("classifier", "text_weight")
    default_epochs = 2  # with later_lr=0.01, 2 epochs matched 5 on validation at 2.5x less time (BENCHMARKS)
    default_lr = 1e-2  # the prompts' gates start at zero; at 1e-3 task 1 reached 74.9% instead of 83.0% (BENCHMARKS)
    summary = builtin_summary("tppt-v")

    config: TPPTConfig

    @classmethod
    def default_training(cls, config: MethodConfig) -> tuple[int, float]:
        """Every task at the full rate (``later_lr=1``, as every workspace made before the option trains) keeps the
        5 epochs a task of that recipe."""
        full_rate = isinstance(config, TPPTConfig) and config.later_lr == 1.0
        return (5 if full_rate else cls.default_epochs), cls.default_lr

    def __init__(self, backbone: Backbone, config: TPPTConfig) -> None:
        super().__init__(backbone, config)
        self.visual_prompts = DeepVisualPrompts(backbone, config.prompt_tokens, config.attention)
        self.start: dict[str, torch.Tensor] = {}  # the prompts before the current task, to measure its change
        self.anchors = TextAnchors(backbone, config.template)
        self.prototypes = PooledGaussian(STATS_PREFIX, None)  # each class's prompted image features, per task
        self.previous_text: torch.Tensor | None = None  # the old classes' text before the task (distillation)

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        self.anchors.add(task)
        self.visual_prompts.load(tensors)
        if self.prototypes.keys[0] in tensors and self.prototypes.n_tasks == task.index - 1:
            self.prototypes.add(task, tensors, self.device)

    def begin_task(self, task: TaskInfo) -> None:
        self.anchors.add(task)
        self.start = self.visual_prompts.tensors()
        self.previous_text = None
        if task.offset and self.config.kd_weight:
            with torch.no_grad():
                self.previous_text = self.class_text()[: task.offset].detach()

    def learning_rate_scale(self) -> float:
        return 1.0 if len(self.tasks) <= 1 else self.config.later_lr

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.visual_prompts.trainable()

    def class_text(self) -> torch.Tensor:
        """The text side of every class seen so far (fixed anchors here; learned prompts in tppt-vt)."""
        return self.anchors.of(self.tasks)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        scale = self.backbone.logit_scale()
        image_features = self.backbone.encode_images(images)
        text = self.class_text()
        classes = self.tasks[-1].class_slice if self.config.ce_classes == "current" else None
        loss = cross_entropy_over(scale * image_features @ text.T, labels, classes)
        loss = loss + self.config.contrastive_weight * text_to_image_contrastive(image_features, text, labels, scale)
        if self.previous_text is not None:
            loss = loss + self.config.kd_weight * self.old_class_distillation(images, image_features, text)
        return loss + self.regulariser(text)

    def old_class_distillation(self, images: torch.Tensor, image_features: torch.Tensor,
                               text: torch.Tensor) -> torch.Tensor:
        """Distillation of the old classes' logits (``image_features`` against ``text``) from those of the prompts
        and text as they stood before the task: zero while neither has moved."""
        assert self.previous_text is not None
        scale = self.backbone.logit_scale()
        with torch.no_grad(), self.visual_prompts.using(self.start):
            old_logits = scale * self.backbone.encode_images(images) @ self.previous_text.T
        new_logits = scale * image_features @ text[: len(self.previous_text)].T
        return distillation(new_logits, old_logits, self.config.kd_temperature)

    def regulariser(self, text: torch.Tensor) -> torch.Tensor | float:
        """An extra loss term on the classes' text side (tppt-vt's diversity); none for tppt-v."""
        return 0.0

    @torch.no_grad()
    def end_task(self, task: TaskInfo, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the task's classes' prototypes: mean prompted image features and within-class scatter, as the
        prompts stand at the end of the task (the hybrid classifier's visual side)."""
        self.previous_text = None
        features, labels = encode_task_images(self, task, batches)
        self.prototypes.add(task, self.prototypes.statistics(features, labels, len(task.classes)), self.device)

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.visual_prompts.tensors(), **self.prototypes.tensors(self.tasks[-1])}

    def task_metadata(self, task: TaskInfo) -> dict[str, Any]:
        now = self.visual_prompts.tensors()
        if not self.start:
            return {}
        change = (now[TOKENS_KEY] - self.start[TOKENS_KEY]).norm() / self.start[TOKENS_KEY].norm().clamp_min(1e-12)
        facts = {"prompt_change": round(float(change), 4), "lr_scale": self.learning_rate_scale()}
        if self.config.attention == "gated":
            facts["mean_gate"] = round(float(torch.tanh(now[GATES_KEY]).abs().mean()), 4)
        return facts

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        uses_prototypes = self.config.classifier == "hybrid" and self.config.text_weight < 1
        if uses_prototypes and self.prototypes.n_tasks != len(self.tasks):
            raise ClipclError("classifier=hybrid needs the class prototypes each task keeps, and this workspace's "
                              "earlier tasks were stored before clipcl kept them: use classifier=text")
        return hybrid_probabilities(self.backbone, images, self.inference_text(self.class_text), self.config,
                                    self.prototypes.log_likelihoods)


@register_method
class TPPTVT(TPPTV):
    name = "tppt-vt"
    config_class = TPPTVTConfig
    summary = builtin_summary("tppt-vt")

    config: TPPTVTConfig

    def __init__(self, backbone: Backbone, config: TPPTVTConfig) -> None:
        super().__init__(backbone, config)
        self.text_prompt = SharedPrompt(backbone, config.context_tokens, config.context_init)

    def restore_task(self, task: TaskInfo, tensors: dict[str, torch.Tensor]) -> None:
        super().restore_task(task, tensors)
        self.text_prompt.add(task, tensors)

    def begin_task(self, task: TaskInfo) -> None:
        super().begin_task(task)
        self.text_prompt.add(task)
        self.start.update(self.text_prompt.tensors(task))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*super().trainable_parameters(), self.text_prompt.shared]

    def class_text(self) -> torch.Tensor:
        return self.text_prompt.encode()

    def regulariser(self, text: torch.Tensor) -> torch.Tensor | float:
        initial = self.anchors.of(self.tasks) if self.config.diversity == "relative" else None
        return self.config.diversity_weight * relational_diversity(text, initial, self.config.diversity_cap)

    def task_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().task_tensors(), **self.text_prompt.tensors(self.tasks[-1])}
